"""One owner per concern: SSIM means one number everywhere, one parser for name lists, one
autoencoder hash check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medldm.autoencoder import networks as ae
from medldm.autoencoder.training import evaluate_reconstruction
from medldm.errors import InputError
from medldm.evaluation.diversity import reconstruction_metrics
from medldm.provenance import check_autoencoder, sha256_file
from medldm.settings import name_list
from tests.vae_toys import LABELS, single_thread, toy_set, vae_settings  # noqa: F401 (fixture)

CPU = torch.device("cpu")


def test_training_logs_and_the_report_compute_the_same_ssim(single_thread):  # noqa: F811
    data = toy_set(3)
    settings = vae_settings()
    torch.manual_seed(0)
    net = ae.build_autoencoder(settings["model"], ae.io_channels(False, len(LABELS)))  # untrained: SSIM well below 1
    logged, _ = evaluate_reconstruction(net, data, len(LABELS), False, CPU, {"batch_size": 2})
    mu = np.concatenate([m for _, m, _ in ae.encode_set(net, data.images, None, len(LABELS), CPU, {"batch_size": 2}, progress=False)])
    recon = np.concatenate([image for _, image, _ in ae.decode_set(net, mu, {"batch_size": 2}, CPU, progress=False)])
    reported = reconstruction_metrics(list(data.images[:, 0].numpy()), list(recon))
    assert logged["ssim"] < 0.9
    assert logged["ssim"] == pytest.approx(float(reported["ssim"].mean()), abs=1e-5)


def test_name_list():
    assert name_list("HC,TLE") == ["HC", "TLE"] and name_list("") == [] and name_list("a,,b") == ["a", "b"]


def test_check_autoencoder(tmp_path):
    vae, other = tmp_path / "vae.pt", tmp_path / "other.pt"
    vae.write_bytes(b"one")
    other.write_bytes(b"two")
    assert check_autoencoder(vae, sha256_file(vae), "latents.h5", "fix") == sha256_file(vae)
    assert check_autoencoder(vae, "", "latents.h5", "fix") == sha256_file(vae)  # nothing recorded
    with pytest.raises(InputError, match=r"latents.h5 was made with another autoencoder .* than .*other.pt.*: fix"):
        check_autoencoder(other, sha256_file(vae), "latents.h5", "fix")
