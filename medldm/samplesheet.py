"""The sample sheet (input) and the manifest (output of preparation): reading, checks, splits.

The sample sheet is a TSV with ``subject_id``, ``image`` and optional ``label``, ``class`` and
``split``. Splits are per subject (never per slice or file): rows without a split are assigned
train/val/test, stratified by class, with a seeded shuffle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medldm.errors import InputError

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["subject_id", "class", "split", "image", "label", "shape", "spacing", "p_low", "p_high"]


def read_table(path: str | Path, what: str) -> pd.DataFrame:
    """A TSV as strings, empty cells as ''."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"{what} {path} is not a readable TSV: {err}") from None


def check_samples(sheet: pd.DataFrame, classes: list[str], where: str, check_files: bool = True) -> pd.DataFrame:
    """Checks the schema cannot express; returns the sheet with optional columns filled with ''."""
    sheet = sheet.copy()
    for column in ("label", "class", "split"):
        if column not in sheet:
            sheet[column] = ""
    duplicated = sheet["subject_id"][sheet["subject_id"].duplicated()].unique().tolist()
    if duplicated:
        raise InputError(f"{where}: duplicate subject_id {duplicated}; each subject must appear once")
    has_label = sheet["label"] != ""
    if has_label.any() and not has_label.all():
        missing = sheet.loc[~has_label, "subject_id"].tolist()
        raise InputError(f"{where}: label maps are given for some subjects but not for {missing}; give all or none")
    with_class = sheet["class"] != ""
    unknown = sorted(set(sheet.loc[with_class, "class"]) - set(classes))
    if unknown:
        raise InputError(f"{where}: class {unknown} not in the config's classes {classes}")
    if classes and not with_class.all():
        missing = sheet.loc[~with_class, "subject_id"].tolist()
        raise InputError(f"{where}: subjects {missing} have no class, but the config lists classes {classes}")
    if check_files:
        for _, row in sheet.iterrows():
            for column in ("image", "label"):
                if row[column] and not Path(row[column]).is_file():
                    raise InputError(f"{where}: row {row['subject_id']}: {column} file {row[column]} does not exist")
    return sheet


def assign_splits(sheet: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """Split per subject, stratified by class; fixed splits in the sheet are kept."""
    splits = sheet["split"].copy()
    rng = np.random.default_rng(seed)
    for _, group in sheet[splits == ""].groupby("class", sort=True):
        ids = group.index.to_numpy()[rng.permutation(len(group))]
        n_test = int(round(len(ids) * test_fraction))
        n_val = int(round(len(ids) * val_fraction))
        if len(ids) - n_test - n_val < 1:
            raise InputError(
                f"class {group['class'].iloc[0]!r} has {len(ids)} subjects without a split: too few to "
                f"keep one for training with test_fraction {test_fraction} and val_fraction {val_fraction}"
            )
        splits[ids[:n_test]] = "test"
        splits[ids[n_test : n_test + n_val]] = "val"
        splits[ids[n_test + n_val :]] = "train"
    return splits


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The prepared-data manifest, checked for its columns."""
    manifest = read_table(path, "manifest")
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest]
    if missing:
        raise InputError(f"manifest {path} lacks columns {missing}; re-run the prepare stage")
    return manifest
