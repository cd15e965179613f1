"""The sample sheet (input) and the manifest (output of preparation): reading, checks, splits.

The sample sheet is a TSV with ``subject_id``, ``image`` and optional ``label``, ``mask``,
``class``, ``split`` and ``group``. Splits are per group (a participant; a row without a group is
its own group), never per row, slice or file. See :func:`assign_splits` for how and how stably.

Multi-channel subjects (config ``image_channels``, e.g. ``[t1pre, t1post]``): one path column per
channel instead of ``image``; :func:`with_channel_columns` checks them and fills ``image`` with the
first channel's path (the one whose geometry drives preparation).

Inpainting masks: one ``mask`` file per row (1 = region to fill; all rows or none). Several masks of
one image are several rows (each its own ``subject_id``) with the same ``image`` and one ``group``,
so that they always share a split; rows repeating an image without sharing a group are refused.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pandas as pd

from medldm.errors import InputError

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["subject_id", "group", "class", "split", "image", "label", "shape", "spacing", "p_low",
                    "p_high", "mask", "channels"]  # channels: comma-separated image_channels, '' for one
SPLITS_COLUMNS = ["subject_id", "group", "class", "split"]  # splits.tsv, which `split.file` can pin


def read_table(path: str | Path, what: str) -> pd.DataFrame:
    """A TSV as strings, empty cells as ''."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except pd.errors.EmptyDataError:
        raise InputError(f"{what} {path} is empty: it needs a header line and one row per subject") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"{what} {path} is not a readable TSV: {err}") from None


def with_channel_columns(sheet: pd.DataFrame, channels: list[str] | None, where: str) -> pd.DataFrame:
    """A sheet of multi-channel subjects (one path column per name in ``channels``) with ``image``
    set to the first channel's path; unchanged when ``channels`` is empty (one ``image`` column)."""
    if not channels:
        return sheet
    if "image" in sheet:
        raise InputError(f"{where} has an `image` column, but the config's image_channels {channels} asks for "
                         f"one path column per channel ({', '.join(channels)}) instead: rename the columns")
    missing = [c for c in channels if c not in sheet]
    if missing:
        raise InputError(f"{where} lacks the column(s) {missing} of the config's image_channels {channels}: "
                         "add one path column per channel")
    for column in channels:
        empty = sheet.loc[sheet[column] == "", "subject_id"].tolist()
        if empty:
            raise InputError(f"{where}: rows {empty} have no path in the column {column!r} (image_channels "
                             "needs every channel of every subject)")
    return sheet.assign(image=sheet[channels[0]])


def check_samples(sheet: pd.DataFrame, classes: list[str], where: str, check_files: bool = True,
                  channels: list[str] | None = None) -> pd.DataFrame:
    """Checks the schema cannot express; returns the sheet with optional columns filled with ''
    (and ``image`` = the first channel's path when ``channels``, see :func:`with_channel_columns`)."""
    if sheet.empty:
        raise InputError(f"{where} lists no subjects (a header only, or every row commented out with '#'): "
                         "add one row per image")
    sheet = with_channel_columns(sheet.copy(), channels, where)
    for column in ("label", "mask", "class", "split", "group"):
        if column not in sheet:
            sheet[column] = ""
    sheet["group"] = sheet["group"].where(sheet["group"] != "", sheet["subject_id"])
    duplicated = sheet["subject_id"][sheet["subject_id"].duplicated()].unique().tolist()
    if duplicated:
        raise InputError(f"{where}: duplicate subject_id {duplicated}; each subject must appear once")
    for column, what in (("label", "label maps"), ("mask", "inpainting masks")):
        given = sheet[column] != ""
        if given.any() and not given.all():
            missing = sheet.loc[~given, "subject_id"].tolist()
            raise InputError(f"{where}: {what} are given for some subjects but not for {missing}; give all or none")
    check_repeated_images(sheet, where)
    with_class = sheet["class"] != ""
    unknown = sorted(set(sheet.loc[with_class, "class"]) - set(classes))
    if unknown:
        raise InputError(f"{where}: class {unknown} not in the config's classes {classes}")
    if classes and not with_class.all():
        missing = sheet.loc[~with_class, "subject_id"].tolist()
        raise InputError(f"{where}: subjects {missing} have no class, but the config lists classes {classes}")
    if check_files:
        for _, row in sheet.iterrows():
            for column in ("image", *(channels or [])[1:], "label", "mask"):
                if row[column] and not Path(row[column]).is_file():
                    raise InputError(f"{where}: row {row['subject_id']}: {column} file {row[column]} does not exist")
    group_table(sheet, where)
    return sheet


def check_repeated_images(sheet: pd.DataFrame, where: str) -> None:
    """Rows with the same image (e.g. several masks of one subject) must share a group, or the
    splits, made per group, could put one image in training and in test."""
    for image, rows in sheet.groupby("image", sort=True):
        if len(rows) > 1 and rows["group"].nunique() > 1:
            raise InputError(
                f"{where}: rows {', '.join(rows['subject_id'])} share the image {image} (several masks of one subject?) "
                "but not a group: give them the same `group` cell (the participant), so that they always land in one split"
            )


def group_table(sheet: pd.DataFrame, where: str) -> pd.DataFrame:
    """One row per group (index: group name) with its class and fixed split ('' when none);
    rows of one group with different classes or different fixed splits are an error."""
    fixed = sheet[sheet["split"] != ""]
    for what, plural, rows in (("class", "classes", sheet), ("split", "splits", fixed)):
        counts = rows.groupby("group")[what].nunique()
        if (counts > 1).any():
            group = counts.index[counts > 1][0]
            members = sheet[sheet["group"] == group]
            raise InputError(
                f"{where}: the rows of group {group!r} ({', '.join(members['subject_id'])}) have different "
                f"{plural} {sorted(set(members[what]) - {''})}; all rows of a group (one participant) must share "
                f"one {what}: fix the `group` or `{what}` cells" + (" or the pinned split file" if what == "split" else "")
            )
    classes = sheet.groupby("group", sort=True)["class"].first()
    splits = fixed.groupby("group")["split"].first().reindex(classes.index, fill_value="")
    return pd.DataFrame({"class": classes, "split": splits})


def unit_rank(group: str, seed: int) -> str:
    """A group's place in its class's seeded order: a hash of (seed, group), nothing else."""
    return hashlib.sha256(f"{seed}\t{group}".encode()).hexdigest()


def split_boundaries(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int]:
    """(b_test, b_val): of n groups in hash order, [0, b_test) are test, [b_test, b_val) val, the rest train.

    Cumulative fractions rounded half up, so that each boundary moves by at most one when n moves by
    one. A class with few groups still gets one test (n >= 2) and one val (n >= 3) group when the
    fraction is not 0, and always keeps one group for training.
    """
    b_test = max(math.floor(n * test_fraction + 0.5), int(test_fraction > 0 and n >= 2))
    b_val = math.floor(n * (test_fraction + val_fraction) + 0.5)
    b_val = max(b_val, b_test + int(val_fraction > 0))
    keep_train = max(n - 1, 0)
    return min(b_test, keep_train), min(b_val, keep_train)


def assign_splits(sheet: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int,
                  pinned: dict[str, str] | None = None, where: str = "sample sheet") -> pd.Series:
    """The split of every row of a checked sheet (see :func:`check_samples`), per group.

    A group's split is fixed by any of its rows' `split` cell or its entry in ``pinned``
    (subject_id -> split, from `split.file`). The other groups of each class are ordered by
    :func:`unit_rank` and cut at :func:`split_boundaries`. Guarantee: adding or removing one group
    without a fixed split changes the split of at most two other groups, both of the same class;
    groups of other classes and groups with a fixed split never change. Pin `splits.tsv` for none.
    """
    pinned = pinned or {}
    sheet = sheet.assign(split=[
        pin_split(row.subject_id, row.split, pinned.get(row.subject_id, ""), where) for row in sheet.itertuples()
    ])
    groups = group_table(sheet, where)
    split_of = groups["split"].to_dict()
    for _, members in groups[groups["split"] == ""].groupby("class", sort=True):
        order = sorted(members.index, key=lambda group: (unit_rank(group, seed), group))
        b_test, b_val = split_boundaries(len(order), test_fraction, val_fraction)
        for rank, group in enumerate(order):
            split_of[group] = "test" if rank < b_test else "val" if rank < b_val else "train"
    return sheet["group"].map(split_of)


def pin_split(subject_id: str, in_sheet: str, in_file: str, where: str) -> str:
    if in_sheet and in_file and in_sheet != in_file:
        raise InputError(f"{where}: subject {subject_id} has split {in_sheet!r} in the sheet but {in_file!r} "
                         "in the pinned split file (`split.file`): make them agree")
    return in_sheet or in_file


def read_pinned_splits(path: str | Path) -> dict[str, str]:
    """`split.file`: subject_id -> split, e.g. a copy of results/prepared/splits.tsv (other columns ignored)."""
    table = read_table(path, "pinned split file (split.file)")
    missing = [c for c in ("subject_id", "split") if c not in table]
    if missing:
        raise InputError(f"pinned split file {path} lacks columns {missing}; it needs subject_id and split")
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise InputError(f"pinned split file {path}: splits {bad} are not among {list(SPLITS)}")
    duplicated = table["subject_id"][table["subject_id"].duplicated()].unique().tolist()
    if duplicated:
        raise InputError(f"pinned split file {path}: duplicate subject_id {duplicated}")
    return dict(zip(table["subject_id"], table["split"], strict=True))


def resolve_splits(sheet: pd.DataFrame, settings: dict, where: str) -> pd.Series:
    """The split of every row of a checked sheet under the config's `split` section."""
    pinned = read_pinned_splits(settings["file"]) if settings.get("file") else {}
    return assign_splits(sheet, settings["val_fraction"], settings["test_fraction"], settings["seed"], pinned, where)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The prepared-data manifest, checked for its columns."""
    manifest = read_table(path, "manifest")
    if "group" not in manifest:  # manifests written before groups: each subject is its own group
        manifest.insert(1, "group", manifest.get("subject_id", ""))
    if "mask" not in manifest:  # manifests written before inpainting masks
        manifest["mask"] = ""
    if "channels" not in manifest:  # manifests written before multi-channel subjects
        manifest["channels"] = ""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest]
    if missing:
        raise InputError(f"manifest {path} lacks columns {missing}; re-run the prepare stage")
    return manifest
