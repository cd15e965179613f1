"""The evaluation rules rerun only for settings that change their output: a dry run after changing
`evaluate.device` (or FID's batch size) plans no job of the FID rules, and a KID setting plans the
comparison but no Inception feature job."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest

from tests.conftest import run_snakemake

FEATURE_RULES = {"fid_reference", "fid_train_features", "fid_reconstruction_features"}
FID_RULES = FEATURE_RULES | {"evaluate_synthetic"}


def planned(workdir: Path, config: dict) -> set[str]:
    """Rules of the jobs a dry run plans with ``config``."""
    done = run_snakemake(workdir, "-n", "--quiet", "rules", config=config)
    return set(re.findall(r"^(\w+)\s+\d+$", done.stdout, re.M)) - {"total"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, dict]:
    """A work folder whose every output exists with Snakemake's metadata (params included), as
    after a finished run, without running a job: outputs are created empty, then `--touch`ed."""
    import yaml

    from tests.conftest import REPO

    workdir = tmp_path_factory.mktemp("recorded")
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    summary = run_snakemake(workdir, "--summary", config=config).stdout
    for row in csv.DictReader(io.StringIO(summary[summary.index("output_file"):]), delimiter="\t"):
        path = workdir / row["output_file"]
        if path.suffix:  # files; the directory() outputs (nifti/, figures/) have no suffix
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    run_snakemake(workdir, "--touch", "--cores", "1", config=config)
    return workdir, config


def test_device_and_batch_size_plan_no_fid_job(recorded):
    workdir, config = recorded
    changed = {**config, "evaluate": {**config["evaluate"], "device": "cpu",
                                      "fid": {**config["evaluate"]["fid"], "batch_size": 7}}}
    assert not planned(workdir, changed) & FID_RULES


def test_kid_settings_plan_no_feature_job(recorded):
    workdir, config = recorded
    changed = {**config, "evaluate": {**config["evaluate"],
                                      "fid": {**config["evaluate"]["fid"], "kid_subsets": 3, "bootstrap": 5}}}
    jobs = planned(workdir, changed)
    assert "evaluate_synthetic" in jobs and not jobs & FEATURE_RULES, jobs


def test_slice_settings_recompute_the_features(recorded):
    """The other side: a setting that changes features plans every feature job."""
    workdir, config = recorded
    changed = {**config, "evaluate": {**config["evaluate"], "fid": {**config["evaluate"]["fid"], "min_foreground": 0.05}}}
    assert FID_RULES <= planned(workdir, changed)
