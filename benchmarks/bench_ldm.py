#!/usr/bin/env python
"""Latent diffusion speed, 3D or 2D as --latent-shape says (C D H W: volumes; C H W: images):

1. training steps/s: ``train_ldm``'s loop (``medldm.diffusion.training.Trainer``: EMA, clipping,
   class-balanced batches, LR schedule, logging) against a bare MONAI loop (scheduler.add_noise,
   forward, MSE, AdamW step) on the same UNet, latents and batch size; target ratio >= 0.95;
2. sampling steps/s: ``medldm.diffusion.process.sample`` (rectified flow, classifier-free guidance
   over a doubled batch, as a sample set runs it) against MONAI's RFlowScheduler loop doing the
   same; target ratio >= 0.95;
3. sampling time per image: DDPM 1000 steps, DDIM 50, rectified flow 30 (guided); target:
   rectified flow 30 at least 25x faster than DDPM 1000.

    OMP_NUM_THREADS=1 python benchmarks/bench_ldm.py --threads 1 --out results/bench/ldm.json
    OMP_NUM_THREADS=1 python benchmarks/bench_ldm.py --threads 1 --latent-shape 3 10 12   # 2D demo

Model and training settings are the demo's ``ldm`` entry of config/config.yaml (or --config /
--ldm), which config/demo2d.yaml trains in 2D; the latents are random. All times are this
process's CPU time (one thread: other jobs on a shared machine then barely change them, unlike
wall time). For 1 and 2, ours and bare alternate in short runs, --repeats times, so that what drift
remains hits both alike; reported are the ratio of the medians and the median of the ratios of
adjacent (ours, bare) runs.
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
import yaml
from monai.networks.schedulers import RFlowScheduler
from snakemake.utils import validate

from medldm.data.h5layout import Header, create_latents
from medldm.diffusion import process as diffusion
from medldm.diffusion.backbones import build_diffusion_model
from medldm.diffusion.training import Trainer

REPO = Path(__file__).resolve().parent.parent
GUIDANCE, NULL_CLASS = 2.0, 2  # two classes (A, B); class 2 is the unconditional one
SAMPLERS = {"ddpm_1000": ("ddpm", "ddpm", 1000), "ddim_50": ("ddpm", "ddim", 50), "rflow_30": ("rflow", "rflow", 30)}


def ldm_settings(config_path: Path, name: str | None) -> dict:
    """The config's ldm entry (schema defaults filled); the first one when ``name`` is None."""
    config = yaml.safe_load(config_path.read_text())
    validate(config, str(REPO / "config" / "schemas" / "config.schema.yaml"))
    entries = config["ldm"]
    return entries[name or next(iter(entries))]


def write_latents(path: Path, n: int, shape, classes) -> None:
    """Random latents of ``shape`` (C, D, H, W or C, H, W: a one-voxel-thick slab's grid)."""
    rng = np.random.default_rng(0)
    grid = tuple(4 * size for size in shape[1:])
    header = Header(np.eye(4), (1,) * (3 - len(grid)) + grid, classes, [], {}, scale_factor=1.0, vae_sha256="")
    with create_latents(path, n, shape, header) as writer:
        for i in range(n):
            writer.append(f"b{i}", i % len(classes), "train", mu=rng.normal(size=shape).astype(np.float32),
                          logvar=np.full(shape, -4.0, np.float32))


def build_model(settings: dict, shape) -> torch.nn.Module:
    return build_diffusion_model(settings["model"], shape[0], 2, spatial_dims=len(shape) - 1)


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
    model = build_model(settings, x_all.shape[1:])
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


def ours_sampling(model, strategy, noise: torch.Tensor, labels: torch.Tensor, sampler: str, steps: int) -> float:
    """CPU seconds of one guided ``diffusion.sample`` run."""
    tic = time.process_time()
    diffusion.sample(model, strategy, noise, labels, sampler=sampler, steps=steps, guidance_scale=GUIDANCE,
                     null_class=NULL_CLASS)
    return time.process_time() - tic


@torch.no_grad()
def bare_sampling(model, strategy, noise: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """CPU seconds of the same guided rectified-flow run as a bare RFlowScheduler loop."""
    scheduler = RFlowScheduler(num_train_timesteps=strategy.num_train_timesteps)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    both_labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    tic = time.process_time()
    x = noise
    for t, t_next in zip(timesteps, [*timesteps[1:], 0], strict=True):
        tt = torch.full((2 * len(x),), int(t), dtype=torch.long)
        cond, uncond = model(torch.cat([x, x]), tt, class_labels=both_labels).chunk(2)
        x, _ = scheduler.step(uncond + GUIDANCE * (cond - uncond), int(t), x, int(t_next))
    return time.process_time() - tic


def sampling_rates(settings: dict, shape, batch: int, steps: int) -> tuple[float, float]:
    """(ours, bare) rectified-flow sampling steps per CPU second on a batch of ``batch`` images."""
    model = build_model(settings, shape).eval()
    strategy = diffusion.build_strategy({**settings["strategy"], "name": "rflow"})
    noise, labels = diffusion.start_noise(shape, 0, range(batch)), torch.arange(batch) % 2
    return (steps / ours_sampling(model, strategy, noise, labels, "rflow", steps),
            steps / bare_sampling(model, strategy, noise, labels, steps))


def sampler_times(settings: dict, shape, images: int) -> dict:
    """CPU seconds per image for each of SAMPLERS (guided: a doubled batch)."""
    model = build_model(settings, shape).eval()
    noise, labels = diffusion.start_noise(shape, 0, range(images)), torch.arange(images) % 2
    out = {}
    for label, (strategy_name, sampler, steps) in SAMPLERS.items():
        strategy = diffusion.build_strategy({**settings["strategy"], "name": strategy_name})
        out[label] = ours_sampling(model, strategy, noise, labels, sampler, steps) / images
        print(f"  {label}: {out[label]:.3f} CPU s per image", flush=True)
    return out


def interleaved_runs(settings: dict, shape, args) -> dict[str, list[float]]:
    """Steps/s of each loop, ours and bare alternating --repeats times."""
    runs = {"train_ours": [], "train_bare": [], "sample_ours": [], "sample_bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        latents = Path(tmp) / "latents.h5"
        write_latents(latents, 64, shape, ["A", "B"])
        x_all, y_all = torch.randn(64, *shape), torch.arange(64) % 2
        for _ in range(args.repeats):  # alternate, so load changes on a shared machine hit both
            runs["train_ours"].append(ours_training(settings, latents, args.steps, Path(tmp)))
            runs["train_bare"].append(bare_training(settings, x_all, y_all, args.steps))
            ours, bare = sampling_rates(settings, shape, args.sample_batch, args.sample_steps)
            runs["sample_ours"].append(ours)
            runs["sample_bare"].append(bare)
            print("  " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()) + " steps/s", flush=True)
    return runs


def compare(runs: dict[str, list[float]], loop: str) -> dict:
    """Ours/bare for ``loop``: the ratio of the medians and the median of adjacent runs' ratios."""
    ours, bare = np.array(runs[f"{loop}_ours"]), np.array(runs[f"{loop}_bare"])
    result = {"ours_steps_per_s": float(np.median(ours)), "bare_steps_per_s": float(np.median(bare)),
              "ratio_of_medians": float(np.median(ours) / np.median(bare)),
              "median_paired_ratio": float(np.median(ours / bare))}
    print(f"{loop}: ours/bare {result['ratio_of_medians']:.3f} (medians), {result['median_paired_ratio']:.3f} "
          "(median of adjacent runs' ratios); target >= 0.95", flush=True)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--ldm", help="ldm entry name (default: the first)")
    parser.add_argument("--latent-shape", type=int, nargs="+", default=[3, 10, 12, 10],
                        help="C D H W (3D) or C H W (2D)")
    parser.add_argument("--batch-size", type=int, help="training batch (default: the entry's)")
    parser.add_argument("--steps", type=int, default=200,
                        help="training steps per run (at 60, a run's one-off costs, ldm.pt written and the "
                             "metrics log opened, cost ours about 2 %%)")
    parser.add_argument("--sample-steps", type=int, default=10, help="rectified-flow steps per sampling run")
    parser.add_argument("--sample-batch", type=int, default=32, help="images per ours-vs-bare sampling run")
    parser.add_argument("--volumes", type=int, default=2, help="images per run of the sampler-time table")
    parser.add_argument("--repeats", type=int, default=10, help="alternating runs of each loop")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args()
    if len(args.latent_shape) not in (3, 4):
        parser.error(f"--latent-shape takes 4 sizes (C D H W) or 3 (C H W), not {len(args.latent_shape)}")
    return args


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ldm_settings(args.config, args.ldm)
    if args.batch_size:
        settings["train"]["batch_size"] = args.batch_size
    shape = tuple(args.latent_shape)
    print(f"threads {torch.get_num_threads()}, latent {shape} ({len(shape) - 1}D), model {settings['model']}, "
          f"batch {settings['train']['batch_size']}", flush=True)
    runs = interleaved_runs(settings, shape, args)
    ratios = {loop: compare(runs, loop) for loop in ("train", "sample")}
    per_image = sampler_times(settings, shape, args.volumes)
    speedup = per_image["ddpm_1000"] / per_image["rflow_30"]
    print(f"sampling: rectified flow 30 is {speedup:.1f}x faster than DDPM 1000 (target >= 25)")
    result = {"threads": torch.get_num_threads(), "latent_shape": shape, "model": settings["model"],
              "batch_size": settings["train"]["batch_size"], "sample_batch": args.sample_batch,
              "runs": runs, "training": ratios["train"], "sampling": ratios["sample"],
              "sampling_cpu_s_per_image": per_image, "rflow30_speedup_over_ddpm1000": speedup,
              "targets_met": min(r["ratio_of_medians"] for r in ratios.values()) >= 0.95 and speedup >= 25}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
