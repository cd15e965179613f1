#!/usr/bin/env python
"""Fidelity of an autoencoder: SSIM and PSNR of its reconstructions of the real subjects of one
split (test by default), matched to the prepared volumes by subject id; per image channel for
multi-channel subjects (the JSON's ``channels``; its top level is the first channel's); for a
label-map autoencoder (reconstructions with label maps and no image) the Dice of each foreground
label instead."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from medldm.data import h5layout
from medldm.data.cohort import Rows, load_prepared
from medldm.errors import InputError, run_cli
from medldm.evaluation import diversity
from medldm.evaluation.label_maps import dice_per_label
from medldm.io import write_json
from medldm.provenance import provenance
from medldm.runtime import setup_logging
from medldm.settings import load_settings, name_list

log = logging.getLogger("evaluate_reconstruction")


def matched_rows(args, recon: h5layout.H5File, real) -> dict[str, int]:
    """{subject id: row of its reconstruction}; every real subject of the split must have one."""
    row_of = {s: i for i, s in enumerate(recon.subject_ids)}
    missing = [s for s in real.subject_ids if s not in row_of]
    if missing:
        raise InputError(f"{args.reconstructions}: no reconstruction of {args.split} subjects {missing[:5]}; "
                         "rerun the reconstruction (decode) rule of this autoencoder")
    return row_of


def label_reconstruction(args, recon: h5layout.H5File, settings) -> int:
    """Dice per foreground label of a label-map autoencoder's reconstructions of the split."""
    real = load_prepared(args.manifest, args.classes).subset(args.split)
    if real.labels is None:
        raise InputError(f"{args.manifest}: no label maps to score the label reconstructions of {args.reconstructions}")
    row_of, names = matched_rows(args, recon, real), recon.header.label_names
    dice = np.array([dice_per_label(recon.label[row_of[s]], real.labels[i].numpy(), len(names))
                     for i, s in enumerate(real.subject_ids)]).reshape(len(real), len(names) - 1)
    result = {
        "split": args.split,
        "n": len(real),
        "labels": names,
        "dice": diversity.summary(np.nanmean(dice, 1)),
        "dice_per_label": {n: diversity.summary(dice[:, i][~np.isnan(dice[:, i])]) for i, n in enumerate(names[1:])},
        "subjects": [{"subject_id": s, **{n: float(d) for n, d in zip(names[1:], row, strict=True)}}
                     for s, row in zip(real.subject_ids, dice, strict=True)],
        "provenance": provenance(settings, {"reconstructions": args.reconstructions}),
    }
    write_json(args.out, result)
    log.info("label reconstruction of %d %s subjects: Dice %s", len(real), args.split,
             ", ".join(f"{n} {v['mean']:.3f}" for n, v in result["dice_per_label"].items()))
    return 0
def channel_metrics(real_images, recon_images, subject_ids: list[str]) -> dict:
    """SSIM and PSNR (summaries and per subject) of one image channel."""
    values = diversity.reconstruction_metrics(real_images, recon_images)  # one pair read at a time
    return {
        "ssim": diversity.summary(values["ssim"]),
        "psnr": diversity.summary(values["psnr"]),
        "subjects": [{"subject_id": s, "ssim": float(a), "psnr": float(b)}
                     for s, a, b in zip(subject_ids, values["ssim"], values["psnr"], strict=True)],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reconstructions", required=True, type=Path, help="the autoencoder's reconstructions (volumes .h5)")
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--classes", type=name_list, default="", help="comma-separated class names (config `classes`)")
    parser.add_argument("--split", default="test", help="split whose reconstructions are scored")
    parser.add_argument("--settings", required=True, help="the config's evaluate.msssim section (JSON or YAML file)")
    parser.add_argument("--out", required=True, type=Path, help="metrics JSON to write")
    args = parser.parse_args(argv)
    setup_logging()
    settings = load_settings(args.settings)
    classes = args.classes
    with h5layout.open_volumes(args.reconstructions) as recon:
        if recon.image is None:  # a label-map autoencoder's
            return label_reconstruction(args, recon, settings)
        real = load_prepared(args.manifest, classes, with_labels=False).subset(args.split)
        rows = [matched_rows(args, recon, real)[s] for s in real.subject_ids]
        per_channel = {name: channel_metrics(real.volumes(k), Rows(recon.channel(k), rows), real.subject_ids)
                       for k, name in enumerate(recon.channel_names)}
    first = next(iter(per_channel.values()))
    result = {
        "split": args.split,
        "n": len(real),
        **first,
        **({"channels": per_channel} if len(per_channel) > 1 else {}),
        "provenance": provenance(settings, {"reconstructions": args.reconstructions}),
    }
    write_json(args.out, result)
    log.info("reconstruction of %d %s subjects: SSIM %.4f, PSNR %.2f dB", len(real), args.split,
             result["ssim"]["mean"], result["psnr"]["mean"])
    return 0


if __name__ == "__main__":
    run_cli(main)
