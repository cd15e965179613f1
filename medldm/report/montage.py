"""PNG slice montages: one row per volume, one column per axis (mid-slices by default); a 2D
image is one column (``IMAGE_AXES``), shown whole."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medldm.io import atomic_path

AXES = ("sagittal", "coronal", "axial")  # RAS arrays: axis 0 = x (sagittal), 1 = y, 2 = z
IMAGE_AXES = ("image",)  # the one "axis" of 2D images: the image itself


def image_axes(ndim: int) -> tuple[str, ...]:
    """The montage columns (and FID axes) of ``ndim``-D images."""
    return AXES if ndim == 3 else IMAGE_AXES


def mid_slice(volume: np.ndarray, axis: int, position: float = 0.5) -> np.ndarray:
    """A 2D slice at a relative ``position`` along ``axis``, oriented for display (up = S or A)."""
    index = min(int(position * volume.shape[axis]), volume.shape[axis] - 1)
    return np.rot90(np.take(volume, index, axis=axis))


def view(image: np.ndarray, axis_name: str) -> np.ndarray:
    """What a montage cell shows: a 2D image whole, or a volume's mid-slice along ``axis_name``."""
    image = np.asarray(image)
    return np.rot90(image) if image.ndim == 2 else mid_slice(image, AXES.index(axis_name))


def save_montage(path: str | Path, volumes: Sequence[np.ndarray], titles: Sequence[str],
                 axes: Sequence[str] | None = None, vmax: float | None = 1.0, cmap: str = "gray",
                 overlays: Sequence[np.ndarray] | None = None) -> None:
    """Write a montage of ``volumes`` (each (X, Y, Z), RAS, or 2D images) as a PNG, atomically.

    ``vmax`` None scales each volume by its own maximum (label maps, reconstructions).
    ``overlays``: one map in [0, 1] per volume (e.g. saliency), drawn semi-transparent on top.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not volumes:
        raise ValueError("save_montage needs at least one volume")
    axes = axes or image_axes(np.ndim(volumes[0]))
    fig, grid = plt.subplots(len(volumes), len(axes), figsize=(2.2 * len(axes), 2.2 * len(volumes)),
                             squeeze=False)
    for row, (volume, title) in enumerate(zip(volumes, titles, strict=True)):
        for col, name in enumerate(axes):
            ax = grid[row][col]
            ax.imshow(view(volume, name), cmap=cmap, vmin=0,
                      vmax=vmax if vmax is not None else float(np.max(volume)) or 1.0)
            if overlays is not None:
                ax.imshow(view(overlays[row], name), cmap="jet", alpha=0.4,
                          vmin=0, vmax=1)
            _label_cell(ax, row, col, name, title)
    fig.tight_layout()
    _save(plt, fig, path)


def save_contours(path: str | Path, volumes: Sequence[np.ndarray], label_maps: Sequence[np.ndarray],
                  titles: Sequence[str], label_names: Sequence[str], axes: Sequence[str] | None = None) -> None:
    """Write mid-slices of ``volumes`` with the boundaries of each foreground label of their
    ``label_maps`` (values 1..L-1, one colour each) drawn on top, as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not volumes:
        raise ValueError("save_contours needs at least one volume")
    axes = axes or image_axes(np.ndim(volumes[0]))
    colours = plt.get_cmap("tab10").colors
    fig, grid = plt.subplots(len(volumes), len(axes), figsize=(2.2 * len(axes), 2.2 * len(volumes)),
                             squeeze=False)
    for row, (volume, maps, title) in enumerate(zip(volumes, label_maps, titles, strict=True)):
        for col, name in enumerate(axes):
            ax = grid[row][col]
            ax.imshow(view(volume, name), cmap="gray", vmin=0, vmax=1)
            labels = view(maps, name)
            for value in range(1, len(label_names)):
                if (labels == value).any():
                    ax.contour(labels == value, levels=[0.5], colors=[colours[(value - 1) % len(colours)]],
                               linewidths=0.8)
            _label_cell(ax, row, col, name, title)
    handles = [plt.Line2D([], [], color=colours[(v - 1) % len(colours)], label=label_names[v])
               for v in range(1, len(label_names))]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(plt, fig, path)


def _label_cell(ax, row: int, col: int, axis_name: str, title: str) -> None:
    """No ticks; the axis name over the first row, the volume's title left of the first column."""
    ax.set_xticks([])
    ax.set_yticks([])
    if row == 0:
        ax.set_title(axis_name, fontsize=9)
    if col == 0:
        ax.set_ylabel(title, fontsize=8)


def _save(plt, fig, path: str | Path) -> None:
    """Write ``fig`` as a PNG, atomically, and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
