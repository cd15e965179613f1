"""Preparation of one subject: load, check, reorient to RAS, resample, crop/pad around the head
(or body), normalise intensity, remap labels. The prepared affine is the true geometry of the new grid.

Intensity models (config ``prepare.intensity``):

``mri``   percentiles of the head (voxels above ``foreground_threshold`` x the robust maximum)
          clipped to [0, 1]; background stays 0.
``ct``    a Hounsfield window (``[low, high]`` or a preset name) clipped and scaled to [0, 1]; the
          fill value outside the field of view is the window's low end (air, not water); the
          foreground used for cropping is the body, voxels above -500 HU. No head mask.
``fixed`` a given ``[low, high]`` input range clipped and scaled to [0, 1]; the foreground is the
          voxels above ``low + foreground_threshold x (high - low)``.

Multi-channel subjects (config ``image_channels``): the first channel's image drives resampling,
the foreground and the crop; every other channel must share its input geometry (shape and
affine), is resampled and cropped the same way, and is normalised on its own (``mri``: its own
percentiles within the first channel's foreground; ``ct``/``fixed``: the same window).

2D inputs (``spacing`` and ``shape`` with two entries, config ``spatial_dims: 2`` without
``prepare.slices``): 2D NIfTI, PNG or TIFF (see :class:`Reader`), prepared by the same steps as a
one-voxel-thick slab and returned as (X, Y) arrays; images of any size come out on one grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medldm.data.masks import check_mask_input, check_prepared_mask
from medldm.errors import InputError
from medldm.report.montage import AXES

log = logging.getLogger(__name__)

# Hounsfield windows as [low, high] (level -/+ width / 2).
CT_WINDOWS = {
    "lung": (-1350.0, 150.0),  # level -600, width 1500
    "brain": (0.0, 80.0),  # level 40, width 80
    "soft_tissue": (-150.0, 250.0),  # level 50, width 400
    "bone": (-500.0, 1300.0),  # level 400, width 1800
}
DEFAULT_CT_WINDOW = (-1000.0, 400.0)
CT_BODY_HU = -500.0  # air and the field of view's fill lie below, every tissue but lung above

@dataclass
class Prepared:
    image: np.ndarray  # (X, Y, Z), or (X, Y) for 2D inputs, float32 in [0, 1]
    label: np.ndarray | None  # (X, Y, Z) uint8, values 0..L-1
    affine: np.ndarray  # (4, 4) voxel -> world (RAS mm) of the prepared grid
    p_low: float  # input intensities mapped to 0 and 1 (percentiles, or the window)
    p_high: float
    mask: np.ndarray | None = None  # (X, Y, Z) uint8 inpainting mask, 1 = region to fill
    channels: list[np.ndarray] | None = None  # every channel (X, Y, Z), the first is ``image``
    channel_range: list[tuple[float, float]] | None = None  # each channel's (p_low, p_high)


@dataclass(frozen=True)
class IntensityModel:
    """How input intensities become [0, 1] (see the module docstring)."""

    name: str  # mri | ct | fixed
    window: tuple[float, float] | None = None  # ct and fixed: input range mapped to [0, 1]


def intensity_model(settings: dict | None) -> IntensityModel:
    """The config's ``prepare.intensity`` section, checked; ``None`` or ``{}`` is ``mri``."""
    settings = settings or {}
    name, window = settings.get("model", "mri"), settings.get("window")
    if name == "mri":
        if window is not None:
            raise InputError("config prepare.intensity: `window` is for the ct and fixed models; "
                             "mri scales by prepare.percentiles")
        return IntensityModel("mri")
    if name == "ct" and window is None:
        window = DEFAULT_CT_WINDOW
    elif isinstance(window, str):
        if name != "ct" or window not in CT_WINDOWS:
            raise InputError(f"config prepare.intensity.window: {window!r} is not a window preset of the "
                             f"ct model (presets: {sorted(CT_WINDOWS)}); or give [low, high]")
        window = CT_WINDOWS[window]
    if window is None:
        raise InputError("config prepare.intensity: the fixed model needs `window: [low, high]`, the input "
                         "range mapped to [0, 1]")
    low, high = (float(v) for v in window)
    if not high > low:
        raise InputError(f"config prepare.intensity.window: [{low}, {high}] must have low < high")
    return IntensityModel(name, (low, high))


PLANAR_SUFFIXES = (".png", ".tif", ".tiff")  # 2D image files without geometry (read with Pillow)


@dataclass(frozen=True)
class Reader:
    """How input files are read. 3D: NIfTI volumes. 2D (``spatial_dims`` 2): 2D NIfTI (also 3D with
    one singleton axis), PNG or TIFF, each held as a one-voxel slab (X, Y, 1) so that every step
    after loading is the 3D one; PNG/TIFF get a diagonal affine of ``pixel_spacing`` mm."""

    spatial_dims: int = 3
    pixel_spacing: tuple[float, float] = (1.0, 1.0)

    def load(self, path: str | Path, what: str = "image") -> nib.Nifti1Image:
        """A finite image of ``spatial_dims`` dimensions (a trailing singleton 4th axis is dropped)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{what} file {path} does not exist")
        if path.suffix.lower() in PLANAR_SUFFIXES:
            data, affine = read_planar(path, what), np.diag([*map(float, self.pixel_spacing), 1.0, 1.0])
        else:
            try:
                img = nib.load(str(path))
                data, affine = np.asanyarray(img.dataobj), img.affine
            except Exception as err:  # nibabel raises many types for corrupt files
                raise InputError(f"{path}: cannot read as NIfTI ({err})") from None
            if data.ndim == 4 and data.shape[3] == 1:
                data = data[..., 0]
        data, affine = self._checked_dims(data, affine, path, what)
        if not np.all(np.isfinite(data)):
            raise InputError(f"{path}: {what} contains NaN or infinite values")
        return nib.Nifti1Image(data, affine)

    def _checked_dims(self, data, affine, path, what):
        flat = [a for a in range(data.ndim) if data.shape[a] == 1]
        planar = data.ndim == 2 or (data.ndim == 3 and len(flat) == 1)
        if self.spatial_dims == 3 and data.ndim == 3 and not planar:
            return data, affine
        if self.spatial_dims == 2 and planar:
            if data.ndim == 2:
                return data[..., None], affine
            order = [a for a in range(3) if a != flat[0]] + flat  # the singleton axis last
            out = affine.copy()
            out[:3, :3] = affine[:3, order]
            return np.transpose(data, order), out
        found = f"found shape {data.shape}"
        if self.spatial_dims == 3:
            hint = (": set spatial_dims: 2 with 2-entry prepare.spacing and prepare.shape to prepare 2D images, "
                    "or give 3D volumes (prepare.slices draws 2D slices from them)" if planar else "")
            raise InputError(f"{path}: {what} must be a 3D volume, {found} ({'2D' if planar else f'{data.ndim}D'})"
                             f"{hint}")
        hint = (": with spatial_dims 2, give 2D images, or draw 2D slices from 3D volumes with prepare.slices "
                "(and 3-entry prepare.spacing and prepare.shape)" if data.ndim == 3 else "")
        raise InputError(f"{path}: {what} must be a 2D image (spatial_dims is 2), {found}{hint}")

    def ras(self, img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
        """:func:`to_ras`; a 2D image keeps its slab axis last (its two image axes in RAS order)."""
        data, affine = to_ras(img)
        if self.spatial_dims == 2:
            slab = int(nib.io_orientation(img.affine)[2, 0])  # where the input's third axis went
            order = [a for a in range(3) if a != slab] + [slab]
            affine = affine.copy()
            affine[:3, :3] = affine[:3, order]
            data = np.transpose(data, order)
        return data, affine

    def image_axes(self, array: np.ndarray) -> np.ndarray:
        """A prepared array without the slab axis of a 2D image."""
        return array.reshape(array.shape[:self.spatial_dims])

    def grid(self, spacing, shape, affine) -> tuple[list[float], list[int]]:
        """``prepare.spacing`` and ``shape`` (one entry per image axis) on the 3D grid: a 2D slab
        keeps its one voxel at its own thickness."""
        if len(spacing) != self.spatial_dims or len(shape) != self.spatial_dims:
            raise InputError(f"prepare.spacing {list(spacing)} and prepare.shape {list(shape)} need "
                             f"{self.spatial_dims} entries each, one per image axis (spatial_dims {self.spatial_dims})")
        if self.spatial_dims == 3:
            return list(spacing), list(shape)
        thickness = float(np.sqrt((affine[:3, 2] ** 2).sum()))
        return [*spacing, thickness], [*shape, 1]


def to_ras(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Reorder and flip axes to the closest RAS orientation (no resampling)."""
    canonical = nib.as_closest_canonical(img)
    return np.asanyarray(canonical.dataobj), canonical.affine


def input_dims(path: str | Path) -> int | None:
    """2 or 3: the spatial dimensions of an input file from its header alone (a singleton axis
    makes a NIfTI 2D), or None when unreadable (preparation then names the problem)."""
    try:
        if Path(path).suffix.lower() in PLANAR_SUFFIXES:
            return 2
        shape = [n for n in nib.load(str(path)).shape if n > 1]
    except Exception:  # unreadable here: prepare_subject reports it with the file's name
        return None
    return len(shape)


def read_planar(path: Path, what: str) -> np.ndarray:
    """A grayscale PNG or TIFF as an (X, Y) array: the first axis left to right, the second bottom
    to top (the inverse of :func:`medldm.io.save_png`). RGB(A) is read only when its colour channels
    are equal (grayscale stored as colour) and it is opaque; colour images are refused."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                raise InputError(f"{path}: {what} has {img.n_frames} pages (a stack); a 2D image has one")
            gray = img.mode in ("1", "L", "I", "F") or img.mode.startswith("I;16")
            pixels = np.asarray(img if gray else img.convert("RGBA"))
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"{path}: cannot read as PNG/TIFF ({err})") from None
    if pixels.ndim == 3:
        if (pixels[..., 3] != 255).any():
            raise InputError(f"{path}: {what} has transparent pixels; save it without an alpha channel")
        if not ((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()):
            raise InputError(f"{path}: {what} is a colour image; medical images are read as one grayscale "
                             "channel: convert it to grayscale (e.g. PIL's .convert('L')) first")
        pixels = pixels[..., 0]
    return np.rot90(pixels.astype(np.float32), -1)


def resample(data: np.ndarray, affine: np.ndarray, spacing, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample to ``spacing`` mm over the same field of view; returns (data, new affine).

    ``order`` 1 (linear, with a Gaussian anti-aliasing prefilter when downsampling) for images,
    0 (nearest) for label maps. Voxel centres follow the cell-centred convention: the grid's
    outer edges stay where they were, so the new affine is the true geometry of the new grid.
    """
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    scale = np.asarray(spacing, dtype=np.float64) / zooms  # output step in input voxels
    shape = np.maximum(np.round(np.asarray(data.shape) / scale), 1).astype(int)
    offset = 0.5 * scale - 0.5
    data = np.asarray(data, np.float32)
    if order > 0 and np.any(scale > 1):
        data = ndimage.gaussian_filter(data, sigma=np.maximum((scale - 1) / 2, 0))
    out = ndimage.affine_transform(data, scale, offset=offset, output_shape=tuple(shape), order=order,
                                   mode="constant", cval=0.0)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = offset
    return out, affine @ step


def head_mask(image: np.ndarray, threshold: float) -> np.ndarray:
    """Voxels above ``threshold`` times the 99th percentile of the positive voxels."""
    positive = image[image > 0]
    if positive.size == 0:
        return np.zeros(image.shape, bool)
    return image > threshold * np.percentile(positive, 99)


def crop_or_pad(data: np.ndarray, affine: np.ndarray, centre, shape) -> tuple[np.ndarray, np.ndarray]:
    """Cut a ``shape`` box centred on voxel ``centre`` (zero padding outside); shifts the affine."""
    start = np.round(np.asarray(centre) - np.asarray(shape) / 2.0).astype(int)
    out = np.zeros(shape, dtype=data.dtype)
    src = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, shape, data.shape, strict=True))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start, strict=True))
    out[dst] = data[src]
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return out, new_affine


def normalise(image: np.ndarray, mask: np.ndarray, percentiles) -> tuple[np.ndarray, float, float]:
    """Clip to the head's intensity percentiles and scale to [0, 1]; background stays 0."""
    lo, hi = (float(v) for v in np.percentile(image[mask], percentiles))
    if hi <= lo:
        raise InputError(f"intensity percentiles {percentiles} are equal ({lo}); the image has no contrast")
    out = np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return out, lo, hi


def remap_labels(label: np.ndarray, label_values: list[int], path: Path) -> np.ndarray:
    """Map original label values (position = new index) to 0..L-1; unknown values are an error."""
    values = np.unique(label)
    unknown = sorted(set(values.tolist()) - set(label_values))
    if unknown:
        raise InputError(
            f"{path}: label values {unknown} are not among the configured label values {label_values}; "
            "add them to `labels`/`label_values` in the config"
        )
    lut = np.zeros(int(max(max(label_values), values.max())) + 1, dtype=np.uint8)
    for index, value in enumerate(label_values):
        lut[value] = index
    return lut[label.astype(np.int64)]


def scale_window(data: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and scale to [0, 1]."""
    return np.clip((np.asarray(data, np.float32) - low) / (high - low), 0.0, 1.0).astype(np.float32)


def warn_if_ct_like(data: np.ndarray, path) -> None:
    """MRI preparation of a CT (values far below 0) keeps only dense tissue: say so."""
    lowest = float(data.min())
    if lowest < CT_BODY_HU:
        log.warning("%s: values down to %g look like CT in Hounsfield units, but prepare.intensity.model "
                    "is mri, which keeps only tissue above the head threshold (lung and soft tissue "
                    "become 0): set prepare.intensity: {model: ct, window: ...}", path, lowest)


def warn_if_cut(before: int, kept: int, path, spacing, shape) -> None:
    """Cropping to prepare.shape that cuts more than 1 % of the foreground (e.g. a larger image
    among mixed sizes): say so, naming the file."""
    if kept < 0.99 * before:
        log.warning("%s: %.0f%% of the foreground lies outside prepare.shape %s at spacing %s mm and is cut off: "
                    "raise prepare.shape or prepare.spacing", path, 100 * (1 - kept / before), list(shape), list(spacing))


def prepare_subject(image_path, label_path, *, spacing, shape, percentiles, foreground_threshold,
                    label_values: list[int] | None = None, intensity: dict | None = None,
                    mask_path=None, channel_paths=(), pixel_spacing=None) -> Prepared:
    """The whole preparation of one subject (see the module docstring); an inpainting mask
    (``mask_path``) goes through the label map's path: nearest neighbour, same crop.
    ``channel_paths``: the subject's further image channels, prepared on the first's grid.
    ``spacing`` and ``shape`` with 2 entries: 2D inputs (see :class:`Reader`; ``pixel_spacing``
    in mm of PNG/TIFF pixels, default 1), prepared as one-voxel slabs and returned 2D."""
    model = intensity_model(intensity)
    reader = Reader(len(spacing), tuple(pixel_spacing or (1.0, 1.0)))
    img = reader.load(image_path, "image")
    data, affine = reader.ras(img)
    spacing, shape = reader.grid(spacing, shape, affine)
    if np.ptp(data) == 0:
        raise InputError(f"{image_path}: image is constant ({data.flat[0]}); nothing to prepare")
    if model.name == "mri":
        warn_if_ct_like(data, image_path)
        image, new_affine = resample(data, affine, spacing, order=1)
        mask = head_mask(image, foreground_threshold)
        where = f"above foreground_threshold {foreground_threshold}"
    else:  # scaled first, so that resampling and padding fill with the window's low end (0)
        lo, hi = model.window
        level = CT_BODY_HU if model.name == "ct" else lo + foreground_threshold * (hi - lo)
        image, new_affine = resample(scale_window(data, lo, hi), affine, spacing, order=1)
        body, _ = resample((data > level).astype(np.float32), affine, spacing, order=1)
        mask = body > 0.5
        where = f"above {level:g} (the {model.name} model's foreground level)"
    if not mask.any():
        raise InputError(f"{image_path}: no foreground found {where}")
    centre = np.argwhere(mask).mean(axis=0)
    image, out_affine = crop_or_pad(image, new_affine, centre, shape)
    foreground = int(mask.sum())
    mask, _ = crop_or_pad(mask, new_affine, centre, shape)
    warn_if_cut(foreground, int(mask.sum()), image_path, spacing[:reader.spatial_dims], shape[:reader.spatial_dims])
    if model.name == "mri":
        image, lo, hi = normalise(image, mask, percentiles)
    label = inpaint = None
    if label_path:
        label = _prepare_label(Path(label_path), reader, img, spacing, new_affine, centre, shape, label_values)
    if mask_path:
        inpaint = _prepare_mask(Path(mask_path), reader, img, spacing, new_affine, centre, shape)
        check_prepared_mask(*(reader.image_axes(m) for m in (inpaint, mask)), mask_path)
    prepared = Prepared(image, label, out_affine, lo, hi, inpaint)
    if channel_paths:
        grid = _ChannelGrid(reader, img, image_path, model, spacing, centre, shape, mask, percentiles)
        others = [grid.prepare(Path(path)) for path in channel_paths]
        prepared.channels = [image, *(channel for channel, _ in others)]
        prepared.channel_range = [(lo, hi), *(bounds for _, bounds in others)]
    return flattened(prepared) if reader.spatial_dims == 2 else prepared


def flattened(prepared: Prepared) -> Prepared:
    """A 2D subject's arrays without their slab axis: (X, Y, 1) -> (X, Y); the affine keeps it."""
    def flat(array):
        return None if array is None else array[..., 0]

    prepared.image, prepared.label, prepared.mask = flat(prepared.image), flat(prepared.label), flat(prepared.mask)
    if prepared.channels is not None:
        prepared.channels = [flat(channel) for channel in prepared.channels]
    return prepared


SLICE_AXES = {name: dim for dim, name in enumerate(AXES)}  # RAS voxel axes of the prepared grid


def slice_positions(image: np.ndarray, axis: str, n: int, central_fraction: float) -> np.ndarray:
    """``n`` evenly spaced indices along ``axis`` (a SLICE_AXES name) within the central
    ``central_fraction`` of the extent of the image's non-zero voxels (the head or body)."""
    dim = SLICE_AXES[axis]
    occupied = np.flatnonzero((image > 0).any(axis=tuple(a for a in range(image.ndim) if a != dim)))
    if not occupied.size:
        raise InputError(f"prepared image is empty: no {axis} slice to draw")
    extent = occupied[-1] - occupied[0] + 1
    count = max(1, round(extent * central_fraction))
    start = occupied[0] + (extent - count) // 2
    if n > count:
        log.warning("prepare.slices.n %d exceeds the %d %s slices in the central fraction %g: slices repeat",
                    n, count, axis, central_fraction)
    return np.round(np.linspace(start, start + count - 1, n)).astype(int)


def take_slice(data: np.ndarray, affine: np.ndarray, axis: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The 2D slice ``index`` along ``axis`` of a prepared ``(X, Y, Z[, C])`` array and its true
    affine: the slice's two voxel axes first, the cut axis third (at the slice's position)."""
    dim = SLICE_AXES[axis]
    kept = [a for a in range(3) if a != dim]
    out = affine.copy()
    out[:3, :3] = affine[:3, [*kept, dim]]
    out[:3, 3] = affine[:3, dim] * index + affine[:3, 3]
    return np.take(data, index, axis=dim), out


@dataclass
class _ChannelGrid:
    """The first channel's grid and foreground, on which the further channels are prepared."""

    reader: Reader
    img: nib.Nifti1Image  # the first channel as loaded
    path: str | Path
    model: IntensityModel
    spacing: object
    centre: np.ndarray
    shape: object
    foreground: np.ndarray  # on the cropped grid
    percentiles: object

    def prepare(self, path: Path) -> tuple[np.ndarray, tuple[float, float]]:
        """One further channel: checked, resampled, cropped, normalised on its own."""
        channel = self.reader.load(path, "image channel")
        if channel.shape != self.img.shape or not np.allclose(channel.affine, self.img.affine, atol=1e-3):
            raise InputError(
                f"{path}: image channel geometry (shape {channel.shape}) differs from the subject's first channel "
                f"{self.path} (shape {self.img.shape}, or another affine); image_channels must be co-registered "
                "on one grid: resample it onto the first channel's grid"
            )
        data, affine = self.reader.ras(channel)
        if self.model.name == "mri":
            resampled, _ = resample(data, affine, self.spacing, order=1)
        else:
            resampled, _ = resample(scale_window(data, *self.model.window), affine, self.spacing, order=1)
        cropped, _ = crop_or_pad(resampled, affine, self.centre, self.shape)
        if self.model.name != "mri":
            return cropped.astype(np.float32), self.model.window
        out, lo, hi = normalise(cropped, self.foreground, self.percentiles)
        return out, (lo, hi)


def _prepare_label(path: Path, reader: Reader, img, spacing, image_affine, centre, shape, label_values) -> np.ndarray:
    lab = reader.load(path, "label map")
    if lab.shape != img.shape or not np.allclose(lab.affine, img.affine, atol=1e-3):
        raise InputError(f"{path}: label map geometry {lab.shape} does not match its image {img.shape}")
    data, affine = reader.ras(lab)
    if not np.allclose(data, np.round(data)):
        raise InputError(f"{path}: label map has non-integer values")
    data = remap_labels(np.round(data).astype(np.int64), label_values, path)
    resampled, lab_affine = resample(data, affine, spacing, order=0)
    if not np.allclose(lab_affine, image_affine, atol=1e-3):
        raise InputError(f"{path}: label map resampled to a different grid than its image")
    out, _ = crop_or_pad(np.round(resampled).astype(np.uint8), lab_affine, centre, shape)
    return out


def _prepare_mask(path: Path, reader: Reader, img, spacing, image_affine, centre, shape) -> np.ndarray:
    """An inpainting mask checked against its image, then resampled (nearest) and cropped like it."""
    raw = reader.load(path, "mask")
    check_mask_input(np.asanyarray(raw.dataobj), raw.affine, img.shape, img.affine, path)
    data, affine = reader.ras(raw)
    resampled, mask_affine = resample(np.asarray(data, np.float32), affine, spacing, order=0)
    out, _ = crop_or_pad(np.round(resampled).astype(np.uint8), mask_affine, centre, shape)
    return out
