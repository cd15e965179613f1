#!/usr/bin/env python
"""Inception features of real volumes (one split of the prepared data), per axis; or, with
--reconstructions, of an autoencoder's reconstructions of the same subjects (the autoencoder's floor). Multi-channel subjects: features of
each image channel, in one file (``medldm.evaluation.fid.save_per_channel``).

Computed once per prepared data set (or autoencoder) and reused by every sample set's evaluation:
the features file holds every slice's features with its class and volume, so per-class and pooled
statistics, KID and bootstrap resamples follow without another Inception pass.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from medldm.data import h5layout
from medldm.data.cohort import load_prepared
from medldm.errors import InputError, run_cli
from medldm.evaluation.fid import SliceSpec, save_per_channel, slice_features
from medldm.evaluation.fid_weights import load_inception, read_record
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings, name_list

log = logging.getLogger("fid_reference")


def reconstructed_volumes(path: Path, subject_ids: list[str], class_index, split: str, channel: int = 0):
    """(volume, class) of the reconstructions of ``subject_ids`` (image ``channel``), in that order,
    read one at a time."""
    with h5layout.open_volumes(path) as recon:
        row_of = {s: i for i, s in enumerate(recon.subject_ids)}
        missing = [s for s in subject_ids if s not in row_of]
        if missing:
            raise InputError(f"{path}: no reconstruction of {split} subjects {missing[:5]}; rerun the "
                             "reconstruction (decode) rule of this autoencoder")
        for s, c in zip(subject_ids, class_index, strict=True):
            yield np.asarray(recon.channel(channel)[row_of[s]]), int(c)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--classes", type=name_list, default="", help="comma-separated class names (config `classes`)")
    parser.add_argument("--split", default="test", help="split of the real subjects")
    parser.add_argument("--reconstructions", type=Path,
                        help="volumes .h5 of an autoencoder's reconstructions: features of its rows of the split's subjects")
    parser.add_argument("--settings", required=True, help="the config's evaluate.fid section (JSON or YAML file)")
    parser.add_argument("--weights-record", required=True, help="record written by fetch_fid_weights")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=50, help="slices per Inception forward pass")
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
    per_channel = {}
    for k, name in enumerate(real.channel_names):
        if args.reconstructions:
            volumes = reconstructed_volumes(args.reconstructions, real.subject_ids, real.class_index, args.split, k)
        else:
            volumes = ((real.volume(i, k), int(real.class_index[i])) for i in range(len(real)))
        per_channel[name] = slice_features(
            volumes, model, SliceSpec.from_settings(fid), device, args.batch_size,
            meta={"weights_sha256": record["sha256"], "weights_source": record["source"],
                  "split": args.split, "subject_ids": real.subject_ids,
                  "reconstructions": str(args.reconstructions or ""),
                  "class_names": classes, "manifest": str(args.manifest)})
    save_per_channel(args.out, per_channel)
    counts = {axis: len(f) for axis, f in per_channel[real.channel_names[0]].features.items()}
    what = f"reconstructions of {args.split}" if args.reconstructions else args.split
    log.info("%d volumes (%s), slices per axis %s -> %s", len(real), what, counts, args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
