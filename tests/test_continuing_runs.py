"""Continuing a run: more steps or epochs keep the LR schedule of the run's start, another GPU
count resumes (diffusion) or is refused with the reason (autoencoder), and the run keys say
which settings may change without starting afresh."""

from __future__ import annotations

import csv

import pytest
import torch

from medldm.autoencoder.training import VAETrainer
from medldm.checkpoint import Checkpoints, load_torch, save_torch
from medldm.diffusion.training import Trainer, run_key
from medldm.errors import InputError
from medldm.resources import gpus_requested
from tests.ldm_toys import ldm_settings, make_latents, make_vae_file, one_thread  # noqa: F401
from tests.vae_toys import LABELS, toy_set, vae_settings
from workflow_scripts import train_vae

CPU = torch.device("cpu")
SPLITS = ["train"] * 4 + ["val"] * 2  # 2 batches of 2 per autoencoder epoch


def _lrs(run_dir) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as fh:
        return {int(r["step"]): float(r["lr"]) for r in csv.DictReader(fh)}


def test_more_ldm_steps_continue_at_the_final_lr(tmp_path):
    vae = make_vae_file(tmp_path / "vae.pt")
    latents = make_latents(tmp_path / "latents.h5", vae)

    def run(steps):
        settings = ldm_settings(train={"steps": steps, "lr": 1e-3, "min_lr_ratio": 0.1, "checkpoint_every": 4})
        assert Trainer(settings, latents, vae, tmp_path / "run", tmp_path / "ldm.pt", CPU, progress=False).run() == 0

    run(16)
    first = _lrs(tmp_path / "run")
    assert first[4] > first[12] > first[16] == pytest.approx(1e-4)  # warm-up, then cosine to the end
    run(32)
    lrs = _lrs(tmp_path / "run")
    assert {s: lrs[s] for s in first} == first
    assert [lrs[s] for s in range(20, 33, 4)] == pytest.approx([1e-4] * 4)  # no jump back up


def _vae_trainer(run_dir, epochs, stop=None):
    data = toy_set(6, splits=SPLITS)
    settings = vae_settings(train={"epochs": epochs, "lr": 1e-3, "min_lr_ratio": 0.1})
    return VAETrainer(settings, data.subset("train"), data.subset("val"), run_dir, len(LABELS), CPU, stop)


class StopAtStep:
    trainer = None

    def __init__(self, step):
        self.step = step

    def __bool__(self):
        return self.trainer.step >= self.step


def test_more_vae_epochs_continue_at_the_final_lr(tmp_path):
    first = _vae_trainer(tmp_path, 2)
    first.run()
    assert first.opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    stop = StopAtStep(5)  # one step into epoch 3 of 4
    more = stop.trainer = _vae_trainer(tmp_path, 4, stop)
    assert more.run().interrupted and more.step == 5
    assert more.opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_vae_run_of_another_gpu_count_is_refused_with_the_reason(tmp_path):
    _vae_trainer(tmp_path, 1).run()
    latest = Checkpoints(tmp_path).latest()
    save_torch(latest, {**load_torch(latest), "world": 2})  # as if written under torchrun with 2 GPUs
    with pytest.raises(InputError, match=r"written by 2 training process.*runs 1.*Give train_vae 2 GPU"):
        _vae_trainer(tmp_path, 2).run()



def test_ldm_run_key_ignores_only_resumable_settings():
    base = ldm_settings()
    key = run_key(base, "abc")
    for name, value in {"steps": 99, "checkpoint_every": 3, "log_every": 3, "val_every": 3, "compile": True}.items():
        assert run_key(ldm_settings(train={name: value}), "abc") == key, name
    for name, value in {"lr": 1e-2, "batch_size": 2, "seed": 1, "class_dropout": 0.3, "splits": ["train", "val"]}.items():
        assert run_key(ldm_settings(train={name: value}), "abc") != key, name
    assert run_key(ldm_settings(model={"channels": [8, 16]}), "abc") != key
    assert run_key(base, "other latents") != key


def test_vae_run_key_ignores_inference_and_resumable_settings(tmp_path):
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("subject_id\n")

    def key(**sections):
        return train_vae.run_key(vae_settings(**sections), manifest, ["HC", "TLE"], LABELS)

    base = key()
    for name, value in {"epochs": 99, "val_every": 3, "checkpoint_every": 3, "montage_subjects": 1}.items():
        assert key(train={name: value}) == base, name
    assert key(inference={"batch_size": 1, "roi_size": [4, 4, 4]}) == base
    assert key(train={"lr": 1e-2}) != base and key(loss={"kl_weight": 1.0}) != base
    assert key(train={"patch_size": [8, 8, 8]}) != base
    assert train_vae.run_key(vae_settings(), manifest, ["HC"], LABELS) != base


@pytest.mark.parametrize("resources, gpus", [
    ({}, 0), ({"gpu": 2}, 2), ({"gpu": 1}, 1), ({"gres": "gpu:4"}, 4), ({"gres": "gpu:a100:2"}, 2),
    ({"gpu_model": "a100"}, 1), ({"gres": "shard:2"}, 0), ({"gpu": None, "gres": None}, 0),
])
def test_gpus_requested_by_rule_resources(resources, gpus):
    assert gpus_requested(resources) == gpus
