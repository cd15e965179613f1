"""The one owner of checkpoints: periodic training checkpoints, resume, final model files,
the best checkpoint by a validation metric (model selection, early stopping), and the
stop-signal handling that SLURM relies on (SIGTERM / SIGUSR1 before a time limit).

A run directory (not a Snakemake output, so Snakemake never deletes it on failure) holds
``ckpt-<step>.pt`` files written atomically; ``latest()`` is the newest complete one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import signal
from pathlib import Path

import numpy as np
import torch

from medldm.errors import InputError
from medldm.io import atomic_path, write_json

log = logging.getLogger(__name__)
_CKPT = re.compile(r"^ckpt-(\d+)\.pt$")
RUN_KEY_FILE = "run.json"  # identity of the run a run directory belongs to


def save_torch(path: str | os.PathLike, payload: dict) -> None:
    """torch.save, atomically."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_torch(path: str | os.PathLike, map_location="cpu") -> dict:
    """torch.load of a medldm file (trusted: our own checkpoints hold plain dicts and numpy state)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def load_model_file(path: str | os.PathLike, tag: tuple[str, str], version: int, rule: str) -> dict:
    """Load a final model file (vae.pt, ldm.pt) and check its kind and format version.

    ``tag`` is the (key, value) pair that marks the kind of file; errors name the file and the
    rule that writes it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; run the {rule} rule first")
    payload = load_torch(path)
    key, value = tag
    if not isinstance(payload, dict) or payload.get(key) != value:
        raise InputError(f"{path}: not a medldm {value} file ({rule} writes it)")
    if payload.get("format_version") != version:
        raise InputError(
            f"{path}: format version {payload.get('format_version')}, this medldm reads {version}; "
            f"rerun {rule} with this version"
        )
    return payload


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """Numbered checkpoints in ``run_dir``; keeps the newest ``keep``."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.keep = keep

    def _all(self) -> list[tuple[int, Path]]:
        if not self.run_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.run_dir.iterdir() if (m := _CKPT.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        found = self._all()
        return found[-1][1] if found else None

    def save(self, step: int, state: dict) -> Path:
        """Write ``state`` (plus RNG states) as checkpoint ``step``; prune older ones."""
        path = self.run_dir / f"ckpt-{step:09d}.pt"
        save_torch(path, {**state, "step": step, "rng": rng_state()})
        for _, old in self._all()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, map_location="cpu") -> dict | None:
        """The newest checkpoint's state with RNG states restored, or None for a fresh start."""
        path = self.latest()
        if path is None:
            return None
        state = load_torch(path, map_location)
        set_rng_state(state["rng"])
        log.info("resuming from checkpoint %s (step %d)", path, state["step"])
        return state


def cpu_copy(state: dict) -> dict:
    """A detached CPU copy of a (nested) state dict: a snapshot that later steps do not change."""
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    return state.detach().to("cpu", copy=True) if isinstance(state, torch.Tensor) else state


class BestCheckpoint:
    """Model selection: the weights of the best validation so far by one metric (``mode`` min or
    max), and the number of validations since it (early stopping after ``patience`` of them;
    0 never stops). ``metric`` ``last`` selects the newest validation: no selection.

    ``state_dict()`` (weights included) goes into every training checkpoint, so a resumed run
    keeps its best weights and its patience count; the trainers export ``weights``.
    """

    def __init__(self, metric: str, mode: str, patience: int = 0):
        if mode not in ("min", "max"):
            raise InputError(f"train.select.mode must be min or max, got {mode!r}")
        self.metric, self.mode, self.patience = metric, mode, patience
        self.value: float | None = None
        self.where: dict = {}  # step (and epoch) of the best validation
        self.metrics: dict = {}  # all metrics of that validation
        self.weights: dict | None = None
        self.since = 0

    def _better(self, value: float) -> bool:
        if self.weights is None or self.metric == "last":
            return True
        if math.isnan(value):
            return False
        if self.value is None or math.isnan(self.value):
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def update(self, metrics: dict[str, float], weights, **where) -> bool:
        """Record one validation's ``metrics`` at ``where`` (step=..., epoch=...); ``weights`` is
        called (for a snapshot of the state dicts) only when it is the new best, which it returns."""
        if self.metric != "last" and self.metric not in metrics:
            raise InputError(f"train.select.metric {self.metric!r}: validation gives {sorted(metrics)} (or 'last')")
        value = float(metrics.get(self.metric, math.nan))
        if not self._better(value):
            self.since += 1
            return False
        self.value, self.where, self.metrics = value, dict(where), dict(metrics)
        self.weights, self.since = cpu_copy(weights()), 0
        return True

    @property
    def exhausted(self) -> bool:
        """True when ``patience`` validations in a row did not improve on the best."""
        return self.patience > 0 and self.since >= self.patience

    def record(self) -> dict:
        """The choice, as model files and logs state it: metric, mode, value, step (and epoch)."""
        return {"metric": self.metric, "mode": self.mode, "value": self.value, **self.where,
                "validations_since": self.since, "stopped_early": self.exhausted}

    def describe(self) -> str:
        where = ", ".join(f"{k} {v}" for k, v in self.where.items())
        if self.metric == "last":
            return f"the last validated weights ({where})"
        return f"the best {self.metric} ({self.mode}) = {self.value:.6g} at {where}"

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "where": self.where,
                "metrics": self.metrics, "weights": self.weights, "since": self.since}

    def load_state_dict(self, state: dict) -> None:
        if (state["metric"], state["mode"]) != (self.metric, self.mode):  # run keys include select
            raise InputError(f"checkpoint selects by {state['metric']} ({state['mode']}), the settings by "
                             f"{self.metric} ({self.mode}): move the run directory away to start afresh")
        self.value, self.where, self.metrics = state["value"], state["where"], state["metrics"]
        self.weights, self.since = state["weights"], state["since"]


class StopFlag:
    """Turns SIGTERM and SIGUSR1 into a flag the training loop polls between steps.

    SLURM sends SIGTERM (or a chosen signal with ``--signal``) before killing a job at its time
    limit; the loop then writes a checkpoint and exits with ``EXIT_INTERRUPTED``.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, _frame):
        self.received = signum
        log.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.received is not None


def claim_run_dir(run_dir: str | Path, key: str) -> None:
    """Make ``run_dir`` the home of the run identified by ``key``.

    A run directory left by different settings or data (another ``key``) is renamed to
    ``<run_dir>.stale-<old key>`` rather than resumed from or deleted.
    """
    run_dir = Path(run_dir)
    marker = run_dir / RUN_KEY_FILE
    if marker.is_file():
        old = json.loads(marker.read_text())["key"]
        if old == key:
            return
        stale = run_dir.with_name(f"{run_dir.name}.stale-{old}")
        n = 1
        while stale.exists():
            stale, n = run_dir.with_name(f"{run_dir.name}.stale-{old}-{n}"), n + 1
        run_dir.rename(stale)
        log.warning("settings or data changed: moved the previous run %s to %s; starting afresh", run_dir, stale)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise InputError(f"{run_dir} holds files but no {RUN_KEY_FILE}: move it away or delete it")
    write_json(marker, {"key": key})
