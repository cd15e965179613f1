"""Training runs of the autoencoder: exact resume, signals, stale run directories, DDP."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medldm.autoencoder import networks as ae
from medldm.autoencoder.training import VAETrainer
from medldm.checkpoint import Checkpoints, claim_run_dir
from medldm.data.cohort import load_prepared, training_loader
from medldm.errors import EXIT_INTERRUPTED, InputError
from tests.conftest import REPO
from tests.vae_toys import LABELS, single_thread, toy_set, vae_settings, write_prepared  # noqa: F401
from workflow_scripts import train_vae

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")
SPLITS = ["train"] * 4 + ["val"] * 2


class StopAtStep:
    """A stop flag that turns true once ``trainer.step`` reaches ``step`` (a simulated SIGTERM)."""

    def __init__(self, step: int):
        self.step, self.trainer = step, None

    def __bool__(self) -> bool:
        return self.trainer.step >= self.step


class SignalledWhileValidating:
    """A stop flag that turns true once the trainer has validated (a SIGTERM after the last step)."""

    trainer = None

    def __bool__(self) -> bool:
        return self.trainer.validated


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as fh:
        return [{k: v for k, v in row.items() if k != "train/volumes_per_s"} for row in csv.DictReader(fh)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_exactly(tmp_path, workers):
    """Bit-exact with DataLoader workers too: they only fetch the batches the trainer planned.
    The run that stops and resumes reads its subjects from disk through the workers; the
    reference reads them in memory, in this process."""
    data = toy_set(6, splits=SPLITS)
    settings = vae_settings(train={"epochs": 3, "val_every": 2, "workers": 0},
                            loss={"adversarial_weight": 0.1, "discriminator": {"channels": 4, "num_layers": 1}})
    straight = VAETrainer(settings, data.subset("train"), data.subset("val"), tmp_path / "a", len(LABELS), CPU)
    reference = straight.run()
    settings["train"]["workers"] = workers
    data = load_prepared(write_prepared(tmp_path / "prepared", data), ["HC", "TLE"], with_labels=False)

    stop = StopAtStep(3)  # 2 batches per epoch: stops in the middle of epoch 2
    first = VAETrainer(settings, data.subset("train"), data.subset("val"), tmp_path / "b", len(LABELS), CPU, stop)
    stop.trainer = first
    assert first.run().interrupted
    assert Checkpoints(tmp_path / "b").latest().name == "ckpt-000000003.pt"
    resumed = VAETrainer(settings, data.subset("train"), data.subset("val"), tmp_path / "b", len(LABELS), CPU)
    assert resumed.loader.num_workers == workers
    result = resumed.run()

    assert not result.interrupted and result.epochs_done == 3 and resumed.step == 6
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, result.model.state_dict()[name]), name
    for name, value in straight.disc.state_dict().items():
        assert torch.equal(value, resumed.disc.state_dict()[name]), name
    rows = _metrics(tmp_path / "b")
    assert [r["step"] for r in rows] == ["2", "4", "6"]  # one row per epoch: no gap, no duplicate
    assert rows == _metrics(tmp_path / "a")
    assert "val/ssim" in rows[1] and rows[1]["val/ssim"] and "train/adv" in rows[0]


def test_signal_checkpoints_exits_75_and_rerun_resumes(tmp_path, monkeypatch, caplog):
    manifest = write_prepared(tmp_path / "prepared", toy_set(6, splits=SPLITS))
    out = tmp_path / "vae.pt"

    def args(epochs):
        settings = vae_settings(train={"epochs": epochs, "checkpoint_every": 5})
        return ["--settings", json.dumps(settings), "--prepare", "{}", "--manifest", str(manifest),
                "--classes", "HC,TLE", "--labels", ",".join(LABELS), "--run-dir", str(tmp_path / "run"), "--out", str(out)]

    real_step = VAETrainer.train_step

    def step_then_signal(self, *batch):
        parts = real_step(self, *batch)
        if self.step == 2:  # the step counter is incremented after this call: signal in step 3
            os.kill(os.getpid(), signal.SIGUSR1)
        return parts

    monkeypatch.setattr(VAETrainer, "train_step", step_then_signal)
    assert train_vae.main(args(2)) == EXIT_INTERRUPTED
    assert Checkpoints(tmp_path / "run").latest().name == "ckpt-000000003.pt" and not out.exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler restored

    monkeypatch.setattr(VAETrainer, "train_step", real_step)
    caplog.set_level("INFO")
    assert train_vae.main(args(3)) == 0  # more epochs: same run, resumed
    assert "resumed at epoch 2, batch 1 (step 3)" in caplog.text
    assert out.exists() and [r["step"] for r in _metrics(tmp_path / "run")] == ["2", "4", "6"]


def test_signal_during_final_validation_still_stops(tmp_path):
    """SIGTERM after the last step (while validating) must not be swallowed: exit interrupted
    with the final checkpoint written; the rerun only writes the outputs."""
    data = toy_set(6, splits=SPLITS)
    settings = vae_settings(train={"epochs": 2, "checkpoint_every": 5, "val_every": 2})
    stop = SignalledWhileValidating()
    first = VAETrainer(settings, data.subset("train"), data.subset("val"), tmp_path, len(LABELS), CPU, stop)
    stop.trainer = first
    assert first.run().interrupted
    assert Checkpoints(tmp_path).latest().name == "ckpt-000000004.pt"
    rerun = VAETrainer(settings, data.subset("train"), data.subset("val"), tmp_path, len(LABELS), CPU)
    result = rerun.run()
    assert not result.interrupted and result.epochs_done == 2 and rerun.step == 4


def test_a_run_with_other_settings_is_moved_aside(tmp_path):
    run = tmp_path / "run"
    claim_run_dir(run, "key1")
    (run / "ckpt-000000001.pt").write_text("old")
    claim_run_dir(run, "key1")
    assert (run / "ckpt-000000001.pt").exists()
    claim_run_dir(run, "key2")
    assert (tmp_path / "run.stale-key1" / "ckpt-000000001.pt").exists()
    assert json.loads((run / "run.json").read_text()) == {"key": "key2"}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(InputError, match="run.json"):
        claim_run_dir(tmp_path / "other", "key")


def test_two_process_ddp_training_on_cpu(tmp_path):
    """torchrun --nproc_per_node 2 with gloo: ranks train shards, rank 0 alone writes."""
    manifest = write_prepared(tmp_path / "prepared", toy_set(6, splits=SPLITS))
    settings = vae_settings(paired_labels=True, train={"epochs": 2})
    out, run = tmp_path / "vae.pt", tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
           str(REPO / "workflow_scripts" / "train_vae.py"), "--settings", json.dumps(settings), "--prepare", "{}",
           "--manifest", str(manifest), "--classes", "HC,TLE", "--labels", ",".join(LABELS),
           "--run-dir", str(run), "--out", str(out), "--montage", str(tmp_path / "m.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr and proc.stderr.count("wrote ") == 1
    assert [r["step"] for r in _metrics(run)] == ["1", "2"]  # 4 subjects / 2 ranks / batch 2
    assert ae.load_vae(out)[1]["epochs"] == 2 and (tmp_path / "m.png").exists()


def test_loader_workers_survive_the_stop_signals(tmp_path):
    """scancel and SLURM's time limit signal every process of the job: a DataLoader worker killed by
    SIGTERM would take the trainer down before it writes its checkpoint."""
    data = load_prepared(write_prepared(tmp_path / "prepared", toy_set(4)), ["HC", "TLE"], with_labels=False)
    loader, plan = training_loader(data, workers=1, cache_mb=0)
    plan.plan = [[0, 1], [2, 3], [0, 2]]
    batches = iter(loader)
    next(batches)
    for worker in batches._workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGUSR1)
    assert [len(b["image"]) for b in batches] == [2, 2]  # the worker read on


def test_a_process_with_an_unfinished_loader_still_exits(tmp_path):
    """Workers ignore SIGTERM, which multiprocessing uses to stop them at interpreter exit: a process
    that leaves a loader mid-epoch must still exit (this hang once stopped CI after the last test)."""
    manifest = write_prepared(tmp_path / "prepared", toy_set(4))
    script = (
        "from medldm.data.cohort import load_prepared, training_loader\n"
        f"data = load_prepared({str(manifest)!r}, ['HC', 'TLE'], with_labels=False)\n"
        "loader, plan = training_loader(data, workers=2, cache_mb=0)\n"
        "plan.plan = [[0, 1], [2, 3], [0, 2], [1, 3]]\n"
        "batches = iter(loader)\n"
        "print(len(next(batches)['image']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"
    assert "exited unexpectedly" not in done.stderr and "Traceback" not in done.stderr
