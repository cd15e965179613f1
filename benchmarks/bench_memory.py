#!/usr/bin/env python
"""Peak memory and throughput of the stages that read a whole cohort, at two cohort sizes.

Writes a synthetic prepared cohort (manifest, NIfTI volumes, 80/10/10 train/val/test) of each
size in --n, a ``vae.pt`` of the config's autoencoder (untrained: memory and speed do not depend
on the weights) and a volumes .h5 of "reconstructions" (the volumes plus noise), then runs each
stage in a fresh child process and reports that process's peak resident memory (VmHWM) and its
throughput (imports and the synthetic inputs are outside the timer). DataLoader workers are not
counted: they are forked copies that share the parent's pages and hold a batch or two each.

- ``train_vae``: VAETrainer for --steps optimiser steps (then one validation pass), streaming
  from disk with the entry's ``train.workers`` (override with --workers) and ``train.cache_mb``;
- ``export_latents``: encodes every subject into latents.h5;
- ``evaluate_reconstruction``: SSIM/PSNR of the train split's "reconstructions" (the stage that
  reads a cohort of decoded volumes beside the prepared ones).

    PYTHONPATH=. python benchmarks/bench_memory.py --shape 48 48 48 --n 40 400 --out results/bench/memory.json

Run with PYTHONPATH pointing at the checkout to measure (the venv may import another one); the
result records which medldm was measured. The ratio of peak RSS at the largest to the smallest
cohort, per stage, is the figure of merit (target <= 1.25); throughput is indicative on a shared
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
STAGES = ("train_vae", "export_latents", "evaluate_reconstruction")
CLASSES = ["A", "B"]


def vae_settings(config_path: Path, name: str | None) -> dict:
    """The config's vae entry (schema defaults filled); the first one when ``name`` is None."""
    import yaml
    from snakemake.utils import validate

    import medldm

    config = yaml.safe_load(config_path.read_text())
    validate(config, str(Path(medldm.__file__).parent.parent / "config" / "schemas" / "config.schema.yaml"))
    entries = config["vae"]
    settings = entries[name or next(iter(entries))]
    return {**settings, "paired_labels": False}


def write_cohort(root: Path, n: int, shape, seed: int = 0) -> Path:
    """``n`` random volumes of ``shape`` as a prepared cohort under ``root``; returns the manifest."""
    from medldm.io import save_nifti

    rng = np.random.default_rng(seed)
    rows, affine = [], np.diag([1.0, 1.0, 1.0, 1.0])
    for i in range(n):
        sid = f"s{i:05d}"
        image = root / sid / "image.nii.gz"
        save_nifti(image, rng.random(shape, dtype=np.float32), affine)
        split = "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test")
        rows.append({"subject_id": sid, "class": CLASSES[i % 2], "split": split, "image": str(image), "label": "",
                     "shape": "x".join(map(str, shape)), "spacing": "1x1x1", "p_low": "0", "p_high": "1"})
    manifest = root / "manifest.tsv"
    pd.DataFrame(rows).to_csv(manifest, sep="\t", index=False)
    return manifest


def write_vae(path: Path, settings: dict, shape) -> None:
    """vae.pt of an untrained autoencoder of ``settings`` on grid ``shape``."""
    from medldm.autoencoder import networks as ae

    net = ae.build_autoencoder(settings["model"], 1)
    factor = ae.downsampling(settings["model"])
    ae.save_vae(path, net, {
        "settings": settings, "channels": 1, "classes": CLASSES, "labels": [], "prepare": {},
        "grid_affine": np.eye(4), "grid_shape": list(shape),
        "latent_shape": [settings["model"]["latent_channels"], *(s // factor for s in shape)],
    })


def write_reconstructions(path: Path, manifest: Path, shape) -> None:
    """A volumes .h5 with every subject's volume plus noise, as a decode rule would write it."""
    import nibabel as nib

    from medldm.data import h5layout

    table = pd.read_csv(manifest, sep="\t")
    rng = np.random.default_rng(1)
    header = h5layout.Header(grid_affine=np.eye(4), grid_shape=tuple(shape), class_names=CLASSES)
    with h5layout.create_volumes(path, len(table), header) as writer:
        for _, row in table.iterrows():
            image = np.asarray(nib.load(row["image"]).dataobj, dtype=np.float32)
            noisy = np.clip(image + rng.normal(0, 0.05, image.shape).astype(np.float32), 0, 1)
            writer.append(row["subject_id"], CLASSES.index(row["class"]), row["split"], image=noisy)


class StopAfter:
    """Stop flag: true once the trainer has done ``steps`` steps."""

    def __init__(self, steps: int):
        self.steps, self.trainer = steps, None

    def __bool__(self) -> bool:
        return self.trainer.step >= self.steps


def run_stage(stage: str, work: Path, settings: dict, steps: int) -> dict:
    """Run one stage in this process; returns {items, seconds}."""
    import torch

    manifest, vae, recon = work / "cohort" / "manifest.tsv", work / "vae.pt", work / "reconstructions.h5"
    if stage == "train_vae":
        from medldm.autoencoder.training import VAETrainer
        from medldm.data.cohort import load_prepared

        data = load_prepared(manifest, CLASSES, with_labels=False)
        stop = StopAfter(steps)
        trainer = VAETrainer(settings, data.subset("train"), data.subset("val"), work / "run", 0,
                             torch.device("cpu"), stop)
        stop.trainer = trainer
        tic = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - tic
        trainer.validate(1)
        return {"items": steps * settings["train"]["batch_size"], "seconds": seconds,
                "unit": "training volumes (steps x batch) per second"}
    if stage == "export_latents":
        from workflow_scripts import export_latents

        tic = time.perf_counter()
        export_latents.main(["--vae", str(vae), "--manifest", str(manifest), "--out", str(work / "latents.h5"),
                             "--settings", json.dumps(settings["inference"]), "--device", "cpu"])
        n = len(pd.read_csv(manifest, sep="\t"))
    else:
        from workflow_scripts import evaluate_reconstruction

        tic = time.perf_counter()
        evaluate_reconstruction.main(["--reconstructions", str(recon), "--manifest", str(manifest),
                                      "--classes", ",".join(CLASSES), "--split", "train", "--settings", "{}",
                                      "--out", str(work / "reconstruction.json")])
        n = int((pd.read_csv(manifest, sep="\t")["split"] == "train").sum())
    return {"items": n, "seconds": time.perf_counter() - tic, "unit": "volumes per second"}


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> int:
    """``--stage``: run it and print one JSON line of its figures."""
    import torch

    torch.set_num_threads(args.threads)
    settings = json.loads(Path(args.work, "settings.json").read_text())
    result = run_stage(args.stage, Path(args.work), settings, args.steps)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))
    return 0


def measure(stage: str, work: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--work", str(work), "--steps", str(args.steps),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["per_s"] = result["items"] / result["seconds"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[40, 400], help="cohort sizes")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96])
    parser.add_argument("--steps", type=int, default=2, help="train_vae optimiser steps")
    parser.add_argument("--workers", type=int, help="train.workers (default: the config's)")
    parser.add_argument("--cache-mb", type=float, help="train.cache_mb (default: the config's)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--vae", help="vae entry of the config (default: the first)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per stage")
    parser.add_argument("--workdir", type=Path, help="where cohorts are written (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="JSON file for the figures")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return child(args)

    import medldm
    from medldm.io import write_json

    settings = vae_settings(args.config, args.vae)
    for key, value in (("workers", args.workers), ("cache_mb", args.cache_mb)):
        if value is not None:
            settings["train"][key] = value
    settings["train"] |= {"epochs": 10**6, "val_every": 10**6, "checkpoint_every": 10**6, "montage_subjects": 1}
    result = {"medldm": str(Path(medldm.__file__).parent), "shape": args.shape, "steps": args.steps,
              "threads": args.threads, "workers": settings["train"].get("workers"),
              "cache_mb": settings["train"].get("cache_mb"), "stages": {}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.n:
            work = Path(tmp) / f"n{n}"
            manifest = write_cohort(work / "cohort", n, args.shape)
            (work / "settings.json").write_text(json.dumps(settings))
            write_vae(work / "vae.pt", settings, args.shape)
            write_reconstructions(work / "reconstructions.h5", manifest, args.shape)
            for stage in args.stages:
                figures = measure(stage, work, args)
                result["stages"].setdefault(stage, {})[str(n)] = figures
                print(f"N={n} {stage}: peak RSS {figures['peak_rss_mb']:.0f} MB, {figures['per_s']:.2f} "
                      f"{figures['unit']}", file=sys.stderr)
    small, large = str(min(args.n)), str(max(args.n))
    for by_n in result["stages"].values():
        by_n["rss_ratio"] = by_n[large]["peak_rss_mb"] / by_n[small]["peak_rss_mb"]
        by_n["rss_growth_mb"] = by_n[large]["peak_rss_mb"] - by_n[small]["peak_rss_mb"]
    result["pass"] = all(by_n["rss_ratio"] <= 1.25 for by_n in result["stages"].values())
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
