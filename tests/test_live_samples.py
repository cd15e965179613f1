"""Live samples of train_ldm: fixed-seed montages every sample_every steps, without changing training."""

from __future__ import annotations

import pytest
import torch

from medldm.autoencoder import networks as ae
from medldm.checkpoint import load_torch
from medldm.diffusion.training import Trainer
from medldm.errors import InputError
from tests.ldm_toys import ldm_settings, make_latents, one_thread  # noqa: F401 (fixture)
from tests.vae_toys import vae_settings

CPU = torch.device("cpu")


@pytest.fixture
def real_vae(tmp_path):
    """An untrained tiny autoencoder whose latents have the toy latent shape (2, 4, 4, 4)."""
    settings = vae_settings()  # channels [8, 16]: 8^3 volumes -> 2x4x4x4 latents
    torch.manual_seed(0)
    net = ae.build_autoencoder(settings["model"], 1)
    path = tmp_path / "vae.pt"
    ae.save_vae(path, net, {"settings": settings, "channels": 1, "classes": ["HC", "TLE"], "labels": [],
                            "grid_shape": [8, 8, 8], "latent_shape": [2, 4, 4, 4]})
    return path, make_latents(tmp_path / "latents.h5", path)


def _trainer(tmp_path, vae, latents, name, vae_path=True, **train):
    settings = ldm_settings(train={"steps": 8, **train})
    return Trainer(settings, latents, vae if vae_path else None, tmp_path / name, tmp_path / f"{name}.pt", CPU,
                   progress=False)


def test_live_samples_are_written_and_leave_training_unchanged(tmp_path, real_vae):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    vae, latents = real_vae
    sampled = _trainer(tmp_path, vae, latents, "sampled", sample_every=4, sample_volumes=3, sample_steps=2)
    assert sampled.run() == 0
    montages = sorted((tmp_path / "sampled" / "samples").glob("*.png"))
    assert [p.name for p in montages] == ["step-000000004.png", "step-000000008.png"]
    first, last = (p.read_bytes() for p in montages)
    assert first != last  # the model moved on
    montages[1].unlink()
    again = sampled.live_samples(8)  # fixed seeds: the same weights give the same samples
    assert again == montages[1] and again.read_bytes() == last
    events = EventAccumulator(str(tmp_path / "sampled" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [4, 8]

    assert _trainer(tmp_path, vae, latents, "plain").run() == 0  # sample_every 0: off
    assert not (tmp_path / "plain" / "samples").exists()
    a, b = load_torch(tmp_path / "sampled.pt"), load_torch(tmp_path / "plain.pt")
    assert all(torch.equal(a["ema_state"][k], b["ema_state"][k]) for k in a["ema_state"])


def test_live_samples_need_the_autoencoder(tmp_path, real_vae):
    vae, latents = real_vae
    with pytest.raises(InputError, match="sample_every > 0 needs the autoencoder"):
        _trainer(tmp_path, vae, latents, "x", vae_path=False, sample_every=4)


def test_live_samples_of_a_label_map_autoencoder_show_label_maps(tmp_path):
    settings = vae_settings(inputs="labels")
    torch.manual_seed(0)
    net = ae.build_autoencoder(settings["model"], 4)
    path = tmp_path / "vae.pt"
    ae.save_vae(path, net, {"settings": settings, "channels": 4, "classes": ["HC", "TLE"],
                            "labels": ["background", "CSF", "GM", "WM"], "grid_shape": [8, 8, 8],
                            "latent_shape": [2, 4, 4, 4]})
    latents = make_latents(tmp_path / "latents.h5", path)
    trainer = _trainer(tmp_path, path, latents, "labels", sample_every=4, sample_volumes=2, sample_steps=2)
    assert trainer.vae_labels == 4
    assert trainer.live_samples(0).stat().st_size > 1000
