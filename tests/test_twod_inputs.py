"""2D inputs given directly (spatial_dims 2 without prepare.slices): 2D NIfTI, PNG and TIFF images,
prepared by the 3D code path as one-voxel slabs; and the refusals of inputs of the wrong dimension."""

import json
import logging
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medldm.data.prepare import prepare_subject
from medldm.errors import InputError
from medldm.io import save_nifti, save_png
from tests.conftest import REPO, run_snakemake

SETTINGS = dict(spacing=[2, 2], shape=[24, 28], percentiles=[0.5, 99.5], foreground_threshold=0.1)


def disc(shape=(60, 50), centre=(30, 25)):
    """A 2D 'head' (an ellipse with a left-right ramp, 1 mm pixels) and its 2-class label map."""
    x, y = np.indices(shape).astype(np.float32)
    inside = ((x - centre[0]) / 20) ** 2 + ((y - centre[1]) / 15) ** 2 < 1
    return np.where(inside, 100.0 + x, 0.0).astype(np.float32), inside.astype(np.uint8)


def as_pixels(image):
    """An (X, Y) array as PNG/TIFF rows (the orientation save_png writes and the reader undoes)."""
    return np.ascontiguousarray(np.rot90(image))


def test_2d_nifti_png_and_tiff_prepare_alike(tmp_path):
    """One image as a 2D NIfTI, a 3D NIfTI with a singleton axis, an 8-bit PNG, a 16-bit TIFF and a
    grey RGB TIFF: the same prepared (X, Y) image (PNG/TIFF up to their 8/16-bit steps)."""
    image, label = disc()
    save_nifti(tmp_path / "a.nii.gz", image, np.eye(4))
    save_nifti(tmp_path / "a_label.nii.gz", label, np.eye(4))
    save_nifti(tmp_path / "coronal.nii.gz", image[:, None, :], np.eye(4))  # (X, 1, Z): a coronal slab
    save_png(tmp_path / "a.png", image / image.max())
    Image.fromarray(as_pixels(label)).save(tmp_path / "a_label.png")
    Image.fromarray(as_pixels(image).astype(np.uint16)).save(tmp_path / "a16.tif")
    grey = (as_pixels(image) / image.max() * 255).astype(np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.tif")

    nifti = prepare_subject(tmp_path / "a.nii.gz", tmp_path / "a_label.nii.gz", label_values=[0, 1], **SETTINGS)
    assert nifti.image.shape == nifti.label.shape == (24, 28) and nifti.affine.shape == (4, 4)
    assert nifti.image.max() == 1 and 0 < nifti.label.mean() < 1
    np.testing.assert_allclose(np.diag(nifti.affine)[:2], [2, 2])
    png = prepare_subject(tmp_path / "a.png", tmp_path / "a_label.png", label_values=[0, 1], **SETTINGS)
    np.testing.assert_array_equal(png.label, nifti.label)
    np.testing.assert_allclose(png.affine, nifti.affine)
    for path, step in (("coronal.nii.gz", 0), ("a.png", 1 / 255), ("a16.tif", 0), ("rgb.tif", 1 / 255)):
        prepared = prepare_subject(tmp_path / path, "", **SETTINGS)
        assert prepared.image.shape == (24, 28), path
        assert np.abs(prepared.image - nifti.image).max() <= 2 * step + 1e-6, path


def test_pixel_spacing_sets_the_png_scale(tmp_path):
    """PNG pixels are 1 mm unless pixel_spacing says otherwise; at 0.5 mm the disc is half as big."""
    image, _ = disc()
    save_png(tmp_path / "a.png", image / image.max())
    one = prepare_subject(tmp_path / "a.png", "", **SETTINGS)
    half = prepare_subject(tmp_path / "a.png", "", pixel_spacing=[0.5, 0.5], **SETTINGS)
    np.testing.assert_allclose(np.diag(half.affine)[:2], [2, 2])
    assert (half.image > 0).sum() == pytest.approx((one.image > 0).sum() / 4, rel=0.2)


@pytest.mark.parametrize("make, message", [
    (lambda p, img: Image.fromarray(np.stack([img, img // 2, img], -1)).save(p / "x.png"),
     r"x.png: image is a colour image.*convert it to grayscale"),
    (lambda p, img: Image.fromarray(np.stack([img] * 4, -1)).save(p / "x.png"),
     r"x.png: image has transparent pixels"),
    (lambda p, img: Image.fromarray(img).save(p / "x.tif", save_all=True, append_images=[Image.fromarray(img)]),
     r"x.tif: image has 2 pages"),
    (lambda p, img: save_nifti(p / "x.nii.gz", np.ones((8, 9, 10), np.float32), np.eye(4)),
     r"x.nii.gz: image must be a 2D image \(spatial_dims is 2\), found shape \(8, 9, 10\).*prepare.slices"),
    (lambda p, img: (p / "x.png").write_bytes(b"not a png"), r"x.png: cannot read as PNG/TIFF"),
], ids=["colour", "transparent", "tiff-stack", "3d-in-2d", "corrupt"])
def test_bad_2d_inputs_name_the_file_and_the_fix(tmp_path, make, message):
    image = (as_pixels(disc()[0]) / 140 * 255).astype(np.uint8)
    make(tmp_path, image)
    path = next(tmp_path.glob("x.*"))
    with pytest.raises(InputError, match=message):
        prepare_subject(path, "", **SETTINGS)


@pytest.mark.parametrize("name", ["flat.nii.gz", "slab.nii.gz", "flat.png"])
def test_2d_files_in_a_3d_config_are_refused(tmp_path, name):
    """A 2D file (2D NIfTI, a one-slice volume, a PNG) prepared as a volume says how to read 2D."""
    image, _ = disc()
    save_nifti(tmp_path / "flat.nii.gz", image, np.eye(4))
    save_nifti(tmp_path / "slab.nii.gz", image[:, :, None], np.eye(4))
    save_png(tmp_path / "flat.png", image / image.max())
    volume = {**SETTINGS, "spacing": [2, 2, 2], "shape": [24, 28, 8]}
    with pytest.raises(InputError, match=rf"{name}: image must be a 3D volume.*set spatial_dims: 2 with 2-entry"):
        prepare_subject(tmp_path / name, "", **volume)


def test_mixed_sizes_come_out_on_one_grid_and_a_cut_is_reported(tmp_path, caplog):
    """Images of different sizes are resampled and cropped to prepare.shape; a crop that cuts the
    foreground is a warning naming the file."""
    small, _ = disc((50, 40), (25, 20))
    save_png(tmp_path / "small.png", small / small.max())
    big = np.zeros((200, 200), np.float32)
    big[20:180, 40:160] = np.arange(120.0, 240.0)  # 160 x 120 mm: larger than 24 x 28 pixels of 2 mm
    save_png(tmp_path / "big.png", big / big.max())
    with caplog.at_level(logging.WARNING, logger="medldm.data.prepare"):
        a = prepare_subject(tmp_path / "small.png", "", **SETTINGS)
        assert "cut off" not in caplog.text
        b = prepare_subject(tmp_path / "big.png", "", **SETTINGS)
    assert a.image.shape == b.image.shape == (24, 28)
    assert re.search(r"big.png: \d+% of the foreground lies outside prepare.shape \[24, 28\] at spacing \[2, 2\]",
                     caplog.text), caplog.text


def test_prepare_subject_script_writes_2d_nifti_and_info(tmp_path):
    image, label = disc()
    save_png(tmp_path / "a.png", image / image.max())
    Image.fromarray(as_pixels(label)).save(tmp_path / "a_label.png")
    out = tmp_path / "prepared"
    subprocess.run([sys.executable, str(REPO / "workflow_scripts" / "prepare_subject.py"),
                    "--image", str(tmp_path / "a.png"), "--label", str(tmp_path / "a_label.png"),
                    "--label-values", "0,1", "--settings", json.dumps({**SETTINGS, "pixel_spacing": [1, 1]}),
                    "--out-image", str(out / "image.nii.gz"), "--out-label", str(out / "label.nii.gz"),
                    "--out-info", str(out / "info.json")], check=True)
    info = json.loads((out / "info.json").read_text())
    assert info["shape"] == [24, 28] and info["spacing"] == [2.0, 2.0] and "slices" not in info
    assert nib.load(out / "image.nii.gz").shape == (24, 28)
    assert nib.load(out / "label.nii.gz").get_data_dtype() == np.uint8


def png_cohort(root, n=8, **paths):
    """``n`` subjects of PNG images and label maps of mixed sizes; returns the sample sheet's path."""
    rows = []
    for i in range(n):
        image, label = disc((50 + 4 * i, 44 + 2 * i), (25 + 2 * i, 22 + i))
        save_png(root / f"s{i}.png", image / image.max())
        Image.fromarray(as_pixels(label)).save(root / f"s{i}_label.png")
        rows.append({"subject_id": f"s{i}", "image": str(paths.get(f"s{i}", root / f"s{i}.png")),
                     "label": str(root / f"s{i}_label.png"), "class": ["HC", "TLE"][i % 2]})
    sheet = root / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return sheet


def planar_config(config, sheet):
    config["demo"]["enabled"] = False
    config["samples"] = str(sheet)
    config["labels"] = ["background", "head"]
    config["spatial_dims"] = 2
    config["prepare"].update(spacing=[4, 4], shape=[16, 16])
    return config


def test_png_cohort_is_prepared_in_2d_and_plans_every_stage(tmp_path, test_config):
    """A sheet of PNGs: prepare + manifest give one 2D row per subject (no slices); the dry run
    of the whole chain plans every stage."""
    from tests.test_workflow import planned_rules

    config = planar_config(test_config, png_cohort(tmp_path))
    run_snakemake(tmp_path, "--cores", "1", "prepared", config=config)
    manifest = pd.read_csv(tmp_path / "results" / "prepared" / "manifest.tsv", sep="\t")
    assert manifest["subject_id"].tolist() == [f"s{i}" for i in range(8)]
    assert set(manifest["shape"]) == {"16x16"} and set(manifest["spacing"]) == {"4x4"}
    assert nib.load(tmp_path / manifest["image"][0]).shape == nib.load(tmp_path / manifest["label"][0]).shape == (16, 16)
    planned = set(planned_rules(run_snakemake(tmp_path, "-n", config=config).stdout))
    assert {"train_vae", "export_latents", "train_ldm", "sample", "decode_synthetic", "evaluate_synthetic",
            "report"} <= planned


def test_a_3d_file_in_a_2d_run_stops_its_prepare_with_nothing_left(tmp_path, test_config):
    """One 3D volume among 2D images: its prepare job fails naming the file, and leaves no outputs."""
    save_nifti(tmp_path / "vol.nii.gz", np.random.default_rng(0).random((20, 20, 20), np.float32), np.eye(4))
    config = planar_config(test_config, png_cohort(tmp_path, s3=tmp_path / "vol.nii.gz"))
    proc = run_snakemake(tmp_path, "--cores", "1", "--keep-going", "prepared", config=config, check=False)
    assert proc.returncode != 0
    log = (tmp_path / "results" / "logs" / "prepare" / "s3.log").read_text()
    assert "vol.nii.gz: image must be a 2D image (spatial_dims is 2), found shape (20, 20, 20)" in log
    assert "Traceback" not in log
    assert not list((tmp_path / "results" / "prepared" / "s3").glob("*"))
    assert not (tmp_path / "results" / "prepared" / "manifest.tsv").exists()
    assert (tmp_path / "results" / "prepared" / "s2" / "image.nii.gz").is_file()  # the others went on


def volume_sheet(root):
    save_nifti(root / "vol.nii.gz", np.ones((8, 8, 8), np.float32), np.eye(4))
    sheet = root / "samples.tsv"
    pd.DataFrame({"subject_id": ["s0"], "image": [str(root / "vol.nii.gz")]}).to_csv(sheet, sep="\t", index=False)
    return sheet


def flat_sheet(root):
    save_png(root / "flat.png", np.ones((8, 8), np.float32))
    sheet = root / "samples.tsv"
    pd.DataFrame({"subject_id": ["s0"], "image": [str(root / "flat.png")]}).to_csv(sheet, sep="\t", index=False)
    return sheet


def user_sheet(config, sheet, **prepare):
    config["demo"]["enabled"] = False
    config["samples"] = str(sheet)
    config["classes"], config["labels"] = [], []
    config["prepare"].update(prepare)
    return config


@pytest.mark.parametrize("change, message", [
    (lambda c, p: c.update(spatial_dims=2),
     r"spatial_dims is 2 but prepare.slices is not set, so the sample sheet's images are 2D .* prepare.spacing "
     r"\[12, 12, 12\] has 3 entries"),
    (lambda c, p: c["prepare"].update(spacing=[4, 4], shape=[16, 16]),
     r"prepare.spacing \[4, 4\] has 2 entries but the inputs are 3D volumes"),
    (lambda c, p: c["prepare"].update(pixel_spacing=[0.5, 0.5]),
     r"prepare.pixel_spacing is the pixel size of PNG/TIFF inputs, read only with spatial_dims 2"),
    (lambda c, p: user_sheet(c, volume_sheet(p), spacing=[4, 4], shape=[16, 16]).update(spatial_dims=2),
     r"vol.nii.gz is a 3D volume, but spatial_dims is 2 without prepare.slices"),
    (lambda c, p: user_sheet(c, flat_sheet(p)),
     r"flat.png is a 2D image, but the inputs must be 3D volumes \(spatial_dims 3\)"),
], ids=["2d-with-3-entries", "3d-with-2-entries", "pixel-spacing-in-3d", "3d-sheet-in-2d", "2d-sheet-in-3d"])
def test_dimension_mismatches_stop_before_any_job(tmp_path, test_config, change, message):
    change(test_config, tmp_path)
    proc = run_snakemake(tmp_path, "-n", config=test_config, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and re.search(message, out), out[-3000:]
    assert not (tmp_path / "results").exists()


def test_report_says_images_not_three_axes_for_2d_fid(tmp_path):
    """The FID section of a 2D run speaks of images (axis `image`), not of slices on three axes."""
    import torch

    from medldm.evaluation.fid import SliceSpec, compare, slice_features
    from medldm.report.page import _fid_section, render

    class MeanFeatures(torch.nn.Module):  # a stand-in for Inception: 8 pixel statistics
        dims = 8

        def forward(self, x):
            return [torch.nn.functional.adaptive_avg_pool2d(x[:, :1], (2, 4)).flatten(1)[:, :, None, None]]

    rng = np.random.default_rng(0)
    images = [(rng.random((16, 20)), i % 2) for i in range(12)]
    features = slice_features(images, MeanFeatures(), SliceSpec(), torch.device("cpu"), progress=False)
    metrics = {"demo": {"fid": {"dims": 8, "rows": compare(features, features, ["HC", "TLE"]), "bootstrap": 0,
                                "slice_spec": SliceSpec().__dict__,
                                "weights": {"source": "stand-in", "sha256": "0" * 64, "weights": "-", "verified": True}},
                        "n_volumes": {"synthetic": 12, "real": 12}, "real_split": "test"}}
    html = render("r", [_fid_section(metrics, tmp_path)])
    assert "FID and KID (per image)" in html and "the 2D images themselves (axis `image`)" in html
    assert "three axes" not in html and "3 axes" not in html


def test_report_lists_controlnet_with_its_base_sha256(tmp_path):
    """The provenance table lists controlnet.pt and the base ldm.pt (path, sha256) it records."""
    from medldm.diffusion.controlnet import save_controlnet
    from medldm.provenance import sha256_file
    from medldm.report.page import _provenance_section, render

    path = tmp_path / "controlnet" / "edges" / "controlnet.pt"
    save_controlnet(path, model_state={}, ema_state={}, settings={"maps": "label"}, base_path="results/ldm/demo/ldm.pt",
                    base_sha256="ab" * 32, spatial_dims=2, in_channels=3, embedding=[8], label_names=["bg", "fg"],
                    step=5, selection={}, provenance={})
    inputs = {"manifest": str(tmp_path / "none.tsv"), "controlnet": {"edges": {"model": str(path), "ldm": "demo"}}}
    html = render("r", [_provenance_section(inputs, {})])
    assert "controlnet edges" in html and sha256_file(path) in html
    assert "controlnet edges: its base, ldm demo" in html and "results/ldm/demo/ldm.pt" in html and "ab" * 32 in html


def test_a_controlnet_run_gives_the_report_its_controlnet(tmp_path):
    """With controlnets in the config, the report job reads each controlnet.pt (an input, and in --inputs)."""
    from tests.test_controlnet_workflow import controlnet_config

    out = run_snakemake(tmp_path, "-n", "-p", "report", config=controlnet_config()).stdout
    job = [b for b in out.split("\n\n") if "rule report:" in b]
    assert len(job) == 1 and "results/controlnet/edges/controlnet.pt" in job[0].split("output:")[0], job
    assert '"controlnet": {"edges": {"ldm": "demo", "model": "results/controlnet/edges/controlnet.pt"' in job[0], job
