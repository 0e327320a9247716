"""Layered PSD output of `decompose --format psd|both`: the layers, their blend modes, and the PSD compositing.

Layer order, bottom to top (the names as Photoshop shows them):

1. ``background``: the predicted background, opaque, mode Normal.
2. ``foreground (<task>)``: the foreground, in the mode of the task's law
   (``dd_jax.data.blend``), so that the PSD composites back to the input:

   ============  =========================  ==============================================
   task          mode                       layer pixels
   ============  =========================  ==============================================
   watermark     Normal                     the RGBA foreground (as the PNG)
   occlusion     Normal                     the RGBA foreground (as the PNG)
   xray          Multiply                   the RGBA foreground (as the PNG)
   cell          Linear Dodge (Add)         opaque: the cells' light on black (alpha A)
   flare         Linear Dodge (Add)         opaque: the light the flare adds to this
                                            background in display values,
                                            ((B^g + (alpha A)^g)^(1/g) - B, g = 2.2)
   glassware     Multiply, then Screen      two layers (below)
   ============  =========================  ==============================================

   glassware's law multiplies where the background's luma is below 0.5 and
   screens where it is above; no PSD mode branches on the backdrop, so it is
   two layers of the RGBA foreground: ``foreground (glassware, multiply)``
   (alpha kept where the background is dark, zero elsewhere) under
   ``foreground (glassware, screen)`` (alpha kept where it is bright).

With these modes every law is reproduced up to 8-bit rounding (a PSD layer
with alpha a and mode f over an opaque backdrop B gives (1 - a) B + a f(B, A),
the formula `composite` implements, and psd-tools' `PSDImage.composite`
with it). Flare adds light in linear light, which no PSD mode does: the
flare layer holds the display-value difference it makes on this background
(exact, but tied to this background). The flare on black in Linear Dodge,
the layer that would not depend on the background, leaves an error measured
by `scripts/psd_check.py` (`addition_error`).

With `decompose --passes N > 1` (`pass_layers`) the stack is the last pass's
``background``, then ``foreground N (<task>)`` ... ``foreground 1 (<task>)``
(glassware: ``foreground p (glassware, multiply)`` under ``foreground p
(glassware, screen)``), each in its task's mode: pass 1 took off the
outermost overlay, so its layer is on top.

The file's own composite image (what viewers without layer support show) is
the layers composited with that formula.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np

from dd_jax import optional
from dd_jax.data import blend

# blend mode of each layer kind -> psd_tools.constants.BlendMode member name
MODES = {"normal": "NORMAL", "multiply": "MULTIPLY", "screen": "SCREEN", "add": "LINEAR_DODGE"}
TASK_MODES = {"watermark": "normal", "occlusion": "normal", "xray": "multiply", "cell": "add", "flare": "add",
              "glassware": "multiply+screen"}


def _blend_fn(mode: str, b: np.ndarray, s: np.ndarray) -> np.ndarray:
    if mode == "normal":
        return s
    if mode == "multiply":
        return b * s
    if mode == "screen":
        return b + s - b * s
    if mode == "add":
        return np.minimum(1.0, b + s)
    raise ValueError(f"unknown blend mode {mode!r}")


def layer_names(task: str) -> list[str]:
    """Names of the layers `layers` makes for `task`, bottom to top."""
    if task == "glassware":
        return ["background", "foreground (glassware, multiply)", "foreground (glassware, screen)"]
    return ["background", f"foreground ({task})"]


def layers(task: str, background: np.ndarray, foreground: np.ndarray | None) -> list[tuple[str, str, np.ndarray]]:
    """The PSD layers, bottom to top: (name, mode, uint8 [H, W, 3 or 4]) from the uint8 layers decompose writes
    (background RGB; foreground straight RGBA as `blend.quantize_rgba` makes it, or None: background only)."""
    bg = np.asarray(background, np.uint8)[..., :3]
    out = [("background", "normal", bg)]
    if foreground is None:
        return out
    q = np.asarray(foreground, np.uint8)
    names = layer_names(task)
    if task in ("watermark", "occlusion", "xray"):
        out.append((names[1], TASK_MODES[task], q))
    elif task in ("cell", "flare"):
        b = bg.astype(np.float64) / 255.0
        light = (q[..., :3].astype(np.float64) / 255.0) * (q[..., 3:4].astype(np.float64) / 255.0)  # alpha A
        if task == "flare":
            light = np.clip(np.asarray(blend.flare_law(light, b)) - b, 0.0, 1.0)
        out.append((names[1], "add", np.clip(np.rint(light * 255.0), 0, 255).astype(np.uint8)))
    elif task == "glassware":
        dark = np.asarray(blend.luma(bg.astype(np.float64) / 255.0))[..., 0] < 0.5
        for name, mode, keep in ((names[1], "multiply", dark), (names[2], "screen", ~dark)):
            part = q.copy()
            part[..., 3] = np.where(keep, q[..., 3], 0)
            part[..., :3][part[..., 3] == 0] = 0
            out.append((name, mode, part))
    else:
        raise ValueError(f"unknown task {task!r}")
    return out


def pass_layers(passes: list[tuple[str, np.ndarray, np.ndarray | None]]) -> list[tuple[str, str, np.ndarray]]:
    """The PSD layers of `decompose --passes N`, bottom to top: `passes[p - 1]` = (task, background, foreground)
    of pass p. One pass: `layers`. Several: the last pass's background, then each pass's foreground layers from
    pass N down to pass 1 (pass 1 took off the outermost overlay, so it is on top), named `foreground <p> (...)`;
    each made against its own pass's background (flare's light, glassware's split)."""
    if len(passes) == 1:
        return layers(*passes[0])
    out = layers(passes[-1][0], passes[-1][1], None)
    for p in range(len(passes), 0, -1):
        task, bg, fg = passes[p - 1]
        out += [(name.replace("foreground (", f"foreground {p} (", 1), mode, px)
                for name, mode, px in layers(task, bg, fg)[1:]]
    return out


def composite(psd_layers: list[tuple[str, str, np.ndarray]]) -> np.ndarray:
    """The layers composited as a PSD does, float [H, W, 3] in [0, 1]: over an opaque backdrop B, a layer of
    colour A, alpha a and blend function f gives (1 - a) B + a f(B, A) (W3C compositing, separable modes)."""
    out = None
    for _, mode, px in psd_layers:
        px = px.astype(np.float64) / 255.0
        colour, alpha = (px[..., :3], px[..., 3:4]) if px.shape[-1] == 4 else (px, np.ones(px.shape[:2] + (1,)))
        out = colour * alpha if out is None else (1.0 - alpha) * out + alpha * _blend_fn(mode, out, colour)
    return out


def addition_error(task: str, background: np.ndarray, foreground: np.ndarray, image: np.ndarray) -> float:
    """RMSE (0-1) against `image` of the foreground *as the PNG has it* (alpha A on black for cell/flare) over the
    background in Linear Dodge: what a background-independent additive layer would leave. Additive tasks only."""
    if task not in blend.EMISSIVE:
        raise ValueError(f"{task}: addition_error is for the additive tasks {sorted(blend.EMISSIVE)}")
    q = np.asarray(foreground, np.float64) / 255.0
    light = np.clip(np.rint(q[..., :3] * q[..., 3:4] * 255.0), 0, 255).astype(np.uint8)
    rec = composite([("background", "normal", np.asarray(background, np.uint8)), ("light", "add", light)])
    return blend.rmse(rec, image)


def check_available() -> None:
    """Raises optional.MissingPackage, a ValueError (one line), when psd-tools cannot be imported."""
    optional.require("psd_tools", "decompose --format psd")


@contextlib.contextmanager
def _quiet_psd_tools():
    # PixelLayer.frompil without a document (the only way it keeps a layer's alpha) logs a warning per layer
    log = logging.getLogger("psd_tools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def write(path: str, psd_layers: list[tuple[str, str, np.ndarray]], preview: np.ndarray | None = None) -> None:
    """Writes the layers (bottom to top) as an 8-bit RGB PSD; its composite image is `preview` (uint8 RGB, default
    the layers' `composite`). Writes under a temporary name in the same folder and renames it to `path`."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from psd_tools import PSDImage  # pylint: disable=g-import-not-at-top
    from psd_tools.api.layers import PixelLayer  # pylint: disable=g-import-not-at-top
    from psd_tools.constants import BlendMode  # pylint: disable=g-import-not-at-top

    if preview is None:
        preview = np.clip(np.rint(composite(psd_layers) * 255.0), 0, 255).astype(np.uint8)
    doc = PSDImage.frompil(Image.fromarray(np.asarray(preview, np.uint8), "RGB"))
    with _quiet_psd_tools():
        for name, mode, px in psd_layers:
            pil = Image.fromarray(px, "RGBA" if px.shape[-1] == 4 else "RGB")
            # psd_file=None: with the (RGB) document frompil would convert the layer to RGB and drop its alpha
            layer = PixelLayer.frompil(pil, None, name)
            layer.blend_mode = getattr(BlendMode, MODES[mode])
            doc.append(layer)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        with _quiet_psd_tools():
            doc.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def read_composite(path: str) -> np.ndarray:
    """psd-tools' own compositing of the file's layers (not its stored composite image): float [H, W, 3]."""
    from psd_tools import PSDImage  # pylint: disable=g-import-not-at-top

    img = PSDImage.open(path).composite(ignore_preview=True)
    return np.asarray(img.convert("RGB"), np.float64) / 255.0
