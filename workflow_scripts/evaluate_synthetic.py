#!/usr/bin/env python
"""Image metrics of one sample set against the real reference set: per-slice FID (and KID) on
three axes, per class and pooled, with bootstrap intervals and two floors computed the same way
(real training subjects, matched to the sample set's class counts; the autoencoder's
reconstructions of the reference subjects), and MS-SSIM among synthetic pairs and among real pairs.
Multi-channel subjects: all of it per image channel (the JSON's ``channels``, the CSV's ``channel``)."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np

from medldm.data import h5layout
from medldm.data.cohort import Rows, load_prepared
from medldm.errors import InputError, run_cli
from medldm.evaluation import diversity
from medldm.evaluation.fid import (
    SliceFeatures,
    SliceSpec,
    compare,
    load_per_channel,
    slice_features,
)
from medldm.evaluation.fid_weights import load_inception, read_record
from medldm.io import atomic_path, write_json
from medldm.provenance import provenance
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings, name_list

log = logging.getLogger("evaluate_synthetic")
FID_COLUMNS = ["compared", "group", "axis", "fid", "ci_low", "ci_high", "kid_mean", "kid_std", "n_real", "n_synthetic",
               "rank_deficient", "flag"]


def groups(class_index: np.ndarray, class_names: list[str]) -> dict[str, list[int]]:
    """Row indices of the pooled set and of each class with at least two volumes."""
    out = {"all": list(range(len(class_index)))}
    for index, name in enumerate(class_names):
        rows = np.flatnonzero(class_index == index).tolist()
        if len(rows) >= 2:
            out[name] = rows
    return out


def msssim_by_group(images, class_index, class_names, settings: dict) -> dict[str, dict]:
    return {name: diversity.summary(diversity.pairwise_msssim(
        Rows(images, rows), settings["kernel_size"], settings.get("scales"), settings["max_pairs"], settings["seed"]))
        for name, rows in groups(class_index, class_names).items()}


def class_matched_rows(pool: np.ndarray, wanted: np.ndarray, seed: int) -> np.ndarray:
    """Rows of ``pool`` (volume classes) drawn without replacement to match the class counts of
    ``wanted`` as far as the pool allows, in ascending order."""
    rng = np.random.default_rng(seed)
    rows = [rng.choice(np.flatnonzero(pool == c), min(int((wanted == c).sum()), int((pool == c).sum())), replace=False)
            for c in np.unique(wanted)]
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)


def fid_baselines(reference: SliceFeatures, synthetic: SliceFeatures, train: SliceFeatures | None,
                  reconstruction: SliceFeatures | None, compare_args: dict, seed: int) -> dict[str, dict]:
    """FID of the floors against the same reference: real training volumes (as many per class as the
    sample set has) and the autoencoder's reconstructions of the reference subjects."""
    out = {}
    if train:
        features = train.select(class_matched_rows(train.volume_class, synthetic.volume_class, seed))
        out["real_train"] = {"n_volumes": len(features.volume_class), "rows": compare(reference, features, **compare_args)}
    if reconstruction:
        out["reconstruction"] = {"n_volumes": len(reconstruction.volume_class),
                                 "rows": compare(reference, reconstruction, **compare_args)}
    return out


def per_channel_features(path: Path | None, channels: list[str]) -> dict[str, SliceFeatures]:
    """A features file's ``{channel: features}`` (empty without ``path``); its channels must be ``channels``."""
    if path is None:
        return {}
    features = load_per_channel(path)
    if list(features) != channels:
        raise InputError(f"{path}: features of channels {list(features)}, but the volumes have {channels}; "
                         "rerun fid_reference after changing image_channels")
    return features


def channel_metrics(synth_images, class_index, real_images, real_class_index, reference: dict[str, SliceFeatures],
                    floors: dict[str, SliceFeatures | None], *, model, device, batch_size: int, weights_sha256: str,
                    settings: dict, classes: list[str]) -> dict:
    """FID/KID (with floors) and MS-SSIM of one image channel of the sample set."""
    fid, msssim = settings["fid"], settings["msssim"]
    volumes = ((synth_images[i], int(class_index[i])) for i in range(len(class_index)))
    features = slice_features(volumes, model, SliceSpec.from_settings(fid), device, batch_size,
                              meta={"weights_sha256": weights_sha256})
    kid = {"subsets": fid["kid_subsets"], "subset_size": fid["kid_subset_size"], "seed": fid["seed"]} \
        if fid["kid"] else None
    compare_args = {"class_names": classes, "kid_settings": kid,
                    "bootstrap": {"replicates": fid["bootstrap"], "seed": fid["seed"]}}
    return {
        "rows": compare(reference, features, **compare_args),
        "baselines": fid_baselines(reference, features, floors["train"], floors["reconstruction"], compare_args,
                                   fid["seed"]),
        "empty_volumes": features.empty_volumes,
        "synthetic_msssim": msssim_by_group(synth_images, class_index, classes, msssim),
        "real_msssim": msssim_by_group(real_images, real_class_index, classes, msssim),
    }


def channel_result(part: dict, fid: dict, msssim: dict, record: dict, spec: dict, shape) -> dict:
    """The ``fid`` and ``msssim`` sections of the metrics JSON for one channel's ``channel_metrics``."""
    return {
        "fid": {"dims": fid["dims"], "rows": part["rows"],
                "weights": {k: record.get(k) for k in ("source", "sha256", "weights", "verified")},
                "slice_spec": spec, "bootstrap": fid["bootstrap"],
                "empty_volumes": part["empty_volumes"], "baselines": part["baselines"]},
        "msssim": {"kernel_size": msssim["kernel_size"],
                   "scale_weights": diversity.fit_msssim(shape, msssim["kernel_size"], msssim.get("scales")),
                   "synthetic": part["synthetic_msssim"], "real": part["real_msssim"]},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--volumes", required=True, type=Path, help="the sample set's volumes.h5")
    parser.add_argument("--reference", required=True, type=Path, help="real features from fid_reference")
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--classes", type=name_list, default="", help="comma-separated class names (config `classes`)")
    parser.add_argument("--split", default="test", help="split of the real reference set")
    parser.add_argument("--settings", required=True, help="the config's evaluate section (JSON or YAML file)")
    parser.add_argument("--weights-record", required=True, help="record written by fetch_fid_weights")
    parser.add_argument("--train-features", type=Path, help="features of the real training subjects (a floor)")
    parser.add_argument("--reconstruction-features", type=Path,
                        help="features of the autoencoder's reconstructions of the reference subjects (a floor)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=50, help="slices per Inception forward pass")
    parser.add_argument("--out-json", required=True, type=Path, help="metrics JSON to write")
    parser.add_argument("--out-csv", required=True, type=Path, help="FID/KID table (CSV) to write")
    args = parser.parse_args(argv)
    setup_logging()
    settings = load_settings(args.settings)
    fid, msssim = settings["fid"], settings["msssim"]
    classes = args.classes
    record = read_record(args.weights_record)
    device = pick_device(args.device)
    real = load_prepared(args.manifest, classes, with_labels=False).subset(args.split)
    with h5layout.open_volumes(args.volumes) as synth:
        if synth.header.class_names != classes:
            raise InputError(f"{args.volumes}: classes {synth.header.class_names} differ from the config's {classes}")
        channels = synth.channel_names
        reference = per_channel_features(args.reference, channels)
        floors = {"train": per_channel_features(args.train_features, channels),
                  "reconstruction": per_channel_features(args.reconstruction_features, channels)}
        model = load_inception(fid["dims"], device, record["weights"])
        parts = {name: channel_metrics(synth.channel(k), synth.class_index, real.volumes(k), real.class_index,
                                       reference[name], {f: floors[f].get(name) for f in floors}, model=model,
                                       device=device, batch_size=args.batch_size, weights_sha256=record["sha256"],
                                       settings=settings, classes=classes)
                 for k, name in enumerate(channels)}
        n_synthetic = len(synth)
    spec = reference[channels[0]].meta["slice_spec"]
    results = {name: channel_result(part, fid, msssim, record, spec, real.shape) for name, part in parts.items()}
    result = {
        **results[channels[0]],
        **({"channels": results} if len(channels) > 1 else {}),  # per channel; the top level is the first's
        "n_volumes": {"synthetic": n_synthetic, "real": len(real)},
        "real_split": args.split,
        "provenance": provenance(settings, {name: path for name, path in (
            ("volumes", args.volumes), ("reference", args.reference), ("train_features", args.train_features),
            ("reconstruction_features", args.reconstruction_features)) if path}),
    }
    write_json(args.out_json, result)
    multi = len(channels) > 1
    with atomic_path(args.out_csv) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["channel"] * multi + FID_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for name, part in parts.items():
            channel = {"channel": name} if multi else {}
            writer.writerows({**channel, "compared": "samples", **r} for r in part["rows"])
            for baseline, values in part["baselines"].items():
                writer.writerows({**channel, "compared": baseline, **r} for r in values["rows"])
    for name, part in parts.items():
        for compared, table in (("samples", part["rows"]), *((n, b["rows"]) for n, b in part["baselines"].items())):
            for row in table:
                if row["axis"] == "mean":
                    log.info("FID %s%s %s (mean of axes): %s %s", compared, f" [{name}]" * multi, row["group"],
                             row["fid"], row["flag"])
        if part["empty_volumes"]:
            log.warning("%d of %d synthetic volumes have no non-empty slice%s", part["empty_volumes"], n_synthetic,
                        f" in channel {name}" * multi)
        log.info("MS-SSIM%s synthetic %s, real %s", f" [{name}]" * multi, part["synthetic_msssim"]["all"],
                 part["real_msssim"]["all"])
    return 0


if __name__ == "__main__":
    run_cli(main)
