#!/usr/bin/env python
"""Write vae.pt from an already trained autoencoder (config vae.<name>.pretrained), instead of training.

The state dict is loaded strictly into the network of the entry's model section; vae.pt records
the file's sha256 and, as train_vae does, the reconstruction metrics and a montage of the
validation subjects (a few training subjects when there are none), so export_latents and every
later stage work as with a trained autoencoder.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from medldm.autoencoder import networks as ae
from medldm.autoencoder.pretrained import load_pretrained
from medldm.autoencoder.training import Trained, evaluate_reconstruction
from medldm.data.cohort import load_prepared
from medldm.errors import run_cli
from medldm.provenance import sha256_file
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings, name_list
from workflow_scripts.train_vae import write_outputs

log = logging.getLogger("import_vae")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the vae entry's name (for messages)")
    parser.add_argument("--settings", required=True, help="the config's vae.<name> section (JSON or YAML file)")
    parser.add_argument("--pretrained", required=True, type=Path, help="the state-dict file to import")
    parser.add_argument("--inference", default='{"batch_size": 1}', help="the vae's inference section (JSON)")
    parser.add_argument("--prepare", required=True, help="the config's prepare section (JSON or YAML file)")
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--classes", type=name_list, default="", help="comma-separated class names (config `classes`)")
    parser.add_argument("--labels", type=name_list, default="", help="comma-separated label names (config `labels`)")
    parser.add_argument("--montage-subjects", type=int, default=3, help="subjects in the montage")
    parser.add_argument("--out", required=True, type=Path, help="vae.pt to write")
    parser.add_argument("--montage", type=Path, help="PNG of validation reconstructions to write")
    parser.add_argument("--device", default=os.environ.get("MEDLDM_DEVICE", "auto"), help="auto, cpu, cuda or cuda:N")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    settings, prepare = load_settings(args.settings), load_settings(args.prepare)
    inference, paired = load_settings(args.inference), settings["paired_labels"]
    device = pick_device(args.device)
    data = load_prepared(args.manifest, args.classes, with_labels=paired)
    channels = ae.io_channels(paired, len(args.labels), image_channels=len(data.channel_names))
    net = load_pretrained(args.pretrained, settings["model"], channels, f"vae.{args.name}.pretrained").to(device)
    sha256 = sha256_file(args.pretrained)
    log.info("loaded %s (sha256 %s) into %s", args.pretrained, sha256, type(net).__name__)

    ae.check_grid(settings["model"], data.shape)
    shown = max(args.montage_subjects, 1)
    split = "val" if "val" in data.splits else "train"
    subjects = data.subset(split)
    if split == "train":  # no validation subjects: a few training subjects, as train_vae does
        subjects = subjects.select(list(range(min(len(subjects), shown))))
    montage = args.montage or args.out.with_name("val_montage.png")
    metrics, montage = evaluate_reconstruction(net, subjects, len(args.labels), paired, device, inference,
                                               montage, shown)
    result = Trained(net, 0, False, split, metrics, montage, {"pretrained": str(args.pretrained)})
    write_outputs(args, settings, prepare, args.classes, args.labels, data, result,
                  inputs={"pretrained": args.pretrained},
                  extra={"pretrained": {"path": str(args.pretrained), "sha256": sha256}})
    return 0


if __name__ == "__main__":
    run_cli(main)
