"""Model selection and early stopping of both trainers, on validation curves the tests script."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from medldm.autoencoder.training import VAETrainer
from medldm.checkpoint import BestCheckpoint, Checkpoints, load_torch
from medldm.errors import InputError
from tests.vae_toys import LABELS, single_thread, toy_set, vae_settings  # noqa: F401 (fixture)

CPU = torch.device("cpu")
SPLITS = ["train"] * 4 + ["val"] * 2  # 2 steps per epoch at batch 2


def _rows(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_checkpoint_rules():
    weights = iter(range(10))
    best = BestCheckpoint("loss", "min", patience=2)
    assert best.update({"loss": math.nan}, lambda: {"w": next(weights)}, step=1)  # something to export
    assert best.update({"loss": 3.0}, lambda: {"w": next(weights)}, step=2)  # any number beats NaN
    assert not best.update({"loss": math.nan}, lambda: {"w": next(weights)}, step=3)
    assert not best.exhausted
    assert not best.update({"loss": 3.0}, lambda: {"w": next(weights)}, step=4)  # a tie is no better
    assert best.exhausted and best.weights == {"w": 1} and best.record()["step"] == 2
    last = BestCheckpoint("last", "max", patience=1)
    for step in (1, 2):
        assert last.update({"loss": -step}, lambda: {}, step=step)
    assert last.where == {"step": 2} and not last.exhausted
    with pytest.raises(InputError, match="select.metric 'dice'.*'psnr', 'ssim'"):
        BestCheckpoint("dice", "max").update({"ssim": 1.0, "psnr": 2.0}, dict, step=1)
    resumed = BestCheckpoint("loss", "max")
    with pytest.raises(InputError, match="selects by loss \\(min\\)"):
        resumed.load_state_dict(best.state_dict())


# ---- autoencoder ------------------------------------------------------------------------------

SSIM = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.65, 5: 0.69, 6: 0.9, 7: 0.8, 8: 0.8}  # best at epoch 2 until 6


@pytest.fixture
def scripted_vae_validation(monkeypatch):
    """VAETrainer.validate returns SSIM[epoch]; the weights it saw are kept per epoch."""
    seen: dict[int, dict] = {}

    def validate(self, epoch):
        seen.setdefault(epoch, {k: v.clone() for k, v in self.net.state_dict().items()})
        self.val_metrics = {"ssim": SSIM[epoch], "psnr": 20.0 + epoch}
        self.montage, self.validated, self.last_validated = None, True, epoch

    monkeypatch.setattr(VAETrainer, "validate", validate)
    return seen


class StopAtStep:
    def __init__(self, step):
        self.step, self.trainer = step, None

    def __bool__(self):
        return self.trainer.step >= self.step


def _vae(tmp_path, name, stop=None, patience=3):
    data = toy_set(6, splits=SPLITS)
    settings = vae_settings(train={"epochs": 8, "patience": patience, "checkpoint_every": 3})
    trainer = VAETrainer(settings, data.subset("train"), data.subset("val"), tmp_path / name, len(LABELS), CPU, stop)
    if stop is not None:
        stop.trainer = trainer
    return trainer


def test_vae_exports_the_best_epoch_and_stops_after_patience(tmp_path, scripted_vae_validation):
    seen = scripted_vae_validation
    trainer = _vae(tmp_path, "a")
    result = trainer.run()
    assert not result.interrupted and result.epochs_done == 5 and trainer.step == 10  # 3 worse after epoch 2
    assert result.selection == {"metric": "ssim", "mode": "max", "value": 0.7, "epoch": 2, "step": 4,
                                "validations_since": 3, "stopped_early": True}
    assert result.val_metrics == {"ssim": 0.7, "psnr": 22.0}
    assert _same(result.model.state_dict(), seen[2]) and not _same(seen[2], seen[5])
    rows = _rows(tmp_path / "a")
    assert [r["step"] for r in rows] == ["2", "4", "6", "8", "10"]
    assert [r["best/epoch"] for r in rows] == ["1", "2", "2", "2", "2"]
    assert Checkpoints(tmp_path / "a").latest().name == "ckpt-000000010.pt"  # the stop is checkpointed

    again = _vae(tmp_path, "a").run()  # the rerun of a stopped run trains no further
    assert again.epochs_done == 5 and _same(again.model.state_dict(), seen[2])
    longer = _vae(tmp_path, "a", patience=5).run()  # more patience resumes it
    assert longer.epochs_done == 8 and longer.selection["epoch"] == 6


def test_vae_selection_survives_resume(tmp_path, scripted_vae_validation):
    reference = _vae(tmp_path, "a").run()
    stopped = _vae(tmp_path, "b", stop=StopAtStep(7))  # mid epoch 4: best epoch 2, one worse since
    assert stopped.run().interrupted
    assert load_torch(Checkpoints(tmp_path / "b").latest())["best"]["since"] == 1
    result = _vae(tmp_path, "b").run()
    assert result.epochs_done == 5 and result.selection == reference.selection
    assert _same(result.model.state_dict(), reference.model.state_dict())


# ---- latent diffusion -------------------------------------------------------------------------

VAL_LOSS = {8: 1.0, 16: 0.5, 24: 0.7, 32: 0.6, 40: 0.4}  # ldm_settings validates every 8 of 40 steps


@pytest.fixture
def scripted_ldm_validation(monkeypatch):
    """Trainer.val_loss returns VAL_LOSS[step]; the EMA weights it saw are kept per step."""
    from medldm.diffusion.training import Trainer

    seen: dict[int, dict] = {}

    def val_loss(self):
        step = self.ema.updates  # one EMA update per step
        seen.setdefault(step, {k: v.clone() for k, v in self.ema.module.state_dict().items()})
        return VAL_LOSS[step]

    monkeypatch.setattr(Trainer, "val_loss", val_loss)
    return seen


def _ldm(tmp_path, name, stop=None, patience=2):
    from medldm.diffusion.training import Trainer
    from tests.ldm_toys import ldm_settings, make_latents, make_vae_file

    vae = tmp_path / "vae.pt"
    if not vae.exists():
        make_latents(tmp_path / "latents.h5", make_vae_file(vae))
    settings = ldm_settings(train={"patience": patience, "checkpoint_every": 100})
    return Trainer(settings, tmp_path / "latents.h5", vae, tmp_path / name, tmp_path / f"{name}.pt", CPU,
                   stop=stop, progress=False)


class StopAtPoll:
    def __init__(self, k):
        self.k, self.polls = k, 0

    def __bool__(self):
        self.polls += 1
        return self.polls >= self.k


def test_ldm_exports_the_best_step_and_stops_after_patience(tmp_path, scripted_ldm_validation):
    seen = scripted_ldm_validation
    assert _ldm(tmp_path, "a").run() == 0
    payload = load_torch(tmp_path / "a.pt")
    assert payload["step"] == 16 and payload["selection"] == {
        "metric": "loss", "mode": "min", "value": 0.5, "step": 16, "validations_since": 2,
        "stopped_early": True, "steps_trained": 32}
    assert _same(payload["ema_state"], seen[16]) and not _same(seen[16], seen[32])
    rows = _rows(tmp_path / "a")
    assert rows[-1]["step"] == "32" and [r["best/step"] for r in rows if r["val_loss"]] == ["8", "16", "16", "16"]
    assert Checkpoints(tmp_path / "a").latest().name == "ckpt-000000032.pt"  # the stop is checkpointed
    longer = _ldm(tmp_path, "a", patience=3)  # more patience resumes the stopped run
    assert longer.start == 32 and longer.run() == 0
    assert load_torch(tmp_path / "a.pt")["selection"]["step"] == 40


def test_ldm_selection_survives_resume(tmp_path, scripted_ldm_validation):
    assert _ldm(tmp_path, "a").run() == 0
    assert _ldm(tmp_path, "b", stop=StopAtPoll(20)).run() != 0  # stopped at step 20: best 16
    assert load_torch(tmp_path / "b" / "ckpt-000000020.pt")["best"]["where"] == {"step": 16}
    resumed = _ldm(tmp_path, "b")
    assert resumed.start == 20 and resumed.run() == 0
    a, b = load_torch(tmp_path / "a.pt"), load_torch(tmp_path / "b.pt")
    assert a["selection"] == b["selection"] and _same(a["ema_state"], b["ema_state"])
    assert _same(a["model_state"], b["model_state"])
