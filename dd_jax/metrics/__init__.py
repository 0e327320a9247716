"""Image metrics: RMSE (0-255), RMSE in a mask, PSNR, SSIM, LPIPS, FID.

Every function takes float NHWC images in [0, 1] and returns one value per
image (papers report the mean over images), except the set-level FID.

    from dd_jax import metrics
    metrics.rmse(a, b)             # (N,) RMSE on the 0-255 scale
    metrics.rmse_masked(a, b, m)   # (N,) RMSE inside mask m (the LOGO papers' RMSEw)
    metrics.psnr(a, b)             # (N,) dB
    metrics.ssim(a, b)             # (N,) Wang et al., as dm-pix / tf.image.ssim
    metrics.ssim(a, b, zero_pad=True)  # the pytorch_ssim variant of the watermark papers
    metrics.frechet_distance(mu1, sigma1, mu2, sigma2)  # float, float64 maths

    from dd_jax.metrics import lpips, fid     # networks; weights are user files
    lpips.distance(lpips.load(path), a, b)    # (N,)
    fid.fid(fid.load_inception(path), real, fake)

Converted weight files: see ``dd_jax.metrics.weights`` and
``scripts/convert_metrics_weights.py``.
"""

from dd_jax.metrics.frechet import frechet_distance, gaussian_statistics
from dd_jax.metrics.pixel import mse, psnr, rmse, rmse_masked
from dd_jax.metrics.structural import ssim

__all__ = ["rmse", "rmse_masked", "psnr", "mse", "ssim", "frechet_distance",
           "gaussian_statistics"]
