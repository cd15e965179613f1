#!/usr/bin/env python
"""Train one ControlNet on a frozen base ldm.pt and write controlnet.pt (with the base's sha256).

The base is read, never written. Checkpoints and metrics.csv go to --run-dir (not a Snakemake
output); a rerun resumes from its newest checkpoint. SIGTERM/SIGUSR1 write a checkpoint and exit
with code 75. Under torchrun (WORLD_SIZE > 1) every rank trains on its share of each batch.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from medldm.checkpoint import StopFlag
from medldm.diffusion.controlnet import ControlNetTrainer
from medldm.errors import run_cli
from medldm.runtime import setup_logging, training_device
from medldm.settings import load_settings, with_cadence


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True, help="the config's controlnet.<name> section (JSON or YAML)")
    parser.add_argument("--cadence", help="train keys that do not change the model: log_every, val_every, "
                        "checkpoint_every, compile (JSON)")
    parser.add_argument("--ldm", required=True, type=Path, help="the base ldm.pt (frozen)")
    parser.add_argument("--latents", required=True, type=Path, help="latents.h5 the base was trained on (with "
                        "the label maps or masks the controlnet's `maps` names)")
    parser.add_argument("--run-dir", required=True, type=Path, help="checkpoints and metrics")
    parser.add_argument("--out", required=True, type=Path, help="controlnet.pt to write")
    parser.add_argument("--device", default=os.environ.get("MEDLDM_DEVICE", "auto"),
                        help="auto, cpu, cuda or cuda:N (default: $MEDLDM_DEVICE, else auto)")
    args = parser.parse_args(argv)
    setup_logging()
    device = training_device(args.device)
    with StopFlag() as stop:
        settings = with_cadence(load_settings(args.settings), args.cadence)
        code = ControlNetTrainer(settings, args.ldm, args.latents, args.run_dir, args.out, device, stop).run()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    run_cli(main)
