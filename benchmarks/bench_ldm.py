#!/usr/bin/env python
"""Latent diffusion speed, in one run:

1. training throughput of ``train_ldm``'s loop (``medldm.diffusion.training.Trainer``: EMA, clipping,
   class-balanced batches, LR schedule, logging) against a bare MONAI loop (scheduler.add_noise,
   forward, MSE, AdamW step) on the same UNet, latents and batch size; target ratio >= 0.95;
2. sampling wall time per volume: DDPM 1000 steps, DDIM 50, rectified flow 30 (guided, as a
   sample set runs them); target: rectified flow 30 at least 25x faster than DDPM 1000.

    python benchmarks/bench_ldm.py --out results/bench/ldm.json

Model and training settings are the demo's ``ldm`` entry of config/config.yaml (or --config /
--ldm); the latents are random, of --latent-shape.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from snakemake.utils import validate

from medldm.data.h5layout import Header, create_latents
from medldm.diffusion import process as diffusion
from medldm.diffusion.backbones import build_diffusion_model
from medldm.diffusion.training import Trainer

REPO = Path(__file__).resolve().parent.parent


def ldm_settings(config_path: Path, name: str | None) -> dict:
    """The config's ldm entry (schema defaults filled); the first one when ``name`` is None."""
    config = yaml.safe_load(config_path.read_text())
    validate(config, str(REPO / "config" / "schemas" / "config.schema.yaml"))
    entries = config["ldm"]
    return entries[name or next(iter(entries))]


def write_latents(path: Path, n: int, shape, classes) -> None:
    rng = np.random.default_rng(0)
    header = Header(np.eye(4), tuple(4 * size for size in shape[1:]), classes, [], {}, scale_factor=1.0, vae_sha256="")
    with create_latents(path, n, shape, header) as writer:
        for i in range(n):
            writer.append(f"b{i}", i % len(classes), "train", mu=rng.normal(size=shape).astype(np.float32),
                          logvar=np.full(shape, -4.0, np.float32))


def ours(settings: dict, latents: Path, steps: int, window: int, workdir: Path) -> float:
    """Steps per second of the Trainer: the best ``window``-step interval after the first."""
    train = {**settings["train"], "steps": steps, "log_every": window, "val_every": 10**9,
             "checkpoint_every": 10**9}
    run = workdir / f"run-{time.monotonic_ns()}"
    trainer = Trainer({**settings, "train": train}, latents, None, run, run / "ldm.pt",
                      torch.device("cpu"), progress=False)
    trainer.run()
    with open(run / "metrics.csv") as fh:
        return max(float(row["steps_per_s"]) for row in list(csv.DictReader(fh))[1:])


def bare(settings: dict, x_all: torch.Tensor, y_all: torch.Tensor, steps: int, window: int) -> float:
    """Steps per second of a bare MONAI loop on the same network, data and batch size, timed
    as ``ours``: the best ``window``-step interval after the first."""
    torch.manual_seed(0)
    model = build_diffusion_model(settings["model"], x_all.shape[1], 2)
    strategy = diffusion.build_strategy(settings["strategy"])
    scheduler = strategy.scheduler
    opt = torch.optim.AdamW(model.parameters(), lr=settings["train"]["lr"])
    bs = settings["train"]["batch_size"]

    def step():
        idx = torch.randint(0, len(x_all), (bs,))
        x0, y = x_all[idx], y_all[idx]
        noise = torch.randn_like(x0)
        t = strategy.sample_timesteps(x0)
        pred = model(scheduler.add_noise(x0, noise, t), t, class_labels=y)
        target = x0 - noise if strategy.name == "rflow" else noise
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    rates = []
    for _ in range(steps // window):
        tic = time.perf_counter()
        for _ in range(window):
            step()
        rates.append(window / (time.perf_counter() - tic))
    return max(rates[1:])


def sampling_time(settings: dict, shape, sampler_steps: dict, volumes: int) -> dict:
    """Seconds per volume for each sampler (class-conditional, guidance 2: a doubled batch)."""
    model = build_diffusion_model(settings["model"], shape[0], 2).eval()
    out = {}
    for label, (strategy_name, sampler, steps) in sampler_steps.items():
        strategy = diffusion.build_strategy({**settings["strategy"], "name": strategy_name})
        noise = diffusion.start_noise(shape, 0, range(volumes))
        labels = torch.arange(volumes) % 2
        tic = time.perf_counter()
        diffusion.sample(model, strategy, noise, labels, sampler=sampler, steps=steps, guidance_scale=2.0,
                         null_class=2)
        out[label] = (time.perf_counter() - tic) / volumes
        print(f"  {label}: {out[label]:.3f} s per volume", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--ldm", help="ldm entry name (default: the first)")
    parser.add_argument("--latent-shape", type=int, nargs=4, default=[3, 10, 12, 10], metavar=("C", "D", "H", "W"))
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--window", type=int, default=5,
                        help="steps per timed interval; the best interval after the first counts, so that "
                             "other jobs on a shared machine only ever slow a run down")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each loop (best kept)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--volumes", type=int, default=2, help="volumes per sampling run")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ldm_settings(args.config, args.ldm)
    shape = tuple(args.latent_shape)
    print(f"threads {torch.get_num_threads()}, latent {shape}, model {settings['model']}, "
          f"batch {settings['train']['batch_size']}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        latents = Path(tmp) / "latents.h5"
        write_latents(latents, 32, shape, ["A", "B"])
        x_all = torch.randn(32, *shape)
        y_all = torch.arange(32) % 2
        ours_runs, bare_runs = [], []
        for _ in range(args.repeats):  # alternate, so load changes on a shared machine hit both
            ours_runs.append(ours(settings, latents, args.steps, args.window, Path(tmp)))
            bare_runs.append(bare(settings, x_all, y_all, args.steps, args.window))
            print(f"  train_ldm {ours_runs[-1]:.2f} steps/s, bare MONAI loop {bare_runs[-1]:.2f} steps/s", flush=True)
    train = {"train_ldm_steps_per_s": max(ours_runs), "bare_monai_steps_per_s": max(bare_runs)}
    train["ratio"] = train["train_ldm_steps_per_s"] / train["bare_monai_steps_per_s"]
    print(f"training: ratio {train['ratio']:.3f} (target >= 0.95)", flush=True)

    per_volume = sampling_time(settings, shape, {
        "ddpm_1000": ("ddpm", "ddpm", 1000), "ddim_50": ("ddpm", "ddim", 50), "rflow_30": ("rflow", "rflow", 30),
    }, args.volumes)
    speedup = per_volume["ddpm_1000"] / per_volume["rflow_30"]
    print(f"sampling: rectified flow 30 is {speedup:.1f}x faster than DDPM 1000 (target >= 25)")
    result = {"threads": torch.get_num_threads(), "latent_shape": shape, "model": settings["model"],
              "batch_size": settings["train"]["batch_size"], "training": train,
              "sampling_s_per_volume": per_volume, "rflow30_speedup_over_ddpm1000": speedup,
              "targets_met": train["ratio"] >= 0.95 and speedup >= 25}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
