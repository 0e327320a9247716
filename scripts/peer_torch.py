"""The device check's torch peer: diffusers' FluxTransformer2DModel + peft LoRA at the device check's shapes.

scripts/device_check.py runs `section_peer_torch` in a process of its own (it imports torch, diffusers, peft and
transformers, which the other sections must not; it never imports JAX). Random weights, made on the device:
flux-dev's size on a GPU, the --dry toy size (device_check.sizes) on the CPU, plus a diffusers AutoencoderKL of
the Flux VAE's shape (the toy one with --dry) that encodes the three ICD images inside the train step, as
dd_jax's production step does (bf16 under autocast on a GPU; float32 on the CPU, where bf16 convolutions
are slow). LoRA rank r (alpha = r) on the projections dd_jax.lora.DEFAULT_TARGETS adapts,
by their diffusers names (dd_jax.benchmark.TORCH_LORA_TARGETS; q/k/v are separate there, so the adapters hold
more parameters than dd_jax's fused-qkv ones), float32, the base bf16, AdamW.

- train rows `<shape>_b<batch>` (the sweep's shapes): one step = VAE-encode the composite, foreground and
  background (no grad), noise the two target layers, the transformer on [clean condition, noisy targets] under
  bf16 autocast, velocity MSE on the targets, backward, AdamW. Without activation checkpointing first; a row
  that runs out of memory is retried with diffusers' gradient checkpointing (recorded), which then stays on;
- sample `512x512_b1`: one sampler step (a forward in inference mode + the Euler update of the targets).

Attention runs through torch's SDPA restricted to the cuDNN backend; where that fails (no cuDNN kernel for the
shapes, or the CPU) the flash backend, then torch's default choice: `attention_backend` records which ran.
Without diffusers or peft the section is skipped and says which wheel to carry.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import sys
import time

# dd_jax.models.flux.PRESETS["flux-dev"] in diffusers' terms (tests/test_device_check.py checks they agree)
FLUX_DEV = dict(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56), guidance_embed=True)
# dd_jax.models.autoencoder.PRESETS: the Flux VAE and the --dry toy one (16 latent channels, 8x down)
AE = {"flux": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
      "tiny": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)}
EST_S = {"512x512": 12.0, "1024x1024": 25.0}  # a GPU row's cost at batch 1 (x batch), for the time left


def missing_package() -> str | None:
    """None where torch, diffusers and peft import; else the line the section records."""
    for mod in ("torch", "diffusers", "peft"):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            if (getattr(e, "name", "") or "").split(".")[0] == mod:
                return f"skipped: {mod} not installed (carry its wheel)"
            return f"skipped: {mod} not importable ({e}; carry the wheels it needs)"
    return None


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(e).lower()


def build(s: dict, dev: str):
    """(transformer with LoRA, vae, optimizer, facts) from random weights made on `dev`."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from peft import LoraConfig

    from dd_jax.benchmark import TORCH_LORA_TARGETS

    p = {**FLUX_DEV, **s["params"]}
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in bf16 on the device: no float32 copy of 12B parameters
    try:
        with torch.device(dev):
            model = FluxTransformer2DModel(
                patch_size=1, in_channels=p["in_channels"], out_channels=p["out_channels"], num_layers=p["depth"],
                num_single_layers=p["depth_single_blocks"], attention_head_dim=p["hidden_size"] // p["num_heads"],
                num_attention_heads=p["num_heads"], joint_attention_dim=p["context_in_dim"],
                pooled_projection_dim=p["vec_in_dim"], guidance_embeds=p["guidance_embed"],
                axes_dims_rope=tuple(p["axes_dim"]))
    finally:
        torch.set_default_dtype(previous)
    with torch.device(dev):  # bf16 on a GPU; float32 on the CPU (--dry), where bf16 convolutions crawl
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, use_quant_conv=False,
                            use_post_quant_conv=False, **AE[s["ae_preset"]])
    vae = vae.to(torch.bfloat16 if dev == "cuda" else torch.float32)
    model.requires_grad_(False)
    vae.requires_grad_(False)
    model.add_adapter(LoraConfig(r=s["rank"], lora_alpha=s["rank"], init_lora_weights="gaussian",
                                 target_modules=TORCH_LORA_TARGETS))
    trainable = [q for q in model.parameters() if q.requires_grad]
    for q in trainable:
        q.data = q.data.float()  # float32 LoRA over the bf16 base (as dd_jax trains)
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    facts = {"lora_params": sum(q.numel() for q in trainable), "lora_tensors": len(trainable),
             "base_params": sum(q.numel() for q in model.parameters() if not q.requires_grad),
             "lora_dtype": str(trainable[0].dtype), "base_dtype": str(model.x_embedder.weight.dtype),
             "vae_params": sum(q.numel() for q in vae.parameters()), "vae_dtype": str(vae.dtype),
             "hidden_size": p["hidden_size"],
             "blocks": [p["depth"], p["depth_single_blocks"]], "lora_rank": s["rank"]}
    return model, vae, opt, facts


def inputs(s: dict, shape: str, batch: int, dev: str) -> dict:
    import torch

    p = {**FLUX_DEV, **s["params"]}
    height, width = s["sweep_images"][shape]
    gh, gw = height // 16, width // 16
    g = torch.Generator(dev).manual_seed(batch)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ids = torch.cat([torch.stack([torch.full_like(rows, k), rows, cols], -1).reshape(-1, 3) for k in range(3)])
    bf = torch.bfloat16
    return dict(images=torch.rand(3 * batch, 3, height, width, generator=g, device=dev, dtype=bf) * 2 - 1,
                txt=torch.randn(batch, s["txt"], p["context_in_dim"], generator=g, device=dev, dtype=bf),
                vec=torch.randn(batch, p["vec_in_dim"], generator=g, device=dev, dtype=bf),
                img_ids=ids.to(dev, torch.float32), txt_ids=torch.zeros(s["txt"], 3, device=dev),
                guidance=torch.full((batch,), 3.5, device=dev), n=gh * gw, grid=(gh, gw), batch=batch)


def pack(latents, batch: int, grid: tuple[int, int]):
    """(3 b, 16, 2 gh, 2 gw) latents -> (b, 3 gh gw, 64) tokens: the three layers of each example in a row."""
    gh, gw = grid
    x = latents.reshape(batch, 3, 16, gh, 2, gw, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(batch, 3 * gh * gw, 64)


def section_peer_torch(rec: dict, dry: bool, save, ctx) -> None:
    reason = missing_package()
    if reason:
        rec.update(status="skipped", reason=reason, missing_package=True)
        return
    import device_check as dc
    import numpy as np
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = dc.sizes(dry)
    dev = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    cuda = dev == "cuda"
    rec.update(torch=torch.__version__, device=torch.cuda.get_device_name() if cuda else "cpu",
               diffusers=importlib.import_module("diffusers").__version__,
               peft=importlib.import_module("peft").__version__, txt_tokens=s["txt"])
    t0 = time.perf_counter()
    model, vae, opt, facts = build(s, dev)
    rec.update(facts, init_s=time.perf_counter() - t0)
    save()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def forward(x, t, d):
        return model(hidden_states=x, encoder_hidden_states=d["txt"], pooled_projections=d["vec"], timestep=t,
                     img_ids=d["img_ids"], txt_ids=d["txt_ids"], guidance=d["guidance"], return_dict=False)[0]

    def train_step(d):
        b, n = d["batch"], d["n"]
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            lat = pack(vae.encode(d["images"].to(vae.dtype)).latent_dist.mode(), b, d["grid"])
        with torch.autocast(dev, dtype=torch.bfloat16):
            t = torch.rand(b, device=dev)
            x0 = lat[:, n:]
            noise = torch.randn_like(x0)
            xt = ((1 - t[:, None, None]) * x0 + t[:, None, None] * noise).to(lat.dtype)
            pred = forward(torch.cat([lat[:, :n], xt], 1), t, d)
            loss = torch.mean(torch.square(pred[:, n:].float() - (noise - x0).float()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    def sample_step(d, x):
        with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16):
            v = forward(x, torch.full((d["batch"],), 0.5, device=dev), d)
            x[:, d["n"]:] += -0.25 * v[:, d["n"]:]
        return x

    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION), ("default", None)]
    chosen: dict = {}
    errors = rec.setdefault("attention_errors", {})

    def attention():
        b = chosen.get("backend")
        return sdpa_kernel([b]) if b is not None else contextlib.nullcontext()

    def first_step(d):
        """The first train step picks the attention backend: cuDNN, else flash, else torch's choice."""
        if "name" in chosen:
            with attention():
                return train_step(d)
        for name, b in backends:
            chosen.update(name=name, backend=b)
            try:
                with attention():
                    loss = train_step(d)
                rec["attention_backend"] = name
                return loss
            except RuntimeError as e:
                if is_oom(e):
                    raise
                errors[name] = f"{type(e).__name__}: {e}"[:400]
                opt.zero_grad(set_to_none=True)
                del chosen["name"]
        raise RuntimeError("no SDPA backend ran the train step")

    def timed(fn, *a):
        sync()
        t0 = time.perf_counter()
        out = fn(*a)
        sync()
        return time.perf_counter() - t0, out

    def run_train(shape, batch):
        out = {"shape": shape, "batch": batch}
        d = inputs(s, shape, batch, dev)
        for attempt in range(2):
            out["gradient_checkpointing"] = bool(getattr(model, "gradient_checkpointing", False))
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                first, loss = timed(first_step, d)
                losses, times = [loss], []
                for _ in range(s["peer_steps"]):
                    with attention():
                        dt, loss = timed(train_step, d)
                    times.append(dt)
                    losses.append(loss)
                step_s = float(np.median(times))
                out.update(status="ok", first_call_s=first, step_times_s=times, step_s=step_s,
                           per_example_s=step_s / batch, loss_finite=bool(np.all(np.isfinite(losses))),
                           peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)
                if not out["loss_finite"]:
                    out["status"] = "failed"
                return out
            except Exception as e:  # noqa: BLE001 - recorded
                opt.zero_grad(set_to_none=True)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                if not is_oom(e):
                    out.update(status="error", error=f"{type(e).__name__}: {e}"[:1000])
                    return out
                out.update(status="oom", error=f"{type(e).__name__}: {e}"[:300])
                if attempt == 0 and not out["gradient_checkpointing"]:
                    model.enable_gradient_checkpointing()  # diffusers' (torch.utils.checkpoint per block)
                    out["retried_with_gradient_checkpointing"] = True
                    continue
                return out
        return out

    def run_sample(shape, batch):
        d = inputs(s, shape, batch, dev)
        p = {**FLUX_DEV, **s["params"]}
        x = torch.randn(batch, 3 * d["n"], p["in_channels"], device=dev, dtype=torch.bfloat16)
        with attention():
            first, x = timed(sample_step, d, x)
            times = [timed(sample_step, d, x)[0] for _ in range(s["peer_sample_steps"])]
        return {"shape": shape, "batch": batch, "status": "ok", "first_call_s": first, "step_times_s": times,
                "step_s": float(np.median(times)), "finite": bool(torch.isfinite(x).all())}

    rec["train"], rec["sample"], skipped = {}, {}, {}
    plan = [("train", shape, b) for shape, b in s["peer_rows"]]
    plan.insert(1, ("sample", "512x512", 1))  # after the first train row, which picks the attention backend
    for kind, shape, b in plan:
        name = f"{shape}_b{b}"
        est = (EST_S[shape] * (b if kind == "train" else 0.3)) if not dry else 0.0
        if ctx.seconds_left() < est:
            skipped[f"{kind} {name}"] = f"skipped: {ctx.seconds_left():.0f} s left, the row needs ~{est:.0f} s"
            continue
        rec[kind][name] = (run_train if kind == "train" else run_sample)(shape, b)
        save()
    rec["skipped"] = skipped
    rec["jax_loaded"] = "jax" in sys.modules
    rec["pass"] = all(r.get("status") in ("ok", "oom") for r in [*rec["train"].values(), *rec["sample"].values()])
