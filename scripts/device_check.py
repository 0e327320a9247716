"""One command for a few minutes on one GPU: versions, correctness, attention kernels, the real train step, the
sampler, a profile of the train step, a sweep of batch sizes and remat policies, and diffusers + peft beside it.

    python scripts/device_check.py --out device_check.json          # one H100 / H200: at most ~8 minutes
    python scripts/device_check.py --dry --out /tmp/dry.json        # the same code at toy sizes on the CPU (CI)
    python scripts/device_check.py --only profile,train_sweep       # some sections

Needs only what a GPU host has (jax + its CUDA plugin, flax, optax, numpy) plus ml_collections and this
project; nothing but peer_torch imports torch, tensorflow, grain or tfds (the JSON lists any such module a
section loaded); peer_torch also needs diffusers and peft (carried as wheels; without them it is skipped and
says so). The JSON file is rewritten atomically after every section, so a run cut short still leaves all
that finished. Sections, each under its own time limit (one that overruns is killed and recorded as
"timeout" with what it had measured; one that raises is recorded as "error"; the next one runs):

- versions: Python, jax/jaxlib/flax/optax, devices, device kind, its dense bf16 peak (dd_jax.perf);
- correctness: a tiny Flux + LoRA forward and LoRA gradient on the device against the CPU, float32,
  errors relative to each tensor's scale;
- attention: cuDNN flash attention against the XLA attention the model runs (the "xla" kernel): error
  against a float32 reference, forward and forward+backward ms and TFLOP/s at L = 3584 and 6656
  (flux-dev's 512x512 and 512x1024 ICD sequences: 24 heads of 128, bf16);
- train_512x512, train_512x1024: the production train step (the one dd_jax.train runs: flow.make_train_step
  with the system's settings) at full flux-dev width and depth, LoRA r128, from random weights made on the
  device (abstract model -> one jitted init, no checkpoint): compile time, median step time, finite loss,
  model-FLOP MFU (dd_jax.perf's analytic count + XLA's count of the VAE encoder in the step) against the
  device's peak, peak memory from device.memory_stats() beside XLA's memory analysis;
- profile: a jax.profiler trace of 3 train steps at 512x512, summarized (dd_jax.profile_summary): device
  time per step by category (matmul, attention, convolution, fusion, copy_transpose, collective, other,
  idle) and the top 15 kernels (scripts/device_sections.py);
- sample: the production sampler (dd_jax.sampling) at 512x512: compile time, time per step, MFU;
- peer_torch: diffusers' FluxTransformer2DModel + peft LoRA at the same sizes, train step (bf16 autocast,
  float32 LoRA, AdamW) and sampler step times, SDPA with cuDNN (else flash) attention (scripts/peer_torch.py);
- quantized: int8 frozen weights (qwix) for the 512x512 sampler and QLoRA train step, fp8 for the sampler:
  compile and step times, weight bytes, peak memory (dd_jax.aot.time_quantized_steps);
- train_sweep: the train step at batch 1, 2, 4 under several remat policies, at 512x512 and 1024x1024 ICD,
  rows named `<shape>_b<batch>_<remat>`, the most telling first while its time lasts, each row under its
  own limit (scripts/device_sections.py: PLAN; the rows it skips are listed with why).

The summary (the JSON's end and stdout) has a line per train row: step time, time per example, MFU, peak
memory and the ratio of its time per example to the torch peer's (below 1: dd_jax is faster), the sampler's
ratio, and the fastest row per shape: what one run needs to choose the defaults.

Each group of sections runs in a child process (the train, profile, sample and sweep sections each in a fresh
one, so their peak memory is their own and a hung compile can be killed; peer_torch in one of its own even with
--dry); this process never touches a device. The children share a persistent compilation cache (a temporary
folder unless JAX_COMPILATION_CACHE_DIR is set), so the profile and the sweep's first row reuse
train_512x512's compile. A sweep row that overruns its limit is killed and the sweep goes on in a fresh
process with the rows it has not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

if __name__ == "__main__":  # device_sections and peer_torch import this module's helpers by name
    sys.modules.setdefault("device_check", sys.modules[__name__])

# (name, time limit in seconds, starts a fresh process), in the order they run; a limit bounds what a hung
# section costs, the budget the whole run. The six sections before profile, peer_torch and train_sweep took
# 183 s together on the last GPU run; the profile is mostly a compilation-cache hit, the peer compiles
# nothing; the sweep comes last and takes what is left of the budget (up to its limit), row by row.
SECTIONS = (
    ("versions", 30, True),
    ("correctness", 45, False),
    ("attention", 45, False),
    ("train_512x512", 120, True),
    ("profile", 70, True),
    ("sample", 110, True),
    ("peer_torch", 100, True),
    ("train_512x1024", 100, True),
    ("quantized", 150, True),
    ("train_sweep", 220, True),
)
ISOLATED = ("peer_torch",)  # a process of its own, even with --dry (it imports torch, diffusers, peft)
RESUMABLE = ("train_sweep",)  # killed at a row's limit: goes on in a fresh process with the rows left
BUDGET_S = 480
DRY_SCALE = 6  # --dry: limits x6 (the dry run checks the code, not the speed; a busy 2-core CI box is slow)
FORBIDDEN = ("torch", "tensorflow", "grain", "tensorflow_datasets", "diffusers", "transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_json(path: str, obj) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".device_check.", dir=d)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the sections (child side)


def sizes(dry: bool) -> dict:
    """Shapes of the run: flux-dev (full width and depth) or toy ones with the same structure (--dry)."""
    if dry:
        return dict(params=dict(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=64,
                                vec_in_dim=32), ae_preset="tiny", txt=8, rank=4, images={"512x512": (64, 64),
                                                                                        "512x1024": (64, 128)},
                    attention_lengths=(256, 384), heads=2, sample_steps=2, steps=2, warmup=1,
                    sweep_images={"512x512": (64, 64), "1024x1024": (96, 96)}, sweep_steps=1, profile_steps=2,
                    peer_rows=(("512x512", 1), ("1024x1024", 2)), peer_steps=1, peer_sample_steps=1)
    return dict(params={}, ae_preset="flux", txt=512, rank=128, images={"512x512": (512, 512),
                                                                         "512x1024": (512, 1024)},
                attention_lengths=(3584, 6656), heads=24, sample_steps=4, steps=5, warmup=1,
                sweep_images={"512x512": (512, 512), "1024x1024": (1024, 1024)}, sweep_steps=3, profile_steps=3,
                peer_rows=(("512x512", 1), ("512x512", 2), ("512x512", 4), ("1024x1024", 1), ("1024x1024", 2)),
                peer_steps=3, peer_sample_steps=5)


def section_versions(rec: dict, dry: bool, save) -> None:
    import platform

    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax

    from dd_jax import perf

    rec["python"] = platform.python_version()
    rec.update(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__,
               numpy=np.__version__)
    for name in ("ml_collections", "orbax.checkpoint"):
        try:
            mod = __import__(name, fromlist=["x"])
            rec[name] = getattr(mod, "__version__", "present")
        except Exception as e:  # noqa: BLE001 - a missing optional package is a fact to record
            rec[name] = f"missing ({type(e).__name__})"
    devices = jax.devices()
    d = devices[0]
    kind, peak = perf.device_peak(d)
    rec.update(backend=jax.default_backend(), device_count=len(devices), device_kind=kind, platform=d.platform,
               peak_bf16_flops=peak, peak_source="dd_jax.perf.PEAK_BF16_FLOPS" if peak else "peak unknown",
               platform_version=getattr(d.client, "platform_version", None),
               mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "(jax default 0.75)"))
    try:
        rec["environment"] = jax.print_environment_info(return_string=True)
    except Exception as e:  # noqa: BLE001
        rec["environment"] = f"unavailable: {e}"


def _rel(a, b) -> float:
    """max |a - b| over max |b|: the error relative to the tensor's scale."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def section_correctness(rec: dict, dry: bool, save) -> None:
    """Tiny Flux + LoRA, float32: forward and LoRA gradient on the default device vs the CPU."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dd_jax import lora
    from dd_jax.models import flux

    p = flux.FluxParams.from_dict({**flux.PRESETS["tiny"].to_dict(), "depth": 1, "depth_single_blocks": 1})

    def make():
        m = flux.Flux(p, rngs=nnx.Rngs(0))
        lora.apply_lora(m, 4, 4, rngs=nnx.Rngs(1))
        return m

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(0)
    weights = []
    for path, v in nnx.to_flat_state(abstract):
        shape, name = v.get_value().shape, str(path[-1])
        scale = 1.0 if name == "scale" else 0.01 if name == "bias" else (shape[-2] if len(shape) > 1 else 1) ** -0.5
        w = (1.0 + 0.1 * rng.standard_normal(shape)) if name == "scale" else scale * rng.standard_normal(shape)
        weights.append((path, w.astype(np.float32)))  # LoRA B random too, so the adapters count
    host_state = nnx.from_flat_state(weights)
    n, t = 48, 8
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    ids = np.stack(np.meshgrid(np.zeros(1), np.arange(6), np.arange(8), indexing="ij"), -1).reshape(n, 3)
    inputs = (f(2, n, p.in_channels), ids.astype(np.float32), f(2, t, p.context_in_dim), np.zeros((t, 3), np.float32),
              np.array([0.3, 0.8], np.float32), f(2, p.vec_in_dim), np.array([3.5, 3.5], np.float32))

    def run(device):
        state, args = jax.device_put((host_state, inputs), device)
        model = nnx.merge(graphdef, state)
        _, lora_p, rest = nnx.split(model, nnx.LoRAParam, ...)

        def loss(lp, rest, *a):
            out = nnx.merge(graphdef, lp, rest)(*a)
            return jnp.mean(jnp.square(out)), out

        with jax.default_matmul_precision("highest"):
            (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora_p, rest, *args)
        return np.asarray(out), [np.asarray(g) for g in jax.tree.leaves(grads)]

    dev, cpu = jax.devices()[0], jax.devices("cpu")[0]
    rec["device"] = str(dev)
    out_d, g_d = run(dev)
    out_c, g_c = run(cpu)
    rec["forward_rel_error"] = _rel(out_d, out_c)
    rec["lora_grad_rel_error_max"] = max(_rel(a, b) for a, b in zip(g_d, g_c))
    rec["lora_grad_tensors"] = len(g_c)
    rec["tolerance"] = 1e-4
    rec["pass"] = rec["forward_rel_error"] < 1e-4 and rec["lora_grad_rel_error_max"] < 1e-4


def _median_ms(fn, *args, reps: int) -> float:
    import numpy as np

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax_block(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def jax_block(x):
    import jax

    return jax.block_until_ready(x)


def section_attention(rec: dict, dry: bool, save) -> None:
    """cuDNN flash attention vs the model's XLA attention (bf16), against a float32 XLA reference."""
    import jax
    import jax.numpy as jnp

    from dd_jax.models import layers

    s = sizes(dry)
    gpu = jax.devices()[0].platform == "gpu"
    kernels = {"xla": layers.xla_attention}
    if gpu:
        kernels["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    else:  # no cuDNN here: the same measurements of jax's own XLA attention, so every line of code runs
        kernels["jax_xla"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
    rec["kernels"] = list(kernels)
    heads, dim = s["heads"], 128
    for length in s["attention_lengths"]:
        key = jax.random.split(jax.random.key(length), 3)
        q, k, v = (jax.random.normal(kk, (1, length, heads, dim), jnp.bfloat16) for kk in key)
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(layers.xla_attention)(*(x.astype(jnp.float32) for x in (q, k, v)))
        flops = 4.0 * length * length * heads * dim  # QK^T + PV
        row = {}
        for name, fn in kernels.items():
            fwd = jax.jit(fn)
            bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
            out = jax_block(fwd(q, k, v))
            jax_block(bwd(q, k, v))
            reps = 3 if dry else 10
            ms, ms_b = _median_ms(fwd, q, k, v, reps=reps), _median_ms(bwd, q, k, v, reps=reps)
            row[name] = {"rel_error_vs_f32": _rel(out, ref), "forward_ms": ms, "forward_tflops": flops / ms / 1e9,
                         "fwd_bwd_ms": ms_b, "fwd_bwd_tflops": 3 * flops / ms_b / 1e9}
        if "cudnn" in row:
            row["cudnn_speedup_fwd"] = row["xla"]["forward_ms"] / row["cudnn"]["forward_ms"]
            row["cudnn_speedup_fwd_bwd"] = row["xla"]["fwd_bwd_ms"] / row["cudnn"]["fwd_bwd_ms"]
        rec[f"L{length}"] = row
        save()


def config_for(dry: bool, height: int, width: int, remat: str):
    """The flux-dev LoRA r128 ICD training config (configs/base.py) at this size, bf16, cuDNN where there is one."""
    from dd_jax import config as config_lib

    s = sizes(dry)
    c = config_lib.base()
    c.model.preset = "flux-dev"
    c.model.params = dict(s["params"])
    c.model.param_dtype = c.model.compute_dtype = "bfloat16"
    c.model.attention = "auto"  # cuDNN on an NVIDIA GPU (bf16), XLA on the CPU
    c.model.scan_layers = True
    c.model.remat = remat
    c.lora.enabled, c.lora.rank, c.lora.alpha = True, s["rank"], float(s["rank"])
    c.autoencoder.kind, c.autoencoder.preset = "flux", s["ae_preset"]
    c.text.kind = "precomputed"
    c.data.height, c.data.width, c.data.batch_size = height, width, 1
    return c


def production_step(system):
    """The train step dd_jax.train runs (`flow.system_step`; dd_jax.train itself is not imported: its input
    pipeline needs Grain)."""
    from dd_jax import flow

    return flow.system_step(system)


def production_optimizer(system):
    """The optimizer dd_jax.train builds (`flow.system_optimizer`)."""
    from dd_jax import flow

    return flow.system_optimizer(system)


def build_on_device(config):
    """(system, optimizer) from random weights made on the device: the abstract model and optimizer
    (`nnx.eval_shape`, nothing allocated), then one jitted function makes every array. Kept cheap to
    compile (a plain per-variable init took 193 s to compile for the toy --dry model on 2 busy cores):
    one uniform draw (XLA's RngBitGenerator, "unsafe_rbg" keys) per distinct (shape, dtype), scaled per
    variable. Kernels ~ U(-1, 1) / sqrt(fan_in), LoRA B 0.01 U(-1, 1) (nonzero, so every adapter has a
    gradient), biases 0, norm scales 1, optimizer state 0 (Adam's start). Variables of one shape get
    scaled copies of the same draw: random enough for speed, memory and finiteness checks."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dd_jax import system as system_lib

    def init():
        model = system_lib.build_model(config, load_weights=False)
        return model, production_optimizer(system_lib.wrap(model, config))

    graphdef, abstract = nnx.split(nnx.eval_shape(init))
    flat = nnx.to_flat_state(abstract)
    plan = []  # (shape, dtype, how, scale) per variable
    for path, var in flat:
        a = var.get_value()
        shape, dtype, name = tuple(a.shape), jnp.dtype(a.dtype), str(path[-1])
        if path[0] == 1 or name == "bias" or not jnp.issubdtype(dtype, jnp.floating):  # path[0] 1: the optimizer
            plan.append((shape, dtype, "zeros", 0.0))
        elif name == "scale":
            plan.append((shape, dtype, "ones", 1.0))
        else:
            fan_in = int(jnp.prod(jnp.array(shape[-4:-1] if len(shape) >= 4 else shape[-2:-1] or (1,))))
            plan.append((shape, dtype, "random", 0.01 if name == "lora_b" else fan_in ** -0.5))

    def make():
        draws = {}
        out = []
        for i, (shape, dtype, how, scale) in enumerate(plan):
            if how != "random":
                out.append(jnp.full(shape, scale, dtype))
                continue
            if (shape, dtype) not in draws:
                key = jax.random.key(len(draws), impl="unsafe_rbg")
                draws[shape, dtype] = jax.random.uniform(key, shape, dtype, -1.0, 1.0)
            out.append(draws[shape, dtype] * jnp.asarray(scale * (1 + 1e-3 * i), dtype))
        return out

    for (_, var), value in zip(flat, jax.jit(make)()):
        var.set_value(value)
    model, optimizer = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return system_lib.wrap(model, config), optimizer


def memory_facts(compiled) -> dict:
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "peak_memory_in_bytes")
    return {k: int(getattr(mem, k)) for k in keys if getattr(mem, k, None) is not None}


def device_memory() -> dict:
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return {"source": "none (this backend reports no memory_stats)"}
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit", "largest_alloc_size")
    return {"source": "device.memory_stats()", **{k: int(stats[k]) for k in keys if k in stats}}


def random_batch(config, txt_len: int):
    """A production batch (shapes and dtypes of dd_jax.aot.abstract_batch) of random numbers on the device."""
    import jax
    import jax.numpy as jnp

    from dd_jax import aot

    abstract = aot.abstract_batch(config, txt_len=txt_len)
    keys = jax.random.split(jax.random.key(1), len(abstract))
    out = {}
    for k, (name, a) in zip(keys, sorted(abstract.items())):
        if jnp.issubdtype(a.dtype, jnp.integer):
            out[name] = jnp.zeros(a.shape, a.dtype)
        elif name in ("composite", "background", "foreground"):
            out[name] = jax.random.uniform(k, a.shape, a.dtype, -1.0, 1.0)
        else:
            out[name] = jax.random.normal(k, a.shape, a.dtype)
    return out


def vae_encode_flops(system, batch) -> float | None:
    """XLA's count of the VAE encoder the step runs on its images (plain convolutions: XLA sees them all)."""
    import jax
    from flax import nnx

    from dd_jax import perf

    if system.model.vae is None:
        return 0.0
    graphdef, state = nnx.split(system.model.vae)
    images = [batch[k] for k in ("composite", "foreground", "background") if k in batch]

    def enc(state, *imgs):
        vae = nnx.merge(graphdef, state)
        return [vae.encode(x) for x in imgs]

    return perf.xla_flops(jax.jit(enc).trace(state, *images).lower())


def section_train(rec: dict, dry: bool, save, size: str, remat: str) -> None:
    import gc

    import jax
    import numpy as np
    from flax import nnx

    from dd_jax import perf, system as system_lib

    s = sizes(dry)
    height, width = s["images"][size]
    config = config_for(dry, height, width, remat)
    params = system_lib.flux_params(config.model)
    rec.update(height=height, width=width, hidden_size=params.hidden_size, blocks=[params.depth,
               params.depth_single_blocks], lora_rank=config.lora.rank, remat=remat, dtype="bfloat16",
               attention=config.model.attention, txt_tokens=s["txt"])
    t0 = time.perf_counter()
    system, optimizer = build_on_device(config)
    jax_block(nnx.state(system.model))
    rec["init_s"] = time.perf_counter() - t0
    rec["memory_after_init"] = device_memory()
    save()
    batch = random_batch(config, s["txt"])
    key = jax.random.key(0)
    step = production_step(system)
    t0 = time.perf_counter()
    lowered = step.lower(system.model, optimizer, batch, key)
    rec["lower_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    rec["compile_s"] = time.perf_counter() - t0
    rec["xla_memory"] = memory_facts(compiled)
    rec["xla_flops"] = perf.xla_flops(compiled)
    save()
    h, w = system.grid(height, width)
    n_img = h * w * len(system.spec.layers)
    flops = perf.flux_step_flops(params, batch=1, img_tokens=n_img, txt_tokens=s["txt"], lora_rank=config.lora.rank,
                                 lora_targets=tuple(config.lora.targets), train=True,
                                 cond_t0=config.icd.condition_t0)
    vae = vae_encode_flops(system, batch)
    rec.update(image_tokens=n_img, model_flops_transformer=flops.total, model_flops_vae_encode=vae,
               model_flops=flops.total + (vae or 0.0))
    del lowered, compiled
    gc.collect()
    t0 = time.perf_counter()
    loss, gnorm = step(system.model, optimizer, batch, key)  # the first call compiles (jit's own cache)
    loss = float(loss)
    rec["first_call_s"] = time.perf_counter() - t0
    losses, times = [loss], []
    for i in range(s["warmup"] + s["steps"]):
        key = jax.random.fold_in(key, i)
        t0 = time.perf_counter()
        loss, gnorm = step(system.model, optimizer, batch, key)
        loss = float(loss)
        if i >= s["warmup"]:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
        rec.update(losses=losses, step_times_s=times)
        save()
    rec["grad_norm"] = float(gnorm)
    rec["loss_finite"] = bool(np.all(np.isfinite(losses)))
    rec["step_s"] = float(np.median(times))
    kind, peak = perf.device_peak()
    rec.update(device_kind=kind, peak_bf16_flops=peak, model_tflops_per_s=rec["model_flops"] / rec["step_s"] / 1e12,
               mfu=perf.mfu(rec["model_flops"], rec["step_s"], peak))
    rec["memory"] = device_memory()
    rec["pass"] = rec["loss_finite"]


# The sampler's variants, timed one after another on the same weights (each changes the model in place, so
# the order is fixed): the LoRA model as trained (adapters beside the base: the rows before 2026-12 and the
# peer's setup); folded (what decompose runs: `system.for_sampling` merges LoRA into a float base); folded
# with RoPE after the q/k norm (model.rope_in_norm=False, the order before 2026-12); folded and fp8_w8a8
# (float8 weights and activations: a float8 matmul, `dd_jax.quantize`).
SAMPLE_VARIANTS = ("lora", "merged", "merged_rope_after_norm", "merged_fp8_w8a8")  # --dry too: toy sizes


def section_sample(rec: dict, dry: bool, save, remat: str) -> None:
    """The production sampler (`sampling.sample`, `sample_steps` Euler steps, 512x512 ICD) in each of
    SAMPLE_VARIANTS: compile time, step time, MFU. The section's own figures (step_s, mfu, ...) are the first
    variant's, "lora", comparable with earlier runs and the peer; `variants` holds all, with each one's time
    relative to "lora", and `fastest` names the quickest."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dd_jax import lora, optional, perf, quantize, sampling, system as system_lib
    from dd_jax.models import flux

    s = sizes(dry)
    height, width = s["images"]["512x512"]
    config = config_for(dry, height, width, remat)
    config.model.remat = "none"  # inference keeps nothing for a backward pass
    params = system_lib.flux_params(config.model)
    t0 = time.perf_counter()
    system, _ = build_on_device(config)
    rec["init_s"] = time.perf_counter() - t0
    h, w = system.grid(height, width)
    n = h * w
    dt = jnp.bfloat16
    key = jax.random.key(2)
    cond = jax.random.normal(key, (1, n, params.in_channels), jnp.float32)
    txt = jax.random.normal(key, (1, s["txt"], params.context_in_dim), dt)
    vec = jax.random.normal(key, (1, params.vec_in_dim), dt)
    steps = s["sample_steps"]
    tr = system.model.transformer
    reading = system.output_reading()
    n_img = n * len(system.spec.layers)
    kind, peak = perf.device_peak()
    rec.update(height=height, width=width, steps=steps, image_tokens=n_img, device_kind=kind, variants={})

    def change(variant: str) -> None:
        if variant == "merged":
            lora.merge_lora(tr)
        elif variant == "merged_rope_after_norm":
            flux.set_rope_in_norm(tr, False)
        elif variant == "merged_fp8_w8a8":
            flux.set_rope_in_norm(tr, True)
            quantize.quantize_module(tr, "fp8_w8a8", quantize.FLUX_TARGETS)
        sampling.forget(tr)

    for variant in SAMPLE_VARIANTS:
        row = rec["variants"][variant] = {}
        if variant.endswith("fp8_w8a8"):
            try:
                quantize.qwix()
            except optional.MissingPackage as e:  # qwix is a carried wheel; without it this row alone is skipped
                row["skipped"] = str(e)
                save()
                continue
        try:
            change(variant)
            args = (tr, system.spec, cond, txt, vec, key, (h, w), steps, system.guidance)
            t0 = time.perf_counter()
            compiled = sampling.lower_sample(*args, **reading).compile()
            row["compile_s"] = time.perf_counter() - t0
            row["xla_memory"] = memory_facts(compiled)
            del compiled
            t0 = time.perf_counter()
            out = jax_block(sampling.sample(*args, **reading))
            row["first_call_s"] = time.perf_counter() - t0
            times = []
            for _ in range(2 if dry else 3):
                t0 = time.perf_counter()
                out = jax_block(sampling.sample(*args, **reading))
                times.append(time.perf_counter() - t0)
        except Exception as e:  # a variant that fails is recorded; the others still run
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            save()
            continue
        rank = config.lora.rank if variant == "lora" else 0  # merged: no adapter FLOPs left to count
        flops = perf.flux_step_flops(params, batch=1, img_tokens=n_img, txt_tokens=s["txt"], lora_rank=rank,
                                     lora_targets=tuple(config.lora.targets), train=False,
                                     cond_t0=config.icd.condition_t0).total
        step_s = float(np.median(times)) / steps
        row.update(model_flops_per_step=flops, step_s=step_s, model_tflops_per_s=flops / step_s / 1e12,
                   mfu=perf.mfu(flops, step_s, peak),
                   finite=bool(all(np.isfinite(np.asarray(x, np.float32)).all() for x in out.values())),
                   memory=device_memory())
        base = rec["variants"].get("lora", {}).get("step_s")
        row["time_vs_lora"] = step_s / base if base else None
        if variant == "lora":
            rec.update({k: row[k] for k in ("compile_s", "xla_memory", "first_call_s", "model_flops_per_step",
                                            "step_s", "model_tflops_per_s", "mfu", "finite", "memory")})
        save()
    timed = {k: v["step_s"] for k, v in rec["variants"].items() if "step_s" in v}
    rec["fastest"] = min(timed, key=timed.get) if timed else None
    rec["pass"] = bool(rec.get("finite")) and all(v.get("finite", False) for v in rec["variants"].values()
                                                  if "skipped" not in v)


def run_section(name: str, rec: dict, dry: bool, save, ctx) -> None:
    if name == "versions":
        section_versions(rec, dry, save)
    elif name == "correctness":
        section_correctness(rec, dry, save)
    elif name == "attention":
        section_attention(rec, dry, save)
    elif name == "train_sweep":
        import device_sections

        device_sections.section_train_sweep(rec, dry, save, ctx)
    elif name.startswith("train_"):
        section_train(rec, dry, save, name[len("train_"):], ctx.remat)
    elif name == "profile":
        import device_sections

        device_sections.section_profile(rec, dry, save, ctx)
    elif name == "sample":
        section_sample(rec, dry, save, ctx.remat)
    elif name == "quantized":
        import device_sections

        device_sections.section_quantized(rec, dry, save, ctx)
    elif name == "peer_torch":
        import peer_torch

        peer_torch.section_peer_torch(rec, dry, save, ctx)
    else:
        raise ValueError(f"unknown section {name!r}")


class Context:
    """What a section may ask of the worker: its time left and, for the sweep, a limit per row (the parent
    kills the child at `row_deadline`)."""

    def __init__(self, args, progress: dict, save):
        self.dry, self.remat, self.keep_trace = args.dry, args.remat, args.keep_trace
        self.scale = DRY_SCALE if args.dry else 1
        self.limits = json.loads(args.limits or "{}")
        self.budget_end = args.deadline or float("inf")
        self._progress, self._save = progress, save

    def seconds_left(self) -> float:
        """Until this section's limit or the run's budget, whichever comes first."""
        p = self._progress
        end = min(self.budget_end, p["started"] + self.limits.get(p["current"], float("inf")))
        return end - time.time()

    def set_row(self, row: str | None, limit_s: float | None) -> None:
        self._progress["row"] = row
        self._progress["row_deadline"] = None if row is None else time.time() + limit_s
        self._progress["row_limit_s"] = limit_s
        self._save()


def worker(args) -> int:
    """Child: runs `--sections` in order, rewriting `--progress` (atomically) as each one advances."""
    if args.dry:
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, ROOT)  # configs/ and dd_jax/ from a checkout too
    sys.path.insert(0, os.path.join(ROOT, "scripts"))  # device_sections, peer_torch
    progress = {"sections": {}, "current": None, "started": None}
    resume = read_json(args.resume) if args.resume else {}

    def save():
        write_json(args.progress, progress)

    ctx = Context(args, progress, save)
    for name in args.sections.split(","):
        rec: dict = dict(resume.get(name, {}))  # a resumed section goes on from what it had recorded
        for k in ("status", "error", "traceback", "log_tail", "limit_s"):
            rec.pop(k, None)
        progress["sections"][name] = rec
        progress["current"], progress["started"] = name, time.time()
        progress["row"] = progress["row_deadline"] = None
        save()
        t0 = time.perf_counter()
        try:
            run_section(name, rec, args.dry, save, ctx)
            rec.setdefault("status", "ok" if rec.get("pass", True) else "failed")  # or the section's own
        except Exception as e:  # noqa: BLE001 - recorded; the next section runs
            rec["status"] = "error"
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            rec["traceback"] = traceback.format_exc()[-4000:]
        rec["seconds"] = time.perf_counter() - t0 + rec.get("seconds_before_resume", 0.0)
        rec["forbidden_modules_loaded"] = sorted(m for m in FORBIDDEN if m in sys.modules)
        progress["current"] = None
        save()
    return 0


# ----------------------------------------------------------------------------- the parent


def run_all(args) -> dict:
    t_start = time.time()
    result = {"tool": "scripts/device_check.py", "dry": args.dry, "budget_s": args.budget,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:], "sections": {}}
    # --dry: one child for everything (the fresh processes are for the device's memory and hung compiles), but
    # an isolated section gets one of its own and the next section a fresh one (what it imported stays there)
    names, after_isolated = [], False
    for n, lim, fresh in SECTIONS:
        if args.only and n not in args.only:
            continue
        names.append((n, lim * args.scale, (fresh and not args.dry) or n in ISOLATED or after_isolated))
        after_isolated = n in ISOLATED
    pending = list(names)
    env = dict(os.environ)
    if args.dry:  # the CPU, compiling fast rather than well (the dry run checks the code, not the speed)
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                            " --xla_llvm_disable_expensive_passes=true").strip()
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")  # the memory plan's assumption (jax: 0.75)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cache = None
    if not env.get("JAX_COMPILATION_CACHE_DIR"):  # shared by the children: a step compiled once is a cache hit
        cache = env["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="device_check_cache.")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    result["env"] = {k: env.get(k) for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_PLATFORMS", "XLA_FLAGS",
                                             "JAX_COMPILATION_CACHE_DIR")}

    def save():
        result["elapsed_s"] = time.time() - t_start
        write_json(args.out, result)

    save()
    try:
        while pending:
            group = [pending.pop(0)]  # sections sharing one child process: up to the next fresh one
            while pending and not pending[0][2]:
                group.append(pending.pop(0))
            if args.budget - (time.time() - t_start) < 5:
                for name, _, _ in group + pending:
                    rec = result["sections"].setdefault(name, {})
                    if rec.get("status") in (None, "resuming"):
                        rec.update(status="skipped", reason="the time budget is spent")
                break
            unfinished = run_group(args, group, env, result, t_start, save)
            if unfinished:  # killed or crashed: the group's remaining sections go on in a fresh process
                pending = [(n, lim, True) if i == 0 else (n, lim, f) for i, (n, lim, f) in enumerate(unfinished)] \
                    + pending
            save()
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    result["summary"] = summary(result)
    save()
    return result


def run_group(args, group, env, result, t_start, save) -> list:
    """Runs `group`'s sections in one child; returns those it did not get to (after a kill or a crash), a
    resumable section killed at one of its rows' limits first (with the time it has left)."""
    limits = {name: limit for name, limit, _ in group}
    with tempfile.TemporaryDirectory() as tmp:
        progress_path, log_path = os.path.join(tmp, "progress.json"), os.path.join(tmp, "log.txt")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--progress", progress_path, "--sections",
               ",".join(g[0] for g in group), "--remat", args.remat, "--deadline", str(t_start + args.budget),
               "--limits", json.dumps(limits)] + (["--dry"] if args.dry else []) \
            + (["--keep-trace", args.keep_trace] if args.keep_trace else [])
        resume = {n: result["sections"][n] for n, _, _ in group
                  if result["sections"].get(n, {}).get("status") == "resuming"}
        if resume:
            write_json(os.path.join(tmp, "resume.json"), resume)
            cmd += ["--resume", os.path.join(tmp, "resume.json")]
        killed = row = None
        resumable = False
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            group_start = time.time()
            while proc.poll() is None:
                time.sleep(0.2)
                prog = read_json(progress_path) or {}
                cur, started = prog.get("current"), prog.get("started")
                now = time.time()
                over_budget = now - t_start > args.budget
                row_over = bool(prog.get("row_deadline")) and now > prog["row_deadline"]
                section_over = bool(cur and started) and now - started > limits.get(cur, 0)
                if cur and started and (section_over or over_budget or row_over):
                    killed, row = cur, prog.get("row")
                    resumable = row_over and not (section_over or over_budget)
                elif not prog and (now - group_start > limits[group[0][0]] or over_budget):
                    killed = group[0][0]  # the child never reached its first section (imports, device start)
                if killed:
                    os.killpg(proc.pid, 9)  # the child's own process group (start_new_session)
                    proc.wait()
                    break
                if prog:
                    result["sections"].update(prog.get("sections", {}))
                    save()
        prog = read_json(progress_path) or {}
        with open(log_path) as f:
            log_tail = f.read()[-3000:]
    result["sections"].update(prog.get("sections", {}))
    for i, (name, limit, _fresh) in enumerate(group):
        rec = result["sections"].setdefault(name, {})
        if name == killed:
            left = limit - (time.time() - (prog.get("started") or group_start))
            if resumable and row and name in RESUMABLE and rec.get("resumed", 0) < 3 and left > 10:
                rec.setdefault("rows", {})[row] = dict(rec.get("rows", {}).get(row, {}), status="timeout",
                                                      limit_s=prog.get("row_limit_s"), log_tail=log_tail[-1500:])
                rec.update(status="resuming", resumed=rec.get("resumed", 0) + 1,
                           seconds_before_resume=limit - left + rec.get("seconds_before_resume", 0.0))
                return [(name, left, True)] + group[i + 1:]
            rec.update(status="timeout", limit_s=limit, log_tail=log_tail)
            if row:  # the row it was in
                rec.setdefault("rows", {}).setdefault(row, {})["status"] = "timeout"
            return group[i + 1:]
        if "status" not in rec:  # the child died (a crash, not a Python exception) in or before this section
            rec.update(status="error", error=f"the worker exited with code {proc.returncode}", log_tail=log_tail)
            return group[i + 1:]
    return []


def summary(result: dict) -> dict:
    import device_sections

    s = result["sections"]
    out = {"statuses": {k: v.get("status") for k, v in s.items()},
           "device_kind": s.get("versions", {}).get("device_kind")}
    for name in ("train_512x512", "train_512x1024", "sample"):
        r = s.get(name, {})
        if "step_s" in r:
            out[name] = {k: r.get(k) for k in ("step_s", "mfu", "model_tflops_per_s", "compile_s")}
            out[name]["peak_bytes"] = r.get("memory", {}).get("peak_bytes_in_use")
    att = s.get("attention", {})
    for k, row in att.items():
        if k.startswith("L") and isinstance(row, dict):
            out[f"attention_{k}"] = {name: {m: row[name][m] for m in ("forward_ms", "fwd_bwd_ms", "rel_error_vs_f32")}
                                     for name in row if isinstance(row[name], dict)}
    out.update(device_sections.summary_rows(s))
    return out


def not_ok(result: dict) -> dict:
    """{section: status} of the sections that did not pass (a peer skipped for a missing package does not
    count: the line says which wheel to carry)."""
    return {k: v.get("status") for k, v in result["sections"].items()
            if v.get("status") != "ok" and not (v.get("status") == "skipped" and v.get("missing_package"))}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="device_check.json", help="the JSON file (rewritten after every section)")
    ap.add_argument("--dry", action="store_true", help="toy sizes on the CPU: the same code, in seconds")
    ap.add_argument("--budget", type=float, default=None, help=f"seconds for everything (default {BUDGET_S}; "
                    f"--dry: {DRY_SCALE}x, as each section's limit: toy sizes on a CPU, where compiles dominate)")
    ap.add_argument("--remat", default="proj", help="train step remat policy (flux.REMAT_POLICIES; the H100/H200 "
                                                    "memory plan's choice at both sizes: proj)")
    ap.add_argument("--only", nargs="*", help="run only these sections (names, space- or comma-separated): "
                    + ", ".join(n for n, _, _ in SECTIONS))
    ap.add_argument("--keep-trace", help="a folder to keep the profile section's perfetto_trace.json.gz in")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sections", help=argparse.SUPPRESS)
    ap.add_argument("--progress", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # the budget's end (time.time())
    ap.add_argument("--limits", help=argparse.SUPPRESS)  # JSON {section: seconds}
    ap.add_argument("--resume", help=argparse.SUPPRESS)  # JSON file {section: its record so far}
    args = ap.parse_args(argv)
    if args.only:
        args.only = [n for a in args.only for n in a.split(",") if n]
        unknown = sorted(set(args.only) - {n for n, _, _ in SECTIONS})
        if unknown:
            ap.error(f"unknown sections {unknown}; choose from {[n for n, _, _ in SECTIONS]}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.scale = DRY_SCALE if args.dry else 1
    if args.budget is None:
        args.budget = BUDGET_S * args.scale
    if args.worker:
        return worker(args)
    result = run_all(args)
    bad = not_ok(result)
    print(json.dumps(result["summary"], indent=1, default=str))
    if result["summary"].get("train_rows"):
        import device_sections

        print(device_sections.rows_table(result["summary"]["train_rows"]))
    print(f"wrote {args.out} in {result['elapsed_s']:.0f} s" + (f"; not ok: {bad}" if bad else ""))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
