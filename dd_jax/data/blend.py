"""The six AlphaBlend blend laws (DiffDecompose sec. 3.1), as pure functions.

Every function takes float images in [0, 1], channels last, and works on numpy
arrays and on jax arrays (also inside ``jax.jit``); it returns the same kind.
Notation: the foreground layer is RGBA ``x = (A, alpha)`` with *straight*
(un-premultiplied) colour ``A``; ``B`` is the RGB background; ``I`` the
composite.

Laws ``composite(task, x, B)``:

* ``xray``      I = (1 - alpha) B + alpha (A * B)        (paper; multiplicative
                darkening, the X-ray of a stack is the product of the
                transmittances of its materials).
* ``glassware`` I = (1 - alpha) B + alpha G(A, B), G = A*B where B < 0.5,
                G = 1 - (1 - A)(1 - B) where B >= 0.5 (paper's multiply /
                screen rule, weighted by the glass' alpha). "B < 0.5" is read
                on the pixel's luma (Rec. 601), so all three channels take the
                same branch; branching per channel tints every crossing of 0.5.
* ``watermark`` I = (1 - alpha) B + alpha A              (standard alpha over;
                the paper's formula writes the same law with alpha meaning
                transparency, i.e. alpha_paper = 1 - alpha).
* ``cell``      I = clip(alpha A + B, 0, 1)              (paper; additive
                emission of fluorescent cells, ``alpha A`` premultiplied).
* ``occlusion`` I = (1 - alpha) B + alpha A over the whole image: a translucent
                window layer (fog, rain, dirt) transmits ``1 - alpha`` of the
                scene and scatters light of colour ``A`` -- this is the
                atmospheric scattering model I = J t + L (1 - t) with t = 1 - alpha.
* ``flare``     I = (B^g + (alpha A)^g)^(1/g), clipped to 1, g = 2.2: lens flare
                is light *added* to the scene, so it is added in linear light
                (as in Flare7K); ``alpha A`` is the flare as photographed on a
                black background.

How a foreground looks "alone" (``foreground_alone``, the 3-channel target the
model's autoencoder sees for the foreground layer):

* ``xray``      the item scanned in an empty tray: the law over white (1).
* ``cell``      the cells on a black field: ``alpha A``.
* ``flare``     the flare on black: ``alpha A``.
* ``watermark`` the mark alpha-over a neutral 50% grey.
* ``occlusion`` the window layer (fog, drops, dirt) alpha-over a neutral 50%
                grey: bright fog and dark dirt both show.
* ``glassware`` the glass alpha-over a neutral 50% grey (this shows both the
                dark edges and the highlights; the law itself on any uniform
                backdrop hides one of the two).

``recompose(task, foreground_alone, B)`` re-applies the law from a predicted
background and a predicted 3-channel foreground rendering. It is exact for
``xray`` (I = F * B), ``cell`` (clip(F + B)) and ``flare``; the other three laws
have four degrees of freedom per pixel (colour and alpha), so they also need
the foreground's alpha (``RECOMPOSE_NEEDS_ALPHA``).

Prompts: ``caption(foreground, background)`` is the paper's prompt template
(sec. 3.3); ``task_prompt(task)`` is a task's prompt at decomposition time,
the template with ``FOREGROUND_DESCRIPTIONS[task]`` and ``BACKGROUND_PROMPT``
(the descriptions a generated example gets when no sidecar caption names its
layers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from typing import TypeAlias

    import jax
    import numpy.typing as npt

    # The laws run on numpy or jax arrays (jax.numpy as soon as one input is a jax value).
    ImageArray: TypeAlias = np.ndarray | jax.Array

TASKS = ("xray", "glassware", "watermark", "cell", "occlusion", "flare")
TASK_INDEX = {t: i for i, t in enumerate(TASKS)}

# The uniform backdrop each foreground is rendered on when shown alone.
ALONE_BACKDROP = {
    "xray": 1.0,
    "glassware": 0.5,
    "watermark": 0.5,
    "cell": 0.0,
    "occlusion": 0.5,
    "flare": 0.0,
}
RECOMPOSE_NEEDS_ALPHA = frozenset({"glassware", "watermark", "occlusion"})

CAPTION_TEMPLATE = ("Three sub-images. <image-1>: {fg}, <image-2>: {bg}, "
                    "<image-3>: The overlapped of <image-1> and <image-2>.")
FOREGROUND_DESCRIPTIONS = {
    "xray": "an X-ray image of a prohibited item", "glassware": "a transparent glass object",
    "watermark": "a semi-transparent watermark", "cell": "semi-transparent cells",
    "occlusion": "a translucent occlusion layer on a window", "flare": "a lens flare",
}
BACKGROUND_PROMPT = "a natural photograph"
assert set(FOREGROUND_DESCRIPTIONS) == set(TASKS)

FLARE_GAMMA = 2.2
_EPS = 1e-9


def _xp(*arrays: Any):
    """numpy for numpy inputs, jax.numpy as soon as one input is a jax value."""
    for a in arrays:
        if not isinstance(a, (np.ndarray, np.generic, float, int)):
            import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

            return jnp
    return np


def _check_task(task: str) -> str:
    if task not in TASK_INDEX:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return task


def caption(foreground: str, background: str) -> str:
    """The paper's prompt template (sec. 3.3)."""
    return CAPTION_TEMPLATE.format(fg=foreground.strip().rstrip("."), bg=background.strip().rstrip("."))


def task_prompt(task: str) -> str:
    """The caption used for a task at decomposition time (the training template with generic descriptions)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return caption(FOREGROUND_DESCRIPTIONS[task], BACKGROUND_PROMPT)


def split_rgba(foreground_rgba: ImageArray) -> tuple[ImageArray, ImageArray]:
    """(A, alpha) with alpha keeping a trailing axis of size 1."""
    return foreground_rgba[..., :3], foreground_rgba[..., 3:4]


# ----------------------------------------------------------------- the laws
def alpha_over(a: ImageArray, alpha: ImageArray, b: ImageArray | float) -> ImageArray:
    """(1 - alpha) b + alpha a."""
    return (1.0 - alpha) * b + alpha * a


def xray_law(a: ImageArray, alpha: ImageArray, b: ImageArray) -> ImageArray:
    """(1 - alpha) b + alpha (a b): multiplicative darkening."""
    return (1.0 - alpha) * b + alpha * (a * b)


def luma(rgb: ImageArray) -> ImageArray:
    """Rec. 601 luma, keeping a trailing axis of size 1."""
    return rgb[..., 0:1] * 0.299 + rgb[..., 1:2] * 0.587 + rgb[..., 2:3] * 0.114


def glass_law(a: ImageArray, alpha: ImageArray, b: ImageArray) -> ImageArray:
    """Multiply where b is dark (luma < 0.5), screen where it is bright, weighted by alpha."""
    xp = _xp(a, alpha, b)
    g = xp.where(luma(b) < 0.5, a * b, 1.0 - (1.0 - a) * (1.0 - b))
    return (1.0 - alpha) * b + alpha * g


def additive_law(light: ImageArray, b: ImageArray) -> ImageArray:
    """clip(light + b): ``light`` is the premultiplied emission alpha A."""
    xp = _xp(light, b)
    return xp.clip(light + b, 0.0, 1.0)


def to_linear(x: ImageArray, gamma: float = FLARE_GAMMA) -> ImageArray:
    xp = _xp(x)
    return xp.clip(x, 0.0, 1.0) ** gamma


def from_linear(x: ImageArray, gamma: float = FLARE_GAMMA) -> ImageArray:
    xp = _xp(x)
    return xp.maximum(xp.clip(x, 0.0, 1.0), _EPS) ** (1.0 / gamma)


def flare_law(light: ImageArray, b: ImageArray, gamma: float = FLARE_GAMMA) -> ImageArray:
    """Add the flare ``light`` (display-encoded, on black) in linear light."""
    return from_linear(to_linear(b, gamma) + to_linear(light, gamma), gamma)


# ------------------------------------------------------------ task dispatch
def composite(task: str, foreground_rgba: ImageArray, background: ImageArray) -> ImageArray:
    """The composite image of an RGBA foreground over an RGB background."""
    _check_task(task)
    a, alpha = split_rgba(foreground_rgba)
    if task == "xray":
        return xray_law(a, alpha, background)
    if task == "glassware":
        return glass_law(a, alpha, background)
    if task in ("watermark", "occlusion"):
        return alpha_over(a, alpha, background)
    if task == "cell":
        return additive_law(alpha * a, background)
    return flare_law(alpha * a, background)  # flare


def foreground_alone(task: str, foreground_rgba: ImageArray) -> ImageArray:
    """The 3-channel rendering of the foreground layer alone (see module doc)."""
    _check_task(task)
    a, alpha = split_rgba(foreground_rgba)
    if task == "xray":
        return (1.0 - alpha) + alpha * a  # == xray_law(a, alpha, 1)
    if task in ("cell", "flare"):
        return alpha * a
    return alpha_over(a, alpha, ALONE_BACKDROP[task])  # glassware, watermark, occlusion


def recompose(task: str, foreground_render: ImageArray, background: ImageArray,
              alpha: ImageArray | None = None) -> ImageArray:
    """Composite from a 3-channel foreground rendering and a background.

    ``alpha`` ([..., 1] in [0, 1]) is required for the tasks in
    ``RECOMPOSE_NEEDS_ALPHA``; with the true alpha the result equals
    ``composite(task, x, background)`` up to rounding.
    """
    _check_task(task)
    f = foreground_render
    if task == "xray":
        return f * background
    if task == "cell":
        return additive_law(f, background)
    if task == "flare":
        return flare_law(f, background)
    if alpha is None:
        raise ValueError(f"recomposing {task!r} needs the foreground alpha")
    xp = _xp(f, background, alpha)
    premult = xp.clip(f - (1.0 - alpha) * ALONE_BACKDROP[task], 0.0, 1.0)
    if task in ("watermark", "occlusion"):
        return (1.0 - alpha) * background + premult
    # glassware: multiply branch b (1 - alpha + alpha A), screen 1-(1-b)(1-alpha A)
    mult = background * (1.0 - alpha + premult)
    screen = 1.0 - (1.0 - background) * (1.0 - premult)
    return xp.where(luma(background) < 0.5, mult, screen)


def rgba_from_alone(task: str, foreground_render: ImageArray, alpha: ImageArray) -> ImageArray:
    """Invert ``foreground_alone`` given alpha: the straight RGBA layer."""
    _check_task(task)
    xp = _xp(foreground_render, alpha)
    f = foreground_render
    if task == "xray":
        premult = f - (1.0 - alpha)  # alpha A
    elif task in ("cell", "flare"):
        premult = f
    else:
        premult = f - (1.0 - alpha) * ALONE_BACKDROP[task]
    a = xp.where(alpha > 0, premult / xp.maximum(alpha, 1e-6), 0.0)
    return xp.concatenate([xp.clip(a, 0.0, 1.0), alpha], axis=-1)


def emission_to_rgba(light: ImageArray) -> ImageArray:
    """An emission image on black (flare, cells) as straight RGBA.

    alpha = max over channels, A = light / alpha, so that alpha A == light.
    """
    xp = _xp(light)
    alpha = xp.max(light, axis=-1, keepdims=True)
    a = xp.where(alpha > 0, light / xp.maximum(alpha, 1e-12), 0.0)
    return xp.concatenate([xp.clip(a, 0.0, 1.0), alpha], axis=-1)


def quantize_rgba(foreground_rgba: np.ndarray) -> np.ndarray:
    """Round an RGBA float layer to uint8, zeroing colour where alpha == 0."""
    q = np.clip(np.rint(foreground_rgba * 255.0), 0, 255).astype(np.uint8)
    q[..., :3][q[..., 3] == 0] = 0
    return q


# ------------------------------------------------- layers from a predicted decomposition (decompose's output)
EMISSIVE = frozenset({"cell", "flare"})  # foreground is light added to the scene, shown on black


def estimate_alpha(fg_render: ImageArray, composite: ImageArray, background: ImageArray, backdrop: float) -> ImageArray:
    """Alpha [H, W, 1] of an alpha-over layer from its rendering on `backdrop`, the composite and the background.

    composite - background = alpha (A - B) and render - g = alpha (A - g) give
    alpha (g - B) = composite - background - (render - g), solved by least
    squares over the channels. Where the background is close to the backdrop
    g the two equations coincide and alpha is not observable; there it falls
    back (smoothly) to the least alpha that keeps the layer's colour A in
    [0, 1] given its rendering. The result is clipped to [that least alpha, 1],
    so it is exact wherever the inputs are consistent and observable.
    """
    xp = _xp(fg_render, composite, background)
    lhs = backdrop - background
    rhs = composite - background - (fg_render - backdrop)
    den = xp.sum(lhs * lhs, -1, keepdims=True)
    least_squares = xp.sum(lhs * rhs, -1, keepdims=True) / xp.maximum(den, 1e-12)
    dev = fg_render - backdrop  # alpha (A - g): |A - g| is at most 1 - g above g and g below
    least = xp.max(xp.maximum(dev / max(1.0 - backdrop, 1e-6), -dev / max(backdrop, 1e-6)), -1, keepdims=True)
    least = xp.clip(least, 0.0, 1.0)
    observed = xp.clip(den / 1e-2, 0.0, 1.0)  # exact least squares once |g - B|^2 >= 0.01 over the channels
    alpha = observed * least_squares + (1.0 - observed) * least
    return xp.clip(alpha, least, 1.0)


def transmittance_to_rgba(render: ImageArray) -> ImageArray:
    """An X-ray item's transmittance on white (``foreground_alone('xray', ...)``) as straight RGBA.

    alpha = 1 - min over channels (the least alpha with A in [0, 1]), so that
    the layer alpha-over white reproduces the rendering exactly.
    """
    xp = _xp(render)
    alpha = xp.clip(1.0 - xp.min(render, axis=-1, keepdims=True), 0.0, 1.0)
    a = xp.where(alpha > 0, (render - (1.0 - alpha)) / xp.maximum(alpha, 1e-12), 0.0)
    return xp.concatenate([xp.clip(a, 0.0, 1.0), alpha], axis=-1)


def layer_alpha(task: str, fg_render: ImageArray, composite: ImageArray, background: ImageArray) -> ImageArray | None:
    """The alpha needed by ``recompose`` for `task` (None for the laws that need none)."""
    if _check_task(task) in RECOMPOSE_NEEDS_ALPHA:
        return estimate_alpha(fg_render, composite, background, ALONE_BACKDROP[task])
    return None


def foreground_rgba(task: str, fg_render: ImageArray, composite: ImageArray, background: ImageArray) -> ImageArray:
    """The predicted foreground layer as straight RGBA [H, W, 4] (what decompose saves).

    Emissive layers (cell, flare): alpha is the emission's brightest channel;
    alpha-over layers (watermark, glassware, occlusion): alpha estimated from
    the composite, background and rendering (``estimate_alpha``), so it follows
    the overlay's edges at the resolution of those images, and zero where the
    background equals the composite (change below ~1/255); X-ray: the item's
    transmittance (``transmittance_to_rgba``).
    """
    _check_task(task)
    if task in EMISSIVE:
        return emission_to_rgba(fg_render)
    if task in RECOMPOSE_NEEDS_ALPHA:
        xp = _xp(fg_render, composite, background)
        alpha = layer_alpha(task, fg_render, composite, background)
        # where the background is the composite (change under ~1/255) there is no layer: no faint sampling noise
        change = xp.max(xp.abs(composite - background), axis=-1, keepdims=True)
        alpha = alpha * xp.clip((change - 0.5 / 255) / (1.0 / 255), 0.0, 1.0)
        return rgba_from_alone(task, fg_render, alpha)
    return transmittance_to_rgba(fg_render)


def rmse(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Root mean square difference of two images over all their values, on their own scale (float64; the one
    host-side RMSE: recomposition errors, scripts). The per-image metric of batches on 0-255 is
    ``dd_jax.metrics.rmse``."""
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def recompose_error(task: str, fg_render: ImageArray, composite: ImageArray, background: ImageArray) -> float:
    """RMSE (0-1 scale) of the composite against the law re-applied to the predicted layers."""
    return rmse(recompose(task, fg_render, background, layer_alpha(task, fg_render, composite, background)), composite)


def layers_error(task: str, foreground_rgba: npt.ArrayLike, background: npt.ArrayLike,
                 image: npt.ArrayLike) -> float:
    """RMSE (0-1 scale) of `image` against the law applied to a straight RGBA foreground over a background (e.g.
    the layers decompose writes, as uint8: divided by 255 here)."""
    scale = lambda a: np.asarray(a, np.float64) / (255.0 if np.asarray(a).dtype == np.uint8 else 1.0)  # noqa: E731
    return rmse(composite(task, scale(foreground_rgba), scale(background)), scale(image))
