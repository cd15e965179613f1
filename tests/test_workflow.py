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


def test_light_steps_are_localrules(tmp_path):
    """README: the light steps (manifest, FID weights fetch, report) run on the login node.
    Snakemake has no public accessor for the localrules and dry runs do not mark them: read the
    workflow's set (a private attribute) through its API."""
    code = (
        "import sys; from pathlib import Path\n"
        "from snakemake.api import SnakemakeApi\n"
        "from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings\n"
        "with SnakemakeApi(OutputSettings()) as api:\n"
        "    config = ConfigSettings(configfiles=[Path(sys.argv[1])])\n"
        "    workflow = api.workflow(ResourceSettings(), config, snakefile=Path(sys.argv[2]), workdir=Path(sys.argv[3]))\n"
        "    print(','.join(sorted(workflow._workflow._localrules)))\n"
    )
    proc = subprocess.run([str(BIN / "python"), "-c", code, str(REPO / "config" / "config.yaml"),
                           str(REPO / "Snakefile"), str(tmp_path)],
                          capture_output=True, text=True, env=snakemake_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "fid_weights,manifest,report"
