"""Label-map autoencoders (``vae.inputs: labels``): one-hot label maps in, label logits out; export
encodes label maps, decode writes integer maps (no image) with the label names."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medldm.autoencoder import networks as ae
from medldm.autoencoder.training import VAETrainer, evaluate_reconstruction
from medldm.data import h5layout
from medldm.errors import InputError
from tests.vae_toys import LABELS, toy_set, vae_settings, write_prepared
from workflow_scripts import decode, export_latents, train_vae

CPU = torch.device("cpu")


def label_settings(**sections) -> dict:
    """A tiny label-map autoencoder's settings, selected by Dice unless ``train`` says otherwise."""
    sections["train"] = {"select": {"metric": "dice"}, **sections.get("train", {})}
    return vae_settings(inputs="labels", **sections)


def test_label_autoencoder_has_one_channel_per_label_and_learns_the_maps(tmp_path):
    data = toy_set(6)
    settings = label_settings(model={"latent_channels": 4},
                              train={"epochs": 30, "val_every": 100, "checkpoint_every": 100,
                                     "select": {"metric": "last"}})
    result = VAETrainer(settings, data, data.subset("val"), tmp_path / "run", len(LABELS), CPU).run()
    assert result.model.encoder.blocks[0].conv.in_channels == len(LABELS)
    metrics, montage = evaluate_reconstruction(result.model, data, len(LABELS), False, CPU, settings["inference"],
                                               tmp_path / "m.png", only_labels=True)
    assert "ssim" not in metrics and set(metrics) == {"dice", "dice_1", "dice_2", "dice_3"}
    assert metrics["dice"] > 0.7, metrics
    assert montage.stat().st_size > 1000


def test_train_export_decode_round_trip_of_label_maps(tmp_path):
    data = toy_set(6, splits=["train", "train", "train", "val", "test", "test"])
    manifest = write_prepared(tmp_path / "prepared", data)
    settings = label_settings(train={"epochs": 1})
    out = tmp_path / "vae" / "vae.pt"
    assert train_vae.main([
        "--settings", json.dumps(settings), "--prepare", json.dumps({"shape": [16, 16, 16]}),
        "--manifest", str(manifest), "--classes", "HC,TLE", "--labels", ",".join(LABELS),
        "--run-dir", str(tmp_path / "run"), "--out", str(out), "--montage", str(tmp_path / "vae" / "m.png"),
    ]) == 0
    net, vae = ae.load_vae(out)
    assert vae["channels"] == len(LABELS) and "dice" in vae["recon_metrics"] and "ssim" not in vae["recon_metrics"]

    inference = json.dumps(settings["inference"])
    latents_path = tmp_path / "vae" / "latents.h5"
    assert export_latents.main(["--vae", str(out), "--manifest", str(manifest), "--settings", inference,
                                "--out", str(latents_path)]) == 0
    x = ae.to_network_input(None, data.labels, len(LABELS))
    mu, _ = ae.encode_posterior(net, x)
    with h5layout.open_latents(latents_path) as lat:
        assert np.allclose(lat.mu[:], mu.numpy(), atol=1e-5)  # the label maps were encoded, not the images

    nifti_dir = tmp_path / "recon" / "nifti"
    volumes = tmp_path / "recon" / "volumes.h5"
    assert decode.main(["--vae", str(out), "--latents", str(latents_path), "--settings", inference,
                        "--out", str(volumes), "--nifti-dir", str(nifti_dir)]) == 0
    with torch.no_grad():
        _, direct = ae.to_volumes(net.reconstruct(x), only_labels=True)
    with h5layout.open_volumes(volumes) as vol:
        assert vol.image is None and vol.header.label_names == LABELS
        assert vol.label.dtype == np.uint8 and vol.label.shape == (6, 16, 16, 16)
        assert np.array_equal(vol.label[:], direct)
        assert vol.label[:].max() < len(LABELS)
    label = nib.load(nifti_dir / "toy04" / "label.nii.gz")
    assert label.get_data_dtype() == np.uint8 and label.shape == (16, 16, 16)
    assert np.array_equal(np.asarray(label.dataobj), direct[4])
    assert label.header["descrip"].item().decode() == "labels: 0=background 1=CSF 2=GM 3=WM"
    assert not (nifti_dir / "toy04" / "image.nii.gz").exists()
    assert json.loads((nifti_dir / "labels.json").read_text()) == {str(i): n for i, n in enumerate(LABELS)}


def test_label_autoencoder_refusals(tmp_path):
    data = toy_set(2)
    no_labels = type(data)(data.subject_ids, data.class_index, data.splits, data.images, None, data.affines)
    with pytest.raises(InputError, match="inputs is labels but the manifest has no label maps"):
        VAETrainer(label_settings(), no_labels, no_labels.subset("val"), tmp_path / "a", len(LABELS), CPU)
    with pytest.raises(InputError, match="paired_labels: false"):
        VAETrainer(label_settings(paired_labels=True), data, data.subset("val"), tmp_path / "b", len(LABELS), CPU)
    with pytest.raises(InputError, match="train.select.metric"):
        VAETrainer(vae_settings(inputs="labels"), data, data.subset("val"), tmp_path / "c", len(LABELS), CPU)
    with pytest.raises(InputError, match="loss.adversarial_weight"):
        VAETrainer(label_settings(loss={"adversarial_weight": 0.1}), data, data.subset("val"), tmp_path / "d",
                   len(LABELS), CPU)


def test_volumes_file_of_label_maps_without_images(tmp_path):
    header = h5layout.Header(grid_affine=np.eye(4), grid_shape=(4, 4, 4), class_names=["HC"], label_names=LABELS)
    path = tmp_path / "v.h5"
    with h5layout.create_volumes(path, 1, header, with_labels=True, with_image=False) as writer:
        writer.append("s0", 0, "synthetic", label=np.full((4, 4, 4), 2, np.uint8))
    with h5layout.open_volumes(path) as vol:
        assert vol.image is None and vol.label[0].max() == 2 and vol.subject_ids == ["s0"]
    with pytest.raises(ValueError, match="images, label maps or both"):
        with h5layout.create_volumes(tmp_path / "w.h5", 1, header, with_image=False):
            pass


def _label_volumes(path, maps, names=LABELS) -> None:
    """A volumes file of label maps alone, rows named like the toy subjects."""
    header = h5layout.Header(grid_affine=np.eye(4), grid_shape=maps.shape[1:], class_names=["HC", "TLE"],
                             label_names=names)
    with h5layout.create_volumes(path, len(maps), header, with_labels=True, with_image=False) as writer:
        for i, m in enumerate(maps):
            writer.append(f"toy{i:02d}", i % 2, "synthetic", label=m)


def test_label_maps_evaluation_compares_label_fractions(tmp_path):
    from workflow_scripts import evaluate_label_maps

    data = toy_set(4, splits=["train", "train", "test", "test"])
    manifest = write_prepared(tmp_path / "prepared", data)
    maps = np.zeros((3, 16, 16, 16), np.uint8)
    maps[:, :8] = 2  # half GM
    maps[0, :4] = 3  # a quarter WM in one map
    _label_volumes(tmp_path / "v.h5", maps)
    out = tmp_path / "label_maps.json"
    assert evaluate_label_maps.main(["--volumes", str(tmp_path / "v.h5"), "--manifest", str(manifest),
                                     "--classes", "HC,TLE", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["labels"] == LABELS and result["synthetic"]["GM"]["n"] == 3
    assert result["synthetic"]["GM"]["mean"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert result["synthetic"]["WM"]["mean"] == pytest.approx(0.25 / 3)
    assert result["synthetic"]["background"]["mean"] == pytest.approx(0.5) and result["synthetic"]["CSF"]["std"] == 0
    real = data.labels[2:].numpy()
    assert result["real"]["WM"]["mean"] == pytest.approx((real == 3).mean())


def test_label_reconstructions_are_scored_by_dice_per_label(tmp_path):
    from workflow_scripts import evaluate_reconstruction

    data = toy_set(3, splits=["train", "test", "test"])
    manifest = write_prepared(tmp_path / "prepared", data)
    recon = data.labels.numpy().copy()
    recon[2][recon[2] == 3] = 2  # subject 2: WM read as GM
    _label_volumes(tmp_path / "r.h5", recon)
    out = tmp_path / "reconstruction.json"
    assert evaluate_reconstruction.main(["--reconstructions", str(tmp_path / "r.h5"), "--manifest", str(manifest),
                                         "--classes", "HC,TLE", "--settings", "{}", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "ssim" not in result and result["n"] == 2
    subjects = {s["subject_id"]: s for s in result["subjects"]}
    assert subjects["toy01"] == {"subject_id": "toy01", "CSF": 1.0, "GM": 1.0, "WM": 1.0}
    assert subjects["toy02"]["WM"] == 0.0 and subjects["toy02"]["CSF"] == 1.0
    gm, true_gm = recon[2] == 2, data.labels[2].numpy() == 2
    assert subjects["toy02"]["GM"] == pytest.approx(2 * (gm & true_gm).sum() / (gm.sum() + true_gm.sum()))
    assert result["dice_per_label"]["WM"]["mean"] == pytest.approx(0.5)


def test_report_shows_label_sets_as_label_maps(tmp_path):
    from medldm.report.page import build_report

    data = toy_set(4, splits=["train", "train", "test", "test"])
    manifest = write_prepared(tmp_path / "prepared", data)
    _label_volumes(tmp_path / "v.h5", data.labels.numpy())
    fractions = {"mean": 0.25, "std": 0.01, "n": 4}
    (tmp_path / "label_maps.json").write_text(json.dumps(
        {"labels": LABELS, "synthetic": dict.fromkeys(LABELS, fractions), "real": dict.fromkeys(LABELS, fractions)}))
    inputs = {"manifest": str(manifest), "sample_sets": {"gen": {
        "ldm": "labels", "volumes": str(tmp_path / "v.h5"), "metrics": None, "classifier": None, "saliency": [],
        "inpainting": None, "label_maps": str(tmp_path / "label_maps.json")}}}
    page = build_report(inputs, {"classes": ["HC", "TLE"]}, tmp_path / "figures", 2)
    assert "Label maps" in page and "0.25 ± 0.01" in page and "sample set gen (label maps)" in page
    assert (tmp_path / "figures" / "synthetic_gen_HC.png").stat().st_size > 1000
