"""The public benchmarks' own evaluation protocols: CLWD and Flare7K++.

``dd_jax.evaluate`` applies the protocol of a dataset built by
``python -m dd_jax.data.build --task clwd|flare7k`` (``protocol_for``) to
every image, next to its usual tables. Inputs are float NHWC images in
[0, 1]; the prediction is first rounded to 8 bits, as the authors' scripts
read saved PNG / JPEG results. One value per image (``per_image``); the
report gives the mean over images (``summarize``).

CLWD (watermark; WDNet, WACV 2021, and the watermark papers after it):
  psnr       10 log10(1 / mse) on [0, 1], capped at 100 dB (WDNet's script
             returns 100 for identical images)
  ssim       the pytorch_ssim SSIM of WDNet / SLBR (``metrics.ssim(zero_pad=True)``)
  rmse       RMSE on 0-255 over the whole image (``metrics.rmse``)
  rmse_w     RMSE on 0-255 inside CLWD's ``Mask`` (``metrics.rmse_masked``:
             sum of (255 d m)^2 over pixels and channels / (C sum m), as
             WDNet's ``mse(g*mask, real*mask) * H*W*C / sum(mask)``)
  alpha_mae, alpha_rmse   the foreground's alpha error on 0-255: the predicted
             layer's alpha (``blend.foreground_rgba('watermark', ...)``, what
             ``decompose`` saves) against CLWD's ``Alpha``, over the whole image

Flare7K++ (flare; as ``evaluate.py`` of https://github.com/ykdai/Flare7K):
  psnr       skimage ``peak_signal_noise_ratio`` (data range 255) of the 8-bit
             images, capped at 100 dB
  ssim       skimage ``structural_similarity`` of 8-bit RGB images with its
             defaults: 7x7 uniform window, sample covariance, reflected borders
             cropped, mean over channels (``ssim_uniform``)
  lpips      LPIPS-Alex v0.1 fed as their script feeds it: ``ToTensor`` images
             in [0, 1] passed to ``lpips.LPIPS`` without ``normalize=True``
             (so [0, 1] is read as [-1, 1]); n/a without ``--lpips-weights``
  g_psnr, s_psnr, global_psnr   PSNR inside the glare, streak and
             "global" (everything but the light source) regions of the mask
             image (``region_masks``, ``masked_psnr``); images without the
             region are left out of that mean, as in their script
  score      (G-PSNR + S-PSNR + Global-PSNR) / 3 of the means (MIPI 2023)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import uniform_filter

from dd_jax import metrics
from dd_jax.data import blend

if TYPE_CHECKING:
    import numpy.typing as npt

PSNR_CAP = 100.0  # dB, identical images
PROTOCOLS = ("clwd", "flare7k")
NA_LPIPS = "n/a (no weights)"
REGIONS = ("glare", "streak", "global")


def protocol_for(dataset: str) -> str | None:
    """The protocol of a dataset name ('clwd/default' -> 'clwd', 'flare7k/real' -> 'flare7k'), or None."""
    name = dataset.split("/", 1)[0]
    return name if name in PROTOCOLS else None


def quantize(x: npt.ArrayLike) -> np.ndarray:
    """[0, 1] floats rounded to 8 bits, float64 in [0, 1] (what a saved result reads back as)."""
    return np.rint(np.clip(np.asarray(x, np.float64), 0.0, 1.0) * 255.0) / 255.0


def _batch(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[None] if x.ndim == 3 else x


def ssim_uniform(a: npt.ArrayLike, b: npt.ArrayLike, win: int = 7, data_range: float = 255.0) -> np.ndarray:
    """Per-image SSIM as ``skimage.metrics.structural_similarity(gt, x, channel_axis=-1)`` on 8-bit images.

    `a`, `b`: [0, 1] images (scaled to 0-255 here). Uniform win x win window,
    k1 = 0.01, k2 = 0.03, sample covariance (N / (N - 1)), the filter reflecting
    at the borders and the map cropped by (win - 1) / 2 before the mean, each
    channel on its own, then the mean over channels. NaN for images smaller than the window."""
    x, y = _batch(a) * 255.0, _batch(b) * 255.0
    if min(x.shape[1:3]) < win:  # skimage refuses images smaller than the window
        return np.full(x.shape[0], np.nan)
    size = (1, win, win, 1)
    filt = lambda z: uniform_filter(z, size=size, mode="reflect")  # noqa: E731
    ux, uy = filt(x), filt(y)
    cov = win * win / (win * win - 1.0)
    vx, vy, vxy = cov * (filt(x * x) - ux * ux), cov * (filt(y * y) - uy * uy), cov * (filt(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    p = (win - 1) // 2
    return s[:, p:-p, p:-p, :].mean(axis=(1, 2, 3))


def region_masks(mask: npt.ArrayLike) -> dict[str, np.ndarray]:
    """Flare7K++'s evaluation regions from its colour-coded mask image, each [N, H, W] in [0, 1].

    As ``extract_mask`` in https://github.com/ykdai/Flare7K (evaluate.py): the
    mask paints glare (255, 255, 0), streak (255, 0, 0), the light source
    (0, 0, 255) and the rest black; glare = G / 255, streak = (R - G) / 255,
    global = (255 - B) / 255 (all but the light source). `mask`: uint8 0-255 or
    float [0, 1] RGB. (Their uint8 R - G would wrap where G > R, a colour the
    masks never use; here it is clipped at 0.)"""
    m = np.asarray(mask)
    m = m.astype(np.float64) if m.dtype == np.uint8 else np.asarray(m, np.float64) * 255.0
    m = m[None] if m.ndim == 3 else m
    r, g, b = m[..., 0], m[..., 1], m[..., 2]
    return {"glare": g / 255.0, "streak": np.clip(r - g, 0.0, None) / 255.0, "global": (255.0 - b) / 255.0}


def masked_psnr(a: npt.ArrayLike, b: npt.ArrayLike, m: npt.ArrayLike) -> np.ndarray:
    """Per-image PSNR (dB) inside the weight map `m` [N, H, W] as Flare7K's ``compare_score``; NaN for an empty map.

    mse = sum over pixels and channels of ((a - b) m)^2 / (C sum m) on [0, 1]
    (their ``compare_mse(gt*m, x*m) / (255^2 * area)`` with area = sum m / 512^2,
    for their 512x512 images; here the image's own H W, so any size gives the
    mean inside the region), PSNR = 10 log10(1 / mse), capped at PSNR_CAP."""
    a, b = _batch(a), _batch(b)
    m = np.asarray(m, np.float64)
    m = m[None] if m.ndim == 2 else m
    area = m.sum(axis=(1, 2))
    sq = np.sum(((a - b) * m[..., None]) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        mse = sq / (a.shape[-1] * area)
        out = np.minimum(10.0 * np.log10(1.0 / mse), PSNR_CAP)
    return np.where(area > 0, out, np.nan)


def flare7k_lpips_inputs(x: npt.ArrayLike) -> np.ndarray:
    """What to give ``lpips.distance`` (which maps [0, 1] to [-1, 1]) so that the network sees [0, 1] itself,
    as Flare7K's script feeds ``lpips.LPIPS`` without ``normalize=True``."""
    return (np.asarray(x, np.float32) + 1.0) * 0.5


def per_image(protocol: str, *, pred_bg: npt.ArrayLike, bg: npt.ArrayLike, comp: npt.ArrayLike, fg_rgba: npt.ArrayLike,
              mask: npt.ArrayLike, pred_fg: npt.ArrayLike | None = None,
              lpips: Callable[[np.ndarray, np.ndarray], npt.ArrayLike] | None = None) -> dict[str, np.ndarray]:
    """The protocol's per-image values for one batch.

    pred_bg, bg, comp: [N, H, W, 3]; fg_rgba: the stored foreground [N, H, W, 4];
    mask: the stored benchmark mask [N, H, W, C] in [0, 1]; pred_fg: the
    predicted 3-channel foreground rendering (None: the model has none);
    lpips: None or a function (a, b) -> per-image LPIPS of [0, 1] images."""
    y, t = quantize(pred_bg), _batch(bg)
    if protocol == "clwd":
        yf, tf = y.astype(np.float32), t.astype(np.float32)
        out = {"psnr": np.asarray(metrics.psnr(yf, tf, cap=PSNR_CAP), np.float64),
               "ssim": np.asarray(metrics.ssim(yf, tf, zero_pad=True), np.float64),
               "rmse": np.asarray(metrics.rmse(yf, tf), np.float64),
               "rmse_w": np.asarray(metrics.rmse_masked(yf, tf, np.asarray(mask, np.float32)[..., :1]), np.float64)}
        if pred_fg is not None:
            rgba = blend.foreground_rgba("watermark", np.asarray(pred_fg, np.float64), _batch(comp), y)
            err = (quantize(rgba[..., 3]) - quantize(np.asarray(fg_rgba)[..., 3])) * 255.0
            out["alpha_mae"] = np.abs(err).mean(axis=(1, 2))
            out["alpha_rmse"] = np.sqrt((err ** 2).mean(axis=(1, 2)))
        return out
    if protocol == "flare7k":
        out = {"psnr": np.asarray(metrics.psnr(y, t, cap=PSNR_CAP), np.float64), "ssim": ssim_uniform(t, y)}
        if lpips is not None:
            out["lpips"] = np.asarray(lpips(flare7k_lpips_inputs(t), flare7k_lpips_inputs(y)), np.float64)
        for name, m in region_masks(np.asarray(mask, np.float64)[..., :3]).items():
            out[f"{name}_psnr"] = masked_psnr(t, y, m)
        return out
    raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def summarize(protocol: str, per: dict[str, np.ndarray]) -> dict:
    """Means over images of `per` ({metric: per-image values}); region PSNRs over the images holding the region."""
    out: dict = {}
    for key, v in per.items():
        v = np.asarray(v, np.float64)
        ok = ~np.isnan(v)
        out[key] = float(v[ok].mean()) if ok.any() else None
        if key.endswith("_psnr"):
            out[f"{key}_n"] = int(ok.sum())
    if protocol == "flare7k":
        out.setdefault("lpips", NA_LPIPS)
        parts = [out.get(f"{r}_psnr") for r in REGIONS]
        out["score"] = float(np.mean(parts)) if all(p is not None for p in parts) else None
    if protocol == "clwd" and "alpha_mae" not in out:
        out["alpha_mae"] = out["alpha_rmse"] = "n/a (model predicts no foreground)"
    return out


# report.md: (key, column header, format) per protocol, and the note under the table
COLUMNS = {
    "clwd": (("psnr", "PSNR↑", "{:.2f}"), ("ssim", "SSIM↑", "{:.4f}"), ("rmse", "RMSE↓", "{:.2f}"),
             ("rmse_w", "RMSEw↓", "{:.2f}"), ("alpha_mae", "alpha MAE↓", "{:.2f}"),
             ("alpha_rmse", "alpha RMSE↓", "{:.2f}")),
    "flare7k": (("psnr", "PSNR↑", "{:.2f}"), ("ssim", "SSIM↑", "{:.4f}"), ("lpips", "LPIPS↓", "{:.4f}"),
                ("glare_psnr", "G-PSNR↑", "{:.2f}"), ("streak_psnr", "S-PSNR↑", "{:.2f}"),
                ("global_psnr", "Global-PSNR↑", "{:.2f}"), ("score", "Score↑", "{:.2f}")),
}
TITLES = {"clwd": "CLWD protocol", "flare7k": "Flare7K++ protocol"}
NOTES = {
    "clwd": "As WDNet's CLWD evaluation: background PSNR, pytorch_ssim SSIM, RMSE on 0-255 and RMSEw = RMSE inside "
            "CLWD's Mask; the foreground's alpha error (MAE and RMSE on 0-255, whole image) of the predicted layer "
            "against CLWD's Alpha. Predictions rounded to 8 bits; means over images.",
    "flare7k": "As Flare7K's evaluate.py: PSNR, skimage SSIM (7x7 uniform window) and LPIPS (fed [0, 1] without "
               "normalize, as their script) of the 8-bit background; G-PSNR / S-PSNR / Global-PSNR inside the "
               "mask's glare (G), streak (R - G) and non-light-source (255 - B) regions, each averaged over the "
               "images holding the region; Score = their mean. LPIPS is n/a without --lpips-weights.",
}
