"""2D mode (config spatial_dims 2): slices drawn from 3D volumes, per-subject splits, 2D networks."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd

from medldm.io import save_nifti
from tests.conftest import REPO
from tests.test_prepare import phantom

SLICES = {"axis": "axial", "n": 3, "central_fraction": 0.5}
SETTINGS = dict(spacing=[2, 2, 2], shape=[24, 28, 20], percentiles=[0.5, 99.5], foreground_threshold=0.1,
                slices=SLICES)


def prepare_sliced(tmp_path, subject, settings=SETTINGS):
    """Run prepare_subject.py with slices on a phantom; returns the subject's output folder."""
    image, label, affine = phantom()
    save_nifti(tmp_path / f"{subject}.nii.gz", image, affine)
    save_nifti(tmp_path / f"{subject}_label.nii.gz", label, affine)
    out = tmp_path / "prepared" / subject
    n = settings["slices"]["n"]
    subprocess.run([sys.executable, str(REPO / "workflow_scripts" / "prepare_subject.py"),
                    "--image", str(tmp_path / f"{subject}.nii.gz"), "--label", str(tmp_path / f"{subject}_label.nii.gz"),
                    "--label-values", "0,1,2", "--settings", json.dumps(settings),
                    "--out-image", *[str(out / f"image-s{k}.nii.gz") for k in range(n)],
                    "--out-label", *[str(out / f"label-s{k}.nii.gz") for k in range(n)],
                    "--out-info", str(out / "info.json")], check=True)
    return out


def test_slices_are_2d_and_keep_their_place(tmp_path):
    """Each slice is a 2D NIfTI whose affine places its pixels where they were in the volume."""
    from medldm.data.prepare import prepare_subject

    out = prepare_sliced(tmp_path, "a")
    info = json.loads((out / "info.json").read_text())
    assert info["shape"] == [24, 28] and info["spacing"] == [2.0, 2.0]
    index = info["slices"]["index"]
    assert len(index) == 3 and index == sorted(index) and len(set(index)) == 3
    settings = {k: v for k, v in SETTINGS.items() if k != "slices"}
    volume = prepare_subject(tmp_path / "a.nii.gz", tmp_path / "a_label.nii.gz", label_values=[0, 1, 2], **settings)
    for k, z in enumerate(index):
        img, lab = nib.load(out / f"image-s{k}.nii.gz"), nib.load(out / f"label-s{k}.nii.gz")
        assert img.shape == (24, 28) and lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(np.asarray(img.dataobj), volume.image[:, :, z])
        np.testing.assert_array_equal(np.asarray(lab.dataobj), volume.label[:, :, z])
        pixel = np.array([5, 7, 0, 1.0])  # voxel (5, 7, z) of the volume
        np.testing.assert_allclose(img.affine @ pixel, volume.affine @ np.array([5, 7, z, 1.0]))


def test_manifest_rows_per_slice_split_per_subject(tmp_path):
    """Slices get ids <subject>-s<k>, their subject's class and group, and never split apart;
    splits.tsv lists subjects; the prepared set reads (1, X, Y) images."""
    from medldm.data.cohort import load_prepared
    from workflow_scripts.make_manifest import build_manifest

    subjects = [f"s{i:02d}" for i in range(8)]
    infos = [prepare_sliced(tmp_path, s) / "info.json" for s in subjects]
    sheet = pd.DataFrame({"subject_id": subjects, "image": [str(tmp_path / f"{s}.nii.gz") for s in subjects],
                          "label": [str(tmp_path / f"{s}_label.nii.gz") for s in subjects],
                          "class": ["HC", "TLE"] * 4})
    split = {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}
    manifest, splits = build_manifest(sheet, infos, split, ["HC", "TLE"])
    assert len(manifest) == 3 * len(subjects) and list(splits["subject_id"]) == subjects
    manifest["subject"] = manifest["subject_id"].str.replace(r"-s\d$", "", regex=True)
    assert manifest["subject_id"].tolist()[:3] == ["s00-s0", "s00-s1", "s00-s2"]
    per_subject = manifest.groupby("subject").agg({"split": "nunique", "class": "nunique", "group": "first"})
    assert (per_subject[["split", "class"]] == 1).all().all()
    assert (per_subject["group"] == per_subject.index).all()
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert dict(zip(splits["subject_id"], splits["split"], strict=True)) == dict(
        zip(manifest["subject"], manifest["split"], strict=True))
    manifest.drop(columns="subject").to_csv(tmp_path / "manifest.tsv", sep="\t", index=False)
    data = load_prepared(tmp_path / "manifest.tsv", ["HC", "TLE"])
    assert data.shape == (24, 28) and data[0]["image"].shape == (1, 24, 28) and data[0]["label"].shape == (24, 28)
