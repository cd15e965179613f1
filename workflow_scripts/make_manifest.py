#!/usr/bin/env python
"""Aggregate prepared subjects into manifest.tsv and splits.tsv (splits per group) and a mid-slice montage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from medldm.data.samplesheet import (
    MANIFEST_COLUMNS,
    SPLITS_COLUMNS,
    check_samples,
    read_table,
    resolve_splits,
)
from medldm.errors import run_cli
from medldm.io import atomic_path
from medldm.settings import load_settings, name_list


def build_manifest(sheet, infos: list[Path], split_settings: dict, classes: list[str], where="sample sheet"):
    """(manifest: one row per prepared image, each 2D slice its own row; splits: one row per
    subject of the sheet, its group and split)."""
    channels = json.loads(infos[0].read_text()).get("channels") if infos else None  # image_channels, as prepared
    sheet = check_samples(sheet, classes, where, check_files=False, channels=channels)
    sheet["split"] = resolve_splits(sheet, split_settings, where)
    folders = {path.parent.name: path.parent for path in infos}
    rows = []
    for _, row in sheet.iterrows():
        folder = folders[row["subject_id"]]
        info = json.loads((folder / "info.json").read_text())
        common = {"group": row["group"], "class": row["class"], "split": row["split"],
                  "shape": "x".join(str(s) for s in info["shape"]),
                  "spacing": "x".join(f"{s:g}" for s in info["spacing"]),
                  "p_low": f"{info['p_low']:.6g}", "p_high": f"{info['p_high']:.6g}",
                  "channels": ",".join(info.get("channels", []))}  # image.nii.gz is then (X, Y, Z, C)
        for suffix in slice_suffixes(info):  # 2D slices: one row each, in the subject's group and split
            rows.append({
                "subject_id": row["subject_id"] + suffix, **common,
                "image": str(folder / f"image{suffix}.nii.gz"),
                "label": str(folder / f"label{suffix}.nii.gz") if row["label"] else "",
                "mask": str(folder / f"mask{suffix}.nii.gz") if row["mask"] else "",
            })
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS), sheet[SPLITS_COLUMNS]


def slice_suffixes(info: dict) -> list[str]:
    """File and id suffixes of a prepared subject's rows: ``-s<k>`` per 2D slice, or one ''."""
    slices = info.get("slices")
    return [f"-s{k}" for k in range(len(slices["index"]))] if slices else [""]


def write_montage(manifest, path: Path, per_class: int = 3) -> None:
    """Mid-slices (three axes) of a few prepared subjects per class (of each channel's)."""
    from medldm.report.montage import save_montage

    volumes, titles = [], []
    for cls, group in manifest.groupby("class", sort=True):
        for _, row in group.head(per_class).iterrows():
            image = np.asarray(nib.load(row["image"]).dataobj, np.float32)
            names = row["channels"].split(",") if row["channels"] else [""]
            for c, name in enumerate(names):
                volumes.append(image[..., c] if image.ndim == 4 else image)
                titles.append(f"{row['subject_id']} {cls} {name}".strip())
    save_montage(path, volumes, titles)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", required=True, help="sample sheet TSV")
    parser.add_argument("--infos", nargs="+", type=Path, required=True,
                        help="every subject's prepared info.json (in <prepared>/<subject>/)")
    parser.add_argument("--split-settings", required=True, help="the config's `split` section (JSON)")
    parser.add_argument("--classes", type=name_list, default="", help="comma-separated class names")
    parser.add_argument("--out", required=True, help="manifest.tsv to write")
    parser.add_argument("--splits", default="", help="splits.tsv to write (subject_id, group, class, split)")
    parser.add_argument("--montage", default="", help="PNG montage of mid-slices per class (optional)")
    args = parser.parse_args(argv)
    classes = args.classes
    manifest, splits = build_manifest(read_table(args.samples, "sample sheet"), args.infos,
                              load_settings(args.split_settings), classes, f"sample sheet {args.samples}")
    if args.splits:  # per subject (not per slice), so that split.file can pin it
        with atomic_path(args.splits) as tmp:
            splits.to_csv(tmp, sep="\t", index=False)
    with atomic_path(args.out) as tmp:
        manifest.to_csv(tmp, sep="\t", index=False)
    if args.montage:
        write_montage(manifest, Path(args.montage))
    counts = manifest.groupby(["split", "class"]).size().to_dict()
    print(f"manifest: {len(manifest)} subjects in {manifest['group'].nunique()} groups, "
          f"split x class counts {counts}")
    return 0


if __name__ == "__main__":
    run_cli(main)
