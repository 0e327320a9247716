"""LPIPS (AlexNet, v0.1): converter + NNX network against a PyTorch reference.

The reference is built here in plain torch from the published definitions
(torchvision cannot be installed beside our torch): torchvision's AlexNet (its
``features`` indices 0..12 and its classifier, so the state dict has the real
checkpoint's key names) and lpips' ``LPIPS`` forward (ScalingLayer, the five
ReLU slices, unit normalisation, ``NetLinLayer`` heads with their dropout at
index 0, spatial mean, sum). The heads are random, or the real v0.1 heads that
the ``lpips`` package ships when it is installed.
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

from flax import nnx  # noqa: E402
from optional_deps import needs  # noqa: E402
from tolerance import assert_close  # noqa: E402

from dd_jax.metrics import lpips  # noqa: E402
from dd_jax.metrics.weights import assign_flat, load_flat  # noqa: E402
from weights_conversion import lpips as conv  # noqa: E402


class AlexNet(nn.Module):
    """torchvision.models.AlexNet (published definition).

    The classifier is narrowed (64 instead of 4096 hidden units) to keep the test light;
    its key names are the real ones, and the converter ignores it.
    """

    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(256 * 6 * 6, 64), nn.ReLU(inplace=True),
            nn.Dropout(), nn.Linear(64, 64), nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )


class NetLinLayer(nn.Module):
    def __init__(self, chn_in):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, stride=1, padding=0,
                                                           bias=False))


class ReferenceLPIPS(nn.Module):
    """lpips.LPIPS(net="alex", version="0.1", lpips=True, spatial=False), eval mode."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.scaling_layer = nn.Module()
        shift = torch.tensor([-.030, -.088, -.188])[None, :, None, None]
        scale = torch.tensor([.458, .448, .450])[None, :, None, None]
        self.scaling_layer.register_buffer("shift", shift)
        self.scaling_layer.register_buffer("scale", scale)
        self.net = nn.Module()
        for k, (lo, hi) in enumerate([(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)], start=1):
            s = nn.Sequential()
            for i in range(lo, hi):
                s.add_module(str(i), features[i])
            setattr(self.net, f"slice{k}", s)
        for k, c in enumerate([64, 192, 384, 256, 256]):
            setattr(self, f"lin{k}", NetLinLayer(c))
        self.eval()

    @torch.no_grad()
    def forward(self, in0, in1, normalize=False):
        if normalize:
            in0, in1 = 2 * in0 - 1, 2 * in1 - 1
        sl = self.scaling_layer
        h0, h1 = (in0 - sl.shift) / sl.scale, (in1 - sl.shift) / sl.scale
        val = 0
        for k in range(5):
            s = getattr(self.net, f"slice{k + 1}")
            h0, h1 = s(h0), s(h1)
            f0 = h0 / (torch.sqrt(torch.sum(h0**2, dim=1, keepdim=True)) + 1e-10)
            f1 = h1 / (torch.sqrt(torch.sum(h1**2, dim=1, keepdim=True)) + 1e-10)
            val = val + getattr(self, f"lin{k}").model((f0 - f1) ** 2).mean([2, 3], keepdim=True)
        return val


def build_reference(seed=0, heads_sd=None):
    torch.manual_seed(seed)
    alex = AlexNet().eval()
    ref = ReferenceLPIPS(alex.features)
    if heads_sd is None:
        for k in range(5):
            nn.init.uniform_(getattr(ref, f"lin{k}").model[1].weight, 0.0, 0.5)
    else:
        ref.load_state_dict(heads_sd, strict=False)
    heads = {k: v for k, v in ref.state_dict().items() if k.startswith("lin")}
    return alex, ref, heads


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _pairs(seed, shape=(3, 64, 64, 3)):
    rng = np.random.default_rng(seed)
    a = rng.uniform(size=shape).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.2, size=shape), 0, 1).astype(np.float32)
    return a, b


def _build(flat):
    return assign_flat(lambda: lpips.LPIPS(rngs=nnx.Rngs(0)), flat)


@pytest.fixture(scope="module")
def ref():
    alex, reference, heads = build_reference()
    ours = _build(conv.convert_state_dicts(alex.state_dict(), heads))
    return alex, reference, heads, ours


def test_checkpoint_key_names(ref):
    alex, reference, heads, _ = ref
    sd = alex.state_dict()
    assert {f"features.{i}.weight" for i in (0, 3, 6, 8, 10)} <= sd.keys()
    assert "classifier.6.weight" in sd
    assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
    assert "net.slice5.10.weight" in reference.state_dict()


@pytest.mark.parametrize("shape", [(3, 64, 64, 3), (2, 48, 80, 3)])
def test_distance_matches_reference(ref, shape):
    _, reference, _, ours = ref
    a, b = _pairs(0, shape)
    want = reference(_nchw(a), _nchw(b), normalize=True).reshape(-1).numpy()
    got = lpips.distance(ours, a, b, batch_size=2)  # batches of 2, the last one padded
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    # The module itself takes [-1, 1] inputs.
    np.testing.assert_allclose(np.asarray(ours(2 * a - 1, 2 * b - 1)), want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(lpips.distance(ours, a, a), 0.0, atol=1e-7)


def test_whole_lpips_state_dict_converts_the_same(ref):
    alex, reference, heads, _ = ref
    a = conv.convert_state_dicts(alex.state_dict(), heads)
    b = conv.convert_state_dicts(reference.state_dict())
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    bad = dict(reference.state_dict())
    bad["scaling_layer.scale"] = torch.ones(1, 3, 1, 1)
    with pytest.raises(ValueError, match="ScalingLayer"):
        conv.convert_state_dicts(bad)
    with pytest.raises(KeyError, match="lin0"):
        conv.convert_state_dicts(alex.state_dict())


def test_cli_roundtrip(ref, tmp_path):
    alex, reference, heads, ours = ref
    torch.save(alex.state_dict(), tmp_path / "alexnet.pth")
    torch.save(heads, tmp_path / "alex_heads.pth")
    spec = importlib.util.spec_from_file_location(
        "convert_metrics_weights",
        os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_metrics_weights.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "lpips.safetensors"
    assert cli.main(["lpips", "--backbone", str(tmp_path / "alexnet.pth"),
                     "--heads", str(tmp_path / "alex_heads.pth"), "--out", str(out)]) == 0
    flat, meta = load_flat(out)
    assert meta["dd_jax_format"] == lpips.FORMAT
    assert flat["net.conv1.kernel"].shape == (11, 11, 3, 64) and flat["lin2.weight"].shape == (384,)
    loaded = lpips.load(out)
    a, b = _pairs(1)
    np.testing.assert_array_equal(lpips.distance(loaded, a, b), lpips.distance(ours, a, b))


@needs("lpips", conv.packaged_heads_path() is not None)
def test_real_packaged_heads(ref):
    alex, _, _, _ = ref
    real = conv.load_torch_file(conv.packaged_heads_path())
    assert sorted(real) == [f"lin{k}.model.1.weight" for k in range(5)]
    _, reference, heads = build_reference(0, heads_sd=real)
    ours = _build(conv.convert_state_dicts(alex.state_dict(), heads))
    np.testing.assert_array_equal(np.asarray(ours.lin3.weight[...]),
                                  real["lin3.model.1.weight"].reshape(-1).numpy())
    a, b = _pairs(2)
    want = reference(_nchw(a), _nchw(b), normalize=True).reshape(-1).numpy()
    np.testing.assert_allclose(lpips.distance(ours, a, b), want, rtol=1e-4, atol=1e-7)


@needs("lpips", conv.packaged_heads_path() is not None)
def test_reference_equals_lpips_package_code(monkeypatch):
    """Our plain-torch reference is the lpips package's own forward (run with a stand-in
    torchvision that returns our AlexNet)."""
    alex, reference, _ = build_reference(3)
    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.alexnet = lambda pretrained=False, **kw: alex
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv.models)
    saved = {k: m for k, m in sys.modules.items() if k == "lpips" or k.startswith("lpips.")}
    for k in saved:
        del sys.modules[k]
    try:
        import lpips as lpips_pkg

        model = lpips_pkg.LPIPS(net="alex", version="0.1", verbose=False).eval()
        real = {k: v for k, v in model.state_dict().items() if k.startswith("lin")}
        reference.load_state_dict(real, strict=False)
        a, b = _pairs(3, (2, 64, 64, 3))
        with torch.no_grad():
            want = model(_nchw(a), _nchw(b), normalize=True).reshape(-1).numpy()
        got = reference(_nchw(a), _nchw(b), normalize=True).reshape(-1).numpy()
        assert_close(got, want, 1e-5, "LPIPS")
    finally:
        for k in [k for k in sys.modules if k == "lpips" or k.startswith("lpips.")]:
            del sys.modules[k]
        sys.modules.update(saved)
