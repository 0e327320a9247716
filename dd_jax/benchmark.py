"""Train-step and sampling-step benchmark of the Flux MMDiT + LoRA, optionally against diffusers + peft.

    python -m dd_jax.benchmark --against-torch --json        # the mid-size CPU comparison
    python -m dd_jax.benchmark --preset flux-dev --height 512 --width 512 --txt 512 --dtype bfloat16 \\
        --lora-rank 128 --scan --remat dots_no_batch --attention auto          # a GPU / TPU run
    python -m dd_jax.benchmark --preset flux-dev ... --compile-only   # FLOPs + XLA memory analysis, no run

The train step is the production ICD LoRA step (`flow.make_train_step`, the
`TrainStep` `dd_jax.train` runs: LoRA and AdamW state donated, the base a
read-only input): `layers` image layers of (H/16)x(W/16) tokens each (the
first is the clean condition, the others noisy targets), `txt` text tokens,
one forward + backward w.r.t. the LoRA parameters (every attention/MLP
projection of every block, rank r) + AdamW. The sampling step is the
production sampler (`sampling.sample`) for one Euler step (a forward + the
update of the targets).
Both are compiled ahead of time. FLOP/s and the peak fraction use the
analytic model FLOPs of `dd_jax.perf` (XLA's cost analysis, reported beside
them, counts a cuDNN or Pallas attention kernel as 0 FLOPs and counts remat
recomputation); peak memory comes from the device (GPU/TPU) or the process
RSS (CPU) and XLA's memory analysis. The FLOP/s reference is the device's
peak (dense bf16, `dd_jax.perf.PEAK_BF16_FLOPS` by exact device kind; an
unknown device has none) on accelerators, and on CPU the float32 GEMM rate
measured in the same run: a jitted 2048^3 matmul, timed right after
each timed train step (best of 3; the median over the steps), so that the
fraction compares the step with the machine's speed at the same moment.

`--against-torch` builds the same architecture in diffusers
(FluxTransformer2DModel) with peft LoRA (the same projections, rank and
alpha; q/k/v as separate adapters as diffusers splits them) in a child
process, runs the same shapes on the same threads, and reports our time /
PyTorch's time. The two sides take turns one step at a time (ours, then
PyTorch's, then ours...), so a machine whose speed drifts during the run
slows both alike; the child waits idle while our step runs.

`--xla-variant KEY=VALUE[,KEY=VALUE]` (repeatable) compiles our two steps
again with those XLA compiler options and times each variant in the same
turns, so a flag's effect is measured against the default in one process
(for example `--xla-variant xla_cpu_experimental_ynn_fusion_type=` for
XLA:CPU's Eigen GEMMs instead of YNNPACK).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dd_jax import hlo_stats, hostmem, perf

if TYPE_CHECKING:
    import jax
    from flax import nnx

    from dd_jax import flow, icd
    from dd_jax.models.flux import Flux, FluxParams

MID = dict(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=512, mlp_ratio=4.0,
           num_heads=4, depth=4, depth_single_blocks=8, axes_dim=(16, 56, 56), theta=10_000, qkv_bias=True,
           guidance_embed=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid", help="'mid' (hidden 512, 4+8 blocks) or a flux.PRESETS key")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3, help="ICD image layers (condition + targets)")
    ap.add_argument("--txt", type=int, default=64, help="text tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="parameter and compute dtype (float32 | bfloat16)")
    ap.add_argument("--attention", default="xla", help="xla | cudnn | splash | auto")
    ap.add_argument("--remat", default="none", help="a flux.REMAT_POLICIES name")
    ap.add_argument("--scan", action="store_true", help="scanned (stacked) block layout")
    ap.add_argument("--rope-after-norm", action="store_true",
                    help="RoPE after the q/k norm's cast (model.rope_in_norm=False), not inside its float32 pass")
    ap.add_argument("--steps", type=int, default=5, help="timed repetitions (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--against-torch", action="store_true", help="also run diffusers + peft with the same shapes")
    ap.add_argument("--compile-only", action="store_true", help="FLOPs and XLA memory analysis only, no run")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--xla-variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="also compile our steps with these XLA compiler options (e.g. "
                         "xla_cpu_experimental_ynn_fusion_type=) and time them in turn with the default; repeatable")
    ap.add_argument("--torch-serve", action="store_true", help=argparse.SUPPRESS)  # the child of --against-torch
    args = ap.parse_args(argv)
    args.xla_options = [parse_xla_options(text) for text in args.xla_variant]  # ValueError on a malformed one
    return args


def parse_xla_options(text: str) -> dict[str, Any]:
    """'k=v,k2=v2' -> compiler options; true/false become booleans and integers ints, the rest strings.
    A value may itself hold commas if it holds no '=' (a list-valued option: 'k=A,B')."""
    out: dict[str, Any] = {}
    key = None
    for part in text.split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            key = key.strip()
            if not key:
                raise ValueError(f"--xla-variant {text!r}: an option without a name")
            out[key] = value
        elif key is None:
            raise ValueError(f"--xla-variant {text!r}: expected KEY=VALUE")
        else:
            out[key] += "," + part
    for k, v in out.items():
        low = v.strip().lower()
        out[k] = True if low == "true" else False if low == "false" else int(low) if low.lstrip("-").isdigit() \
            else v.strip()
    return out


def flux_params(args: argparse.Namespace) -> FluxParams:
    from dd_jax.models import flux

    return flux.FluxParams(**MID) if args.preset == "mid" else flux.PRESETS[args.preset]


def shapes(args: argparse.Namespace) -> dict:
    n = (args.height // 16) * (args.width // 16)
    return {"batch": args.batch, "tokens_per_layer": n, "img_tokens": args.layers * n, "txt_tokens": args.txt,
            "seq": args.layers * n + args.txt}


def host_inputs(args: argparse.Namespace, params: FluxParams, seed: int = 0) -> dict:
    """The same numbers for both frameworks: noisy ICD image tokens, text, ids, t, targets."""
    s = shapes(args)
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    h, w = args.height // 16, args.width // 16
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    ids = np.concatenate([np.concatenate([np.full((h * w, 1), 0 if i in (0, 2) else 1), grid], 1)
                          for i in range(args.layers)]).astype(np.float32)  # LPEC: z and y share ids
    return dict(img=f(s["batch"], s["img_tokens"], params.in_channels), img_ids=ids,
                txt=f(s["batch"], s["txt_tokens"], params.context_in_dim), txt_ids=np.zeros((s["txt_tokens"], 3),
                                                                                          np.float32),
                t=np.full((s["batch"],), 0.5, np.float32), y=f(s["batch"], params.vec_in_dim),
                guidance=np.full((s["batch"],), 3.5, np.float32),
                target=f(s["batch"], s["img_tokens"] - s["tokens_per_layer"], params.out_channels))


def clocked(fn: Callable[[], object]) -> tuple[float, float]:
    """Runs fn once: (wall seconds, process CPU seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_flops(device: jax.Device) -> float | None:
    """Dense bf16 peak of an accelerator by its exact device kind (`dd_jax.perf`); None when unknown."""
    return perf.peak_flops(getattr(device, "device_kind", ""))


def model_flops(args: argparse.Namespace, params: FluxParams) -> dict[str, float]:
    """Analytic model FLOPs (`dd_jax.perf`) of the benchmark's train step (forward + LoRA-only backward over
    all ICD layers' tokens) and sampling step (one forward)."""
    s = shapes(args)
    count = lambda train: perf.flux_step_flops(params, batch=s["batch"], img_tokens=s["img_tokens"],
                                               txt_tokens=s["txt_tokens"], lora_rank=args.lora_rank,
                                               train=train).total
    return {"train": count(True), "sample": count(False)}


def cpu_gemm(n: int = 2048) -> Callable[[], float]:
    """() -> FLOP/s of one jitted float32 n^3 GEMM (compiled and warmed up here): this machine's GEMM rate
    as XLA reaches it, sampled when called."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, a).block_until_ready()
    mm(a, a).block_until_ready()
    return lambda: 2 * n**3 / clocked(lambda: mm(a, a).block_until_ready())[0]


# ----------------------------------------------------------------------------- ours


def build_model(args: argparse.Namespace, params: FluxParams) -> Flux:
    """Random weights made on the device in one jitted call (no host copy, no per-op compiles);
    an abstract model (shapes only) with --compile-only."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dd_jax import lora
    from dd_jax.models import flux

    dtype = jnp.dtype(args.dtype)

    def make():
        m = flux.Flux(params, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype, attention_impl=args.attention,
                      scan_layers=args.scan, remat=args.remat, rope_in_norm=not args.rope_after_norm)
        lora.apply_lora(m, args.lora_rank, args.lora_rank, rngs=nnx.Rngs(1))
        return m

    if args.compile_only:
        return nnx.eval_shape(make)
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1])())
    # B = 0 (the LoRA start) makes the first steps' adapter gradients trivially sparse; use small values
    for i, (_, layer) in enumerate(lora.lora_layers(model)):
        layer.lora_b[...] = 0.01 * jax.random.normal(jax.random.key(i), layer.lora_b.shape, layer.lora_b.dtype)
    return model


def production_inputs(args: argparse.Namespace, params: FluxParams, x: dict) -> tuple[Any, Any, Any]:
    """(spec, flow.Batch, sampler inputs) of the ICD step `dd_jax.train` runs, from the host inputs `x`: the
    image tokens split into the condition and target layers."""
    from dd_jax import flow, icd

    s = shapes(args)
    n = s["tokens_per_layer"]
    targets = ("x", "y")[: args.layers - 1]
    spec = icd.LayerSpec(targets=targets, cloned=tuple(t for t in ("y",) if t in targets))
    import jax

    def cut(a, lo, hi):  # tokens lo:hi of every example (abstract inputs with --compile-only)
        if isinstance(a, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((a.shape[0], hi - lo) + a.shape[2:], a.dtype)
        return a[:, lo:hi]

    layers = {name: cut(x["img"], i * n, (i + 1) * n) for i, name in enumerate(spec.layers)}
    batch = flow.Batch(layers=layers, txt=x["txt"], txt_ids=x["txt_ids"], y=x["y"],
                       grid=(args.height // 16, args.width // 16))
    return spec, batch, (layers[spec.condition], x["txt"], x["y"])


def production_steps(spec: icd.LayerSpec,
                     lr: float = 1e-4) -> tuple[flow.TrainStep | Callable, Callable[[nnx.Module], nnx.Optimizer]]:
    """(train step, optimizer factory): `flow.make_train_step` / `flow.make_optimizer` as `dd_jax.train` builds
    them (configs/base.py: logit-normal shifted t, guidance input 3.5, AdamW with global-norm clipping at 1)."""
    from flax import nnx

    from dd_jax import flow

    step = flow.make_train_step(spec, wrt=nnx.LoRAParam, guidance=3.5, t_sampling="logit_normal", shift=True)
    return step, lambda model: flow.make_optimizer(model, lr, wrt=nnx.LoRAParam, clip_norm=1.0)


def run_jax(args: argparse.Namespace, params: FluxParams) -> dict[str, Any]:
    """Our train step (the production `flow.TrainStep`, donated) and sampling step (the production sampler,
    one Euler step), compiled ahead of time and run as `dd_jax.train` / `dd_jax.system.decompose` run them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dd_jax import sampling

    model = build_model(args, params)
    host = host_inputs(args, params)
    dtype = jnp.dtype(args.dtype)
    x = {k: (v.astype(dtype) if k in ("img", "txt", "y") else v) for k, v in host.items()}
    if args.compile_only:
        x = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in x.items()}
    else:
        x = {k: jnp.asarray(v) for k, v in x.items()}
    spec, batch, (cond, txt, vec) = production_inputs(args, params, x)
    step, make_opt = production_steps(spec)
    opt = nnx.eval_shape(lambda: make_opt(model)) if args.compile_only else make_opt(model)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype) if args.compile_only else jax.random.key(0)
    grid = batch.grid
    sample_args = (spec, cond, txt, vec, key, grid, 1, 3.5)
    t0 = time.perf_counter()
    lowered_train = step.lower(model, opt, batch, key)
    lowered_sample = sampling.lower_sample(model, *sample_args)
    train, sample = lowered_train.compile(), lowered_sample.compile()
    compile_s = time.perf_counter() - t0
    device = jax.devices()[0]
    out: dict[str, Any] = {"compile_s": compile_s, "device": getattr(device, "device_kind", device.platform),
                           "platform": device.platform}
    flops_of = {"train": train, "sample": sample}
    if args.scan:  # XLA counts a while loop's body once: count the unscanned program (lowered only)
        flat = argparse.Namespace(**{**vars(args), "scan": False, "compile_only": True})
        fmodel = build_model(flat, params)
        fopt = nnx.eval_shape(lambda: make_opt(fmodel))
        akey = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
        flops_of = {"train": step.lower(fmodel, fopt, batch, akey),
                    "sample": sampling.lower_sample(fmodel, spec, cond, txt, vec, akey, grid, 1, 3.5)}
    out["flops_source"] = "XLA cost analysis of the " + ("unscanned program (lowered)" if args.scan
                                                         else "compiled step")
    for name, c in (("train", train), ("sample", sample)):
        cost = flops_of[name].cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out[f"{name}_flops"] = float(cost.get("flops", 0.0)) if cost else None
        out[f"{name}_hlo"] = hlo_stats.of(c)  # the optimized program: bytes accessed, top-level op counts
        mem = c.memory_analysis()
        if mem is not None:
            out[f"{name}_memory"] = {k: int(getattr(mem, k)) for k in (
                "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                "host_temp_size_in_bytes") if hasattr(mem, k)}
            peak = getattr(mem, "peak_memory_in_bytes", None)
            if peak:
                out[f"{name}_memory"]["peak_memory_in_bytes"] = int(peak)
    n_lora = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    n_base = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam))))
    out.update(lora_params=n_lora, base_params=n_base)
    if args.compile_only:
        return out

    def steps_of(train, sample):
        def one_train():
            loss, _ = step(model, opt, batch, key, executable=train)
            loss.block_until_ready()

        def one_sample():
            jax.block_until_ready(sampling.sample(model, *sample_args, executable=sample))

        return {"train": one_train, "sample": one_sample}

    out["steps"] = steps_of(train, sample)
    # the same programs compiled with other XLA options, timed in turn with the default by time_steps
    out["variants"] = [{"options": opts, "steps": steps_of(lowered_train.compile(compiler_options=opts),
                                                           lowered_sample.compile(compiler_options=opts))}
                       for opts in args.xla_options]
    return out


def jax_peak_memory(out: dict) -> None:
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    out["peak_memory_bytes"] = int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats \
        else peak_rss_bytes()
    out["peak_memory_source"] = "device" if stats and "peak_bytes_in_use" in stats else "process RSS"


# ----------------------------------------------------------------------------- PyTorch

TORCH_LORA_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                      r"add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
                      r"|.*single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)")


def torch_session(args: argparse.Namespace, params: FluxParams) -> tuple[dict[str, Any], dict]:
    """(facts, {"train": fn, "sample": fn}): the diffusers + peft model and one-step closures."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=params.in_channels, out_channels=params.out_channels, num_layers=params.depth,
        num_single_layers=params.depth_single_blocks, attention_head_dim=params.hidden_size // params.num_heads,
        num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
        pooled_projection_dim=params.vec_in_dim, guidance_embeds=params.guidance_embed,
        axes_dims_rope=tuple(params.axes_dim))
    if dtype != torch.float32:
        model = model.to(dtype)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                 target_modules=TORCH_LORA_TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    host = host_inputs(args, params)
    n_cond = shapes(args)["tokens_per_layer"]
    t = {k: torch.from_numpy(v) for k, v in host.items()}
    for k in ("img", "txt", "y"):
        t[k] = t[k].to(dtype)

    def forward():
        return model(hidden_states=t["img"], encoder_hidden_states=t["txt"], pooled_projections=t["y"],
                     timestep=t["t"], img_ids=t["img_ids"], txt_ids=t["txt_ids"],
                     guidance=t["guidance"] if params.guidance_embed else None, return_dict=False)[0]

    def train():
        model.train()
        pred = forward()[:, n_cond:].float()
        loss = torch.mean(torch.square(pred - t["target"]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sample():
        model.eval()
        with torch.inference_mode():
            v = forward()[:, n_cond:]
            img = t["img"].clone()
            img[:, n_cond:] += -0.05 * v
        return img

    out = {"threads": torch.get_num_threads(), "lora_params": sum(p.numel() for p in trainable),
           "base_params": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
    return out, {"train": train, "sample": sample}


def serve_torch(args: argparse.Namespace, params: FluxParams) -> None:
    """`--torch-serve`: builds the model, then for each stdin line "train"/"sample" runs one step and prints
    its wall and CPU seconds; "done" prints the facts (JSON) and exits. Idle between requests (a blocking read),
    so the two frameworks never run at the same time."""
    out, steps = torch_session(args, params)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "done":
            out["peak_memory_bytes"] = peak_rss_bytes()
            print(json.dumps(out), flush=True)
            return
        wall, cpu = clocked(steps[cmd])
        print(f"{wall} {cpu}", flush=True)


def argv_of(args: argparse.Namespace) -> list[str]:
    """The command line of `args` for the PyTorch child (same shapes, dtype, rank, repetitions)."""
    out = []
    for k in ("preset", "height", "width", "layers", "txt", "batch", "lora_rank", "dtype", "steps", "warmup"):
        out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return out


class TorchChild:
    """The PyTorch side in its own process (its own peak RSS, no JAX runtime beside it), stepped on request."""

    def __init__(self, argv: list[str]):
        import subprocess
        import tempfile

        self.err = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty child never blocks on it
        self.proc = subprocess.Popen([sys.executable, "-m", "dd_jax.benchmark", "--torch-serve", *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)
        self._expect("ready")

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.err.seek(0)
            raise RuntimeError(f"the PyTorch benchmark failed:\n{self.err.read()[-3000:]}")
        return line.strip()

    def _expect(self, word: str) -> None:
        while self._line() != word:  # skips anything the libraries print first
            pass

    def step(self, name: str) -> tuple[float, float]:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        wall, cpu = self._line().split()
        return float(wall), float(cpu)

    def finish(self) -> dict[str, Any]:
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        out = json.loads(self._line())
        self.proc.wait()
        self.err.close()
        return out


GEMM_SAMPLES = 3  # GEMMs timed after each train step (best kept)


def time_steps(ours: dict, args: argparse.Namespace, child: TorchChild | None = None,
               gemm: Callable[[], float] | None = None) -> dict[str, Any] | None:
    """Times our train and sampling steps, and with `child` PyTorch's, alternating one step each (ours,
    theirs, ours, ...) so that a machine whose speed drifts during the run slows both sides alike.
    Medians of `args.steps` steps after `args.warmup`. Each --xla-variant's steps take their turn too
    (after ours), and get their time as a ratio to ours compiled with the default options. With `gemm`
    (see cpu_gemm), the machine's GEMM rate is sampled after each train step into ours["gemm_flops"]."""
    theirs: dict[str, Any] | None = {} if child is not None else None
    variants = ours["variants"]
    for name in ("train", "sample"):
        times = {"jax": [], "torch": []}
        cpus = {"jax": [], "torch": []}
        variant_times = [[] for _ in variants]
        for i in range(args.warmup + args.steps):
            wall, cpu = clocked(ours["steps"][name])
            hostmem.trim_if_grown()  # as our programs do between steps (its cost shows in the next steps)
            if i >= args.warmup:
                times["jax"].append(wall)
                cpus["jax"].append(cpu)
            for v, vt in zip(variants, variant_times):
                wall = clocked(v["steps"][name])[0]
                if i >= args.warmup:
                    vt.append(wall)
            if gemm is not None and name == "train" and i >= args.warmup:
                ours.setdefault("gemm_flops", []).append(max(gemm() for _ in range(GEMM_SAMPLES)))
            if child is not None:
                wall, cpu = child.step(name)
                if i >= args.warmup:
                    times["torch"].append(wall)
                    cpus["torch"].append(cpu)
        for side, out in (("jax", ours), ("torch", theirs)):
            if out is None:
                continue
            out[f"{name}_step_s"], out[f"{name}_times"] = float(np.median(times[side])), times[side]
            out[f"{name}_step_cpu_s"] = float(np.median(cpus[side]))
        for v, vt in zip(variants, variant_times):
            v[f"{name}_step_s"], v[f"{name}_times"] = float(np.median(vt)), vt
            v[f"{name}_ratio_to_default"] = v[f"{name}_step_s"] / ours[f"{name}_step_s"]
    if child is not None:
        theirs.update(child.finish())
    return theirs


# ----------------------------------------------------------------------------- report


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    params = flux_params(args)
    s = shapes(args)
    result: dict[str, Any] = {"config": {**vars(args), **s, "params": params.to_dict()},
                              "jax_version": jax.__version__, "cpu_count": len(os.sched_getaffinity(0)),
                              "host_malloc_tuned": hostmem.applied()}
    ours = run_jax(args, params)
    result["jax"] = ours
    flops = model_flops(args, params)
    for name in ("train", "sample"):
        ours[f"{name}_model_flops"] = flops[name]
    if args.compile_only:
        return result
    device = jax.devices()[0]
    theirs = time_steps(ours, args, TorchChild(argv_of(args)) if args.against_torch else None,
                        gemm=cpu_gemm() if device.platform == "cpu" else None)
    result["timing"] = "alternating steps (ours, PyTorch's, ...)" if theirs is not None else "ours alone"
    result["host_malloc_trims"] = hostmem.trims()
    del ours["steps"]
    for v in ours["variants"]:
        del v["steps"]
    jax_peak_memory(ours)
    peak = device_peak_flops(device)
    if device.platform == "cpu":  # sampled beside the steps: this machine's speed drifts by tens of percent
        peak = float(np.median(ours["gemm_flops"]))
        result["peak_flops_source"] = (f"measured float32 GEMM (XLA, 2048^3): best of {GEMM_SAMPLES} after each "
                                       "timed train step, median over the steps")
    else:
        result["peak_flops_source"] = "device table (dense bf16)" if peak else "peak unknown"
    result["peak_flops"] = peak
    tokens = s["batch"] * s["seq"]
    for name in ("train", "sample"):  # model FLOPs (analytic): XLA's count misses custom-call kernels
        secs = ours[f"{name}_step_s"]
        ours[f"{name}_tokens_per_s"] = tokens / secs
        ours[f"{name}_flops_per_s"] = flops[name] / secs
        ours[f"{name}_peak_fraction"] = perf.mfu(flops[name], secs, peak)
    result["train_step_peak_fraction"] = ours["train_peak_fraction"]
    result["sample_step_peak_fraction"] = ours["sample_peak_fraction"]
    if theirs is not None:
        result["torch"] = theirs
        for name in ("train", "sample"):
            theirs[f"{name}_flops_per_s"] = flops[name] / theirs[f"{name}_step_s"]
            theirs[f"{name}_peak_fraction"] = theirs[f"{name}_flops_per_s"] / peak if peak and \
                theirs[f"{name}_flops_per_s"] else None
        result["train_step_ratio"] = ours["train_step_s"] / theirs["train_step_s"]
        result["sample_step_ratio"] = ours["sample_step_s"] / theirs["sample_step_s"]
    return result


def _gb(x):
    return f"{x / 2**30:.2f} GiB" if x else "-"


def table(r: dict) -> str:
    c, j, t = r["config"], r["jax"], r.get("torch")
    head = (f"Flux {c['preset']} (hidden {c['params']['hidden_size']}, {c['params']['depth']}+"
            f"{c['params']['depth_single_blocks']} blocks), {c['height']}x{c['width']}, ICD {c['layers']} layers "
            f"({c['img_tokens']} image + {c['txt_tokens']} text tokens), batch {c['batch']}, LoRA r{c['lora_rank']}, "
            f"{c['dtype']}, {j['device']} ({r['cpu_count']} cores)")
    if "train_step_s" not in j:
        return head + (f"\n  compile only: train {j['train_model_flops'] / 1e9:.1f} GFLOP (model; XLA "
                       f"{j['train_flops'] / 1e9:.1f}), memory {j.get('train_memory')}")
    rows = [("", "dd_jax (JAX)") + (("diffusers+peft", "ratio") if t else ())]
    for name, label in (("train", "train step"), ("sample", "sampling step")):
        row = [f"{label} [s]", f"{j[f'{name}_step_s']:.3f}"]
        if t:
            row += [f"{t[f'{name}_step_s']:.3f}", f"{j[f'{name}_step_s'] / t[f'{name}_step_s']:.2f}x"]
        rows.append(tuple(row))
        frac = lambda d: f"{d[f'{name}_peak_fraction'] * 100:.0f}%" if d.get(f"{name}_peak_fraction") else "-"
        rows.append((f"  {label} GFLOP/s (% of peak)",
                     f"{j[f'{name}_flops_per_s'] / 1e9:.1f} ({frac(j)})") +
                    ((f"{t[f'{name}_flops_per_s'] / 1e9:.1f} ({frac(t)})", "") if t else ()))
    rows.append(("tokens/s (train)", f"{j['train_tokens_per_s']:.0f}") +
                ((f"{c['batch'] * c['seq'] / t['train_step_s']:.0f}", "") if t else ()))
    label = "peak memory (process RSS)" if j.get("peak_memory_source") == "process RSS" else "peak device memory"
    rows.append((label, _gb(j["peak_memory_bytes"])) + ((_gb(t["peak_memory_bytes"]), "") if t else ()))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(x).ljust(w_) for x, w_ in zip(row, widths)) for row in rows]
    peak = r.get("peak_flops")
    xla = lambda name: f"{j[name] / 1e9:.1f} G" if j.get(name) else "-"
    foot = (f"model FLOPs per step (analytic): train {j['train_model_flops'] / 1e9:.1f} G, sample "
            f"{j['sample_model_flops'] / 1e9:.1f} G (XLA cost analysis: {xla('train_flops')}, {xla('sample_flops')}); "
            + (f"peak reference {peak / 1e9:.1f} GFLOP/s ({r['peak_flops_source']})" if peak else "peak unknown"))
    variants = [f"XLA options {v['options']}: train {v['train_step_s']:.3f} s ({v['train_ratio_to_default']:.2f}x "
                f"the default's), sample {v['sample_step_s']:.3f} s ({v['sample_ratio_to_default']:.2f}x)"
                for v in j.get("variants", ())]
    return "\n".join([head] + lines + [foot] + variants)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0:
        print("error: --steps must be at least 1 and --warmup at least 0", file=sys.stderr)
        return 2
    if (args.against_torch or args.xla_variant) and args.compile_only:
        print("error: --compile-only runs nothing to compare", file=sys.stderr)
        return 2
    if args.torch_serve:
        import types  # the mid preset without importing JAX (its runtime would count in this process's RSS)

        params = types.SimpleNamespace(**MID) if args.preset == "mid" else flux_params(args)
        serve_torch(args, params)
        return 0
    result = benchmark(args)
    print(json.dumps(result, default=str) if args.json else table(result))
    return 0


if __name__ == "__main__":
    if "--torch-serve" not in sys.argv:  # PyTorch's side runs with the allocator defaults
        hostmem.keep_freed_host_memory()  # before JAX starts its CPU client
    sys.exit(main())
