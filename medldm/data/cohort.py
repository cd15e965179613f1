"""Prepared subjects, read one at a time from their NIfTI files.

A real cohort does not fit in memory (1000 subjects at 160x224x160 are 23 GB of float32, per
process), so no stage loads it whole: ``load_prepared`` reads the manifest and the files' headers
(ids, classes, splits, shapes, affines) and a ``PreparedSet`` reads a subject's volume when it is
indexed. Training draws its batches through ``training_loader`` (a torch DataLoader with workers,
optionally over a RAM cache of bounded size); the other stages iterate ``volumes()`` or ``batches()``.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader

from medldm.data.samplesheet import read_manifest
from medldm.errors import InputError

log = logging.getLogger(__name__)


class NiftiVolumes:
    """NIfTI files read on access, indexed like a ``(N, C, X, Y, Z)`` tensor's rows: ``[i]`` reads
    file ``i`` as a ``(C, X, Y, Z)`` tensor (``channel`` False: ``(X, Y, Z)``); a list of positions
    gives the lazy subset of those files. ``shape`` is that of the whole stack. ``channels`` > 1:
    the files are 4D ``(X, Y, Z, C)`` (multi-channel subjects)."""

    def __init__(self, paths: Sequence[str], dtype, grid: tuple[int, ...], channel: bool = True, channels: int = 1):
        self.paths, self.dtype, self.grid, self.channel = list(paths), dtype, tuple(grid), channel
        self.channels = channels

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.paths), *((self.channels,) if self.channel else ()), *self.grid)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            volume = torch.from_numpy(np.asarray(nib.load(self.paths[i]).dataobj, dtype=self.dtype))
            if volume.ndim == len(self.grid) + 1:  # channels last in the file
                return volume.movedim(-1, 0)
            return volume[None] if self.channel else volume
        return NiftiVolumes([self.paths[j] for j in np.asarray(i, dtype=np.int64).tolist()], self.dtype,
                            self.grid, self.channel, self.channels)


class Rows(Sequence):
    """Rows of an array-like (a ``PreparedSet``'s volumes, an HDF5 dataset), read when indexed:
    ``[i]`` is one row as a numpy array; a slice or a 1-D list of positions stacks those rows."""

    def __init__(self, data, indices=None):
        self.data = data
        self.indices = list(range(len(data))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return np.asarray(self.data[self.indices[i]])
        picked = self.indices[i] if isinstance(i, slice) else [self.indices[j] for j in np.asarray(i).tolist()]
        return np.stack([np.asarray(self.data[j]) for j in picked])


@dataclass
class PreparedSet:
    """Subjects of a manifest, in manifest order, as a map-style torch Dataset.

    images: row ``i`` is subject ``i``'s ``(C, X, Y, Z)`` float32 tensor in [0, 1] (``NiftiVolumes``
    read on access, or an in-memory ``(N, C, X, Y, Z)`` tensor); labels: row ``i`` its ``(X, Y, Z)``
    uint8 label map, or None; masks: row ``i`` its ``(X, Y, Z)`` uint8 inpainting
    mask (1 = region to fill), or None; class_index ``(N,)`` int64 (-1 for no class); affines ``(N, 4, 4)``:
    each subject's prepared affine (all share voxel axes and spacing; each keeps its own origin).
    ``data[i]`` is ``{"image": (C, X, Y, Z)[, "label": (X, Y, Z)]}``, read from disk.
    channel_names: the C image channels (config ``image_channels``); ``["image"]`` for one.
    """

    subject_ids: list[str]
    class_index: np.ndarray
    splits: list[str]
    images: NiftiVolumes | torch.Tensor
    labels: NiftiVolumes | torch.Tensor | None
    affines: np.ndarray
    masks: NiftiVolumes | torch.Tensor | None = None
    channel_names: list[str] = field(default_factory=lambda: ["image"])

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

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"image": self.images[i]}
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item

    def volume(self, i: int, channel: int = 0) -> np.ndarray:
        """Subject ``i``'s image ``(X, Y, Z)`` float32 (of its ``channel``)."""
        return self.images[i][channel].numpy()

    def volumes(self, channel: int = 0) -> Rows:
        """The images (of one ``channel``) as a lazy sequence of ``(X, Y, Z)`` float32 arrays (one
        read per access)."""
        return Rows(_ImageRows(self, channel))

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

    def bytes_per_subject(self) -> int:
        voxels = int(np.prod(self.shape))
        return voxels * (4 * len(self.channel_names) + (1 if self.labels is not None else 0))


class _ImageRows:
    """``PreparedSet`` images (one channel) as ``(X, Y, Z)`` rows, for ``Rows``."""

    def __init__(self, data: PreparedSet, channel: int = 0):
        self.data, self.channel = data, channel

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data.volume(i, self.channel)


def batches(data: PreparedSet, batch_size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """(first index, images ``(b, C, X, Y, Z)``, labels ``(b, X, Y, Z)`` or None) in manifest
    order, ``batch_size`` subjects read at a time."""
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        images = torch.stack([it["image"] for it in items])
        labels = torch.stack([it["label"] for it in items]) if data.labels is not None else None
        del items  # only the stacked batch lives on
        yield start, images, labels


class PlannedBatches:
    """A DataLoader batch sampler that yields the batches last set in ``plan`` (lists of subject
    positions): the trainer decides the order from (seed, epoch, rank), never the loader."""

    def __init__(self):
        self.plan: list[list[int]] = []

    def __iter__(self):
        return iter(list(self.plan))

    def __len__(self) -> int:
        return len(self.plan)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM and SIGUSR1: SLURM's scancel and time limit signal the
    whole job, and a worker killed by them takes the trainer down before the main process (which
    handles them: medldm.checkpoint.StopFlag) can write its checkpoint. Workers still exit with it."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """At interpreter exit, multiprocessing stops its daemonic children with SIGTERM and waits for
    them; workers that ignore SIGTERM (a loader not run to its end) would make that wait forever.
    This runs first (atexit is last-in, first-out) and kills them; SIGCHLD goes back to its default
    so that torch's worker watch does not report the kill as a failure."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


atexit.register(_kill_leftover_workers)  # after torch's multiprocessing import, so it runs before its exit


def training_loader(data: PreparedSet, workers: int, cache_mb: float, pin_memory: bool = False,
                    ) -> tuple[DataLoader, PlannedBatches]:
    """A DataLoader over ``data`` whose batches are the ``plan`` of the returned sampler.

    ``workers`` processes read subjects ahead of the step (0: in this process). ``cache_mb`` > 0
    keeps the first subjects that fit in that many MB in RAM (MONAI ``CacheDataset``, filled
    before the workers start, shared with them copy-on-write); 0 reads every batch from disk.
    Workers draw no random numbers and batches come back in plan order, so the batches of a
    step do not depend on worker timing.
    """
    dataset = data
    if cache_mb > 0:
        from monai.data import CacheDataset

        per_subject = data.bytes_per_subject() / 2**20
        if cache_mb < per_subject:
            raise InputError(
                f"vae train.cache_mb is {cache_mb:g} MB but one subject takes {per_subject:.2f} MB "
                f"(grid {'x'.join(map(str, data.shape))}): set train.cache_mb to 0 (no cache) or to at "
                f"least {np.ceil(per_subject):g}"
            )
        cached = min(len(data), int(cache_mb // per_subject))
        log.info("caching %d of %d training subjects in RAM (train.cache_mb %g)", cached, len(data), cache_mb)
        dataset = CacheDataset(data, transform=None, cache_num=cached, copy_cache=False, progress=False)
    sampler = PlannedBatches()
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator())  # leaves the global RNG (the model's noise) alone
    return loader, sampler


def _header(path: str, manifest: Path):
    if not Path(path).is_file():
        raise InputError(f"{manifest}: file {path} does not exist; re-run the prepare stage")
    return nib.load(path)


def class_indices(classes_in_manifest: list[str], classes: list[str], where: str) -> np.ndarray:
    """Class names -> indices into ``classes``; '' -> -1; an unknown name is an InputError."""
    unknown = sorted({c for c in classes_in_manifest if c and c not in classes})
    if unknown:
        raise InputError(f"{where}: classes {unknown} are not in the config's classes {classes}")
    return np.array([classes.index(c) if c else -1 for c in classes_in_manifest], dtype=np.int64)


def load_prepared(manifest_path: str | Path, classes: list[str], with_labels: bool = True) -> PreparedSet:
    """The subjects of the manifest (paths in it are relative to the working directory), read
    lazily: only the headers are read here, to check the files exist and share one grid.

    Label maps are included when ``with_labels`` and the manifest has them, inpainting masks when
    the manifest has them. All volumes must share
    one grid shape and voxel axes; each keeps its own origin (its real position) in ``affines``.
    """
    manifest_path = Path(manifest_path)
    table = read_manifest(manifest_path)
    if table.empty:
        raise InputError(f"manifest {manifest_path} lists no subjects")
    with_labels = with_labels and bool((table["label"] != "").all())
    with_masks = bool((table["mask"] != "").all())
    channel_names = manifest_channels(table, manifest_path)
    affines, affine, shape, moved = [], None, None, 0
    for _, row in table.iterrows():
        img = _header(row["image"], manifest_path)
        if affine is None:
            affine, shape = img.affine, img.shape
            if len(channel_names) > 1 and shape[-1:] != (len(channel_names),):
                raise InputError(f"{row['image']}: shape {shape} does not hold the manifest's channels "
                                 f"{channel_names} as a last axis; re-run the prepare stage")
        elif img.shape != shape:
            raise InputError(
                f"{row['image']}: shape {img.shape} differs from {shape} of the other subjects; "
                "all prepared volumes must share prepare.shape"
            )
        elif not np.allclose(img.affine[:3, :3], affine[:3, :3], atol=1e-3):
            log.warning("%s: voxel axes or spacing differ from the first subject's (not from prepare?); "
                        "generated volumes use the first subject's affine", row["image"])
        elif not np.allclose(img.affine, affine, atol=1e-3):
            moved += 1
        affines.append(img.affine)
        if with_labels:
            _header(row["label"], manifest_path)
        if with_masks:
            _header(row["mask"], manifest_path)
    if moved:
        log.info("%d of %d subjects have their own origin (kept per subject); generated volumes use the first "
                 "subject's affine", moved, len(table))
    grid = shape if len(channel_names) == 1 else shape[:-1]  # (X, Y, Z), or (X, Y) for 2D images
    return PreparedSet(
        subject_ids=table["subject_id"].tolist(),
        class_index=class_indices(table["class"].tolist(), classes, f"manifest {manifest_path}"),
        splits=table["split"].tolist(),
        images=NiftiVolumes(table["image"].tolist(), np.float32, grid, channels=len(channel_names)),
        labels=NiftiVolumes(table["label"].tolist(), np.uint8, grid, channel=False) if with_labels else None,
        affines=np.stack(affines).astype(np.float64),
        masks=NiftiVolumes(table["mask"].tolist(), np.uint8, grid, channel=False) if with_masks else None,
        channel_names=channel_names,
    )


def manifest_channels(table, manifest_path) -> list[str]:
    """The image channels the manifest records (its ``channels`` column); ``["image"]`` for one."""
    recorded = set(table["channels"])
    if len(recorded) > 1:
        raise InputError(f"manifest {manifest_path}: subjects have different image channels {sorted(recorded)}; "
                         "re-run the prepare stage")
    names = recorded.pop()
    return names.split(",") if names else ["image"]
