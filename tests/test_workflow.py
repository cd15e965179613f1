"""The workflow as a whole: the DAG of the default config and snakemake's linter."""

import subprocess

from tests.conftest import BIN, REPO, run_snakemake, snakemake_env

STAGE_RULES = ["demo_cohort", "prepare", "manifest"]


def test_dry_run_lists_every_stage(tmp_path):
    proc = run_snakemake(tmp_path, "-n", "--configfile", str(REPO / "config" / "config.yaml"))
    jobs = proc.stdout.split("Job stats:")[1]
    for rule in STAGE_RULES:
        assert f"\n{rule} " in jobs, f"rule {rule} missing from the dry run:\n{jobs}"


def test_lint_has_no_errors():
    proc = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=REPO, capture_output=True, text=True,
                          env=snakemake_env(), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Congratulations" in out or "Lints for" not in out, out
