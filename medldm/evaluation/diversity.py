"""Diversity and fidelity of 3D volumes: MS-SSIM among pairs (MONAI ``MultiScaleSSIMMetric``) and
SSIM / PSNR of autoencoder reconstructions (MONAI ``SSIMMetric``, ``PSNRMetric``).

MS-SSIM halves the volume between scales and filters each scale with a ``kernel_size`` window, so
small volumes cannot take the usual 5 scales with an 11-voxel kernel: ``fit_msssim`` picks the
number of scales that fits (or checks the configured one) and fails with a clear message otherwise.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

from medldm.errors import InputError

log = logging.getLogger(__name__)

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first


def _divisor(scales: int) -> int:
    # MONAI requires size // (scales - 1)^2 > kernel - 1; the coarsest scale (size / 2^(scales-1))
    # must also hold a whole kernel.
    return max(1, (scales - 1) ** 2, 2 ** (scales - 1))


def _fits(shape: Sequence[int], kernel_size: int, scales: int) -> bool:
    return all(size // _divisor(scales) >= kernel_size for size in shape)


def fit_msssim(shape: Sequence[int], kernel_size: int = 7, scales: int | None = None) -> tuple[float, ...]:
    """MS-SSIM scale weights for volumes of ``shape`` (X, Y, Z) and a ``kernel_size`` window.

    ``scales`` None picks the most (up to 5, at least 2) that fit; the weights are the first
    ``scales`` of the standard five, renormalised to sum to 1.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InputError(f"evaluate.msssim.kernel_size is {kernel_size}; use an odd number (e.g. 3, 5, 7)")
    candidates = [scales] if scales else range(len(MS_SSIM_WEIGHTS), 1, -1)
    for n in candidates:
        if not 2 <= n <= len(MS_SSIM_WEIGHTS):
            raise InputError(f"evaluate.msssim.scales is {n}; use 2 to {len(MS_SSIM_WEIGHTS)} or null (auto)")
        if _fits(shape, kernel_size, n):
            weights = np.asarray(MS_SSIM_WEIGHTS[:n])
            return tuple(float(w) for w in weights / weights.sum())
    n = scales or 2
    raise InputError(
        f"MS-SSIM with kernel_size {kernel_size} and {n} scales needs every side of the volume to be at "
        f"least {kernel_size * _divisor(n)} voxels, but volumes are {'x'.join(map(str, shape))}: lower "
        "evaluate.msssim.kernel_size (odd, >= 3) or evaluate.msssim.scales"
    )


def msssim_metric(shape: Sequence[int], kernel_size: int = 7, scales: int | None = None) -> MultiScaleSSIMMetric:
    """MONAI's MS-SSIM for volumes (or 2D images) in [0, 1], with scales fitted to ``shape``."""
    weights = fit_msssim(shape, kernel_size, scales)
    return MultiScaleSSIMMetric(spatial_dims=len(shape), data_range=1.0, kernel_size=kernel_size, weights=weights)


def sample_pairs(n: int, max_pairs: int, seed: int = 0) -> list[tuple[int, int]]:
    """All pairs i < j of ``n`` items, or ``max_pairs`` of them drawn without replacement."""
    pairs = list(itertools.combinations(range(n), 2))
    if 0 < max_pairs < len(pairs):
        chosen = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(chosen)]
    return pairs


@torch.no_grad()
def pairwise_msssim(volumes: Sequence[np.ndarray], kernel_size: int = 7, scales: int | None = None,
                    max_pairs: int = 100, seed: int = 0, batch_size: int = 8) -> np.ndarray:
    """MS-SSIM of pairs among ``volumes`` (each (X, Y, Z) in [0, 1]): (P,) values.

    Low mean MS-SSIM among synthetic pairs means diverse samples; compare with the real pairs'.
    """
    if len(volumes) < 2:
        raise InputError(f"MS-SSIM diversity needs at least 2 volumes, got {len(volumes)}")
    metric = msssim_metric(volumes[0].shape, kernel_size, scales)
    pairs = sample_pairs(len(volumes), max_pairs, seed)
    values = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        a = torch.stack([torch.as_tensor(volumes[i], dtype=torch.float32) for i, _ in chunk])[:, None]
        b = torch.stack([torch.as_tensor(volumes[j], dtype=torch.float32) for _, j in chunk])[:, None]
        values.append(metric(a, b).flatten().numpy())
    return np.concatenate(values)


def summary(values: np.ndarray) -> dict:
    """{mean, std, n} of a set of pair or subject values."""
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}


SSIM_WINDOW = 7  # voxels: every SSIM medldm reports (training logs, vae.pt, the report) uses it


def ssim_metric(shape: Sequence[int]) -> SSIMMetric:
    """MONAI's SSIM (data range 1, Gaussian SSIM_WINDOW window) for volumes (or 2D images) of ``shape``."""
    if min(shape) < SSIM_WINDOW:
        raise InputError(f"SSIM uses a {SSIM_WINDOW}-voxel window but the volumes are "
                         f"{'x'.join(map(str, shape))}: raise prepare.shape to at least {SSIM_WINDOW} per axis")
    return SSIMMetric(spatial_dims=len(shape), data_range=1.0, win_size=SSIM_WINDOW)


@torch.no_grad()
def reconstruction_metrics(real: Sequence[np.ndarray], recon: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """SSIM and PSNR (data range 1) of each reconstruction against its real volume: {ssim, psnr} (N,)."""
    if len(real) != len(recon) or not len(real):
        raise InputError(f"reconstruction metrics need matching, non-empty sets ({len(real)} vs {len(recon)})")
    ssim = ssim_metric(real[0].shape)
    psnr = PSNRMetric(max_val=1.0)
    out = {"ssim": [], "psnr": []}
    for x, y in zip(real, recon, strict=True):
        a = torch.as_tensor(np.clip(y, 0, 1), dtype=torch.float32)[None, None]
        b = torch.as_tensor(x, dtype=torch.float32)[None, None]
        out["ssim"].append(float(ssim(a, b).item()))
        out["psnr"].append(float(psnr(a, b).item()))
    return {k: np.asarray(v) for k, v in out.items()}
