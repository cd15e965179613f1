#!/usr/bin/env python
"""Segmentation evaluation of one sample set, with the segmenter train_segmenter made:

- adherence: Dice per label between the segmenter's output on each synthetic volume and the label
  map the volume carries (`label` in volumes.h5: its condition maps, or its generated maps); a set
  without label maps is the control, scored against real test maps paired at random (seeded by
  evaluate.segmentation.seed: a permutation of the test subjects, repeated as needed);
- train on synthetic, test on real (sets with label maps): the same network, steps and seed trained
  on the synthetic (image, label map) pairs alone and on real training + synthetic pairs, each
  scored on the real test subjects, next to the segmenter's own real test scores (the ceiling).
Every figure is a mean over volumes or subjects with a percentile bootstrap 95 % interval."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medldm.checkpoint import load_model_file
from medldm.data import h5layout
from medldm.data.cohort import Rows
from medldm.errors import InputError, run_cli
from medldm.evaluation import segmentation as seg
from medldm.io import write_json
from medldm.provenance import provenance
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings, name_list

log = logging.getLogger("evaluate_segmentation")


def load_segmenter(path: Path, labels: list[str], device):
    payload = load_model_file(path, seg.MODEL_TAG, seg.FORMAT_VERSION, "train_segmenter")
    if payload["labels"] != labels:
        raise InputError(f"{path}: trained for labels {payload['labels']}, the config's `labels` are {labels}; "
                         "rerun train_segmenter")
    model = seg.build_segmenter(payload["settings"], len(labels), payload.get("spatial_dims", 3))
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload


def synthetic_pairs(volumes: h5layout.H5File, labels: list[str]) -> tuple[Rows, Rows | None]:
    """The set's images and its label maps (None for a set without them), checked against ``labels``."""
    where = volumes.path
    if volumes.image is None:
        raise InputError(f"{where}: no dataset image (a label-map generator's set); the segmentation "
                         "evaluation needs images: leave this set out of it")
    if volumes.label is None:
        return Rows(volumes.channel(0)), None
    if volumes.header.label_names != labels:
        raise InputError(f"{where}: label maps of labels {volumes.header.label_names}, the config's `labels` "
                         f"are {labels}; regenerate the set with this config")
    maps = Rows(volumes.label)
    for i in range(len(maps)):
        seg.check_label_maps(maps[i], len(labels), f"{where}: dataset label, row {i}")
    return Rows(volumes.channel(0)), maps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--volumes", required=True, type=Path, help="the sample set's volumes.h5")
    parser.add_argument("--segmenter", required=True, type=Path, help="segmenter.pt of train_segmenter")
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--classes", type=name_list, required=True, help="comma-separated class names (config `classes`)")
    parser.add_argument("--labels", type=name_list, required=True, help="comma-separated label names (config `labels`)")
    parser.add_argument("--settings", required=True, help="the config's evaluate.segmentation section (JSON or YAML)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out-json", required=True, type=Path, help="Dice scores JSON to write")
    args = parser.parse_args(argv)
    setup_logging()
    settings, labels = load_settings(args.settings), args.labels
    seed, device = settings.get("seed", 0), pick_device(args.device)
    model, segmenter = load_segmenter(args.segmenter, labels, device)
    real = seg.real_pairs(args.manifest, args.classes, labels)
    arms = {"real": segmenter["test"]}
    with h5layout.open_volumes(args.volumes) as volumes:
        images, maps = synthetic_pairs(volumes, labels)
        ids = volumes.subject_ids
        if maps is None:
            pairing = seg.control_pairing(len(images), len(real["test"]), seed)
            log.info("no label maps in %s: the control, %d volumes against random real test maps", args.volumes, len(images))
            target = seg.Pairs(images, Rows(real["test"].labels, pairing))
            adherence = {"kind": "control", "paired_with": [real["test"].subject_ids[i] for i in pairing]}
        else:
            target = seg.Pairs(images, maps)
            adherence = {"kind": "adherence"}
        adherence |= seg.score(model, target, settings, labels, device) | {"volumes": ids}
        for label, d in adherence["dice"].items():
            log.info("%s Dice %s: %.3f [%.3f, %.3f]", adherence["kind"], label, d["mean"], d["ci_low"], d["ci_high"])
        if maps is not None:
            leaked = sorted(set(volumes.source_ids or []) & set(real["test"].subject_ids))
            if leaked:  # conditions from the test split: its maps are in the synthetic training pairs
                log.warning("%d synthetic volumes were made from real test subjects' maps (source_id): the "
                            "train-on-synthetic arms have seen those test label maps", len(leaked))
            adherence["conditioned_on_test_subjects"] = leaked
            train = {"synthetic": target, "real+synthetic": seg.Pairs.concat(real["train"], target)}
            for arm, data in train.items():
                log.info("arm %s: %d training pairs, %d steps", arm, len(data), settings.get("steps", 500))
                trained = seg.train_segmenter(data, settings, len(labels), device, seed, f"segmenter {arm}")
                arms[arm] = seg.score(trained, real["test"], settings, labels, device) | {
                    "subjects": real["test"].subject_ids, "n_train": len(data)}
                log.info("arm %s: real test mean Dice %.3f", arm, arms[arm]["dice"]["mean"]["mean"])
    write_json(args.out_json, {
        "labels": labels, "adherence": adherence, "arms": arms, "settings": settings,
        "provenance": provenance(settings, {"volumes": args.volumes, "segmenter": args.segmenter,
                                            "manifest": args.manifest}),
    })
    return 0


if __name__ == "__main__":
    run_cli(main)
