"""The one owner of medldm's HDF5 layouts. Every writer and reader goes through this module.

Two kinds of file, each stamped with ``kind`` and ``format_version`` attributes that readers check:

``latents`` (``export_latents`` and ``sample`` write it; ``train_ldm`` and ``decode`` read it)
    mu            (N, C, d, h, w) float32   posterior mean, or sampled latents (unscaled)
    logvar        (N, C, d, h, w) float32   posterior log-variance (absent for sampled latents)
    subject_id    (N,) str                  subject id, or sample id
    class_index   (N,) int64                index into ``class_names``; -1 for "no class"
    split         (N,) str                  train / val / test, or "synthetic"
    affine        (N, 4, 4) float64         voxel -> world of the row's volume: a real subject's own
                                            prepared affine; ``grid_affine`` for generated rows
    label         (N, X, Y, Z) uint8        prepared label maps (optional)
    source_id     (N,) str                  the real row a generated row was made from (inpainted or
                                            conditioned sets; optional)
    mask          (N, X, Y, Z) uint8        prepared inpainting masks, 1 = region to fill (optional)
    voided_mu     (N, C, d, h, w) float32   posterior mean of the voided image (mask voxels set to
                                            0 before encoding); present when the rows have masks
                                            (export_latents), absent in sample sets
    channel_mean  (C,) float32              mean of ``mu`` over all latent voxels of the train split
    channel_std   (C,) float32              std of ``mu`` over the same voxels
    attrs: scale_factor (1 / overall std of train ``mu``), grid_affine (4x4) and grid_shape (3,)
    of the prepared image grid, class_names, label_names, vae_sha256, settings (JSON text).
    ``grid_affine`` is the reference affine: the first prepared subject's (manifest order).
    Subjects share voxel axes and spacing but each keeps its own origin, so a volume decoded from a
    real subject's latent is placed with its row's ``affine``; generated volumes have no source
    subject and are placed with ``grid_affine``.

``volumes`` (``decode`` writes it; evaluation reads it)
    image         (N, X, Y, Z) float32      intensities in [0, 1] on the prepared grid; with K > 1
                                            image channels (attr ``image_channels``): (N, K, X, Y, Z).
                                            Read it through ``channel(k)`` / ``channel_names``.
                                            Optional when ``label`` is present (a label-map generator's volumes)
    label         (N, X, Y, Z) uint8        label maps, values index ``label_names`` (optional)
    mask          (N, X, Y, Z) uint8        inpainting masks of inpainted rows (optional)
    subject_id, class_index, split, affine, source_id (optional)  as above
    attrs: grid_affine, grid_shape, class_names, label_names, settings; image_channels (JSON list
    of the channel names; also in export_latents' latents) only in files of multi-channel subjects:
    a file without it has one channel, named ``image``.

Latents are stored unscaled: a consumer multiplies by ``scale_factor`` before diffusion and
divides by it after sampling, exactly once (see ``medldm.diffusion.process``).
Datasets are chunked one sample per chunk and uncompressed (float latents do not compress,
and gzip makes random reads ~10x slower).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from medldm.errors import InputError
from medldm.io import atomic_path

FORMAT_VERSION = 2  # 2: per-row affine (version 1 kept one affine for every subject)
LATENTS, VOLUMES = "latents", "volumes"
_STR = h5py.string_dtype()
_REQUIRED = {
    LATENTS: ("mu", "subject_id", "class_index", "split", "affine", "channel_mean", "channel_std"),
    VOLUMES: ("subject_id", "class_index", "split", "affine"),  # and image or label (_volume_main)
}
# How to re-create a file of another format version, by kind (named in the refusal).
_RECREATE = {
    LATENTS: "rerun export_latents (real subjects) or sample (a sample set), e.g. "
             "`snakemake --forcerun export_latents sample`",
    VOLUMES: "rerun decode (`snakemake --forcerun decode_reconstructions decode_synthetic`)",
}
_REQUIRED_ATTRS = ("grid_affine", "grid_shape", "class_names", "label_names", "settings")


@dataclass
class Header:
    """File-level metadata shared by both kinds."""

    grid_affine: np.ndarray
    grid_shape: tuple[int, int, int]
    class_names: list[str]
    label_names: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    scale_factor: float | None = None  # latents only
    vae_sha256: str = ""  # latents only
    image_channels: list[str] = field(default_factory=list)  # [] = one channel, named "image"


class _Writer:
    """Fills a file opened by ``create_latents`` / ``create_volumes`` row by row."""

    def __init__(self, h5: h5py.File, n: int, grid_affine: np.ndarray):
        self.h5, self.n, self.count, self.grid_affine = h5, n, 0, grid_affine

    def append(self, subject_id: str, class_index: int, split: str, *, affine: np.ndarray | None = None,
               source_id: str | None = None, **arrays: np.ndarray) -> None:
        """Write one sample; ``arrays`` are mu/logvar/label (latents) or image/label (volumes).

        ``affine``: the volume's own voxel -> world affine (a real subject's prepared affine);
        None for a generated volume, which is placed on the header's ``grid_affine``.
        """
        i = self.count
        if i >= self.n:
            raise IndexError(f"file was created for {self.n} samples")
        for name, value in arrays.items():
            if value is None:
                continue
            if name not in self.h5:
                raise KeyError(f"dataset {name!r} was not created for this file")
            self.h5[name][i] = np.asarray(value)
        self.h5["subject_id"][i] = subject_id
        if source_id is not None:
            self.h5["source_id"][i] = source_id
        self.h5["class_index"][i] = class_index
        self.h5["split"][i] = split
        self.h5["affine"][i] = self.grid_affine if affine is None else np.asarray(affine, dtype=np.float64)
        self.count += 1

    def set_latent_stats(self, channel_mean, channel_std, scale_factor: float) -> None:
        self.h5["channel_mean"][...] = np.asarray(channel_mean, dtype=np.float32)
        self.h5["channel_std"][...] = np.asarray(channel_std, dtype=np.float32)
        self.h5.attrs["scale_factor"] = float(scale_factor)


def _write_header(h5: h5py.File, kind: str, header: Header) -> None:
    h5.attrs["kind"] = kind
    h5.attrs["format_version"] = FORMAT_VERSION
    h5.attrs["grid_affine"] = np.asarray(header.grid_affine, dtype=np.float64)
    h5.attrs["grid_shape"] = np.asarray(header.grid_shape, dtype=np.int64)
    h5.attrs["class_names"] = json.dumps(list(header.class_names))
    h5.attrs["label_names"] = json.dumps(list(header.label_names))
    h5.attrs["settings"] = json.dumps(header.settings, sort_keys=True, default=str)
    h5.attrs["vae_sha256"] = header.vae_sha256
    if header.scale_factor is not None:
        h5.attrs["scale_factor"] = float(header.scale_factor)
    if header.image_channels:
        h5.attrs["image_channels"] = json.dumps(list(header.image_channels))


def _create_rows(h5: h5py.File, n: int) -> None:
    h5.create_dataset("subject_id", (n,), dtype=_STR)
    h5.create_dataset("class_index", (n,), dtype=np.int64)
    h5.create_dataset("split", (n,), dtype=_STR)
    h5.create_dataset("affine", (n, 4, 4), dtype=np.float64)


def _create_array(h5: h5py.File, name: str, n: int, shape: Sequence[int], dtype) -> None:
    shape = tuple(int(s) for s in shape)
    h5.create_dataset(name, (n, *shape), dtype=dtype, chunks=(1, *shape) if n else None)


@contextmanager
def _create(path, kind: str, n: int, header: Header) -> Iterator[tuple[h5py.File, _Writer]]:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            _write_header(h5, kind, header)
            _create_rows(h5, n)
            writer = _Writer(h5, n, np.asarray(header.grid_affine, dtype=np.float64))
            yield h5, writer
            if writer.count != n:
                raise RuntimeError(f"{path}: wrote {writer.count} of {n} samples")


@contextmanager
def create_latents(
    path: str | os.PathLike,
    n: int,
    latent_shape: Sequence[int],
    header: Header,
    *,
    with_logvar: bool = True,
    label_shape: Sequence[int] | None = None,
    mask_shape: Sequence[int] | None = None,
    with_voided: bool = False,
    with_source: bool = False,
) -> Iterator[_Writer]:
    """Create a latents file for ``n`` samples of ``latent_shape`` (C, d, h, w), atomically.

    Append every sample with ``writer.append(subject_id, class_index, split, affine=..., mu=...,
    logvar=..., label=..., mask=..., voided_mu=...)``; the file only appears at ``path`` if the block completes with all ``n`` written.
    """
    with _create(path, LATENTS, n, header) as (h5, writer):
        _create_array(h5, "mu", n, latent_shape, np.float32)
        if with_logvar:
            _create_array(h5, "logvar", n, latent_shape, np.float32)
        if label_shape is not None:
            _create_array(h5, "label", n, label_shape, np.uint8)
        if mask_shape is not None:
            _create_array(h5, "mask", n, mask_shape, np.uint8)
        if with_voided:
            _create_array(h5, "voided_mu", n, latent_shape, np.float32)
        if with_source:
            h5.create_dataset("source_id", (n,), dtype=_STR)
        h5.create_dataset("channel_mean", data=np.zeros(latent_shape[0], np.float32))
        h5.create_dataset("channel_std", data=np.ones(latent_shape[0], np.float32))
        yield writer


@contextmanager
def create_volumes(
    path: str | os.PathLike, n: int, header: Header, *, with_labels: bool = False, with_masks: bool = False,
    with_source: bool = False, with_image: bool = True,
) -> Iterator[_Writer]:
    """Create a volumes file for ``n`` images on ``header.grid_shape`` (of each of
    ``header.image_channels``: rows ``(K, X, Y, Z)``), atomically; ``with_image=False`` (label
    maps only) needs ``with_labels``."""
    if not (with_image or with_labels):
        raise ValueError("a volumes file holds images, label maps or both")
    with _create(path, VOLUMES, n, header) as (h5, writer):
        if with_image:
            _create_array(h5, "image", n, _image_row_shape(header), np.float32)
        if with_labels:
            _create_array(h5, "label", n, header.grid_shape, np.uint8)
        if with_masks:
            _create_array(h5, "mask", n, header.grid_shape, np.uint8)
        if with_source:
            h5.create_dataset("source_id", (n,), dtype=_STR)
        yield writer


def _image_row_shape(header: Header) -> tuple[int, ...]:
    """One row of ``image``: the grid, or (K, *grid) for K > 1 image channels."""
    channels = (len(header.image_channels),) if header.image_channels else ()
    return (*channels, *header.grid_shape)


class _ChannelRows:
    """Channel ``k`` of a multi-channel ``image`` dataset, indexed like a single-channel one."""

    def __init__(self, dataset, k: int):
        self.dataset, self.k = dataset, k
        self.shape = (dataset.shape[0], *dataset.shape[2:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer, slice)):
            return self.dataset[i, self.k]
        rows = np.asarray(i, dtype=np.int64)
        return np.stack([self.dataset[int(j), self.k] for j in rows]) if len(rows) else np.zeros((0, *self.shape[1:]))


class H5File:
    """A checked, read-only view of a medldm HDF5 file; arrays are read lazily by index.

    Images go through ``channel(k)`` (rows ``(X, Y, Z)`` of channel ``k``) and ``channel_names``
    (``["image"]`` for one channel), so that single- and multi-channel files read alike.

    ``f.mu[i]``, ``f.image[a:b]``, ``f.label``, ``f.mask``, ``f.voided_mu`` (None when absent), ``f.subject_ids``, ``f.source_ids`` (None when absent),
    ``f.class_index``, ``f.splits``, ``f.affines`` (N, 4, 4), ``f.header``. Use as a context manager or call ``close()``.
    """

    def __init__(self, path: str | os.PathLike, kind: str):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such HDF5 file")
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise InputError(f"{self.path}: not a readable HDF5 file ({err})") from None
        try:
            self._check(kind)
        except InputError:
            self.h5.close()
            raise
        attrs = self.h5.attrs
        self.header = Header(
            grid_affine=np.asarray(attrs["grid_affine"], dtype=np.float64),
            grid_shape=tuple(int(s) for s in attrs["grid_shape"]),
            class_names=json.loads(attrs["class_names"]),
            label_names=json.loads(attrs["label_names"]),
            settings=json.loads(attrs["settings"]),
            scale_factor=float(attrs["scale_factor"]) if "scale_factor" in attrs else None,
            vae_sha256=str(attrs.get("vae_sha256", "")),
            image_channels=json.loads(attrs.get("image_channels", "[]")),
        )
        self.subject_ids = [s.decode() if isinstance(s, bytes) else s for s in self.h5["subject_id"][:]]
        self.class_index = self.h5["class_index"][:]
        self.splits = [s.decode() if isinstance(s, bytes) else s for s in self.h5["split"][:]]
        self.affines = self.h5["affine"][:]
        self.source_ids = ([s.decode() if isinstance(s, bytes) else s for s in self.h5["source_id"][:]]
                           if "source_id" in self.h5 else None)

    def _check(self, kind: str) -> None:
        attrs, where = self.h5.attrs, str(self.path)
        found = attrs.get("kind")
        if found != kind:
            raise InputError(f"{where}: expected a medldm {kind} file, found kind={found!r}")
        version = int(attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise InputError(
                f"{where}: format version {version}, this medldm reads version {FORMAT_VERSION} "
                f"(version 2 added each subject's own affine); re-create the file with this medldm: "
                f"{_RECREATE[kind]}"
            )
        missing = [k for k in _REQUIRED[kind] if k not in self.h5]
        missing += [f"attribute {a}" for a in _REQUIRED_ATTRS if a not in attrs]
        if kind == LATENTS and "scale_factor" not in attrs:
            missing.append("attribute scale_factor")
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}; the file is incomplete or not from medldm")
        n = self.h5["subject_id"].shape[0]
        main = "mu" if kind == LATENTS else _volume_main(self.h5, where)
        for name in (main, "logvar", "label", "mask", "voided_mu", "source_id", "class_index", "split", "affine"):
            if name in self.h5 and self.h5[name].shape[0] != n:
                raise InputError(f"{where}: dataset {name} has {self.h5[name].shape[0]} rows, expected {n}")
        if self.h5["affine"].shape[1:] != (4, 4):
            raise InputError(f"{where}: dataset affine has shape {self.h5['affine'].shape}, expected ({n}, 4, 4)")
        for name in ("logvar", "voided_mu"):
            if name in self.h5 and self.h5[name].shape != self.h5["mu"].shape:
                raise InputError(f"{where}: {name} shape {self.h5[name].shape} != mu shape {self.h5['mu'].shape}")
        channels = json.loads(attrs.get("image_channels", "[]"))
        expected = (*((len(channels),) if channels and main == "image" else ()), *(int(s) for s in attrs["grid_shape"]))
        if kind == VOLUMES and tuple(self.h5[main].shape[1:]) != expected:
            raise InputError(f"{where}: {main} shape {self.h5[main].shape[1:]} != {expected} (grid_shape"
                             f"{', image_channels ' + str(channels) if channels else ''})")

    def __getattr__(self, name: str):
        if name in ("mu", "logvar", "label", "mask", "voided_mu", "image", "channel_mean", "channel_std"):
            return self.h5[name] if name in self.h5 else None
        raise AttributeError(name)

    def __len__(self) -> int:
        return len(self.subject_ids)

    @property
    def channel_names(self) -> list[str]:
        return self.header.image_channels or ["image"]

    def channel(self, k: int = 0):
        """Lazy rows ``(X, Y, Z)`` of image channel ``k`` (``[i]``, ``[a:b]``, a list of rows)."""
        image = self.h5["image"]
        if not self.header.image_channels:
            if k != 0:
                raise IndexError(f"{self.path} has one image channel, not {k + 1}")
            return image
        return _ChannelRows(image, k)

    def indices(self, split: str | None = None) -> np.ndarray:
        """Row indices of one split (all rows when ``split`` is None)."""
        return np.array([i for i, s in enumerate(self.splits) if split is None or s == split], dtype=np.int64)

    def close(self) -> None:
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _volume_main(h5: h5py.File, where: str) -> str:
    """The dataset a volumes file is about: ``image``, or ``label`` in a label-maps-only file."""
    for name in ("image", "label"):
        if name in h5:
            return name
    raise InputError(f"{where}: missing image (and label); the file is incomplete or not from medldm")


def open_latents(path: str | os.PathLike) -> H5File:
    return H5File(path, LATENTS)


def open_volumes(path: str | os.PathLike) -> H5File:
    return H5File(path, VOLUMES)
