"""Prepared subjects in memory: the manifest's images (and label maps) as tensors.

A prepared set is small (a 40x48x40 float32 volume is 300 KB; 1000 subjects at 160x224x160 are
23 GB), so it is loaded once and batches are plain tensor indexing: the loader never starves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from medldm.data.samplesheet import read_manifest
from medldm.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class PreparedSet:
    """Subjects of a manifest, in manifest order.

    images ``(N, 1, X, Y, Z)`` float32 in [0, 1]; labels ``(N, X, Y, Z)`` uint8 or None;
    class_index ``(N,)`` int64 (-1 for no class); affines ``(N, 4, 4)``: each subject's prepared
    affine (all share voxel axes and spacing; each keeps its own origin); masks ``(N, X, Y, Z)``
    uint8 inpainting masks (1 = region to fill) or None.
    """

    subject_ids: list[str]
    class_index: np.ndarray
    splits: list[str]
    images: torch.Tensor
    labels: torch.Tensor | None
    affines: np.ndarray
    masks: torch.Tensor | None = None

    @property
    def affine(self) -> np.ndarray:
        """The reference affine of the grid: the first subject's. Outputs with no source subject
        (generated volumes) are placed with it."""
        return self.affines[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[2:])

    def __len__(self) -> int:
        return len(self.subject_ids)

    def select(self, keep: list[int]) -> PreparedSet:
        """The subjects at positions ``keep``."""
        return replace(
            self,
            subject_ids=[self.subject_ids[i] for i in keep],
            class_index=self.class_index[keep],
            splits=[self.splits[i] for i in keep],
            images=self.images[keep],
            labels=None if self.labels is None else self.labels[keep],
            affines=self.affines[keep],
            masks=None if self.masks is None else self.masks[keep],
        )

    def subset(self, split: str) -> PreparedSet:
        return self.select([i for i, s in enumerate(self.splits) if s == split])


def _load(path: str, dtype, manifest: Path) -> tuple[np.ndarray, np.ndarray]:
    if not Path(path).is_file():
        raise InputError(f"{manifest}: file {path} does not exist; re-run the prepare stage")
    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=dtype), img.affine


def class_indices(classes_in_manifest: list[str], classes: list[str], where: str) -> np.ndarray:
    """Class names -> indices into ``classes``; '' -> -1; an unknown name is an InputError."""
    unknown = sorted({c for c in classes_in_manifest if c and c not in classes})
    if unknown:
        raise InputError(f"{where}: classes {unknown} are not in the config's classes {classes}")
    return np.array([classes.index(c) if c else -1 for c in classes_in_manifest], dtype=np.int64)


def load_prepared(manifest_path: str | Path, classes: list[str], with_labels: bool = True) -> PreparedSet:
    """Load every subject of the manifest (paths in it are relative to the working directory).

    Label maps are loaded when ``with_labels`` and the manifest has them, inpainting masks when
    the manifest has them. All volumes must share
    one grid shape and voxel axes; each keeps its own origin (its real position) in ``affines``.
    """
    manifest_path = Path(manifest_path)
    table = read_manifest(manifest_path)
    if table.empty:
        raise InputError(f"manifest {manifest_path} lists no subjects")
    with_labels = with_labels and bool((table["label"] != "").all())
    with_masks = bool((table["mask"] != "").all())
    images, labels, masks, affines, affine, moved = [], [], [], [], None, 0
    for _, row in tqdm(table.iterrows(), total=len(table), desc="loading prepared data", unit="vol", disable=None):
        image, img_affine = _load(row["image"], np.float32, manifest_path)
        if affine is None:
            affine, shape = img_affine, image.shape
        elif image.shape != shape:
            raise InputError(
                f"{row['image']}: shape {image.shape} differs from {shape} of the other subjects; "
                "all prepared volumes must share prepare.shape"
            )
        elif not np.allclose(img_affine[:3, :3], affine[:3, :3], atol=1e-3):
            log.warning("%s: voxel axes or spacing differ from the first subject's (not from prepare?); "
                        "generated volumes use the first subject's affine", row["image"])
        elif not np.allclose(img_affine, affine, atol=1e-3):
            moved += 1
        images.append(image)
        affines.append(img_affine)
        if with_labels:
            labels.append(_load(row["label"], np.uint8, manifest_path)[0])
        if with_masks:
            masks.append(_load(row["mask"], np.uint8, manifest_path)[0])
    if moved:
        log.info("%d of %d subjects have their own origin (kept per subject); generated volumes use the first "
                 "subject's affine", moved, len(table))
    return PreparedSet(
        subject_ids=table["subject_id"].tolist(),
        class_index=class_indices(table["class"].tolist(), classes, f"manifest {manifest_path}"),
        splits=table["split"].tolist(),
        images=torch.from_numpy(np.stack(images))[:, None],
        labels=torch.from_numpy(np.stack(labels)) if with_labels else None,
        affines=np.stack(affines).astype(np.float64),
        masks=torch.from_numpy(np.stack(masks)) if with_masks else None,
    )
