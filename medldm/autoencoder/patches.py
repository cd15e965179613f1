"""Random training crops for patch-trained autoencoders (``vae.<name>.train.patch_size``).

A batch ``(B, 1, X, Y, Z)`` (and its label maps ``(B, X, Y, Z)`` in paired mode) becomes one crop
per volume, ``(B, 1, *patch)``. Each crop is centred on a foreground voxel (prepared intensity
above ``foreground_threshold``) with probability ``foreground_fraction``, else on a background
voxel, and kept inside the volume (MONAI ``RandCropByPosNegLabel``). The crops are a function of
(seed, epoch, batch, rank), never of a global random state, so a resumed run crops exactly as an
uninterrupted one. ``patch_stages`` grow the crop over the epochs (MAISI: 64^3, then 128^3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import RandCropByPosNegLabel
from monai.utils import convert_to_tensor

from medldm.errors import InputError


def patch_size_at(train: dict, epoch: int) -> list[int] | None:
    """Crop size at ``epoch`` (0-based): each of ``patch_stages`` for its epochs, in order, then
    ``patch_size`` (None: whole volumes)."""
    end = 0
    for stage in train.get("patch_stages") or []:
        end += stage["epochs"]
        if epoch < end:
            return stage["patch_size"]
    return train.get("patch_size")


def check_patches(train: dict, shape: Sequence[int], factor: int) -> None:
    """Every configured crop fits in volumes of ``shape`` and divides into latent voxels."""
    sizes = [("train.patch_size", train.get("patch_size"))]
    sizes += [(f"train.patch_stages[{i}].patch_size", s["patch_size"]) for i, s in enumerate(train.get("patch_stages") or [])]
    for key, size in sizes:
        if size is None:
            continue
        if len(size) != len(shape) or any(p > s for p, s in zip(size, shape, strict=True)):
            raise InputError(
                f"vae {key} {list(size)} does not fit in the prepared volumes {list(shape)}: use at most "
                f"the prepared shape per axis, or null to train on whole volumes"
            )
        if any(p % factor for p in size):
            raise InputError(
                f"vae {key} {list(size)} is not divisible by {factor} (the autoencoder downsamples by "
                f"{factor}): use multiples of {factor}"
            )


def crop_seed(*key: int) -> int:
    """A 32-bit seed from integers such as (seed, epoch, batch, rank, sample)."""
    return int(np.random.SeedSequence([k % 2**32 for k in key]).generate_state(1)[0])


def random_crops(x: torch.Tensor, size: Sequence[int], foreground_fraction: float, threshold: float,
                 key: Sequence[int]) -> torch.Tensor:
    """One crop of ``size`` per sample of ``x`` ``(B, C, X, Y, Z)``; foreground is channel 0 above
    ``threshold``; sample ``i``'s crop depends only on (``key``, i)."""
    crop = RandCropByPosNegLabel(size, pos=foreground_fraction, neg=1 - foreground_fraction, num_samples=1)
    crops = []
    for i, volume in enumerate(x):
        crop.set_random_state(seed=crop_seed(*key, i))
        (patch,) = crop(volume, label=volume[:1] > threshold)
        crops.append(convert_to_tensor(patch, track_meta=False))
    return torch.stack(crops)


def crop_batch(image: torch.Tensor, label: torch.Tensor | None, size: Sequence[int], train: dict,
               key: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``random_crops`` of an image batch and, in paired mode, the same crops of its label maps."""
    x = image if label is None else torch.cat([image, label[:, None].to(image.dtype)], 1)
    x = random_crops(x, size, train["foreground_fraction"], train["foreground_threshold"], key)
    k = image.shape[1]
    return x[:, :k], (None if label is None else x[:, k].to(label.dtype))
