"""MS-SSIM diversity (scales fitted to the volume size) and reconstruction SSIM/PSNR."""

from __future__ import annotations

import numpy as np
import pytest

from medldm.errors import InputError
from medldm.evaluation.diversity import (
    MS_SSIM_WEIGHTS,
    fit_msssim,
    pairwise_msssim,
    reconstruction_metrics,
    sample_pairs,
    summary,
)


def volumes(n: int, shape=(40, 48, 40), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(shape).astype(np.float32) for _ in range(n)]


def test_scales_fit_the_volume_size():
    assert fit_msssim((160, 192, 160), kernel_size=7) == pytest.approx(np.array(MS_SSIM_WEIGHTS) / sum(MS_SSIM_WEIGHTS))
    assert len(fit_msssim((40, 48, 40), kernel_size=7)) == 3  # 40 // 4 >= 7, 40 // 9 < 7
    assert len(fit_msssim((40, 48, 40), kernel_size=3)) == 4
    assert len(fit_msssim((16, 16, 16), kernel_size=7)) == 2
    assert sum(fit_msssim((16, 16, 16), kernel_size=7)) == pytest.approx(1.0)
    with pytest.raises(InputError, match=r"at least 63 voxels.*40x48x40.*evaluate.msssim"):
        fit_msssim((40, 48, 40), kernel_size=7, scales=4)
    with pytest.raises(InputError, match="8x8x8"):
        fit_msssim((8, 8, 8), kernel_size=7)
    with pytest.raises(InputError, match="odd"):
        fit_msssim((40, 48, 40), kernel_size=4)


def test_msssim_of_a_volume_with_itself_is_one_and_lower_for_different_volumes():
    a, b = volumes(2)
    smooth = np.clip(a * 0.2 + 0.4, 0, 1)
    values = pairwise_msssim([a, a, b, smooth], kernel_size=7, max_pairs=0)
    assert len(values) == 6  # all pairs of 4
    assert values[0] == pytest.approx(1.0, abs=1e-5)  # (a, a)
    assert values[1] < 0.5  # (a, b): independent noise
    small = pairwise_msssim(volumes(3, (16, 16, 16)), kernel_size=7)
    assert small.shape == (3,) and np.all(small < 1)
    with pytest.raises(InputError, match="at least 2"):
        pairwise_msssim([a])


def test_pair_sampling_is_seeded_and_capped():
    assert sample_pairs(4, 0) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    chosen = sample_pairs(50, 20, seed=1)
    assert len(set(chosen)) == 20 and chosen == sample_pairs(50, 20, seed=1)
    assert summary(np.array([1.0, 3.0])) == {"mean": 2.0, "std": 1.0, "n": 2}


def test_reconstruction_ssim_and_psnr():
    real = volumes(2, (16, 16, 16))
    rng = np.random.default_rng(1)
    noisy = [np.clip(v + rng.normal(0, 0.05, v.shape), 0, 1).astype(np.float32) for v in real]
    same = reconstruction_metrics(real, real)
    assert same["ssim"] == pytest.approx([1.0, 1.0], abs=1e-5)
    out = reconstruction_metrics(real, noisy)
    mse = [np.mean((x - y) ** 2) for x, y in zip(real, noisy, strict=True)]
    assert out["psnr"] == pytest.approx(10 * np.log10(1 / np.array(mse)), rel=1e-4)
    assert np.all(out["ssim"] < 1) and np.all(out["ssim"] > 0.5)
    with pytest.raises(InputError, match="matching"):
        reconstruction_metrics(real, noisy[:1])
