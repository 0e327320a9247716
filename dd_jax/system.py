"""The decomposition system a config describes: transformer, conditioning, autoencoder, layout.

`build(config)` assembles
- the Flux transformer: a preset or explicit `FluxParams`, from scratch or
  loaded from a converted checkpoint, with LoRA adapters when configured;
- the conditioning: `task` (a small learned text/task embedding, for models
  trained from scratch) or `precomputed` (the batch carries `txt` [B, L, C]
  and `vec` [B, P]: T5/CLIP embeddings from the text cache,
  `dd_jax.data.text_cache`; at decomposition time the task's prompt is read
  from the cache or encoded with `text.encoders`);
- real Flux weights: `model.weights` names a converted pipeline folder
  (`scripts/convert_flux.py --output`) whose transformer/, vae/ and t5/+clip/
  fill `model.checkpoint`, `autoencoder.path` and `text.encoders` when empty;
- the autoencoder: `pixel` (space-to-depth, no weights) or `flux` (a
  converted Flux VAE folder);
- the ICD layer layout (`icd.LayerSpec`) with LPEC settings;
- `model.quantize` ("int8", "fp8", "int4"; `dd_jax.quantize`): the transformer's frozen base
  stored quantized (LoRA models; read from a checkpoint quantized as it loads), and the T5 that
  encodes decomposition prompts. `build` encodes those prompts before it reads the transformer
  (`dd_jax.prompts.encode_first`), so T5 and the transformer are never on the device together.

`prepare(model, batch)` maps an input-pipeline batch (images in [-1, 1]) to
ICD tokens inside jitted code; `decompose` samples the target layers of a
batch of composites.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dd_jax import flow, icd, lora, prompts as prompts_lib, quantize as quantize_lib, sampling
from dd_jax.data import blend
from dd_jax.models import autoencoder, flux
from dd_jax.models.pixel_ae import PixelAutoencoder

if TYPE_CHECKING:
    import ml_collections
    from flax.nnx import filterlib

    from dd_jax.models.store import Shardings

# Pipeline image key of each ICD layer.
LAYER_IMAGES = {"z": "composite", "x": "foreground", "y": "background"}


class TaskConditioner(nnx.Module):
    """Learned text/task conditioning for small models: per task, L context tokens and a pooled vector.

    Same outputs as T5 + CLIP (`txt` [B, L, context_dim], `vec` [B, vec_dim]).
    """

    def __init__(self, num_tasks: int, length: int, context_dim: int, vec_dim: int, *, rngs: nnx.Rngs):
        self.tokens = nnx.Param(0.5 * jax.random.normal(rngs.params(), (num_tasks, length, context_dim)))
        self.pooled = nnx.Param(0.5 * jax.random.normal(rngs.params(), (num_tasks, vec_dim)))

    def __call__(self, task: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.tokens[...][task], self.pooled[...][task]


class Decomposer(nnx.Module):
    """Everything jitted code touches: the transformer, learned conditioning (optional), the Flux VAE (optional).

    The VAE lives here (rather than being closed over) so its weights are
    arguments of the compiled step, not constants baked into it; it is never
    trained (see `System.trainable`).
    """

    def __init__(self, transformer: flux.Flux, conditioner: TaskConditioner | None, vae: nnx.Module | None = None):
        self.transformer = transformer
        self.conditioner = conditioner
        self.vae = vae

    def conditioning(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        if self.conditioner is not None:
            return self.conditioner(jnp.asarray(batch["task"], jnp.int32))
        if "txt" not in batch or "vec" not in batch:
            raise KeyError("conditioning 'precomputed' needs `txt` and `vec` in every batch")
        return batch["txt"], batch["vec"]


@dataclasses.dataclass
class System:
    model: Decomposer
    pixel_autoencoder: PixelAutoencoder | None  # the weightless alternative to model.vae
    spec: icd.LayerSpec
    guidance: float | None
    config: ml_collections.ConfigDict
    _prompts: Any = dataclasses.field(default=None, repr=False)

    @property
    def autoencoder(self) -> nnx.Module | PixelAutoencoder:
        return self.model.vae if self.model.vae is not None else self.pixel_autoencoder

    @property
    def downsample(self) -> int:
        """Image pixels per token side (autoencoder factor x 2x2 packing)."""
        return self.autoencoder.downsample * 2

    def grid(self, height: int, width: int) -> tuple[int, int]:
        d = self.downsample
        if height % d or width % d:
            raise ValueError(f"image size {height}x{width} must be a multiple of {d}")
        return height // d, width // d

    def tokens(self, images: jax.Array, model: Decomposer | None = None) -> jax.Array:
        vae = (model or self.model).vae
        return icd.pack((vae if vae is not None else self.pixel_autoencoder).encode(images))

    def images(self, tokens: jax.Array, height: int, width: int) -> jax.Array:
        d = self.autoencoder.downsample
        return self.autoencoder.decode(icd.unpack(tokens, height // d, width // d))

    def prepare(self, model: Decomposer, batch: dict) -> tuple[flux.Flux, flow.Batch]:
        """Pipeline batch -> (transformer, ICD token batch); runs inside jit."""
        comp = batch["composite"]
        grid = self.grid(comp.shape[1], comp.shape[2])
        layers = {name: self.tokens(batch[LAYER_IMAGES[name]], model) for name in self.spec.layers}
        txt, vec = model.conditioning(batch)
        txt_ids = jnp.zeros((txt.shape[1], 3), jnp.float32)
        return model.transformer, flow.Batch(layers=layers, txt=txt, txt_ids=txt_ids, y=vec, grid=grid)

    def output_reading(self) -> dict:
        """How the network's output is read: `prediction` and `residual` (see `flow`)."""
        t = self.config.train
        return dict(prediction=t.prediction, residual=tuple(t.residual))

    def prompt_conditioning(self, task: jax.Array, prompt: str | None = None) -> tuple[jax.Array, jax.Array]:
        """txt/vec for `precomputed` models: `prompt` (default: config sample.prompt, else each task's prompt;
        those `build` encoded before the transformer, `dd_jax.prompts`)."""
        if self._prompts is None:
            self._prompts = prompts_lib.Prompts.from_config(self.config)
        prompt = prompt or self.config.sample.prompt
        tasks = np.asarray(task).reshape(-1)
        prompts = [prompt or blend.task_prompt(blend.TASKS[int(t)]) for t in tasks]
        txt, vec = self._prompts(prompts)
        return jnp.asarray(txt), jnp.asarray(vec)

    def trainable(self) -> filterlib.Filter:
        """The variable filter the optimizer updates (never the VAE, never quantized weights)."""
        if self.config.lora.enabled:
            return nnx.LoRAParam
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vae")), nnx.Not(quantize_lib.QuantizedParam))


def flux_params(model_cfg: ml_collections.ConfigDict) -> flux.FluxParams:
    base = flux.PRESETS[model_cfg.preset].to_dict() if model_cfg.preset else {}
    overrides = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(model_cfg.params).items()}
    return flux.FluxParams.from_dict({**base, **overrides})


def layer_spec(cfg: ml_collections.ConfigDict) -> icd.LayerSpec:
    return icd.LayerSpec(condition="z", targets=tuple(cfg.targets), lpec=cfg.lpec, cloned=tuple(cfg.cloned),
                         offset=cfg.offset, condition_t0=cfg.condition_t0)


def weight_paths(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(transformer checkpoint, VAE folder): the explicit fields, else model.weights' transformer/ and vae/."""
    weights = config.model.weights
    checkpoint, ae_path = config.model.checkpoint, config.autoencoder.path
    if weights:
        if not os.path.isdir(weights):
            raise FileNotFoundError(f"model.weights {weights!r}: no such folder (the --output of "
                                    "scripts/convert_flux.py)")
        needed = [("transformer", checkpoint)] + ([("vae", ae_path)] if config.autoencoder.kind == "flux" else [])
        for name, value in needed:
            if not value and not os.path.isdir(os.path.join(weights, name)):
                raise FileNotFoundError(f"model.weights {weights!r} has no {name}/ (convert it with "
                                        f"scripts/convert_flux.py --components {name})")
        checkpoint = checkpoint or os.path.join(weights, "transformer")
        ae_path = ae_path or os.path.join(weights, "vae")
    return checkpoint, ae_path


def build_model(config: ml_collections.ConfigDict, *, seed: int | None = None, load_weights: bool = True,
                shardings: Shardings | None = None) -> Decomposer:
    """The model a config describes. `load_weights=False` initialises every part randomly
    (use under `nnx.eval_shape` for abstract shapes, e.g. ahead-of-time compilation).
    `shardings` (see `flux.load`) places a converted transformer on devices as it is read."""
    mc, ac = config.model, config.autoencoder
    rngs = nnx.Rngs(config.train.seed if seed is None else seed)
    param_dtype = jnp.dtype(mc.param_dtype)
    compute = jnp.dtype(mc.compute_dtype) if mc.compute_dtype else None
    layout = dict(attention_impl=mc.attention, scan_layers=mc.scan_layers, remat=mc.remat,
                  platform=mc.platform or None, rope_in_norm=mc.rope_in_norm)  # platform "" = the current backend
    checkpoint, ae_path = weight_paths(config) if load_weights else ("", "")
    base_q = frozen_quantization(config)
    if checkpoint:
        convert = quantize_lib.loader(base_q, quantize_lib.FLUX_TARGETS) if base_q else None
        transformer = flux.load(checkpoint, param_dtype, compute_dtype=compute, shardings=shardings, convert=convert,
                                **layout)
    else:
        transformer = flux.Flux(flux_params(mc), rngs=rngs, param_dtype=param_dtype, dtype=compute, **layout)
        init = mc.init
        if init not in flux.INITS:
            raise ValueError(f"model.init {init!r}: choose from {flux.INITS}")
        if init == "adaln_zero":
            flux.adaln_zero(transformer)
    if config.lora.enabled:
        targets = tuple(config.lora.targets) + (lora.MODULATION_TARGETS if config.lora.modulation else ())
        lora.apply_lora(transformer, config.lora.rank, config.lora.alpha, targets, rngs=rngs)
    quantize_lib.quantize_module(transformer, base_q, quantize_lib.FLUX_TARGETS)  # (no-op without base_q)
    tc = config.text
    if tc.kind == "task":
        p = transformer.params
        conditioner = TaskConditioner(len(blend.TASKS) + 1, tc.length, p.context_in_dim, p.vec_in_dim, rngs=rngs)
    elif tc.kind == "precomputed":
        conditioner = None
    else:
        raise ValueError(f"text.kind {tc.kind!r}: choose 'task' or 'precomputed'")
    vae = None
    if ac.kind == "flux":  # the Flux VAE (a converted folder)
        if load_weights:
            if not ae_path:
                raise ValueError("autoencoder.kind 'flux' needs autoencoder.path (a converted vae folder) "
                                 "or model.weights (a converted pipeline folder)")
            vae = autoencoder.load(ae_path, param_dtype, compute_dtype=compute)
        else:
            vae = autoencoder.AutoEncoder(autoencoder.PRESETS[ac.preset], rngs=rngs,
                                          param_dtype=param_dtype, dtype=compute)
    elif ac.kind != "pixel":
        raise ValueError(f"autoencoder.kind {ac.kind!r}: choose 'pixel' or 'flux'")
    return Decomposer(transformer, conditioner, vae)


def wrap(model: Decomposer, config: ml_collections.ConfigDict) -> System:
    """The System around a (possibly abstract) model."""
    ac = config.autoencoder
    pixel = PixelAutoencoder(ac.factor) if ac.kind == "pixel" else None
    guidance = config.train.guidance if model.transformer.params.guidance_embed else None
    return System(model, pixel, layer_spec(config.icd), guidance, config)


def frozen_quantization(config: ml_collections.ConfigDict) -> str:
    """The quantization `build_model` gives the frozen base: model.quantize (or `quantize.requested`'s) for a
    LoRA model; "" for a model trained in full, which has no frozen base (refused for training; at
    decomposition `quantize.quantize_system` quantizes it once its weights are read)."""
    q = quantize_lib.configured(config)
    if q and not config.lora.enabled:
        if not quantize_lib.overridden():
            raise ValueError(f"model.quantize={q!r} stores the frozen base quantized under LoRA, but lora.enabled is "
                             "False (every parameter trains); enable LoRA, or quantize a model trained in full "
                             "only to decompose with it (decompose/evaluate --quantize)")
        return ""
    return q


def build(config: ml_collections.ConfigDict, *, seed: int | None = None, load_weights: bool = True,
          shardings: Shardings | None = None) -> System:
    """Builds the system from a config (see configs/base.py for the fields). With weights, T5/CLIP-conditioned
    configs first get their decomposition prompts (`dd_jax.prompts.encode_first`: encoders loaded and dropped
    before the transformer is read)."""
    if quantize_lib.overridden():  # the system's config says what it runs
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.model.quantize = quantize_lib.configured(config)
    if load_weights:
        weight_paths(config)  # a missing weights folder is named before any encoder loads
    encoded = prompts_lib.encode_first(config) if load_weights else None
    system = wrap(build_model(config, seed=seed, load_weights=load_weights, shardings=shardings), config)
    if encoded is not None:
        system._prompts = encoded
    return system


def for_sampling(system: System) -> System:
    """The system as decomposition runs it: its transformer quantized as the config (or `quantize.requested`)
    says (`quantize.quantize_system`), then, with sample.merge_lora (the default), every LoRA adapter over a
    float base folded into its kernel (`lora.merge_lora`), so each adapted projection is one matmul instead of
    three and an add. Adapters over a quantized base stay separate. Returns the system (changed in place)."""
    system = quantize_lib.quantize_system(system)
    transformer = system.model.transformer
    adapted = lora.lora_layers(transformer)
    quantized_base = any(hasattr(layer.kernel, "matmul") for _, layer in adapted)  # a QKernel has a matmul
    if system.config.sample.get("merge_lora", True) and adapted and not quantized_base:
        lora.merge_lora(transformer)
        sampling.forget(transformer)  # its structure changed
    return system


def decompose(system: System, composite: jax.Array, task: jax.Array, key: jax.Array, steps: int,
              guidance: float | None = None, extra: dict | None = None) -> dict[str, jax.Array]:
    """Samples the target layers of composites [B, H, W, 3] in [-1, 1] -> {name: images [B, H, W, 3]}."""
    h_img, w_img = composite.shape[1:3]
    grid = system.grid(h_img, w_img)
    batch = {"task": task, **(extra or {})}
    if system.model.conditioner is None and "txt" not in batch:
        batch["txt"], batch["vec"] = system.prompt_conditioning(task)
    txt, vec = system.model.conditioning(batch)
    g = guidance if guidance is not None else system.guidance
    tokens = sampling.sample(system.model.transformer, system.spec, system.tokens(composite), txt, vec, key,
                             grid, steps, g, **system.output_reading())
    return {name: system.images(t, h_img, w_img) for name, t in tokens.items()}


def count_params(module: nnx.Module, filt: filterlib.Filter = nnx.Param) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, filt))))
