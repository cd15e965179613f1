#!/usr/bin/env python
"""Train on synthetic, test on real: one 3D classifier per arm (real training subjects; the sample
set's synthetic volumes; both), each tested on the real test subjects, with bootstrap 95 %
intervals. Optionally Grad-CAM maps of a few test subjects as a PNG."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np

from medldm import h5layout
from medldm.classifier import ARMS, METRICS, Dataset, gradcam, run_arms
from medldm.data import load_prepared
from medldm.errors import InputError, run_cli
from medldm.io import atomic_path, write_json
from medldm.montage import save_montage
from medldm.provenance import provenance
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings, name_list

log = logging.getLogger("evaluate_classifier")


def synthetic_set(path: Path, classes: list[str]) -> Dataset:
    with h5layout.open_volumes(path) as synth:
        if synth.header.class_names != classes:
            raise InputError(f"{path}: classes {synth.header.class_names} differ from the config's {classes}")
        keep = np.flatnonzero(synth.class_index >= 0)
        return Dataset(np.stack([synth.image[i] for i in keep]).astype(np.float32), synth.class_index[keep])


def saliency_rows(labels: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` test rows, taking the classes in turn (first of each class, then second...)."""
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    picks = [rows[i] for i in range(max(map(len, per_class))) for rows in per_class if i < len(rows)]
    return np.array(picks[:count], dtype=np.int64)


def write_csv(path: Path, arms: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["arm", "metric", "value", "ci_low", "ci_high", "n_train", "n_test"])
        for arm, result in arms.items():
            for metric in METRICS:
                m = result["metrics"][metric]
                writer.writerow([arm, metric, m["value"], m["ci_low"], m["ci_high"], result["n_train"],
                                 len(result["probabilities"])])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--volumes", required=True, type=Path, help="the sample set's synthetic.h5")
    parser.add_argument("--classes", type=name_list, required=True, help="comma-separated class names (config `classes`)")
    parser.add_argument("--settings", required=True, help="the config's evaluate.classifier section (JSON or YAML)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out-json", required=True, type=Path, help="metrics JSON to write")
    parser.add_argument("--out-csv", required=True, type=Path, help="metrics table (CSV) to write")
    parser.add_argument("--saliency", type=Path, help="PNG of Grad-CAM maps of a few test subjects")
    args = parser.parse_args(argv)
    setup_logging()
    settings = load_settings(args.settings)
    classes = args.classes
    if len(classes) < 2:
        raise InputError("the classifier evaluation needs at least two `classes` in the config")
    prepared = load_prepared(args.manifest, classes, with_labels=False)
    real = {split: prepared.subset(split) for split in ("train", "test")}
    real = {k: Dataset(v.images[:, 0].numpy(), v.class_index) for k, v in real.items()}
    synthetic = synthetic_set(args.volumes, classes)
    arms = dict(zip(ARMS, (real["train"], synthetic, Dataset.concat(real["train"], synthetic)), strict=True))
    device = pick_device(args.device)
    results, models = run_arms(arms, real["test"], settings, len(classes), device)
    test_ids = prepared.subset("test").subject_ids
    write_json(args.out_json, {
        "classes": classes, "n_test": len(real["test"]), "test_subjects": test_ids,
        "test_labels": real["test"].labels.tolist(), "arms": results, "settings": settings,
        "provenance": provenance(settings, {"manifest": args.manifest, "volumes": args.volumes}),
    })
    write_csv(args.out_csv, results)
    if args.saliency:
        picks = saliency_rows(real["test"].labels, max(1, settings.get("saliency_subjects", 2)))
        images = real["test"].images[picks]
        maps, titles = [], []
        for arm, model in models.items():
            maps += list(gradcam(model, images, settings, device))
            titles += [f"{test_ids[i]} ({classes[real['test'].labels[i]]}), {arm}" for i in picks]
        save_montage(args.saliency, list(images) * len(models), titles, overlays=maps)
    for arm, result in results.items():
        m = result["metrics"]
        log.info("%s: accuracy %.3f [%.3f, %.3f], ROC AUC %.3f", arm, m["accuracy"]["value"],
                 m["accuracy"]["ci_low"], m["accuracy"]["ci_high"], m["roc_auc"]["value"])
    return 0


if __name__ == "__main__":
    run_cli(main)
