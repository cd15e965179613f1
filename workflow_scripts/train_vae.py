#!/usr/bin/env python
"""Train one autoencoder on the prepared subjects and write vae.pt.

Checkpoints, metrics.csv, TensorBoard logs and montages go to --run-dir (not a Snakemake
output); a rerun resumes from its newest checkpoint. SIGTERM/SIGUSR1 write a checkpoint and exit
with code 75. Under torchrun (WORLD_SIZE > 1) every rank trains a shard; rank 0 writes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

import torch

from medldm.autoencoder import networks as ae
from medldm.autoencoder.training import VAETrainer
from medldm.checkpoint import StopFlag, claim_run_dir
from medldm.data.cohort import load_prepared
from medldm.errors import EXIT_INTERRUPTED, run_cli
from medldm.io import atomic_path
from medldm.provenance import config_hash, provenance, sha256_file
from medldm.runtime import init_distributed, is_main_process, setup_logging, training_device
from medldm.settings import load_settings, name_list, with_cadence

log = logging.getLogger("train_vae")
# Settings that may change without invalidating a run's checkpoints (more epochs resume it).
# patience too: a run stopped early continues when it grows (the selection state is in its checkpoints).
_RESUMABLE = ("epochs", "val_every", "checkpoint_every", "montage_subjects", "patience", "workers", "cache_mb")


def run_key(settings: dict, manifest: Path, classes: list[str], labels: list[str]) -> str:
    """Identity of a training run: settings (bar the resumable ones), data, classes, labels."""
    train = {k: v for k, v in settings["train"].items() if k not in _RESUMABLE}
    stable = {**settings, "train": train, "inference": None}
    return config_hash({"settings": stable, "manifest": sha256_file(manifest), "classes": classes, "labels": labels})


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True, help="the config's vae.<name> section (JSON or YAML file)")
    parser.add_argument("--cadence", help="train keys that do not change the model: val_every, checkpoint_every (JSON)")
    parser.add_argument("--inference", help="the vae's inference section: how validation encodes and decodes "
                        "(sliding windows or whole volumes; JSON); default whole volumes")
    parser.add_argument("--prepare", required=True, help="the config's prepare section (JSON or YAML file)")
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--classes", type=name_list, default="", help="comma-separated class names (config `classes`)")
    parser.add_argument("--labels", type=name_list, default="", help="comma-separated label names (config `labels`)")
    parser.add_argument("--run-dir", required=True, type=Path, help="checkpoints, metrics, montages")
    parser.add_argument("--out", required=True, type=Path, help="vae.pt to write")
    parser.add_argument("--montage", type=Path, help="PNG of validation reconstructions to write")
    parser.add_argument("--device", default=os.environ.get("MEDLDM_DEVICE", "auto"),
                        help="auto, cpu, cuda or cuda:N (default: $MEDLDM_DEVICE, which the workflow "
                        "sets from config cluster.device, else auto)")
    return parser.parse_args(argv)


def write_outputs(args, settings, prepare, classes, labels, data, result, inputs=None, extra=None) -> None:
    """vae.pt (weights, architecture, preparation, grid, provenance) and the montage; ``inputs``:
    more files to hash into the provenance, ``extra``: more vae.pt entries (import_vae uses both)."""
    split, montage, metrics = result.eval_split, result.montage, result.val_metrics
    factor = ae.downsampling(settings["model"])
    ae.save_vae(args.out, result.model, {
        "settings": settings,
        "channels": ae.io_channels(settings["paired_labels"], len(labels), only_labels=ae.labels_only(settings),
                                   image_channels=len(data.channel_names)),
        "image_channels": data.channel_names,
        "classes": classes,
        "labels": labels,
        "prepare": prepare,
        "grid_affine": data.affine,
        "grid_shape": list(data.shape),
        "latent_shape": [settings["model"]["latent_channels"], *(s // factor for s in data.shape)],
        "epochs": result.epochs_done,
        "recon_metrics": {"split": split, **metrics},
        "selection": result.selection,
        "provenance": provenance({"vae": settings, "prepare": prepare}, {"manifest": args.manifest, **(inputs or {})}),
        **(extra or {}),
    })
    if args.montage and Path(montage) != args.montage:
        with atomic_path(args.montage) as tmp:
            shutil.copyfile(montage, tmp)
    chosen = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.selection.items())
    log.info("wrote %s (selection: %s; %s reconstruction: %s)", args.out, chosen, split,
             ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    _, world = init_distributed()
    device = training_device(args.device)
    settings, prepare = with_cadence(load_settings(args.settings), args.cadence), load_settings(args.prepare)
    classes = args.classes
    labels = args.labels

    data = load_prepared(args.manifest, classes, with_labels=settings["paired_labels"] or ae.labels_only(settings))
    ae.check_grid(settings["model"], data.shape)
    train, val = data.subset("train"), data.subset("val")
    log.info("%d train / %d val subjects of shape %s on %s (world size %d)",
             len(train), len(val), data.shape, device, world)
    if is_main_process():
        claim_run_dir(args.run_dir, run_key(settings, args.manifest, classes, labels))
    if world > 1:
        torch.distributed.barrier()

    with StopFlag() as stop:
        inference = load_settings(args.inference) if args.inference else None
        trainer = VAETrainer(settings, train, val, args.run_dir, len(labels), device, stop, inference)
        result = trainer.run()
    if result.interrupted:
        log.warning("stopped by signal after %d epochs; checkpoint written, rerun to resume", result.epochs_done)
        return EXIT_INTERRUPTED
    if is_main_process():
        write_outputs(args, settings, prepare, classes, labels, data, result)
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_cli(main)
