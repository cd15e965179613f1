"""Streamed data: subjects are read from disk one at a time, training batches come through a
DataLoader with workers and an optional RAM cache, and none of it changes what is computed."""

from __future__ import annotations

import json
import weakref

import nibabel as nib
import numpy as np
import pytest
import torch

from medldm.autoencoder import networks as ae
from medldm.autoencoder.training import VAETrainer, epoch_batches, evaluate_reconstruction
from medldm.data import cohort
from medldm.data.cohort import load_prepared
from medldm.errors import InputError
from tests import vae_toys
from tests.vae_toys import AFFINE, CLASSES, LABELS, single_thread, toy_set, vae_settings  # noqa: F401
from workflow_scripts import export_latents

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")
SPLITS = ["train"] * 6 + ["val"] * 2


class LiveVolumes:
    """Patches ``nibabel.load`` so every image array read from a file is tracked while it lives:
    ``peak`` is the most float32 volumes held at once, ``reads`` how many were read."""

    def __init__(self, monkeypatch):
        self.live, self.peak, self.reads = 0, 0, 0
        real_load = nib.load

        def load(path, *args, **kwargs):
            img = real_load(path, *args, **kwargs)
            return _Tracked(img, self)

        monkeypatch.setattr(nib, "load", load)

    def track(self, array: np.ndarray) -> np.ndarray:
        if array.dtype == np.float32:
            self.reads += 1
            self.live += 1
            self.peak = max(self.peak, self.live)
            weakref.finalize(array, self._freed)
        return array

    def _freed(self) -> None:
        self.live -= 1


class _Tracked:
    def __init__(self, img, counter: LiveVolumes):
        self.img, self.counter = img, counter
        self.affine, self.shape, self.header = img.affine, img.shape, img.header

    @property
    def dataobj(self) -> np.ndarray:
        return self.counter.track(np.asarray(self.img.dataobj).copy())

    def get_fdata(self, *args, **kwargs):
        return self.img.get_fdata(*args, **kwargs)


@pytest.fixture
def on_disk(tmp_path):
    """(in-memory toy set, the same subjects read from their prepared files, their manifest)."""
    data = toy_set(8, splits=SPLITS)
    manifest = vae_toys.write_prepared(tmp_path / "prepared", data)
    return data, load_prepared(manifest, CLASSES), manifest


def test_loader_gives_the_in_memory_batches_of_a_seed_and_epoch(on_disk):
    memory, disk = on_disk[0].subset("train"), on_disk[1].subset("train")
    one_subject_mb = disk.bytes_per_subject() / 2**20
    for workers, cache_mb in ((0, 0), (2, 0), (2, 2.5 * one_subject_mb)):  # no cache, workers, part cached
        loader, sampler = cohort.training_loader(disk, workers, cache_mb)
        for epoch in (0, 3):
            planned = epoch_batches(len(memory), 4, epoch, 7, 0, 1)
            sampler.plan = [idx.tolist() for idx in planned]
            got = list(loader)
            assert len(got) == len(planned)
            for idx, batch in zip(planned, got, strict=True):
                assert torch.equal(batch["image"], memory.images[idx])  # the old path: tensor indexing
                assert torch.equal(batch["label"], memory.labels[idx])


def test_training_from_disk_with_workers_and_cache_equals_training_in_memory(on_disk, tmp_path):
    memory, disk, _ = on_disk
    settings = vae_settings(train={"epochs": 2, "val_every": 2, "workers": 0, "cache_mb": 0})
    reference = VAETrainer(settings, memory.subset("train"), memory.subset("val"), tmp_path / "a",
                           len(LABELS), CPU).run()
    streamed_settings = {**settings, "train": {**settings["train"], "workers": 2,
                                               "cache_mb": 3 * disk.bytes_per_subject() / 2**20}}
    trainer = VAETrainer(streamed_settings, disk.subset("train"), disk.subset("val"), tmp_path / "b", len(LABELS), CPU)
    streamed = trainer.run()
    assert trainer.loader.num_workers == 2
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, streamed.model.state_dict()[name]), name
    assert streamed.val_metrics == reference.val_metrics


def test_a_cache_budget_below_one_subject_is_refused_naming_the_key(on_disk):
    disk = on_disk[1]
    with pytest.raises(InputError, match=r"train\.cache_mb is 0\.001 MB but one subject takes 0\.0[0-9]+ MB"):
        cohort.training_loader(disk, 0, 0.001)
    settings = vae_settings(train={"cache_mb": 0.001})
    with pytest.raises(InputError, match="cache_mb"):
        VAETrainer(settings, disk.subset("train"), disk.subset("val"), "unused", len(LABELS), CPU)


def test_load_prepared_reads_headers_only_and_volumes_on_access(on_disk, monkeypatch):
    counter = LiveVolumes(monkeypatch)
    data = load_prepared(on_disk[2], CLASSES)
    assert counter.reads == 0 and len(data) == 8 and data.shape == (16, 16, 16)
    volumes = data.volumes()
    assert np.array_equal(volumes[5], on_disk[0].images[5, 0].numpy())
    assert counter.reads == 1 and counter.peak == 1


def test_export_latents_holds_one_batch_of_volumes_at_a_time(on_disk, tmp_path, monkeypatch):
    manifest = on_disk[2]
    settings = vae_settings(paired_labels=True)
    net = ae.build_autoencoder(settings["model"], ae.io_channels(True, len(LABELS)))
    factor = ae.downsampling(settings["model"])
    vae_path = tmp_path / "vae.pt"
    ae.save_vae(vae_path, net, {
        "settings": settings, "channels": ae.io_channels(True, len(LABELS)), "classes": CLASSES, "labels": LABELS,
        "prepare": {}, "grid_affine": AFFINE, "grid_shape": [16, 16, 16],
        "latent_shape": [settings["model"]["latent_channels"], *(16 // factor,) * 3],
    })
    counter = LiveVolumes(monkeypatch)
    assert export_latents.main(["--vae", str(vae_path), "--manifest", str(manifest), "--settings",
                                json.dumps({"batch_size": 2}), "--out", str(tmp_path / "latents.h5")]) == 0
    assert counter.reads == 8 and counter.peak <= 2  # 8 subjects read, never more than a batch of 2 held


def test_validation_reads_a_batch_at_a_time_and_scores_as_in_memory(on_disk, monkeypatch):
    memory, disk, _ = on_disk
    settings = vae_settings(paired_labels=True)
    net = ae.build_autoencoder(settings["model"], ae.io_channels(True, len(LABELS)))
    in_memory, _ = evaluate_reconstruction(net, memory, len(LABELS), True, CPU, {"batch_size": 8})
    counter = LiveVolumes(monkeypatch)
    streamed, _ = evaluate_reconstruction(net, disk, len(LABELS), True, CPU, {"batch_size": 3})
    assert counter.reads == 8 and counter.peak <= 3
    assert streamed == pytest.approx(in_memory, rel=1e-5)
