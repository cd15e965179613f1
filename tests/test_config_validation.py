"""Bad configuration or sample sheets stop the run before any job starts, naming the problem."""

import pytest

from medldm.io import save_nifti
from tests.conftest import run_snakemake


def user_config(tmp_path, rows, header="subject_id\timage\tlabel\tclass"):
    """A non-demo config whose sample sheet has ``rows`` (lists of cells)."""
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("\n".join([header, *("\t".join(r) for r in rows)]) + "\n")
    return {"samples": str(sheet), "classes": ["HC", "TLE"], "labels": ["background", "tissue"]}


def volume(tmp_path, name):
    import numpy as np

    path = tmp_path / f"{name}.nii.gz"
    save_nifti(path, np.ones((4, 4, 4), np.float32), np.eye(4))
    return str(path)


def dry_run_error(tmp_path, config) -> str:
    proc = run_snakemake(tmp_path, "-n", config=config, check=False)
    assert proc.returncode != 0, "the dry run should have failed"
    return proc.stdout + proc.stderr


def good_rows(tmp_path):
    return [[f"s{i}", volume(tmp_path, f"i{i}"), volume(tmp_path, f"l{i}"), "HC"] for i in range(3)]


def test_valid_user_sheet_plans_jobs(tmp_path):
    proc = run_snakemake(tmp_path, "-n", "prepared", config=user_config(tmp_path, good_rows(tmp_path)))
    assert "prepare" in proc.stdout and "manifest" in proc.stdout


def test_wrong_type(tmp_path):
    config = user_config(tmp_path, good_rows(tmp_path))
    config["prepare"] = {"spacing": "4mm"}
    assert "spacing" in dry_run_error(tmp_path, config)


def test_unknown_key(tmp_path):
    config = user_config(tmp_path, good_rows(tmp_path))
    config["prepar"] = {}
    out = dry_run_error(tmp_path, config)
    assert "prepar" in out and "Additional properties" in out


def test_missing_file(tmp_path):
    rows = good_rows(tmp_path)
    rows[1][1] = str(tmp_path / "nowhere.nii.gz")
    out = dry_run_error(tmp_path, user_config(tmp_path, rows))
    assert "nowhere.nii.gz" in out and "s1" in out


def test_duplicate_subject(tmp_path):
    rows = good_rows(tmp_path)
    rows[2][0] = "s0"
    out = dry_run_error(tmp_path, user_config(tmp_path, rows))
    assert "duplicate subject_id ['s0']" in out


def test_class_not_in_config(tmp_path):
    rows = good_rows(tmp_path)
    rows[0][3] = "ALZ"
    out = dry_run_error(tmp_path, user_config(tmp_path, rows))
    assert "ALZ" in out and "classes" in out


def test_labels_for_some_subjects_only(tmp_path):
    rows = good_rows(tmp_path)
    rows[1][2] = ""
    out = dry_run_error(tmp_path, user_config(tmp_path, rows))
    assert "label maps are given for some subjects but not for ['s1']" in out


@pytest.mark.parametrize("header", ["subject_id\timage\tlabel\tcondition"])
def test_unknown_sheet_column(tmp_path, header):
    out = dry_run_error(tmp_path, user_config(tmp_path, good_rows(tmp_path), header=header))
    assert "condition" in out


def test_intensity_model_checked_before_any_job(tmp_path):
    config = user_config(tmp_path, good_rows(tmp_path))
    config["prepare"] = {"intensity": {"model": "fixed"}}
    assert "fixed model needs `window" in dry_run_error(tmp_path, config)


@pytest.mark.parametrize("rows", [[], [["#s0", "a.nii.gz", "", "HC"]]], ids=["header-only", "all-commented"])
def test_empty_sheet_stops_before_any_job(tmp_path, rows):
    config = user_config(tmp_path, rows)
    out = dry_run_error(tmp_path, config)
    assert f"sample sheet {config['samples']} lists no subjects" in out and "Traceback" not in out


def test_group_with_two_classes_stops_before_any_job(tmp_path):
    rows = [[*row, "p1"] for row in good_rows(tmp_path)]
    rows[2][3] = "TLE"
    out = dry_run_error(tmp_path, user_config(tmp_path, rows, header="subject_id\timage\tlabel\tclass\tgroup"))
    assert "group 'p1' (s0, s1, s2) have different classes ['HC', 'TLE']" in out


def test_pinned_split_file_is_an_input_of_the_manifest(tmp_path):
    config = user_config(tmp_path, good_rows(tmp_path))
    (tmp_path / "pinned.tsv").write_text("subject_id\tsplit\ns0\ttest\ns9\tval\n")
    config["split"] = {"file": str(tmp_path / "pinned.tsv")}
    proc = run_snakemake(tmp_path, "-n", "prepared", config=config)
    assert "pinned.tsv" in proc.stdout
    (tmp_path / "pinned.tsv").write_text("subject_id\tsplit\ns0\ttested\n")
    assert "splits ['tested'] are not among ['train', 'val', 'test']" in dry_run_error(tmp_path, config)
