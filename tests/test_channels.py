"""Multi-channel subjects (config ``image_channels``): the sample sheet's channel columns, every
channel prepared on the first's grid and normalised on its own, the autoencoder's encode/decode round
trip through latents.h5 and volumes.h5, and FID, MS-SSIM and montages per channel. The second channel
is the demo's ``second_contrast`` of the first (seeded)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medldm.autoencoder import networks as ae
from medldm.data import h5layout
from medldm.data.cohort import load_prepared
from medldm.data.demo import second_contrast
from medldm.data.prepare import prepare_subject
from medldm.data.samplesheet import check_samples
from medldm.errors import InputError
from medldm.evaluation.fid import load_per_channel
from medldm.evaluation.fid_weights import save_random_weights
from medldm.io import save_nifti
from tests.test_report import FID, MSSSIM, run
from tests.vae_toys import vae_settings
from workflow_scripts import (
    decode,
    evaluate_reconstruction,
    evaluate_synthetic,
    export_latents,
    fetch_fid_weights,
    fid_reference,
    make_manifest,
)
from workflow_scripts import (
    prepare_subject as prepare_script,
)
from workflow_scripts import report as report_script

CHANNELS = ["t1pre", "t1post"]
CLASSES = ["HC", "TLE"]
INPUT_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
PREPARE = {"spacing": [4, 4, 4], "shape": [16, 16, 16], "percentiles": [0.5, 99.5], "foreground_threshold": 0.1}


def head(rng, shape=(28, 28, 28)) -> np.ndarray:
    """A textured ellipsoid head (arbitrary scanner units) on an empty background."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = ((grid / rng.uniform(0.6, 0.8, 3)[:, None, None, None]) ** 2).sum(0) < 1
    return (inside * (300 + 500 * rng.random(shape))).astype(np.float32)


def write_subject(root: Path, sid: str, rng, seed: int) -> dict:
    pre = head(rng)
    paths = {"t1pre": root / "raw" / f"{sid}_pre.nii.gz", "t1post": root / "raw" / f"{sid}_post.nii.gz"}
    save_nifti(paths["t1pre"], pre, INPUT_AFFINE)
    save_nifti(paths["t1post"], 7.0 * second_contrast(pre, seed), INPUT_AFFINE)  # other units, other contrast
    return {k: str(v) for k, v in paths.items()}


# -- the sample sheet -------------------------------------------------------------------------------------


def sheet(rows) -> pd.DataFrame:
    return pd.DataFrame(rows).fillna("")


def test_sheet_channel_columns_replace_image(tmp_path):
    paths = write_subject(tmp_path, "a", np.random.default_rng(0), 0)
    checked = check_samples(sheet([{"subject_id": "a", **paths}]), [], "sheet s.tsv", channels=CHANNELS)
    assert checked.loc[0, "image"] == paths["t1pre"]  # the first channel drives preparation
    with pytest.raises(InputError, match=r"s.tsv lacks the column\(s\) \['t1post'\]"):
        check_samples(sheet([{"subject_id": "a", "t1pre": paths["t1pre"]}]), [], "sheet s.tsv", channels=CHANNELS)
    with pytest.raises(InputError, match=r"rows \['b'\] have no path in the column 't1post'"):
        check_samples(sheet([{"subject_id": "a", **paths}, {"subject_id": "b", "t1pre": paths["t1pre"], "t1post": ""}]),
                      [], "sheet s.tsv", check_files=False, channels=CHANNELS)
    with pytest.raises(InputError, match=r"has an `image` column, but the config's image_channels"):
        check_samples(sheet([{"subject_id": "a", "image": paths["t1pre"], **paths}]), [], "s", channels=CHANNELS)
    missing = {**paths, "t1post": str(tmp_path / "nowhere.nii.gz")}
    with pytest.raises(InputError, match=r"row a: t1post file .*nowhere.nii.gz does not exist"):
        check_samples(sheet([{"subject_id": "a", **missing}]), [], "s", channels=CHANNELS)


# -- preparation ------------------------------------------------------------------------------------------


def test_channels_share_the_first_grid_and_are_normalised_each_on_its_own(tmp_path):
    rng = np.random.default_rng(1)
    pre = head(rng)
    save_nifti(tmp_path / "pre.nii.gz", pre, INPUT_AFFINE)
    save_nifti(tmp_path / "scaled.nii.gz", 3.0 * pre + 50.0, INPUT_AFFINE)  # same contrast, other units
    save_nifti(tmp_path / "post.nii.gz", 7.0 * second_contrast(pre, 0), INPUT_AFFINE)
    single = prepare_subject(tmp_path / "pre.nii.gz", None, **PREPARE)
    multi = prepare_subject(tmp_path / "pre.nii.gz", None, **PREPARE,
                            channel_paths=[tmp_path / "scaled.nii.gz", tmp_path / "post.nii.gz"])
    first, scaled, post = multi.channels
    assert np.array_equal(first, single.image) and np.allclose(multi.affine, single.affine)
    assert first.shape == scaled.shape == post.shape == (16, 16, 16)
    # normalised on its own percentiles: a channel in other units prepares to the same [0, 1] values
    assert np.allclose(scaled, first, atol=1e-4)
    (lo0, hi0), (lo1, hi1), (lo2, hi2) = multi.channel_range
    assert lo1 == pytest.approx(3 * lo0 + 50, rel=1e-4) and hi1 == pytest.approx(3 * hi0 + 50, rel=1e-4)
    assert hi2 > 1000 and post.max() == pytest.approx(1.0) and not np.allclose(post, first, atol=0.05)


def test_a_channel_of_another_grid_is_refused_naming_the_file(tmp_path):
    rng = np.random.default_rng(2)
    save_nifti(tmp_path / "pre.nii.gz", head(rng), INPUT_AFFINE)
    save_nifti(tmp_path / "other_shape.nii.gz", head(rng, (28, 28, 30)), INPUT_AFFINE)
    moved = INPUT_AFFINE.copy()
    moved[0, 3] = 5.0  # same shape, shifted by 5 mm
    save_nifti(tmp_path / "moved.nii.gz", head(rng), moved)
    for bad in ("other_shape", "moved"):
        with pytest.raises(InputError, match=rf"{bad}.nii.gz: image channel geometry .* differs from the subject's first"):
            prepare_subject(tmp_path / "pre.nii.gz", None, **PREPARE, channel_paths=[tmp_path / f"{bad}.nii.gz"])


# -- prepare -> encode -> decode -> evaluate -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """Eight two-channel subjects through the stage scripts, with an untrained two-channel autoencoder."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("channels")
    rng = np.random.default_rng(0)
    rows, infos = [], []
    for i, split in enumerate(["train", "train", "val", "val", "test", "test", "test", "test"]):
        sid = f"s{i}"
        paths = write_subject(root, sid, rng, i)
        rows.append({"subject_id": sid, **paths, "class": CLASSES[i % 2], "split": split})
        out = root / "prepared" / sid
        run(prepare_script, "--image", paths["t1pre"], "--channel", paths["t1post"], "--channel-names",
            ",".join(CHANNELS), "--settings", json.dumps(PREPARE), "--out-image", out / "image.nii.gz",
            "--out-info", out / "info.json")
        infos.append(out / "info.json")
    pd.DataFrame(rows).to_csv(root / "samples.tsv", sep="\t", index=False)
    manifest = root / "prepared" / "manifest.tsv"
    split = {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0, "file": ""}
    run(make_manifest, "--samples", root / "samples.tsv", "--infos", *infos, "--split-settings", json.dumps(split),
        "--classes", ",".join(CLASSES), "--out", manifest,
        "--montage", root / "prepared" / "montage.png")

    settings = vae_settings()
    data = load_prepared(manifest, CLASSES, with_labels=False)
    torch.manual_seed(0)
    net = ae.build_autoencoder(settings["model"], ae.io_channels(False, 0, image_channels=len(data.channel_names)))
    ae.save_vae(root / "vae.pt", net, {
        "settings": settings, "channels": ae.io_channels(False, 0, image_channels=2), "image_channels": data.channel_names,
        "classes": CLASSES, "labels": [], "prepare": PREPARE, "grid_affine": data.affine,
        "grid_shape": list(data.shape), "latent_shape": [2, 8, 8, 8]})
    inference = json.dumps({"batch_size": 4})
    run(export_latents, "--vae", root / "vae.pt", "--manifest", manifest, "--settings", inference,
        "--out", root / "latents.h5", "--device", "cpu")
    run(decode, "--vae", root / "vae.pt", "--latents", root / "latents.h5", "--settings", inference,
        "--out", root / "recon.h5", "--nifti-dir", root / "nifti", "--device", "cpu")

    random_weights = save_random_weights(root / "random_inception.pth")
    out = root / "eval"
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(root / "torch_home"))
    try:
        run(fetch_fid_weights, "--settings", json.dumps({"weights": str(random_weights), "allow_download": False,
                                                         "allow_convert": False, "allow_unverified": True}),
            "--out", out / "weights.json")
        common = ["--manifest", manifest, "--classes", ",".join(CLASSES)]
        features = [*common, "--settings", json.dumps(FID), "--weights-record", out / "weights.json", "--device", "cpu"]
        run(fid_reference, *features, "--out", out / "reference.npz")
        run(fid_reference, *features, "--reconstructions", root / "recon.h5", "--out", out / "recon_features.npz")
        run(evaluate_synthetic, *common, "--volumes", root / "recon.h5", "--reference", out / "reference.npz",
            "--reconstruction-features", out / "recon_features.npz",
            "--settings", json.dumps({"fid": FID, "msssim": MSSSIM}), "--weights-record", out / "weights.json",
            "--device", "cpu", "--out-json", out / "metrics.json", "--out-csv", out / "metrics.csv")
        run(evaluate_reconstruction, *common, "--reconstructions", root / "recon.h5", "--settings",
            json.dumps(MSSSIM), "--out", out / "reconstruction.json")
    finally:
        mp.undo()
    inputs = {"manifest": str(manifest), "fid_weights": str(out / "weights.json"),
              "vae": {"two": {"model": str(root / "vae.pt"), "run_dir": "", "reconstructions": str(root / "recon.h5"),
                              "reconstruction": str(out / "reconstruction.json")}},
              "sample_sets": {"recon": {"ldm": "none", "volumes": str(root / "recon.h5"),
                                        "metrics": str(out / "metrics.json"), "classifier": None, "saliency": None}}}
    run(report_script, "--inputs", json.dumps(inputs), "--config", json.dumps({"classes": CLASSES}),
        "--out", root / "report" / "index.html", "--figures", root / "report" / "figures")
    return root


def test_prepared_subjects_and_manifest_record_the_channels(pipeline):
    manifest = pd.read_csv(pipeline / "prepared" / "manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert set(manifest["channels"]) == {"t1pre,t1post"}
    assert nib.load(manifest.loc[0, "image"]).shape == (16, 16, 16, 2)  # one 4D NIfTI (X, Y, Z, C)
    info = json.loads((pipeline / "prepared" / "s0" / "info.json").read_text())
    assert info["channels"] == CHANNELS and len(info["channel_range"]) == 2
    data = load_prepared(pipeline / "prepared" / "manifest.tsv", CLASSES)
    assert data.channel_names == CHANNELS and data.shape == (16, 16, 16)
    item = data[0]["image"]
    assert item.shape == (2, 16, 16, 16) and item.dtype == torch.float32
    for c in range(2):  # each channel on its own [0, 1] scale
        assert float(item[c].max()) == pytest.approx(1.0) and float(item[c].min()) == pytest.approx(0.0)
    assert np.array_equal(data.volume(0, 1), item[1].numpy()) and list(data.volumes(1)[0].shape) == [16, 16, 16]


def test_round_trip_keeps_every_channel(pipeline):
    data = load_prepared(pipeline / "prepared" / "manifest.tsv", CLASSES)
    with h5layout.open_latents(pipeline / "latents.h5") as latents:
        assert latents.header.image_channels == CHANNELS and latents.mu.shape == (8, 2, 8, 8, 8)
    net, _ = ae.load_vae(pipeline / "vae.pt")
    with torch.no_grad():
        expected = ae.to_volumes(net.decode(net.encode(data[3]["image"][None])[0]), image_channels=2)[0][0]
    with h5layout.open_volumes(pipeline / "recon.h5") as recon:
        assert recon.channel_names == CHANNELS and recon.image.shape == (8, 2, 16, 16, 16)
        assert recon.channel(1).shape == (8, 16, 16, 16) and recon.channel(1)[3].shape == (16, 16, 16)
        np.testing.assert_allclose(recon.channel(0)[3], expected[0], atol=1e-5)
        np.testing.assert_allclose(recon.channel(1)[[3]][0], expected[1], atol=1e-5)
        assert np.array_equal(recon.channel(1)[2:4][1], recon.image[3, 1])
        row = recon.subject_ids.index("s3")
        for c, name in enumerate(CHANNELS):  # <id>/<channel>.nii.gz, no image.nii.gz
            written = nib.load(pipeline / "nifti" / "s3" / f"{name}.nii.gz")
            np.testing.assert_allclose(np.asarray(written.dataobj), recon.channel(c)[row])
            np.testing.assert_allclose(written.affine, data.affines[3])
    assert not (pipeline / "nifti" / "s3" / "image.nii.gz").exists()


def test_fid_msssim_and_montages_are_reported_per_channel(pipeline):
    reference = load_per_channel(pipeline / "eval" / "reference.npz")
    assert list(reference) == CHANNELS
    assert not np.allclose(reference["t1pre"].features["axial"], reference["t1post"].features["axial"])
    metrics = json.loads((pipeline / "eval" / "metrics.json").read_text())
    assert sorted(metrics["channels"]) == sorted(CHANNELS)
    for name in CHANNELS:
        part = metrics["channels"][name]
        axes = {r["axis"] for r in part["fid"]["rows"]}
        groups = {r["group"] for r in part["fid"]["rows"]}
        assert {"sagittal", "coronal", "axial", "mean"} <= axes and {"all", "HC", "TLE"} <= groups
        assert "reconstruction" in part["fid"]["baselines"] and "all" in part["msssim"]["synthetic"]
    assert metrics["fid"] == metrics["channels"]["t1pre"]["fid"]  # the top level is the first channel's
    table = pd.read_csv(pipeline / "eval" / "metrics.csv")
    assert set(table["channel"]) == set(CHANNELS)
    recon = json.loads((pipeline / "eval" / "reconstruction.json").read_text())
    assert sorted(recon["channels"]) == sorted(CHANNELS) and recon["channels"]["t1post"]["ssim"]["mean"] < 1
    figures = pipeline / "report" / "figures"
    for name in CHANNELS:
        assert (figures / f"real_test_{name}_HC.png").is_file()
        assert (figures / f"synthetic_recon_{name}_TLE.png").is_file()
    page = (pipeline / "report" / "index.html").read_text()
    assert "recon [t1post]" in page and "channel t1post" in page


# -- the workflow -------------------------------------------------------------------------------------------


def channel_config(tmp_path, rows) -> dict:
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return {"samples": str(sheet), "classes": CLASSES, "image_channels": CHANNELS, "prepare": PREPARE}


def test_workflow_prepares_channel_columns(tmp_path):
    from tests.conftest import run_snakemake

    rng = np.random.default_rng(3)
    rows = [{"subject_id": f"s{i}", **write_subject(tmp_path, f"s{i}", rng, i), "class": CLASSES[i % 2]}
            for i in range(4)]
    run_snakemake(tmp_path, "--cores", "1", "prepared", config=channel_config(tmp_path, rows))
    manifest = pd.read_csv(tmp_path / "results" / "prepared" / "manifest.tsv", sep="\t", dtype=str,
                           keep_default_na=False)
    assert set(manifest["channels"]) == {"t1pre,t1post"}
    assert nib.load(tmp_path / manifest.loc[0, "image"]).shape == (16, 16, 16, 2)  # paths relative to the workdir

    no_column = [{k: v for k, v in row.items() if k != "t1post"} for row in rows]
    proc = run_snakemake(tmp_path, "-n", config=channel_config(tmp_path, no_column), check=False)
    assert proc.returncode != 0 and "lacks the column(s) ['t1post']" in proc.stdout + proc.stderr


def test_a_sheet_without_label_maps_plans_its_jobs(tmp_path):
    """One image channel and no `label` column (the sheet of the workflow test above, single-channel)."""
    from tests.conftest import run_snakemake

    rows = [{"subject_id": f"s{i}", "image": write_subject(tmp_path, f"s{i}", np.random.default_rng(i), i)["t1pre"],
             "class": CLASSES[i % 2]} for i in range(4)]
    config = {**channel_config(tmp_path, rows), "image_channels": []}
    proc = run_snakemake(tmp_path, "-n", "prepared", config=config)
    assert "prepare" in proc.stdout and "manifest" in proc.stdout


def test_paired_autoencoder_trains_on_every_channel_with_patches(tmp_path):
    """Two image channels plus one-hot labels in, the same out; random patches crop all alike."""
    from dataclasses import replace

    from medldm.autoencoder.training import VAETrainer, evaluate_reconstruction
    from tests.vae_toys import LABELS, toy_set

    toy = toy_set(4)
    data = replace(toy, images=torch.cat([toy.images, 1 - toy.images], 1), channel_names=CHANNELS)
    settings = vae_settings(paired_labels=True, train={"epochs": 2, "patch_size": [8, 8, 8]})
    result = VAETrainer(settings, data, data.subset("val"), tmp_path / "run", len(LABELS), torch.device("cpu")).run()
    assert result.model.encoder.blocks[0].conv.in_channels == 2 + len(LABELS)
    metrics, montage = evaluate_reconstruction(result.model, data, len(LABELS), True, torch.device("cpu"),
                                               settings["inference"], tmp_path / "m.png")
    assert set(metrics) == {"ssim", "psnr", "dice"} and montage.is_file()
