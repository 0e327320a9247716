"""Writes an evaluation report (``dd_jax.evaluate``): metrics.json, report.md, cases.png.

``report.md`` holds
* a summary per subtask: background RMSE of the model and of the identity
  baseline (the composite), their ratio, background SSIM, foreground RMSE /
  SSIM, and the mean of the per-subtask RMSE ratios;
* Table 1 (background) and Table 3 (foreground) in the paper's layout: one
  row per method (identity baseline, model), RMSE / SSIM / LPIPS / FID per
  subtask, three subtasks per block;
* the LOGO papers' protocol (RMSE, RMSEw, PSNR, pytorch_ssim SSIM) for LOGO
  datasets;
* the CLWD and Flare7K++ protocols (``dd_jax.metrics.protocols``) for those
  datasets.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dd_jax import outdir
from dd_jax.metrics import protocols

NA = "n/a (no weights)"
BACKGROUND_ORDER = ("LOGO-H", "LOGO-L", "LOGO-Gray", "watermark", "glassware", "cell", "xray", "flare", "occlusion")
FOREGROUND_ORDER = ("glassware", "xray", "cell", "watermark", "flare", "occlusion", "LOGO-H", "LOGO-L", "LOGO-Gray")
METHOD_NAMES = {"identity": "Identity (composite)", "model": "Model"}
FORMATS = {"rmse": "{:.2f}", "ssim": "{:.4f}", "lpips": "{:.4f}", "fid": "{:.2f}", "psnr": "{:.2f}",
           "rmse_w": "{:.2f}", "ssim_zero_pad": "{:.4f}", "ratio": "{:.3f}"}
FILES = ("metrics.json", "report.md", "cases.png")  # what `write` makes in the report folder
COLUMNS = ("composite", "background (model)", "background (truth)", "foreground (model)", "foreground (truth)")


def fmt(value: float | str | None, metric: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return FORMATS.get(metric, "{:.4f}").format(value)


def ordered(labels: Iterable[str], order: Sequence[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    return sorted(labels, key=lambda t: (rank.get(t, len(order)), t))


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header, rows) -> list[str]:
    return [_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows]


def summary_table(report: dict) -> list[str]:
    tasks = report["tasks"]
    header = ["subtask", "n", "bg RMSE model", "bg RMSE identity", "ratio", "bg SSIM model", "bg SSIM identity",
              "fg RMSE model", "fg SSIM model", "fg RMSE identity", "fg SSIM identity"]
    rows = []
    for t in ordered(tasks, BACKGROUND_ORDER):
        r = tasks[t]
        bg, fg = r["background"], r["foreground"]
        fgm = fg["model"] or {}
        rows.append([t, str(r["n"]), fmt(bg["model"]["rmse"], "rmse"), fmt(bg["identity"]["rmse"], "rmse"),
                     fmt(bg["rmse_ratio"], "ratio"), fmt(bg["model"]["ssim"], "ssim"),
                     fmt(bg["identity"]["ssim"], "ssim"), fmt(fgm.get("rmse"), "rmse"),
                     fmt(fgm.get("ssim"), "ssim"), fmt(fg["identity"]["rmse"], "rmse"),
                     fmt(fg["identity"]["ssim"], "ssim")])
    s = report["summary"]
    lines = _table(header, rows)
    lines += ["", f"Mean of the per-subtask background RMSE ratios (model / identity): "
                  f"**{fmt(s['mean_background_rmse_ratio'], 'ratio')}**; model below identity in every subtask: "
                  f"**{'yes' if s['model_below_identity_in_every_subtask'] else 'no'}**."]
    return lines


def paper_table(report: dict, layer: str, order: Sequence[str], per_block: int = 3) -> list[str]:
    tasks = report["tasks"]
    names = ordered(tasks, order)
    lines = []
    for b in range(0, len(names), per_block):
        block = names[b:b + per_block]
        header = ["Models"] + [f"{t} {m}" for t in block for m in ("RMSE↓", "SSIM↑", "LPIPS↓", "FID↓")]
        rows = []
        for method in ("identity", "model"):
            cells = [METHOD_NAMES[method]]
            for t in block:
                r = tasks[t][layer][method]
                cells += [fmt(None if r is None else r[m], m) for m in ("rmse", "ssim", "lpips", "fid")]
            rows.append(cells)
        lines += _table(header, rows) + [""]
    return lines


def logo_table(report: dict) -> list[str]:
    logo = [t for t in ordered(report["tasks"], BACKGROUND_ORDER) if report["tasks"][t]["dataset"].startswith("logo/")]
    if not logo:
        return []
    header = ["dataset", "method", "RMSE↓", "RMSEw↓", "PSNR↑", "SSIM↑ (pytorch_ssim)", "n"]
    rows = []
    for t in logo:
        r = report["tasks"][t]
        for method in ("identity", "model"):
            m = r["background"][method]
            rows.append([t, METHOD_NAMES[method], fmt(m["rmse"], "rmse"), fmt(m["rmse_w"], "rmse_w"),
                         fmt(m["psnr"], "psnr"), fmt(m["ssim_zero_pad"], "ssim"), str(r["n"])])
    return ["## LOGO protocol (background)", "",
            "As the LOGO watermark papers: per-image RMSE on 0-255, RMSEw = RMSE inside the watermark mask "
            "(the stored foreground's alpha > 0), PSNR in dB, SSIM with zero padding (pytorch_ssim); "
            "means over images.", ""] + _table(header, rows) + [""]


def protocol_tables(report: dict) -> list[str]:
    """One table per benchmark protocol (CLWD, Flare7K++) present in the report."""
    lines = []
    for name in protocols.PROTOCOLS:
        tasks = [t for t in ordered(report["tasks"], BACKGROUND_ORDER)
                 if (report["tasks"][t].get("protocol") or {}).get("name") == name]
        if not tasks:
            continue
        cols = protocols.COLUMNS[name]
        rows = []
        for t in tasks:
            r = report["tasks"][t]
            for method in ("identity", "model"):
                m = r["protocol"][method]
                cells = []
                for key, _, form in cols:
                    v = m.get(key)
                    cells.append("-" if v is None else v if isinstance(v, str) else form.format(v))
                rows.append([t, METHOD_NAMES[method]] + cells + [str(r["n"])])
        lines += [f"## {protocols.TITLES[name]}", "", protocols.NOTES[name], ""]
        lines += _table(["dataset", "method"] + [h for _, h, _ in cols] + ["n"], rows) + [""]
    return lines


def markdown(report: dict) -> str:
    sizes = sorted({tuple(r["eval_size"]) for r in report["tasks"].values()})
    w = report["working_size"]
    by_seed: dict = {}
    for t in ordered(report["tasks"], BACKGROUND_ORDER):
        seed = report["tasks"][t].get("build", {}).get("seed")
        if seed is not None:
            by_seed.setdefault(seed, []).append(t)
    seeds = [f"{s} ({'all subtasks' if len(ts) == len(report['tasks']) else ', '.join(ts)})"
             for s, ts in by_seed.items()]
    lines = [
        f"# Evaluation of `{os.path.basename(report['checkpoint'].rstrip('/'))}`", "",
        *([f"- command: `{report['command']}`"] if report.get("command") else []),
        f"- checkpoint: `{report['checkpoint']}` (ICD targets {', '.join(report['targets'])}, "
        f"LPEC {'on' if report['lpec'] else 'off'})",
        f"- data: `{report['data']}`, split `{report['split']}`"
        + (f", first {report['limit']} per subtask" if report["limit"] else ""),
        *([f"- data build seeds: {', '.join(seeds)}"] if seeds else []),
        f"- compared at {', '.join(f'{h}x{ww}' for h, ww in sizes)}; model working size {w[0]}x{w[1]}",
        f"- {report['steps']} Euler steps, {report['num_samples']} sample(s) per image (metrics averaged), "
        f"seed {report['seed']}, batch {report['batch_size']}",
        f"- LPIPS weights: {report['lpips_weights'] or NA}; FID weights: {report['fid_weights'] or NA}",
        "- RMSE on 0-255 per image, SSIM of Wang et al. (Gaussian 11, sigma 1.5), means over images. The "
        "foreground is compared as the 3-channel rendering of the layer alone (the data pipeline's "
        "`foreground`). The identity baseline returns the composite as both layers.",
        *(["- FID per subtask between the true and the predicted layers (InceptionV3 pool features, images "
           "resized to 299x299); with fewer images than the 2048 feature dimensions it is a biased, "
           "small-sample estimate, comparable only between rows of the same table."]
          if report["fid_weights"] else []), "",
        "## Summary", ""]
    lines += summary_table(report) + [""]
    lines += ["## Table 1: background", ""] + paper_table(report, "background", BACKGROUND_ORDER)
    lines += ["## Table 3: foreground", ""] + paper_table(report, "foreground", FOREGROUND_ORDER)
    lines += logo_table(report)
    lines += protocol_tables(report)
    lines += ["## Worst and best cases", "",
              "By the model's background RMSE (first sample; the identity baseline's RMSE beside it); columns: "
              + " | ".join(COLUMNS) + ".", "",
              "![worst and best cases](cases.png)", ""]
    return "\n".join(lines)


def _tile(img, size: int) -> np.ndarray:
    if img is None:
        return np.full((size, size, 3), 255, np.uint8)
    u8 = np.clip(np.rint(np.asarray(img) * 255.0), 0, 255).astype(np.uint8)
    im = Image.fromarray(u8)
    if im.size != (size, size):
        up = size >= max(im.size)
        im = im.resize((size, size), Image.NEAREST if up else Image.BICUBIC)
    return np.asarray(im)


def case_grid(cases: dict, tasks: list[str], tile: int = 64, label_width: int = 150) -> Image.Image:
    """Rows: worst and best case of each task; columns: COLUMNS (see module doc)."""
    rows = [(t, which) for t in tasks for which in ("worst", "best") if which in cases.get(t, {})]
    head = 28
    width = label_width + len(COLUMNS) * (tile + 2)
    canvas = Image.new("RGB", (width, head + max(1, len(rows)) * (tile + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, name in enumerate(COLUMNS):
        x = label_width + j * (tile + 2)
        for k, word in enumerate(name.split(" ", 1)):
            draw.text((x + 1, 2 + 12 * k), word, fill="black", font=font)
    for i, (t, which) in enumerate(rows):
        score, index, tiles, identity = cases[t][which]
        y = head + i * (tile + 2)
        draw.text((4, y + 4), t, fill="black", font=font)
        draw.text((4, y + 17), f"{which} (#{index})", fill="black", font=font)
        draw.text((4, y + 30), f"bg RMSE {score:.1f}", fill="black", font=font)
        draw.text((4, y + 43), f"identity {identity:.1f}", fill="black", font=font)
        for j, img in enumerate(tiles):
            canvas.paste(Image.fromarray(_tile(img, tile)), (label_width + j * (tile + 2), y))
    return canvas


_SCALAR_LIST = re.compile(r"\[\n\s*((?:[^\[\]{}\n]+,\n\s*)*[^\[\]{}\n]+)\n\s*\]")


def to_json(report: dict) -> str:
    """Indented JSON with lists of scalars (the per-image values) on one line."""
    text = json.dumps(report, indent=1)
    return _SCALAR_LIST.sub(lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text) + "\n"


def write(report: dict, cases: dict, output: str, overwrite: bool = False) -> None:
    """metrics.json, report.md and cases.png (`FILES`) in `output`, written under temporary names and moved in
    together (`dd_jax.outdir.write_files`): existing ones are replaced only with `overwrite`, else
    FileExistsError."""
    os.makedirs(output, exist_ok=True)

    def text(content: str) -> Callable[[str], None]:
        def write_text(path: str) -> None:
            with open(path, "w") as f:
                f.write(content)
        return write_text

    sizes = [max(r["eval_size"]) for r in report["tasks"].values()] or [64]
    tile = 64 if max(sizes) <= 64 else 96
    grid = case_grid(cases, ordered(report["tasks"], BACKGROUND_ORDER), tile)
    writers = {"metrics.json": text(to_json(report)), "report.md": text(markdown(report)),
               "cases.png": lambda path: grid.save(path, format="PNG", optimize=True)}
    outdir.write_files([(os.path.join(output, f), writers[f]) for f in FILES], overwrite=overwrite)
