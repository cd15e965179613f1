"""Inpainting scored inside the mask against the original (as the BraTS local-synthesis challenge
does): SSIM, PSNR and MSE per volume, with mean and percentile bootstrap 95 % intervals, next to
two baselines, and the largest change outside the mask (0 with paste-back).

SSIM inside the mask: MONAI's SSIM map (the same Gaussian ``SSIM_WINDOW`` window and constants as
every SSIM medldm reports) averaged over the mask voxels; the map covers the voxels whose window
fits in the volume, so mask voxels within half a window of the volume's edge are left out.
PSNR: data range 1 (volumes in [0, 1]), capped at ``PSNR_CAP`` dB for a perfect fill.

Baselines, pasted back like the method so that only the fill differs:
``autoencoder``: the autoencoder's decoding of the voided image's latent (what the model is given).
``mean_fill``: the mask filled with the mean intensity of the known foreground (voxels > 0 outside
the mask), which uses nothing the model does not see.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics.regression import compute_ssim_and_cs

from medldm.evaluation.classifier import bootstrap_rows
from medldm.evaluation.diversity import SSIM_WINDOW, ssim_metric

METRICS = ("ssim", "psnr", "mse")
PSNR_CAP = 100.0  # dB: the PSNR of an MSE of 1e-10


def mean_fill(original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``original`` with the mask filled by the mean of the known foreground (voxels > 0 outside it)."""
    hole = np.asarray(mask).astype(bool)
    known = (original > 0) & ~hole
    fill = float(original[known].mean()) if known.any() else 0.0
    return np.where(hole, fill, original).astype(np.float32)


@torch.no_grad()
def masked_ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Mean of the SSIM map over the mask voxels whose window fits in the volume (NaN if none)."""
    metric = ssim_metric(target.shape)  # checks the volume holds a window
    ssim_map, _ = compute_ssim_and_cs(
        torch.as_tensor(pred, dtype=torch.float32)[None, None], torch.as_tensor(target, dtype=torch.float32)[None, None],
        spatial_dims=3, kernel_size=metric.kernel_size, kernel_sigma=metric.kernel_sigma, data_range=1.0,
        kernel_type=metric.kernel_type, k1=metric.k1, k2=metric.k2,
    )
    half = SSIM_WINDOW // 2
    inner = np.asarray(mask).astype(bool)[tuple(slice(half, s - half) for s in target.shape)]
    return float(ssim_map[0, 0].numpy()[inner].mean()) if inner.any() else math.nan


def masked_metrics(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """SSIM, PSNR and MSE inside the mask (``pred`` clipped to [0, 1]) and ``outside_max_abs``, the
    largest absolute difference outside it."""
    hole = np.asarray(mask).astype(bool)
    pred = np.asarray(pred, np.float32)
    target = np.asarray(target, np.float32)
    outside = float(np.abs(pred - target)[~hole].max()) if (~hole).any() else 0.0
    clipped = np.clip(pred, 0, 1)
    mse = float(np.mean((clipped[hole].astype(np.float64) - target[hole]) ** 2))
    psnr = min(PSNR_CAP, 10 * math.log10(1 / max(mse, 1e-10)))
    return {"ssim": masked_ssim(clipped, target, hole), "psnr": psnr, "mse": mse, "outside_max_abs": outside}


def summarise(values: np.ndarray, boots: np.ndarray) -> dict:
    """{mean, ci_low, ci_high, n} of per-volume ``values`` over the bootstrap rows ``boots`` (B, n)."""
    values = np.asarray(values, np.float64)
    means = np.nanmean(values[boots], axis=1) if len(values) else np.array([np.nan])
    low, high = np.nanpercentile(means, [2.5, 97.5]) if np.isfinite(means).any() else (math.nan, math.nan)
    return {"mean": float(np.nanmean(values)) if len(values) else math.nan,
            "ci_low": float(low), "ci_high": float(high), "n": int(len(values))}


def score_methods(per_volume: dict[str, list[dict]], replicates: int = 1000, seed: int = 0) -> dict[str, dict]:
    """{method: {metric: summary}} from {method: per-volume masked_metrics}; every method is
    resampled with the same bootstrap rows (volumes drawn with replacement), so intervals compare."""
    n = len(next(iter(per_volume.values())))
    boots = bootstrap_rows(n, replicates, seed) if n else np.zeros((1, 0), np.int64)
    out = {}
    for method, rows in per_volume.items():
        out[method] = {m: summarise(np.array([r[m] for r in rows]), boots) for m in METRICS}
        out[method]["outside_max_abs"] = max((r["outside_max_abs"] for r in rows), default=0.0)
    return out
