"""Preparation on NIfTI files in several orientations and spacings."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medldm.data.prepare import prepare_subject
from medldm.errors import InputError
from medldm.io import save_nifti
from tests.conftest import REPO

SETTINGS = dict(spacing=[2, 2, 2], shape=[24, 28, 20], percentiles=[0.5, 99.5], foreground_threshold=0.1)


def phantom(shape=(40, 48, 36)):
    """An ellipsoid 'head' with an off-centre bright blob and a 3-class label map, in RAS at 1 mm."""
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2
    r = sum(((g - c) / (0.4 * s)) ** 2 for g, c, s in zip(grid, centre, shape, strict=True))
    blob = sum((g - c) ** 2 for g, c in zip(grid, centre + [6, 5, -4], strict=True)) < 16
    image = np.where(r < 1, 100.0 + 10 * grid[0], 0.0) + 300.0 * blob
    label = np.where(r < 1, 1, 0) + blob
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -centre
    return image.astype(np.float32), label.astype(np.uint8), affine


def reorient(data, affine, flips):
    """The same volume stored with some axes flipped (e.g. LPS), with a matching affine."""
    out, new_affine = data, affine.copy()
    for axis in flips:
        out = np.flip(out, axis)
        flip = np.eye(4)
        flip[axis, axis] = -1
        flip[axis, 3] = data.shape[axis] - 1
        new_affine = new_affine @ flip
    return np.ascontiguousarray(out), new_affine


def write_pair(tmp_path, name, image, label, affine):
    save_nifti(tmp_path / f"{name}.nii.gz", image, affine)
    save_nifti(tmp_path / f"{name}_label.nii.gz", label, affine)
    return tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_label.nii.gz"


def prep(image_path, label_path, **overrides):
    return prepare_subject(image_path, label_path, **{**SETTINGS, **overrides}, label_values=[0, 1, 2])


@pytest.mark.parametrize("flips", [(0, 1), (0,), (2,)], ids=["LPS", "LAS", "RAI"])
def test_reoriented_input_prepares_identically(tmp_path, flips):
    image, label, affine = phantom()
    ras = prep(*write_pair(tmp_path, "ras", image, label, affine))
    other_image, other_affine = reorient(image, affine, flips)
    other_label, _ = reorient(label, affine, flips)
    other = prep(*write_pair(tmp_path, "other", other_image, other_label, other_affine))
    np.testing.assert_allclose(other.image, ras.image, atol=1e-5)
    np.testing.assert_array_equal(other.label, ras.label)
    np.testing.assert_allclose(other.affine, ras.affine, atol=1e-6)


def test_shapes_affine_and_labels(tmp_path):
    image, label, affine = phantom()
    out = prep(*write_pair(tmp_path, "ras", image, label, affine))
    assert out.image.shape == tuple(SETTINGS["shape"]) and out.image.dtype == np.float32
    assert out.label.shape == tuple(SETTINGS["shape"]) and out.label.dtype == np.uint8
    assert 0.0 <= out.image.min() and out.image.max() <= 1.0
    assert set(np.unique(out.label)) == {0, 1, 2}
    np.testing.assert_allclose(np.abs(np.diag(out.affine)[:3]), SETTINGS["spacing"])
    # The blob's world position survives: its centroid maps through both affines to the same mm.
    blob_in = np.argwhere(label == 2).mean(axis=0)
    blob_out = np.argwhere(out.label == 2).mean(axis=0)
    world_in = affine[:3, :3] @ blob_in + affine[:3, 3]
    world_out = out.affine[:3, :3] @ blob_out + out.affine[:3, 3]
    np.testing.assert_allclose(world_out, world_in, atol=1.0)


def test_anisotropic_spacing_resampled(tmp_path):
    image, label, affine = phantom()
    thick = image[:, :, ::3]  # 1 x 1 x 3 mm slices
    thick_affine = affine @ np.diag([1, 1, 3, 1])
    out = prep(*write_pair(tmp_path, "thick", thick, label[:, :, ::3], thick_affine))
    ras = prep(*write_pair(tmp_path, "ras", image, label, affine))
    assert out.image.shape == ras.image.shape
    assert np.corrcoef(out.image.ravel(), ras.image.ravel())[0, 1] > 0.95


def test_label_values_remapped(tmp_path):
    image, label, affine = phantom()
    mapped = np.choose(label, [0, 10, 42]).astype(np.uint8)
    out = prepare_subject(*write_pair(tmp_path, "m", image, mapped, affine), **SETTINGS, label_values=[0, 10, 42])
    assert set(np.unique(out.label)) == {0, 1, 2}
    with pytest.raises(InputError, match="label values \\[42\\]"):
        prepare_subject(*write_pair(tmp_path, "m", image, mapped, affine), **SETTINGS, label_values=[0, 10])


@pytest.mark.parametrize("bad,match", [
    (np.zeros((8, 8)), "3D volume"),
    (np.zeros((8, 8, 8, 2)), "3D volume"),
    (np.full((8, 8, 8), 5.0), "constant"),
    (np.full((8, 8, 8), np.nan), "NaN"),
])
def test_bad_images_name_the_file(tmp_path, bad, match):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(bad.astype(np.float32), np.eye(4)), str(path))
    with pytest.raises(InputError, match=match) as err:
        prepare_subject(path, "", **SETTINGS)
    assert "bad.nii.gz" in str(err.value)


def test_script_writes_outputs_and_fails_cleanly(tmp_path):
    image, label, affine = phantom()
    img, lab = write_pair(tmp_path, "s", image, label, affine)
    script = str(REPO / "workflow_scripts" / "prepare_subject.py")
    args = [sys.executable, script, "--image", str(img), "--label", str(lab), "--label-values", "0,1,2",
            "--settings", json.dumps(SETTINGS), "--out-image", str(tmp_path / "o" / "image.nii.gz"),
            "--out-label", str(tmp_path / "o" / "label.nii.gz"), "--out-info", str(tmp_path / "o" / "info.json")]
    subprocess.run(args, check=True)
    info = json.loads((tmp_path / "o" / "info.json").read_text())
    assert info["shape"] == SETTINGS["shape"]
    assert nib.load(tmp_path / "o" / "label.nii.gz").get_data_dtype() == np.uint8
    args[3] = str(tmp_path / "missing.nii.gz")
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 2 and "missing.nii.gz" in proc.stderr and "Traceback" not in proc.stderr
