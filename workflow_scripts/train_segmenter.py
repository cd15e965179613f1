#!/usr/bin/env python
"""Train the segmentation network of the segmentation evaluation on the real training subjects'
(image, label map) pairs, and score it on the real test subjects (the ceiling: Dice per label per
subject, means with bootstrap 95 % intervals). Writes segmenter.pt (weights, settings, labels,
test scores) and the same scores as JSON."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medldm.checkpoint import save_torch
from medldm.errors import InputError, run_cli
from medldm.evaluation import segmentation as seg
from medldm.io import write_json
from medldm.provenance import provenance
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings, name_list

log = logging.getLogger("train_segmenter")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--classes", type=name_list, required=True, help="comma-separated class names (config `classes`)")
    parser.add_argument("--labels", type=name_list, required=True, help="comma-separated label names (config `labels`)")
    parser.add_argument("--settings", required=True, help="the config's evaluate.segmentation section (JSON or YAML)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out-model", required=True, type=Path, help="segmenter.pt to write")
    parser.add_argument("--out-json", required=True, type=Path, help="its test scores, JSON")
    args = parser.parse_args(argv)
    setup_logging()
    settings, labels = load_settings(args.settings), args.labels
    if len(labels) < 2:
        raise InputError("the segmentation evaluation needs at least two `labels` (background and one more) in the config")
    pairs = seg.real_pairs(args.manifest, args.classes, labels)
    device = pick_device(args.device)
    log.info("segmenter: %d training pairs, %d steps; %d test subjects", len(pairs["train"]),
             settings.get("steps", 500), len(pairs["test"]))
    model = seg.train_segmenter(pairs["train"], settings, len(labels), device, settings.get("seed", 0), "segmenter real")
    test = seg.score(model, pairs["test"], settings, labels, device) | {
        "subjects": pairs["test"].subject_ids, "n_train": len(pairs["train"])}
    for label, d in test["dice"].items():
        log.info("real test Dice %s: %.3f [%.3f, %.3f]", label, d["mean"], d["ci_low"], d["ci_high"])
    result = {"labels": labels, "spatial_dims": pairs["train"].spatial_dims, "test": test, "settings": settings,
              "provenance": provenance(settings, {"manifest": args.manifest})}
    save_torch(args.out_model, {**dict([seg.MODEL_TAG]), "format_version": seg.FORMAT_VERSION,
                                "state_dict": model.state_dict(), **result})
    write_json(args.out_json, result)
    return 0

if __name__ == "__main__":
    run_cli(main)
