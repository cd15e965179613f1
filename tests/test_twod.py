"""2D mode (config spatial_dims 2): slices drawn from 3D volumes, per-subject splits, 2D networks."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

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


def test_vae_round_trip_2d():
    """A 2D AutoencoderKL (spatial_dims 2): images (B, 1, X, Y) -> latents (B, C, X/f, Y/f) -> images."""
    import torch

    from medldm.autoencoder import networks as ae
    from tests.vae_toys import vae_settings

    settings = vae_settings(model={"spatial_dims": 2})
    net = ae.build_autoencoder(settings["model"], 1).eval()
    images = torch.rand(3, 1, 16, 24)
    with torch.no_grad():
        z_mu, _ = net.encode(images)
        decoded = net.decode(z_mu)
    assert z_mu.shape == (3, 2, 8, 12) and decoded.shape == images.shape
    disc = ae.build_discriminator({**settings["loss"], "adversarial_weight": 0.5}, 2)
    assert disc(torch.rand(2, 1, 64, 64))[-1].ndim == 4  # (B, 1, h, w) patch logits


def test_diffusion_unet_2d_and_dit3d_refused():
    """The UNet backbone follows the latents' dimension; DiT3D says it is 3D only."""
    import torch

    from medldm.diffusion.backbones import build_diffusion_model
    from medldm.errors import InputError

    unet = {"name": "unet", "channels": [16, 32], "attention_levels": [False, True], "norm_num_groups": 8,
            "num_head_channels": 16}
    model = build_diffusion_model(unet, 2, num_classes=2, spatial_dims=2)
    x = torch.randn(4, 2, 8, 12)
    out = model(x, torch.randint(0, 1000, (4,)), class_labels=torch.tensor([0, 1, 2, 0]))
    assert out.shape == x.shape
    with pytest.raises(InputError, match="dit3d is 3D only"):
        build_diffusion_model({"name": "dit3d"}, 2, 2, spatial_dims=2)


def test_fid_scores_2d_images_directly():
    """2D images are their own one slice on the one axis `image`; an empty image gives none."""
    import torch

    from medldm.evaluation.fid import SliceSpec, compare, slice_features

    class MeanFeatures(torch.nn.Module):  # a stand-in for Inception: 8 pixel statistics
        dims = 8

        def forward(self, x):
            pooled = torch.nn.functional.adaptive_avg_pool2d(x[:, :1], (2, 4))
            return [pooled.flatten(1)[:, :, None, None]]

    rng = np.random.default_rng(0)
    images = [(rng.random((16, 20)) * (i % 3 > 0), i % 2) for i in range(9)]  # every third image empty
    features = slice_features(images, MeanFeatures(), SliceSpec(), torch.device("cpu"), progress=False)
    assert features.axes == ("image",) and len(features.features["image"]) == 6
    assert features.empty_volumes == 3 and sorted(set(features.volume["image"])) == [1, 2, 4, 5, 7, 8]
    rows = compare(features, features, ["HC", "TLE"])
    assert [r["axis"] for r in rows if r["group"] == "all"] == ["image", "mean"]
    assert rows[0]["fid"] == pytest.approx(0, abs=1e-6)


def test_demo2d_dry_run_plans_every_stage(tmp_path):
    """config/demo2d.yaml, merged over config/config.yaml, plans the whole chain."""
    from tests.conftest import run_snakemake
    from tests.test_workflow import planned_rules

    configs = [str(REPO / "config" / name) for name in ("config.yaml", "demo2d.yaml")]
    proc = run_snakemake(tmp_path, "-n", "--configfile", *configs)
    planned = set(planned_rules(proc.stdout))
    assert {"prepare", "manifest", "train_vae", "export_latents", "train_ldm", "sample", "decode_synthetic",
            "decode_reconstructions", "fid_reference", "evaluate_synthetic", "train_controlnet", "train_segmenter",
            "evaluate_segmentation", "report"} <= planned, proc.stdout[-3000:]
    assert "image-s11.nii.gz" in proc.stdout  # 12 slices per subject


def two_d(config):
    config["spatial_dims"] = 2
    config["prepare"]["slices"] = {"n": 2}


def dit3d_in_2d(config):
    two_d(config)
    config["ldm"]["demo"]["model"] = {"name": "dit3d"}


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(spatial_dims=2), "spatial_dims is 2 but prepare.slices is not set"),
    (lambda c: c["prepare"].update(slices={"n": 2}), "prepare.slices is set but spatial_dims is 3"),
    (dit3d_in_2d, "dit3d, which is 3D only"),
], ids=["2d-without-slices", "slices-in-3d", "dit3d-in-2d"])
def test_dimension_mismatches_are_refused(tmp_path, test_config, change, message):
    from tests.conftest import run_snakemake

    change(test_config)
    proc = run_snakemake(tmp_path, "-n", config=test_config, check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr


def test_2d_vae_refuses_3d_data():
    """A 2D autoencoder (spatial_dims 2) given prepared volumes says which dimension to set."""
    import torch

    from medldm.autoencoder.training import VAETrainer
    from medldm.errors import InputError
    from tests.vae_toys import toy_set, vae_settings

    data = toy_set(4, shape=(16, 16, 16), splits=["train", "train", "val", "val"])
    with pytest.raises(InputError, match="prepared images are 3D .* autoencoder is 2D"):
        VAETrainer(vae_settings(model={"spatial_dims": 2}), data.subset("train"), data.subset("val"), "unused", 4,
                   torch.device("cpu"))


def test_tiny_2d_chain_end_to_end(tmp_path, test_config):
    """config/test.yaml in 2D (2 axial slices per subject), with a ControlNet on tissue contours:
    every stage runs; latents are (N, C, h, w), decoded images 2D NIfTI and PNG, FID on the images
    themselves; the ControlNet set carries its 2D condition maps and a 2D segmenter scores its
    adherence; the base ldm.pt is the file the ControlNet was trained on."""
    import h5py
    import torch

    from medldm.provenance import sha256_file
    from tests.conftest import run_snakemake

    test_config["spatial_dims"] = 2
    test_config["prepare"]["slices"] = {"axis": "axial", "n": 2, "central_fraction": 0.5}
    test_config["vae"]["demo"]["paired_labels"] = False
    test_config["controlnet"] = {"edges": {"ldm": "demo", "maps": "label", "transform": "contour",
                                           "train": {"steps": 4, "batch_size": 4, "val_every": 2, "checkpoint_every": 2}}}
    test_config["sample_sets"] = {"steered": {"controlnet": "edges", "conditions": {"from": "test"}, "sampler": "rflow",
                                              "steps": 4, "batch_size": 4}}  # the base ldm samples inside it
    run_snakemake(tmp_path, "--cores", "2", config=test_config, timeout=1200)
    results = tmp_path / "results"
    with h5py.File(results / "vae" / "demo" / "latents.h5") as f:
        assert f["mu"].shape == (16, 2, 8, 8) and list(f.attrs["grid_shape"]) == [16, 16]
        assert [s.decode() for s in f["subject_id"][:2]] == ["demo000-s0", "demo000-s1"]
    test_slices = 4  # 2 test subjects x 2 slices, one image per map
    with h5py.File(results / "synthetic" / "demo" / "steered" / "volumes.h5") as f:
        assert f["image"].shape == f["label"].shape == (test_slices, 16, 16)
    synthetic = results / "synthetic" / "demo" / "steered" / "nifti"
    assert len(list(synthetic.glob("*/image.png"))) == test_slices
    assert nib.load(next(synthetic.glob("*/image.nii.gz"))).shape == (16, 16)
    metrics = json.loads((results / "eval" / "synthetic" / "demo" / "steered" / "image_metrics.json").read_text())
    assert {r["axis"] for r in metrics["fid"]["rows"]} == {"image", "mean"}
    controlnet = torch.load(results / "controlnet" / "edges" / "controlnet.pt", weights_only=False)
    assert controlnet["spatial_dims"] == 2 and controlnet["base_sha256"] == sha256_file(results / "ldm" / "demo" / "ldm.pt")
    adherence = json.loads((results / "eval" / "synthetic" / "demo" / "steered" / "segmentation.json").read_text())
    assert adherence["adherence"]["kind"] == "adherence"
    assert np.shape(adherence["adherence"]["per_subject"]) == (test_slices, 3)
    assert set(adherence["arms"]) == {"real", "synthetic", "real+synthetic"}
    classifier = json.loads((results / "eval" / "synthetic" / "demo" / "steered" / "classifier.json").read_text())
    assert classifier["n_test"] == test_slices and "synthetic" in classifier["arms"]
    assert (results / "report" / "index.html").is_file()


def test_2d_input_file_says_how_to_get_2d(tmp_path):
    """A 2D NIfTI given as input names the file and the way to 2D data (slices of the volumes)."""
    from medldm.data.prepare import prepare_subject
    from medldm.errors import InputError

    save_nifti(tmp_path / "flat.nii.gz", np.ones((16, 16), np.float32), np.eye(4))
    with pytest.raises(InputError, match=r"flat.nii.gz: image must be a 3D volume.*prepare.slices"):
        prepare_subject(tmp_path / "flat.nii.gz", "", **{k: v for k, v in SETTINGS.items() if k != "slices"})


class LabelOracle:
    """A stand-in segmenter for images that encode their label map as label / (L - 1): one-hot logits."""

    def __init__(self, n_labels):
        self.n_labels = n_labels

    def __call__(self, x):
        import torch

        labels = (x[:, 0] * (self.n_labels - 1)).round().long()
        return torch.nn.functional.one_hot(labels, self.n_labels).movedim(-1, 1).float()


def test_segmentation_scores_2d_images():
    """The segmentation evaluation in 2D: a perfect prediction scores Dice 1 on every label, the
    same maps shifted by two pixels less; the grid (13x18) is not a multiple of the network's 4."""
    import torch

    from medldm.evaluation import segmentation as seg

    labels = ["background", "CSF", "GM", "WM"]
    maps = np.zeros((5, 13, 18), np.uint8)
    for i in range(5):
        maps[i, 2 + i % 2:11, 3:16] = 1
        maps[i, 4:9, 5:14 - i] = 2
        maps[i, 5:8, 7:11] = 3
    settings = {"channels": [4, 8, 16], "batch_size": 2, "bootstrap": 50}
    perfect = seg.score(LabelOracle(4), seg.Pairs(maps / 3.0, maps), settings, labels, torch.device("cpu"))
    shifted = seg.score(LabelOracle(4), seg.Pairs(maps / 3.0, np.roll(maps, 2, axis=2)), settings, labels,
                        torch.device("cpu"))
    np.testing.assert_allclose(perfect["per_subject"], 1.0)
    assert all(shifted["dice"][name]["ci_high"] < 1.0 for name in ("CSF", "GM", "WM", "mean"))


def test_a_2d_segmenter_trains_on_2d_pairs():
    """train_segmenter builds a 2D network for 2D pairs; segment gives (N, X, Y) maps."""
    import torch

    from medldm.evaluation import segmentation as seg

    rng = np.random.default_rng(0)
    maps = rng.integers(0, 3, (6, 12, 16)).astype(np.uint8)
    settings = {"channels": [4, 8], "steps": 2, "batch_size": 2}
    images = (maps / 2.0).astype(np.float32)
    model = seg.train_segmenter(seg.Pairs(images, maps), settings, 3, torch.device("cpu"))
    assert seg.segment(model, images[:3], torch.device("cpu"), settings).shape == (3, 12, 16)
