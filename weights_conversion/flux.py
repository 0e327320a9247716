"""Flux transformer key maps: BFL single files and diffusers folders -> our NNX model.

Our model keeps BFL's module names, so a BFL checkpoint maps 1:1 (Linear
weights [out, in] become kernels [in, out]). Diffusers names map through
`diffusers_modules`, which also says which tensors are fused (q/k/v into
`qkv`, q/k/v/mlp-in into a single block's `linear1`) and that the final
adaLN halves are (scale, shift) in diffusers and (shift, scale) in BFL.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence

from dd_jax.models import flux as flux_model, store
from dd_jax.models.flux import FluxParams
from weights_conversion import common, plan as planlib
from weights_conversion.safetensors_reader import CheckpointError, SafetensorsReader

# Prefixes some tools add in front of BFL names (ComfyUI, some fine-tuners).
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

_DIFFUSERS_STATIC = {
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],
}
_DIFFUSERS_DOUBLE = {
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.norm.query_norm": ["attn.norm_q"],
    "img_attn.norm.key_norm": ["attn.norm_k"],
    "txt_attn.norm.query_norm": ["attn.norm_added_q"],
    "txt_attn.norm.key_norm": ["attn.norm_added_k"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
_DIFFUSERS_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
    "norm.query_norm": ["attn.norm_q"],
    "norm.key_norm": ["attn.norm_k"],
}


def diffusers_modules(module: str) -> list[str]:
    """BFL module name -> the diffusers module(s) holding its weights (fused in this order)."""
    if module in _DIFFUSERS_STATIC:
        return _DIFFUSERS_STATIC[module]
    m = re.fullmatch(r"double_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in _DIFFUSERS_DOUBLE:
        return [f"transformer_blocks.{m.group(1)}.{s}" for s in _DIFFUSERS_DOUBLE[m.group(2)]]
    m = re.fullmatch(r"single_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in _DIFFUSERS_SINGLE:
        return [f"single_transformer_blocks.{m.group(1)}.{s}" for s in _DIFFUSERS_SINGLE[m.group(2)]]
    raise KeyError(f"no diffusers name for Flux module {module!r}")


def _target_shapes(params: FluxParams) -> dict[str, tuple[int, ...]]:
    return common.flat_shapes(flux_model.abstract(params))


def _split_sizes(module: str, out: int, n_sources: int, params: FluxParams) -> list[int]:
    if module.endswith("linear1"):  # q, k, v, mlp-in
        h = params.hidden_size
        return [h, h, h, out - 3 * h]
    return [out // n_sources] * n_sources


def build_plan(params: FluxParams, layout: str, prefix: str = "") -> dict[str, planlib.Rule]:
    """`layout` is "bfl" or "diffusers"; `prefix` is prepended to every source name."""
    if layout not in ("bfl", "diffusers"):
        raise ValueError(f"unknown Flux checkpoint layout {layout!r}")
    rules: dict[str, planlib.Rule] = {}
    shapes = _target_shapes(params)
    for target, shape in shapes.items():
        module, leaf = target.rsplit(".", 1)
        if leaf == "bias":
            continue  # made together with its kernel
        if layout == "bfl":
            sources = [prefix + module]
        else:
            sources = [prefix + s for s in diffusers_modules(module)]
        if leaf == "kernel":
            rules.update(planlib.linear_rules(
                module, shape, sources,
                split=_split_sizes(module, shape[1], len(sources), params) if len(sources) > 1 else None,
                swap=(layout == "diffusers" and module == "final_layer.adaLN_modulation.1")))
        elif leaf == "scale":
            name = f"{sources[0]}.scale" if layout == "bfl" else f"{sources[0]}.weight"
            rules[target] = planlib.copy_rule(name, shape)
        else:
            raise KeyError(f"no conversion rule for parameter {target!r}")
    missing_bias = [k for k in shapes if k not in rules]
    if missing_bias:
        raise KeyError(f"parameters without a rule: {missing_bias}")
    return {k: rules[k] for k in shapes}  # the model's own order


def params_from_diffusers_config(config: dict) -> FluxParams:
    if config.get("patch_size", 1) != 1:
        raise CheckpointError(f"patch_size {config['patch_size']} is not supported (Flux uses 1)")
    heads = config.get("num_attention_heads", 24)
    head_dim = config.get("attention_head_dim", 128)
    in_channels = config.get("in_channels", 64)
    return FluxParams(
        in_channels=in_channels,
        out_channels=config.get("out_channels") or in_channels,
        vec_in_dim=config.get("pooled_projection_dim", 768),
        context_in_dim=config.get("joint_attention_dim", 4096),
        hidden_size=heads * head_dim,
        mlp_ratio=4.0,  # fixed in diffusers' Flux blocks
        num_heads=heads,
        depth=config.get("num_layers", 19),
        depth_single_blocks=config.get("num_single_layers", 38),
        axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=bool(config.get("guidance_embeds", False)),
    )


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Flux's split of the head dim over (index, row, col) RoPE axes: 128 -> (16, 56, 56)."""
    first = 2 * max(1, round(head_dim / 16))
    rest = head_dim - first
    row = rest // 2 - (rest // 2) % 2
    return first, row, rest - row


def strip_bfl_prefix(names: Iterable[str]) -> str:
    """The common tool prefix in front of BFL names, if any ("" when none)."""
    for p in BFL_PREFIXES:
        if any(n.startswith(p + "img_in.") for n in names):
            return p
    return ""


def params_from_bfl_shapes(shapes: dict[str, tuple[int, ...]], prefix: str = "",
                           axes_dim: Sequence[int] | None = None, theta: int = 10_000) -> FluxParams:
    def shape(name):
        if prefix + name not in shapes:
            raise CheckpointError(f"missing key {prefix + name!r}: not a BFL Flux checkpoint?")
        return shapes[prefix + name]

    hidden, in_channels = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    blocks = lambda kind: {int(m.group(1)) for k in shapes
                           if (m := re.match(re.escape(prefix) + kind + r"\.(\d+)\.", k))}
    double, single = blocks("double_blocks"), blocks("single_blocks")
    if double != set(range(len(double))) or single != set(range(len(single))):
        raise CheckpointError(f"block indices are not contiguous: double {sorted(double)}, single {sorted(single)}")
    if axes_dim is None:
        axes_dim = default_axes_dim(head_dim)
        if head_dim != 128:
            warnings.warn(f"head dim {head_dim}: RoPE axes_dim not stored in BFL files; using {axes_dim} "
                          "(pass --axes-dim to override)", stacklevel=2)
    return FluxParams(
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0],
        vec_in_dim=shape("vector_in.in_layer.weight")[1],
        context_in_dim=shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=shape("double_blocks.0.img_mlp.0.weight")[0] / hidden,
        num_heads=hidden // head_dim,
        depth=len(double),
        depth_single_blocks=len(single),
        axes_dim=tuple(axes_dim),
        theta=theta,
        qkv_bias=prefix + "double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed=prefix + "guidance_in.in_layer.weight" in shapes,
    )


def find_transformer(source: str) -> tuple[str, str]:
    """Resolves SRC to (path, layout): a BFL file, a diffusers transformer folder, or a pipeline folder."""
    source = os.fspath(source)
    if os.path.isfile(source):
        if not source.endswith(".safetensors"):
            raise CheckpointError(f"{source}: expected a .safetensors file")
        return source, "bfl"
    if not os.path.isdir(source):
        raise CheckpointError(f"{source}: no such file or folder")
    if os.path.isfile(os.path.join(source, "model_index.json")) or os.path.isdir(os.path.join(source, "transformer")):
        sub = os.path.join(source, "transformer")
        if not os.path.isdir(sub):
            raise CheckpointError(f"{source}: a pipeline folder without a transformer/ subfolder")
        return sub, "diffusers"
    if os.path.isfile(os.path.join(source, "config.json")):
        return source, "diffusers"
    files = [f for f in os.listdir(source) if f.endswith(".safetensors")]
    if len(files) == 1:
        return os.path.join(source, files[0]), "bfl"
    raise CheckpointError(f"{source}: neither a BFL .safetensors file nor a diffusers folder (no config.json)")


def transformer_plan(source: str, axes_dim: Sequence[int] | None = None,
                     theta: int = 10_000) -> tuple[SafetensorsReader, FluxParams, dict[str, planlib.Rule]]:
    """(reader, FluxParams, plan) for a transformer checkpoint; nothing read but headers."""
    path, layout = find_transformer(source)
    reader = SafetensorsReader.open(path)
    if layout == "bfl":
        prefix = strip_bfl_prefix(reader.keys())
        params = params_from_bfl_shapes(reader.shapes(), prefix, axes_dim, theta)
    else:
        prefix = ""
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        params = params_from_diffusers_config(config)
        if axes_dim is not None:
            params = FluxParams.from_dict({**params.to_dict(), "axes_dim": tuple(axes_dim)})
    plan = build_plan(params, layout, prefix)
    planlib.check(plan, reader)
    return reader, params, plan


def convert_transformer(source: str, output: str, dtype: str | None = None, *, overwrite: bool = False,
                        axes_dim: Sequence[int] | None = None, progress: bool = True,
                        allow_non_finite: bool = False) -> str:
    """Converts a Flux transformer checkpoint; returns OUT. `dtype=None` keeps the source's; NaN or inf values are
    refused unless `allow_non_finite` (`plan.stream`)."""
    reader, params, plan = transformer_plan(source, axes_dim=axes_dim)
    return common.write_model(reader, plan, output, model="flux", config=params.to_dict(), dtype=dtype,
                              block_fn=store.default_group, overwrite=overwrite, progress=progress,
                              allow_non_finite=allow_non_finite,
                              label=f"Flux transformer ({params.depth} double + {params.depth_single_blocks} "
                                    f"single blocks, hidden {params.hidden_size})")
