#!/usr/bin/env python
"""Autoencoder training throughput (volumes per second) of ``train_vae``'s loop
(``medldm.autoencoder.training.VAETrainer``: subjects streamed from their NIfTI files through its
DataLoader, exact-resume batching, stop-flag polling, clipping, loss bookkeeping, progress bar)
against a bare MONAI loop over the same volumes held in memory (DataLoader over a tensor, forward,
L1 + KL, AdamW step) on the same AutoencoderKL and batch size, in one run. Target ratio >= 0.95.

    python benchmarks/bench_vae.py --out results/bench/vae.json

The model and training settings are the demo's ``vae`` entry of config/config.yaml (or --config /
--vae); the volumes are random, of --shape, written as a prepared cohort for ours (the config's
``train.workers`` and ``train.cache_mb``, or --workers / --cache-mb). Rounds alternate ours and bare, so a load change on a
shared machine hits both; each side's throughput is the median over its epochs after the first.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from monai.data import DataLoader
from snakemake.utils import validate
from torch.utils.data import TensorDataset

from medldm.autoencoder import networks as ae
from medldm.autoencoder.training import VAETrainer
from medldm.data.cohort import PreparedSet, load_prepared
from medldm.io import save_nifti, write_json
from medldm.runtime import memory_format

REPO = Path(__file__).resolve().parent.parent


def vae_settings(config_path: Path, name: str | None) -> dict:
    """The config's vae entry (schema defaults filled); the first one when ``name`` is None."""
    config = yaml.safe_load(config_path.read_text())
    validate(config, str(REPO / "config" / "schemas" / "config.schema.yaml"))
    entries = config["vae"]
    return entries[name or next(iter(entries))]


def write_cohort(root: Path, images: torch.Tensor) -> Path:
    """``images`` (N, 1, X, Y, Z) as a prepared cohort (NIfTI files, all train) under ``root``."""
    rows = []
    for i, image in enumerate(images):
        path = root / f"b{i:04d}.nii.gz"
        save_nifti(path, image[0].numpy(), np.eye(4))
        rows.append({"subject_id": f"b{i:04d}", "class": "", "split": "train", "image": str(path), "label": "",
                     "shape": "x".join(map(str, image.shape[1:])), "spacing": "1x1x1", "p_low": "0", "p_high": "1"})
    pd.DataFrame(rows).to_csv(root / "manifest.tsv", sep="\t", index=False)
    return root / "manifest.tsv"


def ours(settings: dict, data: PreparedSet, epochs: int, workdir: Path) -> list[float]:
    """Volumes per second of each epoch of VAETrainer (its own timer spans every step of the epoch)."""
    train = {**settings["train"], "epochs": epochs, "val_every": 10**9, "checkpoint_every": 10**9,
             "montage_subjects": 0}
    cfg = {**settings, "paired_labels": False, "train": train}
    VAETrainer(cfg, data, data.subset("val"), workdir, 0, torch.device("cpu")).run()
    with open(workdir / "metrics.csv") as fh:
        return [float(row["train/volumes_per_s"]) for row in csv.DictReader(fh)]


def bare(settings: dict, images: torch.Tensor, epochs: int) -> list[float]:
    """The MONAI tutorial loop on the same model, data and batch size."""
    torch.manual_seed(settings["train"]["seed"])
    layout = memory_format(torch.device("cpu"))  # the same layout as our loop
    model = ae.build_autoencoder(settings["model"], 1).to(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["train"]["lr"])
    loader = DataLoader(TensorDataset(images), batch_size=settings["train"]["batch_size"], shuffle=True)
    rates = []
    for _ in range(epochs):
        tic, count = time.perf_counter(), 0
        for (x,) in loader:
            recon, mu, sigma = model(x.contiguous(memory_format=layout))
            loss = torch.nn.functional.l1_loss(recon, x) + settings["loss"]["kl_weight"] * ae.kl_loss(mu, sigma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            count += len(x)
            loss.item()
        rates.append(count / (time.perf_counter() - tic))
    return rates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--vae", help="vae entry of the config (default: the first)")
    parser.add_argument("--shape", type=int, nargs=3, default=[40, 48, 40])
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="per side and round; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=4, help="fewer (16 volumes x 2 rounds) gave ratios 0.95-1.01")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--workers", type=int, help="train.workers of ours (default: the config's)")
    parser.add_argument("--cache-mb", type=float, help="train.cache_mb of ours (default: the config's)")
    parser.add_argument("--out", type=Path, help="JSON file for the figures")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = vae_settings(args.config, args.vae)
    for key, value in (("workers", args.workers), ("cache_mb", args.cache_mb)):
        if value is not None:
            settings["train"][key] = value
    images = torch.from_numpy(np.random.default_rng(0).random((args.volumes, 1, *args.shape), dtype=np.float32))
    ours_rates, bare_rates = [], []
    with tempfile.TemporaryDirectory() as cohort:
        data = load_prepared(write_cohort(Path(cohort), images), [], with_labels=False)
        for r in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                ours_rates += ours(settings, data, args.epochs, Path(tmp) / "run")[1:]
            bare_rates += bare(settings, images, args.epochs)[1:]
            print(f"round {r + 1}: ours {ours_rates[-1]:.3f} vol/s, bare {bare_rates[-1]:.3f} vol/s", file=sys.stderr)
    result = {
        "model_channels": settings["model"]["channels"], "shape": args.shape,
        "batch_size": settings["train"]["batch_size"], "threads": torch.get_num_threads(),
        "workers": settings["train"]["workers"], "cache_mb": settings["train"]["cache_mb"],
        "ours_volumes_per_s": statistics.median(ours_rates), "bare_volumes_per_s": statistics.median(bare_rates),
    }
    result["ratio"] = result["ours_volumes_per_s"] / result["bare_volumes_per_s"]
    result["pass"] = result["ratio"] >= 0.95
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
