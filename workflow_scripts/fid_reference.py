#!/usr/bin/env python
"""Inception features of the real reference volumes (one split of the prepared data), per axis.

Computed once per prepared data set and reused by every sample set's evaluation: the features
file holds every slice's features with its class, so per-class and pooled statistics (mean,
covariance) and KID follow without another Inception pass.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medldm.data import load_prepared
from medldm.errors import InputError, run_cli
from medldm.fid import SliceSpec, load_inception, read_record, slice_features
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings, name_list

log = logging.getLogger("fid_reference")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--classes", type=name_list, default="", help="comma-separated class names (config `classes`)")
    parser.add_argument("--split", default="test", help="split of the real reference set")
    parser.add_argument("--settings", required=True, help="the config's evaluate.fid section (JSON or YAML file)")
    parser.add_argument("--weights-record", required=True, help="record written by fetch_fid_weights")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", required=True, type=Path, help="features file (.npz) to write")
    args = parser.parse_args(argv)
    setup_logging()
    fid = load_settings(args.settings)
    classes = args.classes
    real = load_prepared(args.manifest, classes, with_labels=False).subset(args.split)
    if len(real) < 2:
        raise InputError(f"{args.manifest}: {len(real)} subjects in split {args.split!r}; FID needs at least 2")
    record = read_record(args.weights_record)
    device = pick_device(args.device)
    model = load_inception(fid["dims"], device, record["weights"])
    volumes = ((real.images[i, 0].numpy(), int(real.class_index[i])) for i in range(len(real)))
    features = slice_features(volumes, model, SliceSpec.from_settings(fid), device, fid["batch_size"],
                              meta={"weights_sha256": record["sha256"], "weights_source": record["source"],
                                    "split": args.split, "subject_ids": real.subject_ids,
                                    "class_names": classes, "manifest": str(args.manifest)})
    features.save(args.out)
    counts = {axis: len(f) for axis, f in features.features.items()}
    log.info("reference: %d %s volumes, slices per axis %s -> %s", len(real), args.split, counts, args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
