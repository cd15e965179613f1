#!/usr/bin/env python
"""Patch training and sliding windows on the demo: figures for issue 11, item 2.

    snakemake --cores 2 results/prepared/manifest.tsv      # the demo cohort, prepared
    python -m benchmarks.bench_patches --budget-s 300 --out results/bench/patches.json

1. Same wall time: the config's demo autoencoder trained on whole volumes and on random crops
   (``--patch``, default 24^3, foreground fraction of the config), each for ``--budget-s``
   seconds of its own training time. The two arms alternate epoch by epoch in one process on
   one thread, so a busy machine slows both alike. Each arm's epoch count (its LR schedule) is
   set from a short calibration of its step time. Test-split SSIM/PSNR of both, decoded whole
   (and the patch arm's also by windows of the patch size).
2. Seams: for each trained autoencoder, test subjects decoded by sliding windows (ROI, overlap,
   blending) against the same latents decoded whole (PSNR between the two on [0, 1]); and the
   whole windowed path (windowed encode, then windowed decode) against the whole path.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from snakemake.utils import validate

from medldm.autoencoder import networks as ae
from medldm.autoencoder.training import VAETrainer, evaluate_reconstruction
from medldm.data.cohort import load_prepared
from medldm.io import write_json
from medldm.runtime import MetricsLog

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
# (roi_size in image voxels, overlap, mode); the demo grid is 40x48x40 and downsamples by 4
WINDOWS = [(24, 0.5, "constant"), (24, 0.5, "gaussian"), (24, 0.75, "gaussian"),
           (32, 0.5, "constant"), (32, 0.5, "gaussian"), (32, 0.75, "gaussian")]


def load_config(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    validate(config, str(REPO / "config" / "schemas" / "config.schema.yaml"))  # fills defaults
    return config


def arm_settings(config: dict, vae: str, patch: list[int] | None) -> dict:
    settings = copy.deepcopy(config["vae"][vae])
    settings["train"] |= {"patch_size": patch, "val_every": 10**9, "checkpoint_every": 10**9,
                          "montage_subjects": 1}
    return settings


def step_seconds(trainer: VAETrainer, images: torch.Tensor, steps: int = 3) -> float:
    trainer.train_step(images, None)  # warm-up
    tic = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(images, None)
    return (time.perf_counter() - tic) / steps


def train_alternating(arms: dict, train, val, budget: float, root: Path) -> dict:
    """Calibrate, then train the arms epoch by epoch in turn, each to ``budget`` seconds."""
    batch = next(iter(arms.values()))["train"]["batch_size"]
    per_epoch = -(-len(train) // batch)
    images = train.images[:batch]
    calib = {}
    for name, settings in arms.items():
        calib[name] = step_seconds(VAETrainer(settings, train, val, root / f"calib-{name}", 0, CPU), images)
    trainers, spent = {}, {}
    for name, settings in arms.items():
        settings["train"]["epochs"] = max(1, int(budget / (calib[name] * per_epoch)))
        trainers[name] = VAETrainer(settings, train, val, root / name, 0, CPU)
        trainers[name].metrics = MetricsLog(root / name)
        spent[name] = 0.0
    while True:
        active = [n for n, t in trainers.items() if t.epoch < t.train_cfg["epochs"] and spent[n] < budget]
        if not active:
            break
        for name in active:
            tic = time.perf_counter()
            trainers[name].train_epoch()
            spent[name] += time.perf_counter() - tic
            print(f"{name}: epoch {trainers[name].epoch}/{trainers[name].train_cfg['epochs']}, "
                  f"{spent[name]:.0f} s", file=sys.stderr, flush=True)
    for trainer in trainers.values():
        trainer.metrics.close()
    return {name: {"model": t.net, "epochs_planned": t.train_cfg["epochs"], "epochs_done": t.epoch,
                   "steps": t.step, "train_seconds": spent[name], "calibrated_step_s": calib[name]}
            for name, t in trainers.items()}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of ``a`` against ``b`` on [0, 1] (infinite when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def decoded(net, latents: np.ndarray, inference: dict) -> np.ndarray:
    return np.concatenate([image for _, image, _ in ae.decode_set(net, latents, {"batch_size": 4, **inference},
                                                                   CPU, progress=False)])


def encoded(net, images: torch.Tensor, inference: dict) -> np.ndarray:
    return np.concatenate([mu for _, mu, _ in ae.encode_set(net, images, None, 0, CPU, {"batch_size": 4, **inference},
                                                            progress=False)])


def seams(net, test, subjects: int) -> list[dict]:
    """Per window setting: PSNR (mean and worst subject) of windowed decode vs whole decode of
    the same latents, and of the windowed path vs the whole path."""
    net.eval()
    test = test.select(list(range(min(subjects, len(test)))))
    mu = encoded(net, test.images, {})
    whole = decoded(net, mu, {})
    rows = []
    for roi, overlap, mode in WINDOWS:
        inference = {"roi_size": [roi] * 3, "overlap": overlap, "mode": mode}
        tic = time.perf_counter()
        windowed = decoded(net, mu, inference)
        seconds = time.perf_counter() - tic
        path = decoded(net, encoded(net, test.images, inference), inference)
        per = [psnr(w, v) for w, v in zip(windowed, whole, strict=True)]
        per_path = [psnr(w, v) for w, v in zip(path, whole, strict=True)]
        rows.append({"roi_size": roi, "overlap": overlap, "mode": mode, "decode_psnr_mean": float(np.mean(per)),
                     "decode_psnr_min": float(np.min(per)), "path_psnr_mean": float(np.mean(per_path)),
                     "path_psnr_min": float(np.min(per_path)), "decode_s": seconds})
        print(f"seams roi {roi} overlap {overlap} {mode}: decode {np.mean(per):.1f} dB "
              f"(min {np.min(per):.1f}), encode+decode {np.mean(per_path):.1f} dB", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--manifest", type=Path, default=Path("results/prepared/manifest.tsv"))
    parser.add_argument("--vae", default="demo", help="the config's vae entry")
    parser.add_argument("--patch", type=int, nargs=3, default=[24, 24, 24], help="crop size of the patch arm")
    parser.add_argument("--budget-s", type=float, default=300, help="training seconds per arm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seam-subjects", type=int, default=4, help="test subjects in the seam figures")
    parser.add_argument("--out", type=Path, required=True, help="JSON of the figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(args.config)
    data = load_prepared(args.manifest, config["classes"], with_labels=False)
    train, val, test = data.subset("train"), data.subset("val"), data.subset("test")
    arms = {"whole": arm_settings(config, args.vae, None), "patch": arm_settings(config, args.vae, args.patch)}
    with tempfile.TemporaryDirectory() as tmp:
        trained = train_alternating(arms, train, val, args.budget_s, Path(tmp))
    report = {"shape": list(data.shape), "train": len(train), "test": len(test), "threads": args.threads,
              "budget_s": args.budget_s, "patch": args.patch, "load_average": os.getloadavg(), "arms": {}}
    for name, arm in trained.items():
        net = arm.pop("model")
        scores, _ = evaluate_reconstruction(net, test, 0, False, CPU, {"batch_size": 4})
        arm["test_whole_decode"] = scores
        if name == "patch":
            windows = {"batch_size": 4, "roi_size": args.patch, "overlap": 0.5, "mode": "gaussian"}
            arm["test_windows_of_the_patch"] = evaluate_reconstruction(net, test, 0, False, CPU, windows)[0]
        arm["seams"] = seams(net, test, args.seam_subjects)
        report["arms"][name] = arm
        print(name, {k: v for k, v in arm.items() if k != "seams"}, file=sys.stderr, flush=True)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
