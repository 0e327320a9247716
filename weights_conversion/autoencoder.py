"""Flux autoencoder key maps: diffusers `AutoencoderKL` folders and BFL `ae.safetensors` -> our NNX model.

Our model keeps BFL's names, so a BFL file maps 1:1 (its attention q/k/v/
proj_out are 1x1 convs, which become Linear kernels). Diffusers names map
through `diffusers_module`: `down.N.block.M` <-> `down_blocks.N.resnets.M`,
`nin_shortcut` <-> `conv_shortcut`, `mid.block_1/attn_1/block_2` <->
`mid_block.resnets.0/attentions.0/resnets.1` (attention `norm,q,k,v,proj_out`
<-> `group_norm,to_q,to_k,to_v,to_out.0`), `norm_out` <-> `conv_norm_out`,
and the decoder's levels are reversed: `up.N` <-> `up_blocks.{n-1-N}`.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from dd_jax.models import autoencoder as ae_model
from dd_jax.models.autoencoder import AutoEncoderParams
from weights_conversion import common, plan as planlib
from weights_conversion.safetensors_reader import CheckpointError, SafetensorsReader

# Prefixes in front of BFL/LDM autoencoder names in some single files.
BFL_PREFIXES = ("first_stage_model.", "vae.", "ae.")
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}


def diffusers_module(module: str, n_levels: int) -> str:
    """Our (BFL) module name -> the diffusers module holding its weights."""
    if module in ("quant_conv", "post_quant_conv"):
        return module
    side, rest = module.split(".", 1)
    m = re.fullmatch(r"(down|up)\.(\d+)\.(block\.(\d+)\.(\w+)|downsample\.conv|upsample\.conv)", rest)
    if m:
        kind, level = m.group(1), int(m.group(2))
        blocks = "down_blocks" if kind == "down" else "up_blocks"
        if kind == "up":
            level = n_levels - 1 - level
        if m.group(4) is not None:
            return f"{side}.{blocks}.{level}.resnets.{m.group(4)}.{_RESNET[m.group(5)]}"
        return f"{side}.{blocks}.{level}.{'downsamplers' if kind == 'down' else 'upsamplers'}.0.conv"
    m = re.fullmatch(r"mid\.(block_1|block_2)\.(\w+)", rest)
    if m:
        return f"{side}.mid_block.resnets.{int(m.group(1)[-1]) - 1}.{_RESNET[m.group(2)]}"
    m = re.fullmatch(r"mid\.attn_1\.(\w+)", rest)
    if m:
        return f"{side}.mid_block.attentions.0.{_ATTN[m.group(1)]}"
    if rest in ("conv_in", "conv_out"):
        return module
    if rest == "norm_out":
        return f"{side}.conv_norm_out"
    raise KeyError(f"no diffusers name for autoencoder module {module!r}")


def _attn_1x1_kernel(ws):
    """BFL attention 1x1 conv weight [O, I, 1, 1] -> Linear kernel [I, O]."""
    return np.ascontiguousarray(ws[0][:, :, 0, 0].T)


def build_plan(params: AutoEncoderParams, layout: str, prefix: str = "") -> dict[str, planlib.Rule]:
    """`layout` is "diffusers" or "bfl"; `prefix` is prepended to every source name."""
    if layout not in ("bfl", "diffusers"):
        raise ValueError(f"unknown autoencoder checkpoint layout {layout!r}")
    n = len(params.block_out_channels)
    plan: dict[str, planlib.Rule] = {}
    for target, shape in common.flat_shapes(ae_model.abstract(params)).items():
        module, leaf = target.rsplit(".", 1)
        source = prefix + (module if layout == "bfl" else diffusers_module(module, n))
        if layout == "bfl" and leaf == "kernel" and len(shape) == 2:  # attention q/k/v/proj_out: 1x1 convs
            plan[target] = planlib.Rule((f"{source}.weight",), ((shape[1], shape[0], 1, 1),), _attn_1x1_kernel)
        else:
            plan.update(common.direct_rules(target, shape, source))
    return plan


def params_from_diffusers_config(config: dict) -> AutoEncoderParams:
    downs = config.get("down_block_types", ["DownEncoderBlock2D"])
    ups = config.get("up_block_types", ["UpDecoderBlock2D"])
    if set(downs) != {"DownEncoderBlock2D"} or set(ups) != {"UpDecoderBlock2D"} or len(downs) != len(ups):
        raise CheckpointError(f"unsupported autoencoder blocks {downs} / {ups} (expected DownEncoderBlock2D / "
                              "UpDecoderBlock2D, as many of each)")
    if config.get("act_fn", "silu") != "silu":
        raise CheckpointError(f"unsupported activation {config['act_fn']!r} (Flux's autoencoder uses silu)")
    channels = tuple(config.get("block_out_channels", (64,)))
    if len(channels) != len(downs):
        raise CheckpointError(f"{len(channels)} block_out_channels for {len(downs)} blocks")
    return AutoEncoderParams(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        block_out_channels=channels,
        layers_per_block=config.get("layers_per_block", 1),
        latent_channels=config.get("latent_channels", 4),
        norm_num_groups=config.get("norm_num_groups", 32),
        scaling_factor=config.get("scaling_factor", 0.18215),
        shift_factor=config.get("shift_factor") or 0.0,
        use_quant_conv=config.get("use_quant_conv", True),
        use_post_quant_conv=config.get("use_post_quant_conv", True),
        mid_block_add_attention=config.get("mid_block_add_attention", True),
    )


def _bfl_prefix(names) -> str:
    for p in BFL_PREFIXES:
        if any(n.startswith(p + "encoder.conv_in.") for n in names):
            return p
    return ""


def params_from_bfl_shapes(shapes: dict, prefix: str = "") -> AutoEncoderParams:
    """BFL files store no config: read the architecture off the tensor shapes (Flux's scale and shift)."""
    def shape(name):
        if prefix + name not in shapes:
            raise CheckpointError(f"missing key {prefix + name!r}: not a BFL autoencoder checkpoint?")
        return shapes[prefix + name]

    levels = sorted({int(m.group(1)) for k in shapes
                     if (m := re.match(re.escape(prefix) + r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"encoder levels are not contiguous: {levels}")
    channels = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels)
    blocks = {int(m.group(1)) for k in shapes
              if (m := re.match(re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.", k))}
    z2, c_last = shape("encoder.conv_out.weight")[:2]
    groups = 32 if all(c % 32 == 0 for c in channels) else None
    if groups is None:
        raise CheckpointError(f"channels {channels}: cannot infer GroupNorm groups (BFL uses 32)")
    return AutoEncoderParams(in_channels=shape("encoder.conv_in.weight")[1],
                             out_channels=shape("decoder.conv_out.weight")[0],
                             block_out_channels=channels, layers_per_block=len(blocks), latent_channels=z2 // 2,
                             norm_num_groups=groups, use_quant_conv=prefix + "quant_conv.weight" in shapes,
                             use_post_quant_conv=prefix + "post_quant_conv.weight" in shapes,
                             mid_block_add_attention=prefix + "encoder.mid.attn_1.q.weight" in shapes)


def find_autoencoder(source: str) -> tuple[str, str]:
    """SRC -> (path, layout): a diffusers vae/ folder, a pipeline folder holding one, or a BFL file."""
    source = os.fspath(source)
    if os.path.isfile(source):
        return source, "bfl"
    if not os.path.isdir(source):
        raise CheckpointError(f"{source}: no such file or folder")
    if os.path.isdir(os.path.join(source, "vae")):
        source = os.path.join(source, "vae")
    if os.path.isfile(os.path.join(source, "config.json")):
        return source, "diffusers"
    raise CheckpointError(f"{source}: not a diffusers autoencoder folder (no config.json)")


def block(path: str) -> str:
    """`encoder.down.1.block.0.conv1.kernel` -> `encoder.down.1`; the mid blocks are a group of their own."""
    return common.numbered_group(path, split_at=("mid",))


def autoencoder_plan(source: str) -> tuple[SafetensorsReader, AutoEncoderParams, dict[str, planlib.Rule]]:
    """(reader, AutoEncoderParams, plan) for an autoencoder checkpoint; nothing read but headers."""
    path, layout = find_autoencoder(source)
    reader = SafetensorsReader.open(path)
    if layout == "bfl":
        prefix = _bfl_prefix(reader.keys())
        params = params_from_bfl_shapes(reader.shapes(), prefix)
        ignore = [k for k in reader.keys() if not k.startswith(prefix)] if prefix else []
    else:
        prefix, ignore = "", []
        with open(os.path.join(path, "config.json")) as f:
            params = params_from_diffusers_config(json.load(f))
    plan = build_plan(params, layout, prefix)
    planlib.check(plan, reader, ignore=ignore)
    return reader, params, plan


def convert_autoencoder(source: str, output: str, dtype: str | None = None, *, overwrite: bool = False,
                        progress: bool = True, allow_non_finite: bool = False) -> str:
    """Converts an autoencoder checkpoint into a dd_jax model folder; returns its path."""
    reader, params, plan = autoencoder_plan(source)
    return common.write_model(reader, plan, output, model="autoencoder", config=params.to_dict(), dtype=dtype,
                              block_fn=block, overwrite=overwrite, progress=progress, label="autoencoder",
                              allow_non_finite=allow_non_finite)
