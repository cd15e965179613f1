"""A seeded synthetic cohort on real anatomy: the MNI152 2009 template shipped inside nilearn,
deformed per subject, with a tissue label map and a TLE-like change in the second class.

Each subject: a random affine (rotation, scaling, translation) and a smooth elastic deformation
of the template, a multiplicative bias field, Gaussian noise and a global intensity scale. The
label map (background, CSF, GM, WM) goes through the same deformation (nearest neighbour).
Subjects of ``lesion_class`` carry left mesial-temporal atrophy: grey and white matter of an
ellipsoid around the left hippocampus turn into CSF, in the image and in the label map.
Files are written in varied but valid geometry (RAS, LPS or LAS axes, anisotropic spacing,
different matrix sizes) so that preparation is exercised. Same seed, same bytes.

Inpainting masks (``masks_per_subject`` > 0, config ``demo.masks``): each mask is the union of
``ellipsoids`` random ellipsoids inside the brain (radii 8-16 mm), plus the atrophy region for
subjects of ``lesion_class``, drawn in template space from their own seeded stream (so the images
do not change) and deformed with the subject. A subject with k masks is k sample-sheet rows
``<subject>-m<j>`` sharing its image and its group (the subject id).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage

from medldm.data.masks import random_ellipsoids
from medldm.io import save_nifti

LABELS = ["background", "CSF", "GM", "WM"]
CLASSES = ["HC", "TLE"]
# Left hippocampus / temporal horn centre in MNI millimetres, and the atrophy's radii (mm).
LESION_CENTRE_MM = np.array([-27.0, -20.0, -14.0])
LESION_RADII_MM = np.array([9.0, 17.0, 9.0])
MASK_RADII_MM = (8.0, 16.0)  # radii of the demo's random inpainting ellipsoids
# Output geometries: (axis codes, spacing in mm, field of view in mm).
GEOMETRIES = [
    ("RAS", (2.0, 2.0, 2.0), (200, 236, 196)),
    ("LPS", (2.0, 2.0, 2.0), (196, 232, 200)),
    ("LAS", (1.6, 1.6, 3.0), (208, 240, 192)),
    ("RAS", (2.4, 2.0, 2.0), (204, 240, 200)),
    ("LPS", (1.8, 2.2, 2.6), (200, 244, 198)),
]


@dataclass(frozen=True)
class DemoSubject:
    subject_id: str
    cls: str


def demo_subjects(n_subjects: int, lesion_class: str = "TLE") -> list[DemoSubject]:
    """Subject ids and classes of the demo cohort (alternating classes, balanced)."""
    other = next(c for c in CLASSES if c != lesion_class) if lesion_class in CLASSES else "HC"
    classes = [other, lesion_class]
    return [DemoSubject(f"demo{i:03d}", classes[i % 2]) for i in range(n_subjects)]


def sheet_rows(out_dir: str | Path, n_subjects: int, lesion_class: str = "TLE", masks_per_subject: int = 0) -> list[dict]:
    """The demo's sample-sheet rows (files under ``out_dir``): one per subject, or one per mask
    (``<subject>-m<j>``, grouped by subject) when ``masks_per_subject`` > 0."""
    out_dir, rows = Path(out_dir), []
    for subject in demo_subjects(n_subjects, lesion_class):
        sid = subject.subject_id
        row = {"subject_id": sid, "image": str(out_dir / "images" / f"{sid}.nii.gz"),
               "label": str(out_dir / "labels" / f"{sid}.nii.gz"), "class": subject.cls}
        if not masks_per_subject:
            rows.append(row)
        for j in range(masks_per_subject):
            mask_id = f"{sid}-m{j}"
            rows.append({**row, "subject_id": mask_id, "group": sid,
                         "mask": str(out_dir / "masks" / f"{mask_id}.nii.gz")})
    return rows


def template_masks(original: Template, atrophied: Template, rng: np.random.Generator, n_masks: int,
                   ellipsoids: int) -> list[np.ndarray]:
    """``n_masks`` inpainting masks in template space: random ellipsoids in the brain, each with
    the atrophy region (where ``atrophied`` turned tissue into CSF; empty for a healthy subject)."""
    brain = original.labels > 0
    lesion = (original.labels > 1) & (atrophied.labels == 1)
    radii = tuple(r / float(np.abs(original.affine[0, 0])) for r in MASK_RADII_MM)
    return [random_ellipsoids(brain, ellipsoids, rng, radii) | lesion for _ in range(n_masks)]


@dataclass
class Template:
    t1: np.ndarray  # (X, Y, Z) float32 in [0, 1]
    labels: np.ndarray  # (X, Y, Z) uint8, values index LABELS
    affine: np.ndarray  # voxel -> MNI mm


def load_template(resolution_mm: int = 2) -> Template:
    """The MNI152 2009 T1 template and a tissue label map from its GM/WM probability maps."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=resolution_mm)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=resolution_mm).dataobj, np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=resolution_mm).dataobj, np.float32)
    t1 = np.asarray(t1_img.dataobj, np.float32)
    t1 = t1 / np.percentile(t1[t1 > 0], 99.9)
    brain = ndimage.binary_fill_holes(t1 > 0.05) & ((gm + wm) > 0.05) | ((gm + wm) > 0.3)
    brain = ndimage.binary_closing(brain, iterations=2)
    csf = np.clip(1.0 - gm - wm, 0, 1)
    tissue = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + 1
    labels = np.where(brain, tissue, 0).astype(np.uint8)
    return Template(np.clip(t1, 0, None), labels, t1_img.affine.astype(np.float64))


def apply_atrophy(template: Template, severity: float) -> Template:
    """Left mesial-temporal atrophy: tissue in an ellipsoid becomes CSF (image and labels)."""
    inv = np.linalg.inv(template.affine)
    centre = (inv @ np.append(LESION_CENTRE_MM, 1.0))[:3]
    radii = LESION_RADII_MM * severity / np.abs(np.diag(template.affine)[:3])
    grid = np.ogrid[tuple(slice(0, s) for s in template.t1.shape)]
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    region = (dist <= 1.0) & (template.labels > 1)
    labels = template.labels.copy()
    labels[region] = 1
    csf_level = float(np.median(template.t1[template.labels == 1]))
    soft = np.clip(1.5 - dist, 0, 1) * (template.labels > 0)  # soft edge in the image
    t1 = template.t1 * (1 - soft) + csf_level * soft
    return Template(t1.astype(np.float32), labels, template.affine)


def _orientation_affine(codes: str, spacing, shape) -> np.ndarray:
    """Voxel -> world affine with the given axis codes, centred on the world origin region."""
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for vox_axis, code in enumerate(codes):
        world_axis, sign = axes[code]
        affine[world_axis, vox_axis] = sign * spacing[vox_axis]
    centre_vox = (np.asarray(shape) - 1) / 2.0
    affine[:3, 3] = np.array([0.0, -18.0, 8.0]) - affine[:3, :3] @ centre_vox
    return affine


def _random_rigid_scale(rng: np.random.Generator) -> np.ndarray:
    """A world -> world affine: rotation up to 8 degrees, scaling 0.92-1.08, shift up to 6 mm."""
    angles = np.deg2rad(rng.uniform(-8, 8, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx @ np.diag(rng.uniform(0.92, 1.08, 3))
    out[:3, 3] = rng.uniform(-6, 6, 3)
    return out


def _smooth_field(rng: np.random.Generator, shape, coarse: int, amplitude: float) -> np.ndarray:
    """A smooth random field on ``shape``: Gaussian noise on a coarse grid, cubic-upsampled.

    The cubic spline is separable, so it is applied as one (n, coarse) weight matrix per axis: the
    same field as ``ndimage.zoom`` of the 3D noise (to 1e-14), about 100x faster."""
    noise = rng.normal(0.0, amplitude, (coarse, coarse, coarse))
    weights = [ndimage.zoom(np.eye(coarse), (n / coarse, 1), order=3, mode="nearest") for n in shape]
    return np.einsum("ia,jb,kc,abc->ijk", *weights, noise, optimize=True)


def synthesize_subject(template: Template, subject_index: int, seed: int, is_lesion: bool,
                       masks: Callable[[Template, Template], list[np.ndarray]] | None = None):
    """One subject: returns (image float32, labels uint8, affine, masks) in its own output geometry.

    ``masks(original, atrophied)`` gives template-space masks to deform with the subject (nearest);
    the returned list is empty without it.
    """
    rng = np.random.default_rng([seed, subject_index])
    original = template
    if is_lesion:
        template = apply_atrophy(template, severity=rng.uniform(0.85, 1.15))
    codes, spacing, fov = GEOMETRIES[subject_index % len(GEOMETRIES)]
    shape = tuple(int(round(f / s)) + int(rng.integers(-2, 3)) for f, s in zip(fov, spacing, strict=True))
    out_affine = _orientation_affine(codes, spacing, shape)
    # Output voxel -> world -> (inverse subject transform) -> template voxel.
    to_template = np.linalg.inv(template.affine) @ np.linalg.inv(_random_rigid_scale(rng)) @ out_affine
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = to_template[:3, :3] @ grid + to_template[:3, 3:4]
    for axis in range(3):  # elastic deformation, in template voxels (about 2-3 mm)
        coords[axis] += _smooth_field(rng, shape, 5, 1.2).reshape(-1)
    image = ndimage.map_coordinates(template.t1, coords, order=1, mode="constant").reshape(shape)
    labels = ndimage.map_coordinates(template.labels, coords, order=0, mode="constant").reshape(shape)
    warped = [ndimage.map_coordinates(m, coords, order=0, mode="constant").reshape(shape).astype(np.uint8)
              for m in (masks(original, template) if masks else [])]
    bias = np.exp(_smooth_field(rng, shape, 3, 0.12))
    image = image * bias + rng.normal(0.0, 0.02, shape)
    image = np.clip(image, 0, None) * rng.uniform(400, 1200)
    return image.astype(np.float32), labels.astype(np.uint8), out_affine, warped


def second_contrast(image: np.ndarray, seed: int, gamma: float = 0.5) -> np.ndarray:
    """A second, co-registered contrast of a demo image (for multi-channel subjects, config
    ``image_channels``): its intensities through a gamma curve, which brightens dark tissue as another
    MR contrast would, with its own seeded noise."""
    rng = np.random.default_rng(seed)
    top = float(image.max()) or 1.0
    contrast = top * (np.clip(image, 0, None) / top) ** gamma
    return np.clip(contrast + rng.normal(0.0, 0.01 * top, image.shape), 0, None).astype(np.float32)


def write_cohort(out_dir: str | Path, n_subjects: int, seed: int, lesion_class: str = "TLE",
                 resolution_mm: int = 2, progress: bool = True, masks_per_subject: int = 0,
                 ellipsoids: int = 3) -> Path:
    """Write every subject's image and label map (and masks) plus ``samples.tsv``; returns the sheet's path."""
    from tqdm import tqdm

    from medldm.io import write_text

    out_dir = Path(out_dir)
    template = load_template(resolution_mm)
    rows = sheet_rows(out_dir, n_subjects, lesion_class, masks_per_subject)
    subjects = demo_subjects(n_subjects, lesion_class)
    for index, subject in enumerate(tqdm(subjects, desc="demo cohort", disable=not progress)):
        masks = None
        if masks_per_subject:  # their own random stream: the images stay the same
            masks = partial(template_masks, rng=np.random.default_rng([seed, index, 1]), n_masks=masks_per_subject,
                            ellipsoids=ellipsoids)
        image, labels, affine, warped = synthesize_subject(template, index, seed, subject.cls == lesion_class, masks)
        own = [row for row in rows if row.get("group", row["subject_id"]) == subject.subject_id]
        save_nifti(own[0]["image"], image, affine)
        save_nifti(own[0]["label"], labels, affine)
        for row, mask in zip(own, warped, strict=False):
            save_nifti(row["mask"], mask, affine)
    columns = list(rows[0])
    lines = ["\t".join(columns)] + ["\t".join(row[c] for c in columns) for row in rows]
    sheet = out_dir / "samples.tsv"
    write_text(sheet, "\n".join(lines) + "\n")
    return sheet
