#!/usr/bin/env python
"""Train one latent diffusion model on an autoencoder's latents and write ldm.pt.

Checkpoints, metrics.csv, TensorBoard logs and live-sample montages go to --run-dir (not a
Snakemake output); a rerun resumes from its newest checkpoint. SIGTERM/SIGUSR1 write a checkpoint and exit with code 75.
Under torchrun (WORLD_SIZE > 1) every rank trains on its share of each batch; rank 0 writes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from medldm.checkpoint import StopFlag
from medldm.diffusion.training import Trainer
from medldm.errors import run_cli
from medldm.runtime import setup_logging, training_device
from medldm.settings import load_settings, with_cadence


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True, help="the config's ldm.<name> section (JSON or YAML file)")
    parser.add_argument("--cadence", help="train keys that do not change the model: log_every, val_every, "
                        "checkpoint_every, compile, sample_every, sample_volumes, sample_steps (JSON)")
    parser.add_argument("--latents", required=True, type=Path, help="latents.h5 from export_latents")
    parser.add_argument("--vae", type=Path, help="the vae.pt that wrote the latents (its sha256 is checked; "
                        "it decodes the live samples of train.sample_every)")
    parser.add_argument("--decoding", help="the vae's inference section (JSON or YAML file), for the live samples")
    parser.add_argument("--init", type=Path, help="ldm.pt whose weights start this run (the config's init_from)")
    parser.add_argument("--run-dir", required=True, type=Path, help="checkpoints and metrics")
    parser.add_argument("--out", required=True, type=Path, help="ldm.pt to write")
    parser.add_argument("--device", default=os.environ.get("MEDLDM_DEVICE", "auto"),
                        help="auto, cpu, cuda or cuda:N (default: $MEDLDM_DEVICE, which the workflow "
                        "sets from config cluster.device, else auto)")
    args = parser.parse_args(argv)
    setup_logging()
    device = training_device(args.device)
    with StopFlag() as stop:
        settings = with_cadence(load_settings(args.settings), args.cadence)
        decoding = load_settings(args.decoding) if args.decoding else None
        trainer = Trainer(settings, args.latents, args.vae, args.run_dir, args.out, device, stop, decoding=decoding,
                          init_path=args.init)
        code = trainer.run()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    run_cli(main)
