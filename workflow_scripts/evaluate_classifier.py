#!/usr/bin/env python
"""Train on synthetic, test on real: one 3D classifier per arm, each tested on the real test
subjects, with bootstrap 95 % intervals. An arm is a training set: the real training subjects
(real), the autoencoder's reconstructions of them (reconstructions), a sample set's synthetic
volumes (synthetic) or both (real+synthetic). Arms trained by other jobs (--trained: the real arm
once per run, the reconstruction arm once per autoencoder) join those trained here, and paired
bootstrap intervals of the differences between arms are computed on the same resampled test
subjects. Optionally Grad-CAM maps of a few test subjects, per arm trained here, as a PNG."""

from __future__ import annotations

import argparse
import csv
import json
import logging
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from medldm.data import h5layout
from medldm.data.cohort import Rows, load_prepared
from medldm.errors import InputError, run_cli
from medldm.evaluation.classifier import (
    ARMS,
    METRICS,
    Dataset,
    gradcam,
    paired_differences,
    run_arms,
)
from medldm.io import atomic_path, write_json
from medldm.provenance import provenance
from medldm.report.montage import save_montage
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings, name_list

log = logging.getLogger("evaluate_classifier")


def volume_set(path: Path, classes: list[str], files: ExitStack, subject_ids: list[str] | None = None) -> Dataset:
    """The labelled volumes of a volumes .h5, read when used (the file stays open in ``files``);
    only those of ``subject_ids`` (all of them must be there) when given."""
    volumes = files.enter_context(h5layout.open_volumes(path))
    if volumes.header.class_names != classes:
        raise InputError(f"{path}: classes {volumes.header.class_names} differ from the config's {classes}")
    if subject_ids is None:
        keep = np.flatnonzero(volumes.class_index >= 0)
    else:
        row_of = {sid: i for i, sid in enumerate(volumes.subject_ids)}
        missing = [sid for sid in subject_ids if sid not in row_of]
        if missing:
            raise InputError(f"{path}: no reconstruction of training subjects {missing[:5]}; "
                             "rerun the autoencoder's decode_reconstructions rule")
        keep = np.array([row_of[sid] for sid in subject_ids], dtype=np.int64)
    return Dataset(Rows(volumes.channel(0), keep), volumes.class_index[keep])  # the first image channel


def training_sets(names: list[str], real: Dataset, real_ids: list[str], classes: list[str],
                  volumes: Path | None, reconstructions: Path | None, files: ExitStack) -> dict[str, Dataset]:
    """{arm: training set} of the arms ``names``, reading only the files they need (opened in ``files``)."""
    unknown = sorted(set(names) - set(ARMS))
    if unknown:
        raise InputError(f"--arms {unknown}: known arms are {', '.join(ARMS)}")
    needs = {"synthetic": ("--volumes", volumes), "real+synthetic": ("--volumes", volumes),
             "reconstructions": ("--reconstructions", reconstructions)}
    for arm in names:
        flag, path = needs.get(arm, ("", True))
        if not path:
            raise InputError(f"arm {arm} needs {flag}")
    synthetic = volume_set(volumes, classes, files) if volumes and {"synthetic", "real+synthetic"} & set(names) else None
    sources = {
        "real": lambda: real,
        "reconstructions": lambda: volume_set(reconstructions, classes, files, real_ids),
        "synthetic": lambda: synthetic,
        "real+synthetic": lambda: Dataset.concat(real, synthetic),
    }
    return {arm: sources[arm]() for arm in names}


def _training_settings(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != "saliency_subjects"}


def trained_arms(paths: list[Path], test_ids: list[str], settings: dict) -> dict:
    """The arms of classifier JSONs written by other jobs, checked to be tested on the same
    subjects with the same settings."""
    arms = {}
    for path in paths:
        other = json.loads(Path(path).read_text())
        if other["test_subjects"] != test_ids:
            raise InputError(f"{path}: tested on other subjects than this job's test split; rerun its rule")
        if _training_settings(other["settings"]) != _training_settings(settings):
            raise InputError(f"{path}: trained with other evaluate.classifier settings; rerun its rule")
        arms |= other["arms"]
    return arms


def saliency_rows(labels: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` test rows, taking the classes in turn (first of each class, then second...)."""
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    picks = [rows[i] for i in range(max(map(len, per_class))) for rows in per_class if i < len(rows)]
    return np.array(picks[:count], dtype=np.int64)


def write_csv(path: Path, arms: dict, differences: dict, n_test: int) -> None:
    """One row per (arm, metric), then one per (difference, metric) with n_train empty."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["arm", "metric", "value", "ci_low", "ci_high", "n_train", "n_test"])
        for name, result in (*arms.items(), *differences.items()):
            for metric in METRICS:
                m = result["metrics"][metric] if "metrics" in result else result[metric]
                writer.writerow([name, metric, m["value"], m["ci_low"], m["ci_high"], result.get("n_train", ""),
                                 n_test])


def save_saliency(path: Path, models: dict, test: Dataset, test_ids: list[str], classes: list[str],
                  settings: dict, device) -> None:
    picks = saliency_rows(test.labels, max(1, settings.get("saliency_subjects", 2)))
    images = test.images[picks]
    maps, titles = [], []
    for arm, model in models.items():
        maps += list(gradcam(model, images, settings, device))
        titles += [f"{test_ids[i]} ({classes[test.labels[i]]}), {arm}" for i in picks]
    save_montage(path, list(images) * len(models), titles, overlays=maps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--arms", required=True, help=f"comma-separated arms to train here, among {', '.join(ARMS)}")
    parser.add_argument("--volumes", type=Path, help="the sample set's synthetic volumes .h5 (synthetic arms)")
    parser.add_argument("--reconstructions", type=Path,
                        help="the autoencoder's reconstructions of the real subjects, volumes .h5 (reconstructions arm)")
    parser.add_argument("--trained", type=Path, nargs="*", default=[],
                        help="classifier JSONs of arms trained by other jobs, to report and compare with")
    parser.add_argument("--classes", type=name_list, required=True, help="comma-separated class names (config `classes`)")
    parser.add_argument("--settings", required=True, help="the config's evaluate.classifier section (JSON or YAML)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out-json", required=True, type=Path, help="metrics JSON to write")
    parser.add_argument("--out-csv", type=Path, help="metrics table (CSV) to write")
    parser.add_argument("--saliency", type=Path, help="PNG of Grad-CAM maps of a few test subjects")
    args = parser.parse_args(argv)
    setup_logging()
    settings = load_settings(args.settings)
    classes = args.classes
    if len(classes) < 2:
        raise InputError("the classifier evaluation needs at least two `classes` in the config")
    prepared = load_prepared(args.manifest, classes, with_labels=False)
    split = {name: prepared.subset(name) for name in ("train", "test")}
    real = {k: Dataset(v.volumes(), v.class_index) for k, v in split.items()}  # read one volume at a time
    test_ids = split["test"].subject_ids
    reused = trained_arms(args.trained, test_ids, settings)
    device = pick_device(args.device)
    with ExitStack() as files:
        arms = training_sets([a for a in args.arms.split(",") if a], real["train"], split["train"].subject_ids,
                             classes, args.volumes, args.reconstructions, files)
        results, models = run_arms(arms, real["test"], settings, len(classes), device)
    merged = reused | results  # an arm trained here wins over a reused one
    results = {arm: merged[arm] for arm in ARMS if arm in merged}
    seed = settings.get("seed", 0)
    differences = paired_differences(real["test"].labels, {a: np.array(r["probabilities"]) for a, r in results.items()},
                                     settings.get("bootstrap", 1000), seed)
    inputs = {"manifest": args.manifest, "volumes": args.volumes, "reconstructions": args.reconstructions}
    write_json(args.out_json, {
        "classes": classes, "n_test": len(real["test"]), "test_subjects": test_ids,
        "test_labels": real["test"].labels.tolist(), "arms": results, "differences": differences,
        "settings": settings, "provenance": provenance(settings, {k: v for k, v in inputs.items() if v}),
    })
    if args.out_csv:
        write_csv(args.out_csv, results, differences, len(real["test"]))
    if args.saliency:
        save_saliency(args.saliency, models, real["test"], test_ids, classes, settings, device)
    for name, result in (*results.items(), *differences.items()):
        m = result.get("metrics", result)
        log.info("%s: ROC AUC %.3f [%.3f, %.3f], balanced accuracy %.3f [%.3f, %.3f]", name,
                 m["roc_auc"]["value"], m["roc_auc"]["ci_low"], m["roc_auc"]["ci_high"],
                 m["balanced_accuracy"]["value"], m["balanced_accuracy"]["ci_low"], m["balanced_accuracy"]["ci_high"])
    return 0


if __name__ == "__main__":
    run_cli(main)
