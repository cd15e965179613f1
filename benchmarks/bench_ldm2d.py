#!/usr/bin/env python
"""2D latent diffusion throughput (issue #14): our loops against bare MONAI loops on the same 2D
DiffusionModelUNet, latents and batch; target ratio >= 0.95 for both.

1. training steps/s: ``medldm.diffusion.training.Trainer`` (as in bench_ldm.py: EMA, clipping,
   class-balanced batches, LR schedule, logging) vs scheduler.add_noise, forward, MSE, AdamW step;
2. sampling steps/s: ``medldm.diffusion.process.sample`` (rectified flow, classifier-free guidance
   over a doubled batch, as a sample set runs it) vs MONAI's RFlowScheduler loop doing the same.

    OMP_NUM_THREADS=1 python benchmarks/bench_ldm2d.py --threads 1 --out results/bench/ldm2d.json

Model and training settings: the demo's ``ldm`` entry of config/config.yaml, which
config/demo2d.yaml trains in 2D; latents (C, h, w) of --latent-shape (the 2D demo's 3x10x12 by
default). Rates are steps per second of this process's CPU time (one thread: other jobs on a
shared machine then barely change them, unlike wall time); ours and bare alternate in short runs,
--repeats times, so that what drift remains hits both alike. Reported: the ratio of the medians and
the median of the ratios of adjacent (ours, bare) runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import RFlowScheduler

from medldm.diffusion import process as diffusion
from medldm.diffusion.backbones import build_diffusion_model
from medldm.diffusion.training import Trainer

try:  # python -m benchmarks.bench_ldm2d
    from benchmarks.bench_ldm import REPO, ldm_settings, write_latents
except ModuleNotFoundError:  # python benchmarks/bench_ldm2d.py
    from bench_ldm import REPO, ldm_settings, write_latents


def ours_training(settings: dict, latents: Path, steps: int, workdir: Path) -> float:
    """CPU steps/s of ``Trainer.run`` (set-up not timed; its final ldm.pt write is, against us)."""
    train = {**settings["train"], "steps": steps, "log_every": 10, "val_every": 10**9, "checkpoint_every": 10**9}
    run = workdir / f"run-{time.monotonic_ns()}"
    trainer = Trainer({**settings, "train": train}, latents, None, run, run / "ldm.pt", torch.device("cpu"),
                      progress=False)
    tic = time.process_time()
    trainer.run()
    return steps / (time.process_time() - tic)


def bare_training(settings: dict, x_all: torch.Tensor, y_all: torch.Tensor, steps: int) -> float:
    """CPU steps/s of a bare MONAI loop on the same network, data and batch size."""
    torch.manual_seed(0)
    model = build_diffusion_model(settings["model"], x_all.shape[1], 2, spatial_dims=x_all.ndim - 2)
    strategy = diffusion.build_strategy(settings["strategy"])
    opt = torch.optim.AdamW(model.parameters(), lr=settings["train"]["lr"])
    bs = settings["train"]["batch_size"]
    tic = time.process_time()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (bs,))
        x0, y = x_all[idx], y_all[idx]
        noise = torch.randn_like(x0)
        t = strategy.sample_timesteps(x0)
        pred = model(strategy.scheduler.add_noise(x0, noise, t), t, class_labels=y)
        loss = torch.nn.functional.mse_loss(pred, x0 - noise if strategy.name == "rflow" else noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps / (time.process_time() - tic)


def sampling_rates(settings: dict, shape, batch: int, steps: int) -> tuple[float, float]:
    """(ours, bare) sampling steps per second: rectified flow, guidance 2 (a doubled batch)."""
    model = build_diffusion_model(settings["model"], shape[0], 2, spatial_dims=len(shape) - 1).eval()
    strategy = diffusion.build_strategy({**settings["strategy"], "name": "rflow"})
    noise = diffusion.start_noise(shape, 0, range(batch))
    labels = torch.arange(batch) % 2

    tic = time.process_time()
    diffusion.sample(model, strategy, noise, labels, sampler="rflow", steps=steps, guidance_scale=2.0, null_class=2)
    ours_rate = steps / (time.process_time() - tic)

    scheduler = RFlowScheduler(num_train_timesteps=strategy.num_train_timesteps)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    null = torch.full_like(labels, 2)
    tic = time.process_time()
    with torch.no_grad():
        x = noise
        for t, t_next in zip(timesteps, [*timesteps[1:], 0], strict=True):
            tt = torch.full((2 * batch,), int(t), dtype=torch.long)
            cond, uncond = model(torch.cat([x, x]), tt, class_labels=torch.cat([labels, null])).chunk(2)
            x, _ = scheduler.step(uncond + 2.0 * (cond - uncond), int(t), x, int(t_next))
    return ours_rate, steps / (time.process_time() - tic)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--ldm", help="ldm entry name (default: the first)")
    parser.add_argument("--latent-shape", type=int, nargs=3, default=[3, 10, 12], metavar=("C", "H", "W"))
    parser.add_argument("--batch-size", type=int, help="training batch (default: the entry's)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--sample-steps", type=int, default=10, help="rectified-flow steps per sampling run")
    parser.add_argument("--sample-batch", type=int, default=32, help="images per sampling run")
    parser.add_argument("--repeats", type=int, default=10, help="alternating runs of each loop")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ldm_settings(args.config, args.ldm)
    if args.batch_size:
        settings["train"]["batch_size"] = args.batch_size
    shape = tuple(args.latent_shape)
    print(f"threads {torch.get_num_threads()}, latent {shape}, model {settings['model']}, "
          f"batch {settings['train']['batch_size']}", flush=True)
    runs = {"train_ours": [], "train_bare": [], "sample_ours": [], "sample_bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        latents = Path(tmp) / "latents.h5"
        write_latents(latents, 64, shape, ["A", "B"])
        x_all, y_all = torch.randn(64, *shape), torch.arange(64) % 2
        for _ in range(args.repeats):  # alternate, so load changes on a shared machine hit both
            runs["train_ours"].append(ours_training(settings, latents, args.steps, Path(tmp)))
            runs["train_bare"].append(bare_training(settings, x_all, y_all, args.steps))
            for key, rate in zip(("sample_ours", "sample_bare"),
                                 sampling_rates(settings, shape, args.sample_batch, args.sample_steps), strict=True):
                runs[key].append(rate)
            print("  " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()) + " steps/s", flush=True)
    median = {key: float(np.median(rates)) for key, rates in runs.items()}
    ratios, paired = {}, {}
    for loop in ("train", "sample"):
        ours_rates, bare_rates = np.array(runs[f"{loop}_ours"]), np.array(runs[f"{loop}_bare"])
        ratios[loop] = median[f"{loop}_ours"] / median[f"{loop}_bare"]
        paired[loop] = float(np.median(ours_rates / bare_rates))
        print(f"{loop}: ours/bare {ratios[loop]:.3f} (medians), {paired[loop]:.3f} (median of adjacent runs' "
              "ratios); target >= 0.95")
    result = {"threads": torch.get_num_threads(), "latent_shape": shape, "model": settings["model"],
              "batch_size": settings["train"]["batch_size"], "sample_batch": args.sample_batch,
              "cpu_steps_per_s": median, "runs": runs, "ratio_of_medians": ratios, "median_paired_ratio": paired,
              "targets_met": min(ratios.values()) >= 0.95}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
