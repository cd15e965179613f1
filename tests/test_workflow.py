"""The workflow as a whole: the DAG of the default config, snakemake's linter, and the
interpreter its jobs run."""

import os
import re
import subprocess

import yaml

from tests.conftest import BIN, REPO, run_snakemake, snakemake_env
from tests.test_workflow_samples import planned_rules

TARGET_RULES = {"all", "prepared", "autoencoders", "synthetic"}  # rules that only gather others' outputs
# rules the default config does not use: a pretrained autoencoder, inpaint sample sets (config/inpaint.yaml),
# the segmentation and label-map evaluations (sets with label maps: config/spatial.yaml), ControlNets
OPTIONAL_RULES = {"import_vae", "evaluate_inpainting", "train_segmenter", "evaluate_segmentation", "evaluate_label_maps",
                  "train_controlnet"}


def test_dry_run_lists_every_stage(tmp_path):
    proc = run_snakemake(tmp_path, "-n", "--configfile", str(REPO / "config" / "config.yaml"))
    listed = run_snakemake(tmp_path, "--list-rules", "--configfile", str(REPO / "config" / "config.yaml"))
    rules = set(re.findall(r"^(\w+)$", listed.stdout, re.MULTILINE)) - TARGET_RULES - OPTIONAL_RULES
    assert len(rules) >= 14, listed.stdout
    missing = rules - set(planned_rules(proc.stdout))
    assert not missing, f"rules {sorted(missing)} are missing from the default dry run:\n{proc.stdout[-3000:]}"


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


def test_jobs_run_the_interpreter_that_runs_snakemake(tmp_path):
    """`.venv/bin/snakemake` without the venv on PATH: jobs must not run another `python`."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\necho 'not the interpreter of snakemake' >&2\nexit 3\n")
    (fake / "python").chmod(0o755)
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config["demo"]["n_subjects"] = 4
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**snakemake_env(), "PATH": f"{fake}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(tmp_path / "config.yaml"), "--cores", "1", "results/demo/samples.tsv"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    log = tmp_path / "results" / "logs" / "demo_cohort.log"
    assert proc.returncode == 0, (log.read_text() if log.exists() else "") + proc.stderr[-3000:]
    assert (tmp_path / "results" / "demo" / "samples.tsv").is_file()
