"""Atomic file output: write to a temporary name beside the target, rename when complete."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it to ``path`` only on success.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.h5``) so libraries that
    pick a format by extension still work. On any exception the temporary file is removed,
    so a killed or failed job never leaves a file that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, descrip: str = "") -> None:
    """Write a NIfTI volume atomically; dtype is kept as given (float32 images, uint8 labels);
    ``descrip``: the header's description (at most 80 bytes, cut beyond)."""
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    if descrip:
        img.header["descrip"] = descrip.encode()[:80]
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a 2D image in [0, 1] as an 8-bit grayscale PNG, atomically, oriented as the montages
    show it (RAS arrays: the first axis left to right, the second bottom to top)."""
    from PIL import Image

    pixels = np.round(np.clip(np.rot90(np.asarray(image, np.float32)), 0, 1) * 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
