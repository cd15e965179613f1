"""The autoencoder: KL term, training, paired labels, and export -> decode through the scripts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medldm.autoencoder import networks as ae
from medldm.autoencoder.training import VAETrainer, evaluate_reconstruction
from medldm.data import h5layout
from medldm.errors import InputError
from tests.vae_toys import AFFINE, LABELS, single_thread, toy_set, vae_settings, write_prepared  # noqa: F401
from workflow_scripts import decode, export_latents, train_vae

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


def test_kl_is_summed_over_latent_elements_and_averaged_over_the_batch():
    mu, sigma = torch.randn(3, 2, 4, 5, 6), torch.rand(3, 2, 4, 5, 6) + 0.5
    per_element = 0.5 * (mu**2 + sigma**2 - torch.log(sigma**2) - 1)
    expected = per_element.sum(dim=(1, 2, 3, 4)).mean()
    assert torch.allclose(ae.kl_loss(mu, sigma), expected)
    # a latent twice as large carries twice the KL: it is a sum, not a voxel average
    doubled = ae.kl_loss(torch.cat([mu, mu], 2), torch.cat([sigma, sigma], 2))
    assert torch.allclose(doubled, 2 * expected)
    assert ae.kl_loss(torch.zeros(2, 3, 4, 4, 4), torch.ones(2, 3, 4, 4, 4)) == 0


def test_kl_weight_warms_up_linearly():
    loss = vae_settings(loss={"kl_weight_start": 1e-6, "kl_weight": 1e-4, "kl_warmup_epochs": 4})["loss"]
    weights = [ae.kl_weight(loss, e) for e in range(6)]
    assert weights[0] == pytest.approx(1e-6)
    assert weights[2] == pytest.approx((1e-6 + 1e-4) / 2)
    assert weights[4:] == [1e-4, 1e-4]


def test_gradient_loss_penalises_blurred_edges_and_is_added_to_the_total():
    image = torch.zeros(1, 1, 8, 8, 8)
    image[..., 2:6, 2:6, 2:6] = 1.0  # a cube with sharp edges
    blurred = F.avg_pool3d(image, 3, stride=1, padding=1, count_include_pad=False)
    assert ae.gradient_loss(image, image) == 0
    assert ae.gradient_loss(blurred, image) > 0.05
    # a constant offset leaves every finite difference unchanged
    assert ae.gradient_loss(image + 0.3, image) == pytest.approx(0, abs=1e-6)
    mu, sigma = torch.zeros(1, 2, 2, 2, 2), torch.ones(1, 2, 2, 2, 2)
    off = ae.Losses(vae_settings()["loss"], 3)(blurred, image, None, mu, sigma, 0)
    on = ae.Losses(vae_settings(loss={"gradient_weight": 2.0})["loss"], 3)(blurred, image, None, mu, sigma, 0)
    assert "gradient" not in off
    assert on["total"] == pytest.approx(off["total"] + 2.0 * on["gradient"])


def _recon_l1(net, data) -> float:
    with torch.no_grad():
        net.eval()
        return F.l1_loss(net.reconstruct(data.images), data.images).item()


def test_training_halves_the_reconstruction_loss(tmp_path):
    data = toy_set(6)
    settings = vae_settings(train={"epochs": 20, "val_every": 100, "checkpoint_every": 100})
    trainer = VAETrainer(settings, data, data.subset("val"), tmp_path / "run", len(LABELS), CPU)
    before = _recon_l1(trainer.net, data)
    result = trainer.run()
    after = _recon_l1(result.model, data)
    assert trainer.step == 60
    assert after < 0.5 * before, (before, after)
    # warm-up then cosine decay to lr * min_lr_ratio at the last step
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.1)
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 21 and "train/kl" in metrics[0] and "train/volumes_per_s" in metrics[0]


def test_paired_labels_reconstruct_the_label_map(tmp_path):
    data = toy_set(6)
    settings = vae_settings(paired_labels=True, model={"latent_channels": 4},
                            train={"epochs": 40, "val_every": 100, "checkpoint_every": 100})
    result = VAETrainer(settings, data, data.subset("val"), tmp_path / "run", len(LABELS), CPU).run()
    assert result.model.encoder.blocks[0].conv.in_channels == 1 + len(LABELS)
    metrics, montage = evaluate_reconstruction(result.model, data, len(LABELS), True, CPU,
                                               settings["inference"], tmp_path / "m.png")
    assert metrics["dice"] > 0.8, metrics
    assert montage.stat().st_size > 1000


def test_sliding_window_decode_approximates_whole_volume_decode():
    net = ae.build_autoencoder(vae_settings()["model"], 1).eval()
    z = torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = net.decode(z)
        # roi_size is in image voxels: 16^3 is the whole 8^3 latent grid (factor 2)
        one_window = ae.make_decoder(net, {"roi_size": [16, 16, 16], "overlap": 0.25})(z)
        larger = ae.make_decoder(net, {"roi_size": [64, 64, 64], "mode": "constant"})(z)  # clipped
        windows = ae.make_decoder(net, {"roi_size": [12, 12, 12], "sw_batch_size": 2, "overlap": 0.5})(z)
    assert torch.allclose(one_window, whole, atol=1e-5)
    assert torch.allclose(larger, whole, atol=1e-5)
    # GroupNorm statistics are per window, so smaller windows approximate the whole decode
    assert windows.shape == whole.shape
    assert torch.corrcoef(torch.stack([windows.flatten(), whole.flatten()]))[0, 1] > 0.9


def test_bad_settings_give_clear_errors():
    with pytest.raises(InputError, match="perceptual_weights"):
        ae.perceptual_loss(vae_settings(loss={"perceptual_weight": 0.1})["loss"], 3)
    with pytest.raises(InputError, match="prepare.shape"):
        ae.check_grid(vae_settings(model={"channels": [8, 8, 8]})["model"], (18, 16, 16))
    with pytest.raises(InputError, match="norm_num_groups"):
        ae.build_autoencoder(vae_settings(model={"channels": [6, 8]})["model"], 1)


def test_train_export_decode_round_trip(tmp_path):
    """Scripts end to end: decode(export(x)) equals the autoencoder's direct reconstruction."""
    data = toy_set(6, splits=["train", "train", "train", "val", "test", "test"])
    manifest = write_prepared(tmp_path / "prepared", data)
    settings = vae_settings(paired_labels=True, train={"epochs": 1})
    out = tmp_path / "vae" / "vae.pt"
    assert train_vae.main([
        "--settings", json.dumps(settings), "--prepare", json.dumps({"shape": [16, 16, 16]}),
        "--manifest", str(manifest), "--classes", "HC,TLE", "--labels", ",".join(LABELS),
        "--run-dir", str(tmp_path / "run"), "--out", str(out), "--montage", str(tmp_path / "vae" / "m.png"),
    ]) == 0
    net, vae = ae.load_vae(out)
    assert vae["grid_shape"] == [16, 16, 16] and vae["latent_shape"] == [2, 8, 8, 8]
    assert np.allclose(vae["grid_affine"], data.affine) and vae["labels"] == LABELS
    assert set(vae["provenance"]) >= {"config_hash", "code_version", "inputs_sha256"}

    inference = json.dumps(settings["inference"])
    latents_path = tmp_path / "vae" / "latents.h5"
    assert export_latents.main(["--vae", str(out), "--manifest", str(manifest), "--settings", inference,
                                "--out", str(latents_path)]) == 0
    x = ae.to_network_input(data.images, data.labels, len(LABELS))
    mu, logvar = ae.encode_posterior(net, x)
    with h5layout.open_latents(latents_path) as lat:
        assert lat.subject_ids == data.subject_ids and lat.splits == data.splits
        assert np.allclose(lat.mu[:], mu.numpy(), atol=1e-5)
        assert np.allclose(lat.logvar[:], logvar.numpy(), atol=1e-4)
        assert np.array_equal(lat.label[:], data.labels.numpy())
        train_mu = mu[:3].double()
        assert np.allclose(lat.channel_mean[:], train_mu.mean((0, 2, 3, 4)).numpy(), atol=1e-5)
        assert np.allclose(lat.channel_std[:], train_mu.transpose(0, 1).flatten(1).std(1, unbiased=False), atol=1e-5)
        assert lat.header.scale_factor == pytest.approx(1 / train_mu.std(unbiased=False).item(), rel=1e-5)
        assert lat.header.class_names == ["HC", "TLE"] and list(lat.class_index) == [0, 1, 0, 1, 0, 1]

    nifti_dir = tmp_path / "recon" / "nifti"
    synthetic = tmp_path / "recon" / "synthetic.h5"
    assert decode.main(["--vae", str(out), "--latents", str(latents_path), "--settings", inference,
                        "--out", str(synthetic), "--nifti-dir", str(nifti_dir)]) == 0
    with torch.no_grad():
        direct_image, direct_label = ae.to_volumes(net.reconstruct(x))
    with h5layout.open_volumes(synthetic) as vol:
        assert np.allclose(vol.image[:], direct_image, atol=1e-5)
        assert np.array_equal(vol.label[:], direct_label)
        assert vol.subject_ids == data.subject_ids and vol.header.label_names == LABELS
    img = nib.load(nifti_dir / "toy04" / "image.nii.gz")
    assert np.allclose(img.affine, data.affines[4]) and img.shape == (16, 16, 16)
    assert np.allclose(img.get_fdata(), direct_image[4], atol=1e-5)
    assert nib.load(nifti_dir / "toy04" / "label.nii.gz").get_data_dtype() == np.uint8

    # latents from another autoencoder are refused
    other = tmp_path / "other.pt"
    ae.save_vae(other, net, {k: v for k, v in vae.items() if k not in ("kind", "format_version", "state_dict")}
                | {"epochs": 99})
    with pytest.raises(InputError, match="another autoencoder"):
        decode.main(["--vae", str(other), "--latents", str(latents_path), "--settings", inference,
                     "--out", str(tmp_path / "x.h5"), "--nifti-dir", str(tmp_path / "x")])


def _untrained_vae(path, settings, shape=(16, 16, 16)) -> None:
    """vae.pt of an untrained tiny autoencoder (geometry does not depend on training)."""
    channels = ae.io_channels(settings["paired_labels"], len(LABELS))
    net = ae.build_autoencoder(settings["model"], channels)
    factor = ae.downsampling(settings["model"])
    ae.save_vae(path, net, {
        "settings": settings, "channels": channels, "classes": ["HC", "TLE"], "labels": LABELS,
        "prepare": {"shape": list(shape)}, "grid_affine": AFFINE, "grid_shape": list(shape),
        "latent_shape": [settings["model"]["latent_channels"], *(s // factor for s in shape)],
    })


def test_decoded_reconstructions_keep_each_subjects_affine(tmp_path):
    """Prepared subjects with different origins: each decoded NIfTI carries its own subject's affine,
    and a generated latent (no source subject) is placed on the grid's reference affine."""
    data = toy_set(4, splits=["train", "train", "val", "test"])
    manifest = write_prepared(tmp_path / "prepared", data)
    prepared = [nib.load(tmp_path / "prepared" / sid / "image.nii.gz").affine for sid in data.subject_ids]
    assert not np.allclose(prepared[1], prepared[0])  # the subjects really differ in origin
    settings = vae_settings(paired_labels=True)
    vae_path, latents_path = tmp_path / "vae.pt", tmp_path / "latents.h5"
    _untrained_vae(vae_path, settings)
    inference = json.dumps(settings["inference"])
    assert export_latents.main(["--vae", str(vae_path), "--manifest", str(manifest), "--settings", inference,
                                "--out", str(latents_path)]) == 0
    nifti = tmp_path / "reconstructions" / "nifti"
    assert decode.main(["--vae", str(vae_path), "--latents", str(latents_path), "--settings", inference,
                        "--out", str(tmp_path / "reconstructions" / "reconstructions.h5"),
                        "--nifti-dir", str(nifti)]) == 0
    for sid, affine in zip(data.subject_ids, prepared, strict=True):
        for name in ("image.nii.gz", "label.nii.gz"):
            written = nib.load(nifti / sid / name)
            np.testing.assert_allclose(written.affine, affine, atol=1e-6, err_msg=f"{sid}/{name}")
            np.testing.assert_allclose(written.header.get_sform(), affine, atol=1e-6)
    with h5layout.open_volumes(tmp_path / "reconstructions" / "reconstructions.h5") as volumes:
        np.testing.assert_allclose(volumes.affines, np.stack(prepared), atol=1e-6)

    # a generated latent has no source subject: it is decoded onto the grid's reference affine
    generated = tmp_path / "generated.h5"
    with h5layout.open_latents(latents_path) as real:
        header, mu = real.header, real.mu[0]
    with h5layout.create_latents(generated, 1, mu.shape, header, with_logvar=False) as writer:
        writer.append("syn-00000", 0, "synthetic", mu=mu)
        writer.set_latent_stats(np.zeros(mu.shape[0]), np.ones(mu.shape[0]), header.scale_factor)
    assert decode.main(["--vae", str(vae_path), "--latents", str(generated), "--settings", inference,
                        "--out", str(tmp_path / "generated" / "volumes.h5"),
                        "--nifti-dir", str(tmp_path / "generated" / "nifti")]) == 0
    np.testing.assert_allclose(nib.load(tmp_path / "generated" / "nifti" / "syn-00000" / "image.nii.gz").affine,
                               prepared[0], atol=1e-6)
