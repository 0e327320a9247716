"""Decompose images into layers: `python -m dd_jax.decompose --input FILES_OR_DIR --output DIR`.

For every input it writes `<stem>_background.png` and `<stem>_foreground.png`
(RGBA for the tasks whose foreground is a layer with alpha: watermark,
glassware, occlusion, and the emissive cell / flare layers; the X-ray item
as its transmittance on white). With `--num-samples K > 1` the files are
`<stem>_s<k>_background.png`, ...

Without `--checkpoint`, the small model shipped with the package is used
(dd_jax/assets/tiny, trained with configs/tiny.py at 64x64). The task (blend
law) comes from `--task`, or from the file name when it starts with a task
name (e.g. `watermark_01.png`).

Runs of a real Flux (configs/flux.py, T5/CLIP conditioning) take each task's
prompt (`dd_jax.data.text_cache.task_prompt`, or `--prompt`) from the run's
text cache, else encode it with the converted T5/CLIP of `text.encoders` /
`model.weights`.

Inputs of any size are resized to the model's working size, decomposed in
fixed-shape batches (the last one padded, so one compilation serves a whole
folder) and brought back to their original size. For the background, the
predicted change (background - composite) is upsampled and added to the
full-resolution composite, so detail the working size cannot hold is kept.
Unreadable inputs are reported and skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dd_jax import hostmem
from dd_jax.data import blend

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
ALPHA_OVER = ("watermark", "glassware", "occlusion")


def list_inputs(paths: list[str]) -> list[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS))
        else:
            files.append(p)
    return files


def read_rgb(path: str) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1]; any PIL mode (16-bit, palette, CMYK, RGBA over white)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, np.float32)
            arr = arr / (65535.0 if arr.max() > 255 else 255.0)
            return np.repeat(arr[..., None], 3, axis=-1)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = np.asarray(im.convert("RGBA"), np.float32) / 255.0
            return rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
        return np.asarray(im.convert("RGB"), np.float32) / 255.0


def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(jax.image.resize(jnp.asarray(img), (h, w, img.shape[2]), "linear", antialias=True))


def task_for(path: str, task: str | None) -> str:
    if task:
        return task
    stem = os.path.basename(path).lower()
    for t in blend.TASKS:
        if stem.startswith(t):
            return t
    raise ValueError(f"no task for {path}: pass --task (one of {', '.join(blend.TASKS)}) or name the file <task>_*.png")


def estimate_alpha(fg_render: np.ndarray, composite: np.ndarray, background: np.ndarray, backdrop: float) -> np.ndarray:
    """Alpha [H, W, 1] of an alpha-over layer from its rendering on `backdrop`, the composite and the background.

    composite - background = alpha (A - B) and render - g = alpha (A - g) give
    alpha (g - B) = composite - background - (render - g), solved by least
    squares over the channels.
    """
    lhs = backdrop - background
    rhs = composite - background - (fg_render - backdrop)
    alpha = np.sum(lhs * rhs, -1, keepdims=True) / np.maximum(np.sum(lhs * lhs, -1, keepdims=True), 1e-3)
    return np.clip(alpha, 0.0, 1.0)


def foreground_image(task: str, fg: np.ndarray, composite: np.ndarray, background: np.ndarray) -> np.ndarray:
    """What to save for the foreground layer: RGBA where the layer has alpha."""
    if task in ("cell", "flare"):
        return np.asarray(blend.emission_to_rgba(fg))
    if task in ALPHA_OVER:
        alpha = estimate_alpha(fg, composite, background, blend.ALONE_BACKDROP[task])
        return np.asarray(blend.rgba_from_alone(task, fg, alpha))
    return fg  # xray: the item's transmittance on white


def save_png(path: str, img: np.ndarray) -> None:
    Image.fromarray(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)).save(path)


def load_config_file(path: str):
    spec = importlib.util.spec_from_file_location("dd_jax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    sys.path.insert(0, repo)  # configs import `configs.base`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(repo)
    return module.get_config()


def run(inputs: list[str], output: str, checkpoint: str | None = None, config_file: str | None = None,
        task: str | None = None, steps: int | None = None, seed: int = 0, num_samples: int = 1,
        batch_size: int = 8, guidance: float | None = None, detail_transfer: bool = True,
        prompt: str | None = None) -> dict:
    from dd_jax import system as system_lib, train

    if task is not None and task not in blend.TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(blend.TASKS)}")
    config = load_config_file(config_file) if config_file else None
    system = train.load_trained(checkpoint or DEFAULT_MODEL, config)
    cfg = system.config
    steps = steps or cfg.sample.steps
    height, width = cfg.data.height, cfg.data.width
    os.makedirs(output, exist_ok=True)

    items, skipped = [], []
    for path in list_inputs(inputs):
        try:
            t = task_for(path, task)
            items.append((path, t, read_rgb(path)))
        except Exception as e:  # unreadable file, unknown task: report and go on
            skipped.append(path)
            print(f"skipping {path}: {e}", file=sys.stderr)
    if not items:
        print("nothing to decompose", file=sys.stderr)
        return {"written": 0, "skipped": skipped}

    print(f"decomposing {len(items)} image(s) at {height}x{width}, {steps} steps, {num_samples} sample(s) each",
          file=sys.stderr)
    t0, written = time.time(), 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed shape: one compilation
        comp = np.stack([resize(img, height, width) for _, _, img in padded])
        tasks = np.array([blend.TASK_INDEX[t] for _, t, _ in padded], np.int32)
        extra = None
        if system.model.conditioner is None:  # T5/CLIP conditioning: the prompts' embeddings, once per batch
            txt, vec = system.prompt_conditioning(tasks, prompt)
            extra = {"txt": txt, "vec": vec}
        for k in range(num_samples):
            key = jax.random.fold_in(jax.random.key(seed), start * num_samples + k)
            layers = system_lib.decompose(system, jnp.asarray(comp * 2 - 1), jnp.asarray(tasks), key, steps, guidance,
                                          extra)
            layers = {n: (np.asarray(v, np.float32) + 1) / 2 for n, v in layers.items()}
            for i, (path, t, img) in enumerate(chunk):
                h, w = img.shape[:2]
                stem = os.path.splitext(os.path.basename(path))[0] + (f"_s{k}" if num_samples > 1 else "")
                bg = np.clip(layers["y"][i], 0, 1)
                if detail_transfer:
                    bg_full = np.clip(img + resize(bg - comp[i], h, w), 0, 1)
                else:
                    bg_full = resize(bg, h, w)
                save_png(os.path.join(output, f"{stem}_background.png"), bg_full)
                if "x" in layers:
                    fg = resize(np.clip(layers["x"][i], 0, 1), h, w)
                    save_png(os.path.join(output, f"{stem}_foreground.png"), foreground_image(t, fg, img, bg_full))
                written += 1
            hostmem.trim_if_grown()
        print(f"  {min(start + batch_size, len(items))}/{len(items)} ({time.time() - t0:.1f}s)", file=sys.stderr)
    return {"written": written, "skipped": skipped, "output": output}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dd_jax.decompose", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    ap.add_argument("--output", required=True)
    ap.add_argument("--checkpoint", default=None, help="trained model folder or training workdir (default: shipped tiny model)")
    ap.add_argument("--config", default=None, help="config file overriding the checkpoint's (e.g. another base path)")
    ap.add_argument("--task", default=None, choices=blend.TASKS, help="blend law (default: from the file name)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's sample.steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--no-detail-transfer", action="store_true", help="plain resize of the background")
    ap.add_argument("--prompt", default=None, help="text prompt for T5/CLIP-conditioned models (default: the task's)")
    args = ap.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        ap.error("--num-samples and --batch-size must be >= 1")
    try:
        out = run(args.input, args.output, args.checkpoint, args.config, args.task, args.steps, args.seed,
                  args.num_samples, args.batch_size, args.guidance, not args.no_detail_transfer, args.prompt)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out['written']} decomposition(s) to {args.output}; skipped {len(out['skipped'])}", file=sys.stderr)
    return 0 if out["written"] or not out["skipped"] else 1


if __name__ == "__main__":
    hostmem.keep_freed_host_memory()  # before JAX starts its CPU client
    sys.exit(main())
