"""Inpainting masks: prepared with their image, bad masks refused by name, paste-back exact outside."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from medldm.data.masks import blend_weights, paste_back, random_ellipsoids
from medldm.data.prepare import prepare_subject
from medldm.data.samplesheet import check_samples
from medldm.errors import InputError
from medldm.io import save_nifti
from tests.conftest import REPO
from tests.test_prepare import SETTINGS, phantom, reorient


def write(tmp_path, name, data, affine):
    path = tmp_path / f"{name}.nii.gz"
    save_nifti(path, data, affine)
    return path


def prep_with_mask(image_path, mask_path, label_path=None):
    return prepare_subject(image_path, label_path, **SETTINGS, label_values=[0, 1, 2], mask_path=mask_path)


@pytest.mark.parametrize("flips", [(), (0, 1)], ids=["RAS", "LPS"])
def test_mask_is_prepared_like_the_label_map(tmp_path, flips):
    """Nearest neighbour, same resampling and crop as the image: the blob's mask comes out exactly
    where the label map's blob (prepared the same way) comes out."""
    image, label, affine = phantom()
    blob = (label == 2).astype(np.uint8)
    image, new_affine = reorient(image, affine, flips)
    label, _ = reorient(label, affine, flips)
    blob, _ = reorient(blob, affine, flips)
    prepared = prep_with_mask(write(tmp_path, "img", image, new_affine), write(tmp_path, "mask", blob, new_affine),
                              write(tmp_path, "lab", label, new_affine))
    assert prepared.mask.dtype == np.uint8 and prepared.mask.shape == tuple(SETTINGS["shape"])
    assert set(np.unique(prepared.mask)) == {0, 1}
    np.testing.assert_array_equal(prepared.mask, prepared.label == 2)


def test_prepare_script_writes_the_mask_on_the_image_grid(tmp_path):
    image, label, affine = phantom()
    args = [sys.executable, "-m", "workflow_scripts.prepare_subject",
            "--image", str(write(tmp_path, "img", image, affine)),
            "--mask", str(write(tmp_path, "mask", (label == 2).astype(np.uint8), affine)),
            "--settings", str(SETTINGS).replace("'", '"'), "--out-image", str(tmp_path / "out.nii.gz"),
            "--out-mask", str(tmp_path / "out_mask.nii.gz"), "--out-info", str(tmp_path / "info.json")]
    subprocess.run(args, check=True, cwd=REPO)
    out_image, out_mask = nib.load(tmp_path / "out.nii.gz"), nib.load(tmp_path / "out_mask.nii.gz")
    np.testing.assert_allclose(out_mask.affine, out_image.affine)
    assert np.asarray(out_mask.dataobj).sum() > 0


def _bad_masks(image, label, affine):
    """(name, mask data, mask affine, message) of each refused mask."""
    blob = (label == 2).astype(np.uint8)
    shifted = affine.copy()
    shifted[0, 3] += 5
    return [
        ("shape", blob[:-2], affine, "mask geometry .* does not match its image"),
        ("geometry", blob, shifted, "mask geometry .* does not match its image"),
        ("empty", np.zeros_like(blob), affine, "mask is empty"),
        ("whole", (image > 0).astype(np.uint8) | blob, affine, "covers the whole foreground"),
        ("nonbinary", blob * 2, affine, "not binary"),
        ("soft", blob * 0.5, affine, "not binary"),
    ]


@pytest.mark.parametrize("case", range(6), ids=["shape", "geometry", "empty", "whole", "nonbinary", "soft"])
def test_bad_masks_are_refused_naming_the_file(tmp_path, case):
    image, label, affine = phantom()
    name, mask, mask_affine, message = _bad_masks(image, label, affine)[case]
    mask_path = write(tmp_path, f"mask_{name}", mask, mask_affine)
    with pytest.raises(InputError, match=message) as err:
        prep_with_mask(write(tmp_path, "img", image, affine), mask_path)
    assert str(mask_path) in str(err.value)


def test_mask_emptied_by_resampling_is_refused(tmp_path):
    image, _, affine = phantom()
    speck = np.zeros(image.shape, np.uint8)
    speck[20, 24, 18] = 1  # one 1 mm voxel: nearest-neighbour resampling to 2 mm can miss it
    speck_path = write(tmp_path, "speck", speck, affine)
    with pytest.raises(InputError, match="empty after preparation") as err:
        prepare_subject(write(tmp_path, "img", image, affine), None, **{**SETTINGS, "spacing": [4, 4, 4]},
                        mask_path=speck_path)
    assert str(speck_path) in str(err.value)


def sheet(rows, columns=("subject_id", "image", "mask", "group")):
    return pd.DataFrame(rows, columns=list(columns))


def test_several_masks_of_one_image_need_a_group():
    rows = [("a-m0", "a.nii.gz", "a0.nii.gz", ""), ("a-m1", "a.nii.gz", "a1.nii.gz", "")]
    with pytest.raises(InputError, match="rows a-m0, a-m1 share the image a.nii.gz .* same `group`") as err:
        check_samples(sheet(rows), [], "sample sheet s.tsv", check_files=False)
    assert "sample sheet s.tsv" in str(err.value)
    grouped = [(*row[:3], "a") for row in rows]
    assert check_samples(sheet(grouped), [], "s", check_files=False)["group"].tolist() == ["a", "a"]
    no_group_column = [row[:3] for row in rows]
    with pytest.raises(InputError, match="share the image"):
        check_samples(sheet(no_group_column, ("subject_id", "image", "mask")), [], "s", check_files=False)


def test_masks_for_some_rows_only_are_refused():
    rows = [("a", "a.nii.gz", "a0.nii.gz", ""), ("b", "b.nii.gz", "", "")]
    with pytest.raises(InputError, match=r"inpainting masks are given for some subjects but not for \['b'\]"):
        check_samples(sheet(rows), [], "s", check_files=False)


def test_missing_mask_file_is_named(tmp_path):
    image = tmp_path / "a.nii.gz"
    image.write_bytes(b"")
    rows = [("a", str(image), str(tmp_path / "gone.nii.gz"), "")]
    with pytest.raises(InputError, match="mask file .*gone.nii.gz does not exist"):
        check_samples(sheet(rows), [], "s")


@pytest.mark.parametrize("blend", [0, 1, 3])
def test_paste_back_leaves_the_outside_exactly_equal(blend):
    rng = np.random.default_rng(blend)
    original = rng.random((20, 22, 18)).astype(np.float32)
    generated = rng.random((20, 22, 18)).astype(np.float32)
    mask = random_ellipsoids(np.ones(original.shape, bool), 3, rng, radii=(3, 6))
    out = paste_back(generated, original, mask, blend)
    outside = mask == 0
    assert np.array_equal(out[outside], original[outside])  # bit for bit
    weight = blend_weights(mask, blend)
    np.testing.assert_allclose(out, weight * generated + (1 - weight) * original, atol=1e-6)
    if blend == 0:
        assert np.array_equal(out[~outside], generated[~outside])
    else:  # a ramp inside the mask: the layer touching known voxels is partly original, the core generated
        inside = mask.astype(bool)
        border = inside & ~ndimage.binary_erosion(inside, border_value=1)
        np.testing.assert_allclose(weight[border], 1 / (blend + 1))
        assert weight.max() == 1


def test_random_ellipsoids_stay_inside_and_are_seeded():
    inside = np.zeros((30, 30, 30), bool)
    inside[5:25, 5:25, 5:25] = True
    first = random_ellipsoids(inside, 3, np.random.default_rng(1))
    assert first.any() and not (first.astype(bool) & ~inside).any()
    assert np.array_equal(first, random_ellipsoids(inside, 3, np.random.default_rng(1)))


def test_workflow_refuses_several_masks_of_an_image_without_groups(tmp_path):
    from tests.test_config_validation import dry_run_error, user_config, volume

    image, label = volume(tmp_path, "img"), volume(tmp_path, "lab")
    rows = [[f"s-m{k}", image, label, "HC", volume(tmp_path, f"m{k}")] for k in range(2)]
    config = user_config(tmp_path, rows, header="subject_id\timage\tlabel\tclass\tmask")
    out = dry_run_error(tmp_path, config)
    assert f"sample sheet {config['samples']}: rows s-m0, s-m1 share the image {image}" in out and "Traceback" not in out


def test_workflow_prepares_masks_with_their_images(tmp_path):
    from tests.conftest import run_snakemake
    from tests.test_config_validation import user_config, volume

    image, label = volume(tmp_path, "img"), volume(tmp_path, "lab")
    rows = [[f"s-m{k}", image, label, "HC", volume(tmp_path, f"m{k}"), "s"] for k in range(2)]
    rows.append(["t", volume(tmp_path, "img2"), volume(tmp_path, "lab2"), "HC", volume(tmp_path, "m9"), ""])
    config = user_config(tmp_path, rows, header="subject_id\timage\tlabel\tclass\tmask\tgroup")
    proc = run_snakemake(tmp_path, "-n", "-p", "prepared", config=config)
    assert proc.stdout.count(" --mask ") == 3
    assert f"--mask {tmp_path / 'm1.nii.gz'} --out-mask results/prepared/s-m1/mask.nii.gz" in proc.stdout
