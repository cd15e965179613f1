#!/usr/bin/env python
"""Label maps of a label-map generator's sample set (volumes.h5 with ``label``) against the real
label maps of one split (test by default): the fraction of each map's voxels per label, mean and
std over the synthetic and over the real maps (their image metrics, FID and MS-SSIM, do not
apply to label maps)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medldm.data import h5layout
from medldm.data.cohort import load_prepared
from medldm.errors import InputError, run_cli
from medldm.evaluation.label_maps import fraction_summary, volume_fractions
from medldm.io import write_json
from medldm.provenance import provenance
from medldm.runtime import setup_logging
from medldm.settings import name_list

log = logging.getLogger("evaluate_label_maps")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--volumes", required=True, type=Path, help="the sample set's volumes.h5 (with label)")
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--classes", type=name_list, default="", help="comma-separated class names (config `classes`)")
    parser.add_argument("--split", default="test", help="split of the real label maps compared")
    parser.add_argument("--out", required=True, type=Path, help="label_maps.json to write")
    args = parser.parse_args(argv)
    setup_logging()
    real = load_prepared(args.manifest, args.classes).subset(args.split)
    if real.labels is None or not len(real):
        raise InputError(f"{args.manifest}: no {args.split} subjects with label maps to compare the set with")
    with h5layout.open_volumes(args.volumes) as vol:
        if vol.label is None:
            raise InputError(f"{args.volumes}: no label maps (dataset label); decode the set with its label-map "
                             "autoencoder (vae inputs: labels)")
        names = vol.header.label_names
        synthetic = volume_fractions((vol.label[i] for i in range(len(vol))), len(names))
    real_fractions = volume_fractions((real.labels[i] for i in range(len(real))), len(names))
    result = {
        "labels": names,
        "split": args.split,
        "synthetic": fraction_summary(synthetic, names),
        "real": fraction_summary(real_fractions, names),
        "provenance": provenance({"split": args.split}, {"volumes": args.volumes, "manifest": args.manifest}),
    }
    write_json(args.out, result)
    log.info("label fractions, synthetic vs real %s: %s", args.split, ", ".join(
        f"{n} {result['synthetic'][n]['mean']:.3f} vs {result['real'][n]['mean']:.3f}" for n in names))
    return 0


if __name__ == "__main__":
    run_cli(main)
