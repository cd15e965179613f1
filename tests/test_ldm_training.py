"""train_ldm and sample: resume, ldm.pt contents and checks, sample sets (CPU, toy latents)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from medldm.checkpoint import load_torch
from medldm.data.h5layout import open_latents
from medldm.diffusion import process as diffusion
from medldm.diffusion.training import Trainer, batch_weights
from medldm.errors import EXIT_INTERRUPTED, InputError
from medldm.provenance import sha256_file
from medldm.runtime import cosine_lr
from tests.conftest import REPO, snakemake_env
from tests.ldm_toys import (  # noqa: F401 (one_thread is a fixture)
    SHAPE,
    ldm_settings,
    make_latents,
    make_vae_file,
    one_thread,
    sample_set_settings,
)
from workflow_scripts import sample as sample_script

CPU = torch.device("cpu")


class StopAt:
    """Stands in for StopFlag: true from the k-th poll on (the loop polls once per step)."""

    def __init__(self, k: int):
        self.k, self.polls = k, 0

    def __bool__(self) -> bool:
        self.polls += 1
        return self.polls >= self.k


@pytest.fixture
def toy(tmp_path):
    vae = make_vae_file(tmp_path / "vae.pt")
    return vae, make_latents(tmp_path / "latents.h5", vae)


def train(toy, tmp_path, name="run", stop=None, **sections):
    vae, latents = toy
    trainer = Trainer(ldm_settings(**sections), latents, vae, tmp_path / name, tmp_path / f"{name}.pt",
                      CPU, stop=stop, progress=False)
    return trainer, trainer.run()


def metric_steps(run_dir) -> list[int]:
    with open(run_dir / "metrics.csv") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh)]


def test_resume_continues_exactly(toy, tmp_path):
    _, code = train(toy, tmp_path, "straight")
    assert code == 0
    trainer, code = train(toy, tmp_path, "stopped", stop=StopAt(10))
    assert code == EXIT_INTERRUPTED and not (tmp_path / "stopped.pt").exists()
    assert (tmp_path / "stopped" / "ckpt-000000010.pt").is_file()
    trainer, code = train(toy, tmp_path, "stopped")
    assert code == 0 and trainer.start == 10
    a, b = load_torch(tmp_path / "straight.pt"), load_torch(tmp_path / "stopped.pt")
    for key in ("model_state", "ema_state"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=0, msg=f"{key} {name}")
    assert metric_steps(tmp_path / "stopped") == list(range(4, 41, 4))  # no gap, no duplicate
    # more steps resume the finished run; other settings move it aside and start afresh
    trainer = Trainer(ldm_settings(train={"steps": 60}), *reversed(toy), tmp_path / "stopped",
                      tmp_path / "x.pt", CPU, progress=False)
    assert trainer.start == 40
    trainer = Trainer(ldm_settings(train={"lr": 1e-3}), *reversed(toy), tmp_path / "stopped",
                      tmp_path / "x.pt", CPU, progress=False)
    assert trainer.start == 0 and list(tmp_path.glob("stopped.stale-*"))


def test_signal_on_the_last_step_still_stops(toy, tmp_path):
    """A stop request polled at the very last step checkpoints and exits 75 (no ldm.pt): under
    SLURM the job is being killed anyway; the rerun resumes there and only writes ldm.pt."""
    trainer, code = train(toy, tmp_path, "run", stop=StopAt(40))  # ldm_settings: 40 steps
    assert code == EXIT_INTERRUPTED and not (tmp_path / "run.pt").exists()
    assert (tmp_path / "run" / "ckpt-000000040.pt").is_file()
    trainer, code = train(toy, tmp_path, "run")
    assert code == 0 and trainer.start == 40 and (tmp_path / "run.pt").is_file()


def test_ldm_pt_records_what_it_was_trained_against(toy, tmp_path):
    vae, latents = toy
    train(toy, tmp_path, train={"steps": 8})
    payload = load_torch(tmp_path / "run.pt")
    assert payload["scale_factor"] == 0.5 and payload["latent_shape"] == list(SHAPE)
    assert payload["strategy"]["name"] == "rflow" and payload["model"]["channels"] == [16, 32]
    assert payload["latents_sha256"] == sha256_file(latents)
    assert payload["vae_sha256"] == sha256_file(vae)
    assert set(payload["ema_state"]) == set(payload["model_state"])
    ldm = diffusion.load_ldm(tmp_path / "run.pt", vae_path=vae)
    assert ldm.class_names == ["HC", "TLE"] and ldm.null_class == 2
    other = make_vae_file(tmp_path / "other_vae.pt", b"another autoencoder")
    with pytest.raises(InputError, match="trained against"):
        diffusion.load_ldm(tmp_path / "run.pt", vae_path=other)
    with pytest.raises(InputError, match="another autoencoder"):  # latents not from this vae.pt
        Trainer(ldm_settings(), latents, other, tmp_path / "r2", tmp_path / "r2.pt", CPU)


def test_sample_set_is_conditional_unscaled_and_reproducible(toy, tmp_path):
    vae, _ = toy
    train(toy, tmp_path, train={"steps": 150, "log_every": 50, "val_every": 150, "checkpoint_every": 150})
    settings = sample_set_settings(n=12, sampler="auto", steps=20, guidance_scale=1.0, batch_size=5, seed=3)
    outs = []
    for name, batch in (("a", 5), ("again", 5), ("b", 12)):
        out = tmp_path / f"samples_{name}.h5"
        argv = ["--ldm", str(tmp_path / "run.pt"), "--vae", str(vae), "--out", str(out), "--name", "s1",
                "--settings", json.dumps({**settings, "batch_size": batch}), "--device", "cpu"]
        assert sample_script.main(argv) == 0
        outs.append(out)
    mus = []
    for out in outs:
        with open_latents(out) as f:
            mus.append(f.mu[:])
            assert f.logvar is None and set(f.splits) == {"synthetic"} and f.subject_ids[0] == "syn-00000"
            assert f.class_index.tolist() == [0] * 6 + [1] * 6
            assert f.header.settings["sampler"] == "rflow" and f.header.vae_sha256 == sha256_file(vae)
            assert f.header.scale_factor == 0.5
    mu = mus[0]
    np.testing.assert_array_equal(mu, mus[1])  # same seed, same volumes
    np.testing.assert_allclose(mu, mus[2], atol=1e-5)  # another batch size: same up to rounding
    # unscaled: the toy classes have means -2 and 2 before scaling (-1 and 1 after)
    m0, m1 = mu[:6].mean(), mu[6:].mean()
    assert m0 < -1.0 and m1 > 1.0, (m0, m1)
    other = make_vae_file(tmp_path / "other_vae.pt", b"another autoencoder")
    argv = ["--ldm", str(tmp_path / "run.pt"), "--vae", str(other), "--out", str(tmp_path / "x.h5"),
            "--settings", json.dumps(settings), "--device", "cpu"]
    with pytest.raises(InputError, match="trained against"):
        sample_script.main(argv)


def test_class_allocation_and_balance():
    classes = ["HC", "TLE", "X"]
    assert diffusion.allocate_classes(5, classes).tolist() == [0, 0, 1, 1, 2]
    assert diffusion.allocate_classes(4, classes, cls="TLE").tolist() == [1] * 4
    counts = np.bincount(diffusion.allocate_classes(10, classes, proportions={"HC": 1, "X": 3}), minlength=3)
    assert counts.tolist() == [3, 0, 7]  # 2.5 / 7.5: a tie goes to the first class
    assert diffusion.allocate_classes(3, []).tolist() == [-1] * 3
    with pytest.raises(InputError, match="unknown class"):
        diffusion.allocate_classes(3, classes, cls="AD")
    labels = torch.tensor([0, 0, 0, 1])
    weights = batch_weights(labels, balance=True)
    assert weights[3] == pytest.approx(weights[:3].sum())
    assert cosine_lr(0, 100, 10, 0.1) == pytest.approx(0.1) and cosine_lr(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_cli_checkpoints_and_exits_75_on_sigterm(toy, tmp_path):
    vae, latents = toy
    settings = ldm_settings(train={"steps": 100000, "log_every": 1, "checkpoint_every": 100000})
    cmd = [sys.executable, "-m", "workflow_scripts.train_ldm", "--settings", json.dumps(settings),
           "--latents", str(latents), "--vae", str(vae), "--run-dir", str(tmp_path / "run"),
           "--out", str(tmp_path / "ldm.pt"), "--device", "cpu"]
    env = {**snakemake_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.csv").is_file() or len(metric_steps(tmp_path / "run")) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert list((tmp_path / "run").glob("ckpt-*.pt")) and "checkpoint written" in err
    assert not (tmp_path / "ldm.pt").exists()


def test_ddp_two_processes_gloo(toy, tmp_path):
    vae, latents = toy
    settings = ldm_settings(train={"steps": 6, "log_every": 2, "checkpoint_every": 3, "batch_size": 4})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "workflow_scripts.train_ldm", "--settings", json.dumps(settings),
           "--latents", str(latents), "--vae", str(vae), "--run-dir", str(tmp_path / "run"),
           "--out", str(tmp_path / "ldm.pt"), "--device", "cpu"]
    env = {**snakemake_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert diffusion.load_ldm(tmp_path / "ldm.pt", vae_path=vae).latent_shape == SHAPE
    assert metric_steps(tmp_path / "run") == [2, 4, 6]
