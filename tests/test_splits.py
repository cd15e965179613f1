"""Splits per group, stable when groups are added or removed, pinnable through splits.tsv."""

import json

import numpy as np
import pandas as pd
import pytest

from medldm.data.samplesheet import SPLITS, assign_splits, check_samples, read_table, resolve_splits
from medldm.errors import InputError
from workflow_scripts import make_manifest

CLASSES = ["HC", "TLE"]


def sheet_of(rows) -> pd.DataFrame:
    """A checked sample sheet from (subject_id, class, group, split) tuples; the rows of a group share
    one image (as several masks of one subject do)."""
    table = pd.DataFrame(rows, columns=["subject_id", "class", "group", "split"])
    table["image"] = [f"{group or subject}.nii.gz" for subject, _, group, _ in rows]
    return check_samples(table, CLASSES, "test sheet", check_files=False)


def splits_of(rows, val=0.15, test=0.2, seed=0) -> dict[str, str]:
    sheet = sheet_of(rows)
    return dict(zip(sheet["subject_id"], assign_splits(sheet, val_fraction=val, test_fraction=test, seed=seed),
                    strict=True))


@pytest.mark.parametrize("val,test", [(0.15, 0.2), (0.25, 0.25), (0.1, 0.5)])
def test_adding_or_removing_a_subject_moves_at_most_two_others_of_its_class(val, test):
    rng = np.random.default_rng(0)
    subjects = {f"s{i}": CLASSES[i % 2] for i in range(6)}
    previous = splits_of([(s, c, "", "") for s, c in subjects.items()], val, test)
    for step in range(150):
        if len(subjects) > 1 and rng.random() < 0.45:
            changed = str(rng.choice(sorted(subjects)))
            changed_class = subjects.pop(changed)
        else:
            changed, changed_class = f"n{step}", CLASSES[rng.integers(2)]
            subjects[changed] = changed_class
        current = splits_of([(s, c, "", "") for s, c in subjects.items()], val, test)
        moved = [s for s in subjects if s != changed and s in previous and current[s] != previous[s]]
        assert len(moved) <= 2, (step, changed, moved)
        assert all(subjects[s] == changed_class for s in moved), (step, changed, moved)
        previous = current


def test_a_subject_split_depends_on_its_rank_not_on_row_order():
    rows = [(f"s{i}", CLASSES[i % 2], "", "") for i in range(30)]
    assert splits_of(rows) == splits_of(rows[::-1])
    assert splits_of(rows) != splits_of(rows, seed=1)


@pytest.mark.parametrize("n_subjects,val,test,expected", [
    (40, 0.15, 0.2, {"test": 4, "val": 3, "train": 13}),  # the demo config
    (8, 0.25, 0.25, {"test": 1, "val": 1, "train": 2}),  # config/test.yaml
    (6, 0.15, 0.2, {"test": 1, "val": 1, "train": 1}),  # 3 per class: one in each split
    (4, 0.15, 0.2, {"test": 1, "val": 0, "train": 1}),  # 2 per class: one test, one for training
])
def test_split_sizes_per_class_in_small_cohorts(n_subjects, val, test, expected):
    splits = splits_of([(f"s{i}", CLASSES[i % 2], "", "") for i in range(n_subjects)], val, test)
    for cls in CLASSES:
        counts = {split: 0 for split in SPLITS}
        for i in range(n_subjects):
            if CLASSES[i % 2] == cls:
                counts[splits[f"s{i}"]] += 1
        assert counts == expected, cls


@pytest.mark.parametrize("seed", range(5))
def test_rows_of_one_group_never_land_in_different_splits(seed):
    rng = np.random.default_rng(seed)
    rows, group_of = [], {}
    for g in range(int(rng.integers(5, 40))):
        group, cls = f"p{g}", CLASSES[rng.integers(2)]
        for r in range(int(rng.integers(1, 6))):
            rows.append((f"p{g}-m{r}", cls, group, ""))
            group_of[f"p{g}-m{r}"] = group
    pinned_row = int(rng.integers(len(rows)))  # one row's split fixed in the sheet fixes its whole group
    rows[pinned_row] = (*rows[pinned_row][:3], "val")
    splits = splits_of([rows[i] for i in rng.permutation(len(rows))])
    per_group = {}
    for subject, split in splits.items():
        per_group.setdefault(group_of[subject], set()).add(split)
    assert all(len(s) == 1 for s in per_group.values()), per_group
    assert per_group[rows[pinned_row][2]] == {"val"}
    assert len(set(splits.values())) == 3


def test_group_without_name_is_the_subject():
    sheet = sheet_of([("a", "HC", "", ""), ("b", "HC", "a", "")])
    assert sheet["group"].tolist() == ["a", "a"]


@pytest.mark.parametrize("rows,match", [
    ([("a", "HC", "p1", ""), ("b", "TLE", "p1", "")], "group 'p1' \\(a, b\\) have different classes"),
    ([("a", "HC", "p1", "test"), ("b", "HC", "p1", "train")], "group 'p1' \\(a, b\\) have different splits"),
])
def test_inconsistent_groups_are_refused(rows, match):
    with pytest.raises(InputError, match=match):
        sheet_of(rows)


def write_infos(root, subjects):
    infos = []
    for subject in subjects:
        (root / subject).mkdir(parents=True)
        info = root / subject / "info.json"
        info.write_text(json.dumps({"shape": [4, 4, 4], "spacing": [1, 1, 1], "p_low": 0, "p_high": 1}))
        infos.append(info)
    return infos


def write_sheet(path, subjects):
    pd.DataFrame({"subject_id": subjects, "image": [f"{s}.nii.gz" for s in subjects],
                  "class": [CLASSES[i % 2] for i in range(len(subjects))]}).to_csv(path, sep="\t", index=False)


def test_pinned_splits_file_fixes_the_subjects_it_lists(tmp_path):
    subjects = [f"s{i:02d}" for i in range(20)]
    write_sheet(tmp_path / "sheet.tsv", subjects)
    settings = {"val_fraction": 0.15, "test_fraction": 0.2, "seed": 0, "file": None}
    args = ["--samples", str(tmp_path / "sheet.tsv"), "--infos", *map(str, write_infos(tmp_path / "p", subjects)),
            "--classes", "HC,TLE", "--out", str(tmp_path / "manifest.tsv"), "--splits", str(tmp_path / "splits.tsv")]
    assert make_manifest.main([*args, "--split-settings", json.dumps(settings)]) == 0
    first = read_table(tmp_path / "splits.tsv", "splits")
    assert first.columns.tolist() == ["subject_id", "group", "class", "split"]
    assert (read_table(tmp_path / "manifest.tsv", "manifest")["split"] == first["split"]).all()

    # Another seed and 10 more subjects: the pinned ones keep their split, the new ones get one.
    pinned = tmp_path / "pinned.tsv"
    pinned.write_text((tmp_path / "splits.tsv").read_text())
    grown = subjects + [f"t{i:02d}" for i in range(10)]
    write_sheet(tmp_path / "sheet.tsv", grown)
    sheet = check_samples(read_table(tmp_path / "sheet.tsv", "sheet"), CLASSES, "sheet", check_files=False)
    splits = resolve_splits(sheet, {**settings, "seed": 7, "file": str(pinned)}, "sheet")
    assert splits[: len(subjects)].tolist() == first["split"].tolist()
    assert set(splits[len(subjects):]) <= set(SPLITS)

    sheet.loc[0, "split"] = next(s for s in SPLITS if s != first["split"][0])
    with pytest.raises(InputError, match="s00 has split .* in the sheet but .* in the pinned split file"):
        resolve_splits(sheet, {**settings, "file": str(pinned)}, "sheet")
