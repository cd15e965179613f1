"""Patch-trained autoencoders: random foreground-biased crops, growing stages, exact resume, and
sliding-window encoding and decoding of whole volumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from snakemake.exceptions import WorkflowError

from medldm.autoencoder import networks as ae
from medldm.autoencoder.patches import check_patches, crop_batch, patch_size_at, random_crops
from medldm.autoencoder.training import VAETrainer
from medldm.checkpoint import Checkpoints
from medldm.data import h5layout
from medldm.errors import InputError
from tests.vae_toys import LABELS, single_thread, toy_set, vae_settings, write_prepared  # noqa: F401
from workflow_scripts import export_latents, train_vae

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")
SHAPE = (24, 24, 24)


def _coded_volumes(n: int) -> torch.Tensor:
    """``(n, 2, *SHAPE)``: channel 0 a foreground cube [10, 14)^3 (value 1) on 0, channel 1 each
    voxel's flat index, so a crop tells where it came from."""
    x = torch.zeros(n, 2, *SHAPE)
    x[:, 0, 10:14, 10:14, 10:14] = 1
    x[:, 1] = torch.arange(x[0, 1].numel(), dtype=torch.float32).reshape(SHAPE)
    return x


def _origin(crop: torch.Tensor) -> tuple[int, ...]:
    """Where in the volume a crop ``(2, *size)`` of ``_coded_volumes`` starts; asserts it is one block."""
    flat = int(crop[1].flatten()[0])
    start = (flat // (SHAPE[1] * SHAPE[2]), flat // SHAPE[2] % SHAPE[1], flat % SHAPE[2])
    block = _coded_volumes(1)[0, 1][tuple(slice(s, s + n) for s, n in zip(start, crop.shape[1:], strict=True))]
    assert torch.equal(crop[1], block), "a crop is not a contiguous block of the volume"
    return start


@pytest.mark.parametrize("fraction, low, high", [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.5, 0.3, 0.7)])
def test_crops_lie_inside_the_volume_centred_on_foreground_as_often_as_set(fraction, low, high):
    x = _coded_volumes(100)
    crops = random_crops(x, [8, 8, 8], fraction, 0.5, key=(0, 0, 0, 0))
    assert crops.shape == (100, 2, 8, 8, 8)
    for crop in crops:
        assert all(0 <= s <= n - 8 for s, n in zip(_origin(crop), SHAPE, strict=True))
    centred_on_foreground = (crops[:, 0, 4, 4, 4] == 1).float().mean().item()
    assert low <= centred_on_foreground <= high


def test_crops_are_a_function_of_the_key_only():
    x = _coded_volumes(4)
    torch.manual_seed(1)  # the global random state plays no part
    first = random_crops(x, [8, 8, 8], 0.5, 0.5, key=(0, 3, 7, 0))
    torch.manual_seed(2)
    assert torch.equal(first, random_crops(x, [8, 8, 8], 0.5, 0.5, key=(0, 3, 7, 0)))
    assert not torch.equal(first, random_crops(x, [8, 8, 8], 0.5, 0.5, key=(0, 3, 8, 0)))


def test_paired_label_maps_are_cropped_with_their_images():
    data = toy_set(3, shape=SHAPE)
    train = vae_settings(train={"patch_size": [8, 8, 8]})["train"]
    image, label = crop_batch(data.images, data.labels, [8, 8, 8], train, key=(0, 0, 0, 0))
    assert image.shape == (3, 1, 8, 8, 8) and label.shape == (3, 8, 8, 8) and label.dtype == data.labels.dtype
    means = torch.tensor([0.0, 0.25, 0.6, 0.9])  # the phantom's intensity per label, plus noise
    assert (image[:, 0] - means[label.long()]).abs().max() < 0.2


def test_patch_stages_grow_the_crop_then_patch_size_applies():
    train = {"patch_stages": [{"patch_size": [8, 8, 8], "epochs": 2}, {"patch_size": [16, 16, 16], "epochs": 1}],
             "patch_size": None}
    assert [patch_size_at(train, e) for e in range(4)] == [[8, 8, 8], [8, 8, 8], [16, 16, 16], None]
    assert patch_size_at({"patch_size": [8, 8, 8], "patch_stages": []}, 5) == [8, 8, 8]


def test_bad_patches_and_windows_name_their_key():
    with pytest.raises(InputError, match=r"train.patch_size \[32, 8, 8\] does not fit .* \[24, 24, 24\]"):
        check_patches({"patch_size": [32, 8, 8]}, SHAPE, 4)
    with pytest.raises(InputError, match=r"train.patch_stages\[0\].patch_size \[6, 8, 8\] is not divisible by 4"):
        check_patches({"patch_size": None, "patch_stages": [{"patch_size": [6, 8, 8], "epochs": 1}]}, SHAPE, 4)
    net = ae.build_autoencoder(vae_settings()["model"], 1)  # downsamples by 2
    with pytest.raises(InputError, match=r"inference.roi_size \[7, 8, 8\] is not divisible by 2"):
        ae.make_decoder(net, {"roi_size": [7, 8, 8]})
    with pytest.raises(InputError, match=r"inference.roi_size \[9, 8, 8\] is not divisible by 2"):
        ae.make_encoder(net, {"roi_size": [9, 8, 8]}, SHAPE)
    data = toy_set(2, shape=(16, 16, 16))
    with pytest.raises(InputError, match="train.patch_size"):  # before any training
        VAETrainer(vae_settings(train={"patch_size": [24, 8, 8]}), data, data.subset("val"), "unused", 4, CPU)
    with pytest.raises(InputError, match="inference.roi_size"):
        VAETrainer(vae_settings(), data, data.subset("val"), "unused", 4, CPU, inference={"roi_size": [5, 8, 8]})


def test_schema_fills_and_checks_the_patch_and_window_keys():
    settings = vae_settings(train={"patch_stages": [{"patch_size": [8, 8, 8], "epochs": 2}]})
    assert settings["train"]["patch_size"] is None and settings["train"]["foreground_fraction"] == 0.5
    assert settings["inference"] | {"batch_size": 4} == {"batch_size": 4, "roi_size": None, "overlap": 0.5,
                                                          "mode": "gaussian", "sw_batch_size": 1}
    for bad in ({"inference": {"mode": "median"}}, {"inference": {"roi_size": [8, 8]}},
                {"inference": {"sw_roi_size": [8, 8, 8]}}, {"train": {"patch_stages": [{"patch_size": [8, 8, 8]}]}},
                {"train": {"foreground_fraction": 1.5}}):
        with pytest.raises(WorkflowError):
            vae_settings(**bad)


def test_whole_volume_windows_encode_and_decode_exactly():
    net = ae.build_autoencoder(vae_settings()["model"], 1).eval()
    x = toy_set(2, shape=(16, 16, 16)).images
    whole_mu, whole_logvar = ae.encode_posterior(net, x)
    mu, logvar = ae.make_encoder(net, {"roi_size": [16, 16, 16]}, x.shape[2:])(x)
    assert torch.allclose(mu, whole_mu, atol=1e-5) and torch.allclose(logvar, whole_logvar, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(ae.make_decoder(net, {"roi_size": [16, 16, 16]})(mu), net.decode(mu), atol=1e-5)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = b.max() - b.min()
    return float(10 * torch.log10(peak**2 / F.mse_loss(a, b)))


def test_overlapping_gaussian_windows_hide_the_seams():
    """Windows see their own GroupNorm statistics and zero padding, so stitched windows only
    approximate the whole decode; overlap with Gaussian blending brings them closer."""
    torch.manual_seed(0)
    net = ae.build_autoencoder(vae_settings()["model"], 1).eval()
    z = F.avg_pool3d(torch.randn(1, 2, 20, 20, 20), 5, stride=1)  # smooth latents, 16^3
    with torch.no_grad():
        whole = net.decode(z)
        butted = ae.make_decoder(net, {"roi_size": [16, 16, 16], "overlap": 0.0, "mode": "constant"})(z)
        blended = ae.make_decoder(net, {"roi_size": [16, 16, 16], "overlap": 0.75, "mode": "gaussian"})(z)
    assert blended.shape == whole.shape == (1, 1, 32, 32, 32)
    assert _psnr(blended, whole) > _psnr(butted, whole) + 3
    assert _psnr(blended, whole) > SEAM_PSNR_FLOOR


def test_windowed_encoding_lines_up_with_the_latent_grid():
    torch.manual_seed(0)
    net = ae.build_autoencoder(vae_settings()["model"], 1).eval()
    x = F.avg_pool3d(torch.rand(1, 1, 36, 36, 36), 5, stride=1)  # 32^3
    whole, _ = ae.encode_posterior(net, x)
    mu, _ = ae.make_encoder(net, {"roi_size": [16, 16, 16], "overlap": 0.6}, x.shape[2:])(x)
    assert mu.shape == whole.shape == (1, 2, 16, 16, 16)
    assert _psnr(mu, whole) > SEAM_PSNR_FLOOR


def test_patch_training_resumes_exactly_and_validates_by_windows(tmp_path):
    data = toy_set(6, shape=(16, 16, 16), splits=["train"] * 4 + ["val"] * 2)
    settings = vae_settings(paired_labels=True, train={
        "epochs": 3, "val_every": 3, "patch_size": [12, 12, 12],
        "patch_stages": [{"patch_size": [8, 8, 8], "epochs": 1}]})
    inference = {"roi_size": [8, 8, 8], "overlap": 0.5, "mode": "gaussian"}
    args = (data.subset("train"), data.subset("val"))
    straight = VAETrainer(settings, *args, tmp_path / "a", len(LABELS), CPU, inference=inference)
    reference = straight.run()

    class StopAtStep3:  # 2 batches per epoch: stops in epoch 2, the first of patch_size
        def __bool__(self):
            return first.step >= 3

    first = VAETrainer(settings, *args, tmp_path / "b", len(LABELS), CPU, StopAtStep3(), inference)
    assert first.run().interrupted and Checkpoints(tmp_path / "b").latest().name == "ckpt-000000003.pt"
    result = VAETrainer(settings, *args, tmp_path / "b", len(LABELS), CPU, inference=inference).run()
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, result.model.state_dict()[name]), name
    assert result.val_metrics == reference.val_metrics and 0 < result.val_metrics["ssim"] < 1


SEAM_PSNR_FLOOR = 20.0  # a random toy net; the demo autoencoder: README, benchmarks/bench_patches.py


def test_scripts_train_on_patches_and_export_by_windows(tmp_path):
    data = toy_set(4, shape=(16, 16, 16), splits=["train", "train", "val", "test"])
    manifest = write_prepared(tmp_path / "prepared", data)
    settings = vae_settings(train={"epochs": 1, "patch_size": [8, 8, 8]})
    windows = {"roi_size": [8, 8, 8], "overlap": 0.5, "mode": "gaussian"}
    out = tmp_path / "vae.pt"
    assert train_vae.main([
        "--settings", json.dumps(settings), "--inference", json.dumps(windows), "--prepare", "{}",
        "--manifest", str(manifest), "--classes", "HC,TLE", "--run-dir", str(tmp_path / "run"), "--out", str(out),
    ]) == 0
    latents = tmp_path / "latents.h5"
    assert export_latents.main(["--vae", str(out), "--manifest", str(manifest), "--settings", json.dumps(windows),
                                "--batching", json.dumps({"batch_size": 3}), "--out", str(latents)]) == 0
    net, _ = ae.load_vae(out)
    mu, _ = ae.make_encoder(net, windows, (16, 16, 16))(data.images)
    with h5layout.open_latents(latents) as lat:
        assert np.allclose(lat.mu[:], mu.numpy(), atol=1e-5)

    bad = tmp_path / "bad.h5"
    with pytest.raises(InputError, match="inference.roi_size"):
        export_latents.main(["--vae", str(out), "--manifest", str(manifest), "--settings",
                             json.dumps({"roi_size": [5, 8, 8], "batch_size": 2}), "--out", str(bad)])
    assert not bad.exists()
