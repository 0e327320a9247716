"""Metric tables: `python -m dd_jax.evaluate --data DIR --output REPORT_DIR [--checkpoint RUN]`.

Decomposes every composite of a built test split (``python -m dd_jax.data.build``)
and compares the predicted layers with the stored ones:

* background: RMSE (0-255), SSIM, LPIPS, FID (the paper's Table 1), plus PSNR
  and RMSEw (RMSE inside the foreground's mask: alpha > 0);
* foreground: the same four against the 3-channel rendering of the layer
  alone that the data pipeline yields as ``foreground`` (Table 3);
* the identity baseline (return the composite itself) is a row of every
  table, and each subtask reports the ratio of the model's background RMSE
  to the identity's; the summary gives the mean of these ratios;
* LOGO datasets (``--tasks logo/high`` ...) also get the LOGO papers'
  protocol: background RMSE (0-255), RMSEw inside the watermark mask, PSNR
  and the pytorch_ssim (zero-padded) SSIM;
* CLWD and Flare7K++ datasets (``--protocol clwd|flare7k``, or ``--tasks
  clwd`` / ``flare7k/real`` ...) also get their own protocol
  (``dd_jax.metrics.protocols``): CLWD's PSNR, SSIM, RMSE, RMSEw inside its
  Mask and the foreground's alpha error; Flare7K++'s PSNR, SSIM, LPIPS and
  the glare / streak / global PSNRs inside its colour-coded masks.

It writes ``REPORT_DIR/metrics.json`` (settings, per-subtask means and the
per-image values), ``REPORT_DIR/report.md`` (the tables) and
``REPORT_DIR/cases.png`` (the worst and best case of each subtask by
background RMSE: composite | background model / truth | foreground model /
truth). Without ``--lpips-weights`` / ``--fid-weights`` (converted with
``scripts/convert_metrics_weights.py``) those columns read "n/a (no weights)".
A report folder that holds one of these files is refused before any work
(exit status 2, one line) unless ``--overwrite`` is given; the three are
written under temporary names and moved in together, so a run that dies
leaves the report before it whole. The folder is locked for the run
(``dd_jax.outdir``): a second evaluate or decompose run on it stops at once.

Images are compared at the stored size of the data, decomposed exactly as
``decompose`` does (``dd_jax.inference``): in overlapping tiles of the
model's working size (``--mode tile``) or resized to it with the change
upsampled onto the full-size composite (``--mode resize``); the default is
the model's (``sample.tile``). At the working size both are one tile per
image. ``--at-working-size`` instead resizes the stored layers to the
working size. Batches have a fixed shape (the last one padded), so one
compilation serves every subtask.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from dd_jax import (
    checkpoints,
    cli,
    config as config_lib,
    hostmem,
    inference,
    metrics,
    outdir,
    quantize as quantize_lib,
    system as system_lib,
)
from dd_jax.data import pipeline
from dd_jax.metrics import fid, lpips, protocols, report as report_lib
from dd_jax.metrics.frechet import frechet_distance, gaussian_statistics

if TYPE_CHECKING:
    from dd_jax.system import System

NA = "n/a (no weights)"
LOGO_LABELS = {"logo/high": "LOGO-H", "logo/mid": "LOGO-L", "logo/gray": "LOGO-Gray", "clwd/default": "CLWD",
               "flare7k/real": "Flare7K++-real", "flare7k/synthetic": "Flare7K++-synthetic"}
PIXEL_METRICS = ("rmse", "ssim", "psnr", "rmse_w", "ssim_zero_pad")
PSNR_CAP = protocols.PSNR_CAP  # dB, for identical images (infinite PSNR)
LAYERS = ("background", "foreground")
METHODS = ("identity", "model")


# ------------------------------------------------------------------ data
def resolve_tasks(data_dir: str, tasks: str | Iterable[str]) -> list[str]:
    """`all` / a list of subtasks, a benchmark (`logo`, `clwd`, `flare7k`), `<benchmark>/<config>` -> dataset
    keys present under data_dir."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    out = []
    for t in tasks:
        if t == "all":
            out += pipeline.resolve_tasks(data_dir, "all")
            for bench in pipeline.BENCHMARKS:
                out += _benchmark_configs(data_dir, bench)
        elif t in pipeline.BENCHMARKS:
            out += _benchmark_configs(data_dir, t) or [t]
        else:
            out.append(t)
    return list(dict.fromkeys(out))


def _benchmark_configs(data_dir: str, bench: str = "logo") -> list[str]:
    root = os.path.join(data_dir, bench)
    if not os.path.isdir(root):
        return []
    return [f"{bench}/{c}" for c in sorted(os.listdir(root)) if pipeline._versions(os.path.join(root, c))]


def label(dataset: str) -> str:
    """Table header of a dataset ('alphablend/xray' -> 'xray', 'logo/high' -> 'LOGO-H')."""
    if dataset.split("/", 1)[0] in pipeline.BENCHMARKS:
        return LOGO_LABELS.get(dataset, dataset)
    return dataset.split("/", 1)[-1]


# ------------------------------------------------------------------ metric networks
class Networks:
    """Optional LPIPS / FID networks; None where no weight file was given."""

    def __init__(self, lpips_weights: str | None = None, fid_weights: str | None = None):
        self.lpips_path, self.fid_path = lpips_weights, fid_weights
        self.lpips = self.inception = None
        if lpips_weights:
            self.lpips = lpips.load(lpips_weights)
        if fid_weights:
            self.inception = fid.load_inception(fid_weights)

    def lpips_distance(self, a: jax.Array | np.ndarray, b: jax.Array | np.ndarray) -> np.ndarray:
        return np.asarray(lpips.distance(self.lpips, a, b, batch_size=a.shape[0]))

    def fid_features(self, images: jax.Array | np.ndarray) -> np.ndarray:
        return np.asarray(fid.features(self.inception, images, batch_size=images.shape[0]))


def fid_score(real: np.ndarray, fake: np.ndarray) -> float | None:
    if len(real) < 2 or len(fake) < 2:
        return None
    mu1, s1 = gaussian_statistics(real)
    mu2, s2 = gaussian_statistics(fake)
    return float(frechet_distance(mu1, s1, mu2, s2))


@jax.jit
def pixel_metrics(pred: jax.Array, truth: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Per-image RMSE, SSIM, PSNR (capped), RMSEw inside `mask`, zero-padded SSIM of [0, 1] images."""
    return {"rmse": metrics.rmse(pred, truth), "ssim": metrics.ssim(pred, truth),
            "psnr": metrics.psnr(pred, truth, cap=PSNR_CAP),
            "rmse_w": metrics.rmse_masked(pred, truth, mask),
            "ssim_zero_pad": metrics.ssim(pred, truth, zero_pad=True)}


# ------------------------------------------------------------------ accumulation
class TaskResult:
    """Per-image values and FID features of one dataset, gathered batch by batch."""

    def __init__(self, dataset: str, size: tuple[int, int]):
        self.dataset, self.size = dataset, size
        self.values: dict[str, list] = collections.defaultdict(list)  # "layer/method/metric" -> [(K?, n)]
        self.features: dict[str, list] = collections.defaultdict(list)
        self.indices: list[int] = []
        self.cases: dict[str, tuple] = {}  # worst / best: (score, index, tiles, identity score)

    def add(self, key: str, values: Any) -> None:
        self.values[key].append(np.asarray(values, np.float64))

    def per_image(self) -> dict[str, list[float]]:
        """Mean over samples of every value, per image."""
        out = {}
        for key, chunks in self.values.items():
            arr = np.concatenate([c.reshape(-1, c.shape[-1]).mean(0) if c.ndim > 1 else c for c in chunks])
            out[key] = arr
        return out

    def note_case(self, score: float, index: int, tiles: list, identity: float) -> None:
        """Keeps the worst and best image by `score` (the model's background RMSE)."""
        case = (score, index, tiles, identity)
        if "worst" not in self.cases or score > self.cases["worst"][0]:
            self.cases["worst"] = case
        if "best" not in self.cases or score < self.cases["best"][0]:
            self.cases["best"] = case


def evaluate_task(system: System, examples: pipeline.Examples, result: TaskResult, nets: Networks, *, steps: int,
                  seed: int, batch_size: int, num_samples: int, guidance: float | None, key_offset: int,
                  progress: Callable[[int, int], None] | None = None,
                  mode: str | None = None, overlap: int | None = None) -> int:
    """Runs the model over `examples` and fills `result`; returns the number of batches run.

    A CLWD or Flare7K++ dataset also gets its protocol's values (``protocol/<method>/<metric>``)."""
    has_fg = "x" in system.spec.targets
    protocol = protocols.protocol_for(result.dataset)
    n_batches = 0
    for start in range(0, len(examples), batch_size):
        chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        n = len(chunk)
        padded = chunk + [chunk[-1]] * (batch_size - n)
        get = lambda k: np.stack([e[k] for e in padded])  # noqa: E731
        comp, bg, fg = get("composite"), get("background"), get("foreground")
        mask = (get("foreground_rgba")[..., 3:] > 0.5 / 255.0).astype(np.float32)
        tasks = [e["task"] for e in chunk]
        result.indices += [e["index"] for e in chunk]

        def record(layer, method, pred, truth):
            vals = pixel_metrics(jnp.asarray(pred), jnp.asarray(truth), jnp.asarray(mask))
            for m in PIXEL_METRICS:
                yield f"{layer}/{method}/{m}", np.asarray(vals[m])[:n]
            if nets.lpips is not None:
                yield f"{layer}/{method}/lpips", nets.lpips_distance(pred, truth)[:n]

        # identity baseline: the composite as both layers
        for layer, truth in (("background", bg), ("foreground", fg)):
            for k, v in record(layer, "identity", comp, truth):
                result.add(k, v)
        ident_rmse = result.values["background/identity/rmse"][-1]
        lp = nets.lpips_distance if nets.lpips is not None else None

        def bench(pred_bg, pred_fg):
            return protocols.per_image(protocol, pred_bg=pred_bg[:n], bg=bg[:n], comp=comp[:n],
                                       fg_rgba=get("foreground_rgba")[:n], mask=get("mask")[:n],
                                       pred_fg=None if pred_fg is None else pred_fg[:n], lpips=lp)

        if protocol:
            for kk, v in bench(comp, comp).items():  # identity: the composite as both layers
                result.add(f"protocol/identity/{kk}", v)
        if nets.inception is not None:
            for name, imgs in (("background/truth", bg), ("foreground/truth", fg), ("composite", comp)):
                result.features[name].append(nets.fid_features(imgs)[:n])

        per_sample = collections.defaultdict(list)
        pad = lambda a: np.concatenate([a, np.repeat(a[-1:], batch_size - n, 0)])  # noqa: E731
        for k in range(num_samples):
            key = jax.random.fold_in(jax.random.key(seed), (key_offset + n_batches) * num_samples + k)
            outs = inference.decompose_images(system, list(comp[:n]), tasks, steps=steps, key=key, mode=mode,
                                              batch_size=batch_size, overlap=overlap, guidance=guidance)
            y = pad(np.stack([o.background for o in outs]))
            x = pad(np.stack([o.foreground for o in outs])) if has_fg else None
            for kk, v in record("background", "model", y, bg):
                per_sample[kk].append(v)
            if x is not None:
                for kk, v in record("foreground", "model", x, fg):
                    per_sample[kk].append(v)
            if protocol:
                for kk, v in bench(y, x).items():
                    per_sample[f"protocol/model/{kk}"].append(v)
            if nets.inception is not None:
                result.features["background/model"].append(nets.fid_features(y)[:n])
                if x is not None:
                    result.features["foreground/model"].append(nets.fid_features(x)[:n])
            if k == 0:
                scores = per_sample["background/model/rmse"][0]
                for i in range(n):
                    tiles = [comp[i], y[i], bg[i], None if x is None else x[i], fg[i]]
                    result.note_case(float(scores[i]), chunk[i]["index"], tiles, float(ident_rmse[i]))
        for kk, vs in per_sample.items():
            result.add(kk, np.stack(vs))  # (K, n)
        n_batches += 1
        if progress:
            progress(min(start + batch_size, len(examples)), len(examples))
    return n_batches


def summarize(result: TaskResult, nets: Networks, has_fg: bool) -> dict:
    """Means over images (and samples) of one dataset; LPIPS / FID as NA without weights."""
    per = result.per_image()
    out = {"dataset": result.dataset, "label": label(result.dataset), "n": len(result.indices),
           "eval_size": list(result.size)}
    for layer in LAYERS:
        out[layer] = {}
        for method in METHODS:
            if layer == "foreground" and method == "model" and not has_fg:
                out[layer][method] = None
                continue
            row = {m: float(np.mean(per[f"{layer}/{method}/{m}"])) for m in PIXEL_METRICS}
            row["lpips"] = float(np.mean(per[f"{layer}/{method}/lpips"])) if nets.lpips is not None else NA
            if nets.inception is not None:
                real = np.concatenate(result.features[f"{layer}/truth"])
                fake_key = "composite" if method == "identity" else f"{layer}/model"
                row["fid"] = fid_score(real, np.concatenate(result.features[fake_key]))
            else:
                row["fid"] = NA
            out[layer][method] = row
    ident = out["background"]["identity"]["rmse"]
    out["background"]["rmse_ratio"] = out["background"]["model"]["rmse"] / ident if ident > 0 else None
    protocol = protocols.protocol_for(result.dataset)
    if protocol:
        out["protocol"] = {"name": protocol, **{
            method: protocols.summarize(protocol, {k.rsplit("/", 1)[1]: v for k, v in per.items()
                                                  if k.startswith(f"protocol/{method}/")})
            for method in METHODS}}
    out["per_image"] = {"index": list(result.indices),
                        **{k: [None if np.isnan(x) else round(float(x), 5) for x in v] for k, v in per.items()}}
    out["cases"] = {k: {"index": v[1], "background_rmse": round(v[0], 4), "identity_rmse": round(v[3], 4)}
                    for k, v in result.cases.items()}
    return out


def overall(tasks: dict) -> dict:
    ratios = {t: r["background"]["rmse_ratio"] for t, r in tasks.items() if r["background"]["rmse_ratio"] is not None}
    return {"mean_background_rmse_ratio": float(np.mean(list(ratios.values()))) if ratios else None,
            "background_rmse_ratios": ratios,
            "model_below_identity_in_every_subtask": bool(ratios) and all(r < 1 for r in ratios.values())}


# ------------------------------------------------------------------ driver
def display_path(path: str) -> str:
    """`path` relative to the working directory when inside it (reports travel), else absolute."""
    p = os.path.abspath(path)
    rel = os.path.relpath(p)
    return p if rel.startswith("..") else rel


def run(data_dir: str, output: str, checkpoint: str | None = None, *, tasks: str | Iterable[str] = "all",
        split: str = "test", config_file: str | None = None, steps: int | None = None, seed: int = 0,
        num_samples: int = 1, batch_size: int = 8, limit: int | None = None, guidance: float | None = None,
        lpips_weights: str | None = None, fid_weights: str | None = None, at_working_size: bool = False,
        nets: Networks | None = None, command: str | None = None, mode: str | None = None,
        overlap: int | None = None, overwrite: bool = False, quantize: str | None = None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Evaluates a trained model (export folder or training workdir); writes and returns the report.

    `nets` replaces the LPIPS / FID networks loaded from the weight files. Raises ValueError (one line), before
    any work, if `output` holds a report file (`report_lib.FILES`) and not `overwrite`, or another run uses it
    (`dd_jax.outdir.locked`, held until the report is written).
    """
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps}: at least one sampling step")
    outdir.check_folder(output)
    with outdir.locked(output, "evaluate"):
        existing = [f for f in report_lib.FILES if os.path.lexists(os.path.join(output, f))]
        if existing and not overwrite:
            raise ValueError(f"{os.path.join(output, existing[0])} exists; pass --overwrite to replace the report "
                             f"({', '.join(report_lib.FILES)}), or choose another --output")
        if not os.path.isdir(data_dir):  # a typo: said before the model loads
            raise FileNotFoundError(cli.not_found(data_dir, "--data"))
        checkpoint = checkpoint or checkpoints.DEFAULT_MODEL
        config = config_lib.load_config_file(config_file) if config_file else None
        with quantize_lib.requested(quantize):  # a LoRA base quantized as it loads, a model trained in full after
            system = system_lib.for_sampling(checkpoints.load_trained(checkpoint, config,
                                                                           config_source=f"--config {config_file}"))
        cfg = system.config
        steps = cfg.sample.steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"steps={steps}: at least one sampling step")
        working = (int(cfg.data.height), int(cfg.data.width))
        if mode is not None and mode not in inference.MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(inference.MODES)}")
        inference.check_options(system, mode or inference.default_mode(cfg), mode_given=mode is not None,
                                overlap=overlap, guidance=guidance)
        mode = mode or inference.default_mode(cfg)
        overlap = inference.default_overlap(working) if overlap is None else overlap
        nets = nets or Networks(lpips_weights, fid_weights)
        names = resolve_tasks(data_dir, tasks)
        if not names:
            raise ValueError(f"no datasets found under {data_dir!r}")
        log(f"evaluating {checkpoint} on {', '.join(names)} ({split}), working size {working[0]}x{working[1]}, "
            f"mode {mode}, {steps} steps, {num_samples} sample(s), batch {batch_size}")
        t0, results, batches = time.time(), {}, 0
        has_fg = "x" in system.spec.targets
        cases = {}
        for task in names:
            examples = pipeline.Examples(data_dir, task, split, limit, working if at_working_size else None)
            dataset, size = examples.dataset, examples.size
            if not len(examples):
                log(f"  {dataset}: no examples in split {split!r}, skipped")
                continue
            res = TaskResult(dataset, size)
            prog = lambda i, n, d=dataset: log(f"  {d}: {i}/{n} ({time.time() - t0:.1f}s)")  # noqa: E731
            batches += evaluate_task(system, examples, res, nets, steps=steps, seed=seed, batch_size=batch_size,
                                     num_samples=num_samples, guidance=guidance, key_offset=batches, progress=prog,
                                     mode=mode, overlap=overlap)
            results[label(dataset)] = summarize(res, nets, has_fg)
            results[label(dataset)]["build"] = examples.metadata
            cases[label(dataset)] = res.cases
        report = {
            "command": command, "checkpoint": display_path(checkpoint), "data": display_path(data_dir),
            "split": split,
            "steps": steps, "seed": seed, "num_samples": num_samples, "batch_size": batch_size, "limit": limit,
            "guidance": guidance, "working_size": list(working), "at_working_size": at_working_size,
            "mode": mode, "overlap": overlap if mode == "tile" else None,
            "targets": list(system.spec.targets), "lpec": bool(cfg.icd.lpec),
            "lpips_weights": nets.lpips_path, "fid_weights": nets.fid_path, "psnr_cap_db": PSNR_CAP,
            "seconds": round(time.time() - t0, 1), "tasks": results, "summary": overall(results),
        }
        try:
            report_lib.write(report, cases, output, overwrite=overwrite)
        except FileExistsError as e:  # another program wrote it during the run: kept, as is
            raise ValueError(f"{e.filename} appeared during the run and was kept; pass --overwrite to replace it, or "
                             f"choose another --output") from e
        except OSError as e:  # e.g. a full disk: the files written before are whole, the failed one is not there
            raise ValueError(f"{e.strerror or e} writing the report in {output}: stopped, no partial file left; "
                             f"rerun with --overwrite once there is room") from e
        log(f"wrote {output}/metrics.json, report.md, cases.png ({time.time() - t0:.1f}s)")
        return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m dd_jax.evaluate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the --out folder of python -m dd_jax.data.build")
    ap.add_argument("--output", required=True, help="report folder")
    ap.add_argument("--checkpoint", default=None, help="export folder or training workdir (default: shipped model)")
    ap.add_argument("--config", default=None,
                    help="config file overriding the checkpoint's settings (e.g. another base path); a config of "
                         "another architecture is refused (checkpoints.ARCHITECTURE)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--tasks", nargs="+", default=None,
                    help="subtasks, logo, logo/<high|mid|gray>, clwd, flare7k, flare7k/<real|synthetic>, or all "
                         "(default)")
    ap.add_argument("--protocol", default=None, choices=protocols.PROTOCOLS,
                    help="evaluate the built CLWD or Flare7K++ datasets under --data with that benchmark's own "
                         "metrics (as --tasks clwd / flare7k; see dd_jax.metrics.protocols)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's sample.steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=1, help="samples per image (metrics are averaged)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="first N examples per subtask")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--lpips-weights", default=None, help="converted LPIPS file (.safetensors)")
    ap.add_argument("--fid-weights", default=None, help="converted FID InceptionV3 file (.safetensors)")
    ap.add_argument("--at-working-size", action="store_true",
                    help="compare at the model's working size instead of the stored size")
    ap.add_argument("--mode", default=None, choices=inference.MODES,
                    help="tile or resize (see dd_jax.inference; default: the model's config, sample.tile)")
    ap.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels (default: a quarter of a tile)")
    ap.add_argument("--quantize", default=None, choices=quantize_lib.QTYPES + ("none",),
                    help="store the transformer's weights (and T5's) quantized: int8/fp8/int4 weight-only, fp8_w8a8 "
                         "float8 matmuls (dd_jax.quantize; default: the model's config, model.quantize; none: float)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the report files (metrics.json, report.md, cases.png) in --output; without it "
                         "the run refuses a folder holding one, before any work")
    args = ap.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        ap.error("--num-samples, --batch-size and --limit must be >= 1")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps {args.steps}: at least one sampling step")
    if args.protocol:
        other = [t for t in args.tasks or [] if t.split("/", 1)[0] != args.protocol]
        if other:
            ap.error(f"--protocol {args.protocol} evaluates {args.protocol} datasets only; "
                     f"drop --tasks {' '.join(other)}")
        args.tasks = args.tasks or [args.protocol]
    args.tasks = args.tasks or ["all"]
    try:
        report = run(args.data, args.output, args.checkpoint, tasks=args.tasks, split=args.split,
                     config_file=args.config, steps=args.steps, seed=args.seed, num_samples=args.num_samples,
                     batch_size=args.batch_size, limit=args.limit, guidance=args.guidance,
                     lpips_weights=args.lpips_weights, fid_weights=args.fid_weights,
                     at_working_size=args.at_working_size, mode=args.mode, overlap=args.overlap,
                     overwrite=args.overwrite, quantize=args.quantize,
                     command=" ".join(["python -m dd_jax.evaluate"] + list(sys.argv[1:] if argv is None else argv)))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = report["summary"]
    if s["mean_background_rmse_ratio"] is not None:
        print(f"mean background RMSE ratio (model / identity): {s['mean_background_rmse_ratio']:.3f}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    hostmem.keep_freed_host_memory()  # before JAX starts its CPU client
    sys.exit(main())
