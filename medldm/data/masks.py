"""Inpainting masks: input checks, seeded random ellipsoids, and paste-back with a blend ramp.

A mask is a binary volume on its image's grid; 1 marks the region to fill (the "hole"), 0 the
known tissue. Preparation resamples it with the image (nearest neighbour, same crop), decoding
pastes the known voxels back outside it, evaluation scores the fill inside it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medldm.errors import InputError

# A mask must leave at least this fraction of the foreground (brain, body) known: an inpainting
# model conditioned on nothing is an unconditional generator, and the scores inside would mean little.
MIN_KNOWN_FRACTION = 0.01


def check_mask_input(mask: np.ndarray, mask_affine: np.ndarray, image_shape, image_affine, path) -> np.ndarray:
    """A mask file's data as read (before preparation), checked against its image; returns it as uint8.

    Refuses another shape or geometry (affine) than the image's, values other than 0 and 1, and an
    empty mask, each naming ``path``.
    """
    if tuple(mask.shape) != tuple(image_shape) or not np.allclose(mask_affine, image_affine, atol=1e-3):
        raise InputError(
            f"{path}: mask geometry (shape {tuple(mask.shape)}, affine {np.round(mask_affine, 3).tolist()}) does not "
            f"match its image (shape {tuple(image_shape)}, affine {np.round(image_affine, 3).tolist()}); "
            "a mask must be on its image's voxel grid (resample it to the image first)"
        )
    values = np.unique(mask)
    if not set(values.tolist()) <= {0, 1}:
        shown = values[:6].tolist()
        raise InputError(f"{path}: mask is not binary (values {shown}{' ...' if len(values) > 6 else ''}); "
                         "use 1 for the region to fill and 0 elsewhere")
    if not values.any():
        raise InputError(f"{path}: mask is empty (no voxel is 1): nothing to inpaint; remove the row or its mask")
    return mask.astype(np.uint8)


def check_prepared_mask(mask: np.ndarray, foreground: np.ndarray, path) -> None:
    """After resampling and cropping: the mask must keep some voxels and leave some foreground known."""
    if not mask.any():
        raise InputError(f"{path}: mask is empty after preparation (resampled to prepare.spacing and cropped to "
                         "prepare.shape, no voxel is left): use a larger mask or a finer prepare.spacing")
    interior = ndimage.binary_erosion(foreground)  # the edge layer differs between linear and nearest resampling
    brain = int(interior.sum())
    known = int((interior & ~mask.astype(bool)).sum())
    if brain and known < MIN_KNOWN_FRACTION * brain:
        raise InputError(
            f"{path}: mask covers the whole foreground (brain/body): only {known} of its {brain} prepared voxels "
            f"stay known (less than {MIN_KNOWN_FRACTION:.0%}); an inpainting mask must leave tissue to condition on"
        )


def random_ellipsoids(inside: np.ndarray, n: int, rng: np.random.Generator, radii=(2.0, 5.0)) -> np.ndarray:
    """Union of ``n`` random ellipsoids centred on voxels of ``inside`` (bool (X, Y, Z)), clipped to it.

    Radii (voxels) are drawn per axis from ``radii``; ellipsoids are axis-aligned. Returns uint8.
    """
    candidates = np.argwhere(inside)
    if not len(candidates):
        raise InputError("random ellipsoids: the region to place them in is empty")
    grid = np.ogrid[tuple(slice(0, s) for s in inside.shape)]
    out = np.zeros(inside.shape, bool)
    for _ in range(n):
        centre = candidates[rng.integers(len(candidates))]
        r = rng.uniform(radii[0], radii[1], 3)
        out |= sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, r, strict=True)) <= 1.0
    return (out & inside).astype(np.uint8)


def blend_weights(mask: np.ndarray, blend_voxels: int = 0) -> np.ndarray:
    """Weight of the generated volume per voxel: 0 outside the mask, ramping to 1 inside it.

    A mask voxel at Euclidean distance ``d`` (voxels) from the nearest known voxel gets
    ``min(1, d / (blend_voxels + 1))``: ``blend_voxels`` 0 is a hard paste (every mask voxel 1),
    ``b`` ramps over the ``b`` outermost voxel layers of the mask. The ramp lies only inside the
    mask, so the known tissue comes back exactly.
    """
    inside = np.asarray(mask).astype(bool)
    if blend_voxels <= 0:
        return inside.astype(np.float32)
    distance = ndimage.distance_transform_edt(inside)
    return np.where(inside, np.minimum(1.0, distance / (blend_voxels + 1)), 0.0).astype(np.float32)


def paste_back(generated: np.ndarray, original: np.ndarray, mask: np.ndarray, blend_voxels: int = 0) -> np.ndarray:
    """``generated`` inside the mask, ``original`` outside (exactly), blended over ``blend_voxels`` inside."""
    weight = blend_weights(mask, blend_voxels)
    blended = weight * np.asarray(generated, np.float32) + (1.0 - weight) * np.asarray(original, np.float32)
    return np.where(weight > 0, blended, original).astype(np.float32)

