"""Shared test helpers: running the workflow with snakemake in a temporary folder."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def cpus_per_worker() -> int:
    """This process's share of the CPUs: all of them, or an even split among pytest-xdist workers."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, len(os.sched_getaffinity(0)) // workers)


def pytest_configure(config):
    """Under pytest-xdist, every worker's torch and its subprocesses use only the worker's share
    of the CPUs: two processes with two OpenMP threads each on two cores run many times slower."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    import torch

    threads = cpus_per_worker()
    torch.set_num_threads(threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


@functools.cache
def random_torch_home() -> Path:
    """A TORCH_HOME whose hub cache holds a random FID Inception: the workflow's FID steps run
    pytorch-fid's real loading code offline, without touching the user's cache (numbers are not
    real FIDs)."""
    from medldm.evaluation.fid_weights import WEIGHTS_FILE, save_random_weights

    home = Path(tempfile.mkdtemp(prefix="medldm-torch-home-"))
    atexit.register(shutil.rmtree, home, True)
    save_random_weights(home / "hub" / "checkpoints" / WEIGHTS_FILE)
    return home


# the modules whose tests use the tiny_run fixture: one xdist worker runs them, so it is built once
TINY_RUN_MODULES = ("tests/test_report.py", "tests/test_rerun_triggers.py", "tests/test_workflow_samples.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`-n 2`, `--dist load`) each test module goes whole to the next free
    worker, so module fixtures are built once; the SLURM tests (one local cluster) go to one worker,
    and so do the modules that share the session's tiny_run."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndSharedFixtures(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module.startswith("tests/slurm/"):
                return "tests/slurm"
            return "tiny_run" if module in TINY_RUN_MODULES else module

    return ModulesAndSharedFixtures(config, log)


@functools.cache
def _config_schema_json() -> str:
    """config/schemas/config.schema.yaml as a JSON file (temporary, one per process): snakemake's
    `validate` parses JSON in milliseconds, but this YAML in about a second on every call."""
    schema = yaml.load((REPO / "config" / "schemas" / "config.schema.yaml").read_text(), Loader=yaml.CSafeLoader)
    path = Path(tempfile.mkdtemp(prefix="medldm-schema-")) / "config.schema.json"
    atexit.register(shutil.rmtree, path.parent, True)
    path.write_text(json.dumps(schema))
    return str(path)


def validated_config(config: dict) -> dict:
    """``config`` checked against config.schema.yaml by snakemake's `validate`, its defaults filled
    in; as plain dicts (defaults from a JSON schema come as OrderedDicts, which YAML cannot dump)."""
    from snakemake.utils import validate

    validate(config, _config_schema_json())
    return json.loads(json.dumps(config))


@functools.cache
def failing_scontrol_dir() -> Path:
    """A folder whose `scontrol` fails at once. Snakemake imports every executor plugin on each run,
    and the SLURM plugin's import runs `scontrol show config` (10 s timeout): where SLURM is
    installed but not running, as between the cluster tests, every local run would wait ~9 s."""
    folder = Path(tempfile.mkdtemp(prefix="medldm-noslurm-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    stub = folder / "scontrol"
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    return folder


def snakemake_env() -> dict:
    """The test interpreter's folder first on PATH, so rules' `python` is the project's, then a
    failing `scontrol` (local runs only; tests/slurm has its own environment); a TORCH_HOME with
    random FID Inception weights."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(BIN), str(failing_scontrol_dir()), env.get("PATH", "")])
    env["TORCH_HOME"] = str(random_torch_home())
    return env


def run_snakemake(workdir: Path, *args: str, config: dict | None = None, timeout: int = 900,
                  check: bool = True) -> subprocess.CompletedProcess:
    """Run the repo's Snakefile in ``workdir`` with ``config`` (written to workdir/config.yaml)."""
    cmd = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir)]
    if config is not None:
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(workdir / "config.yaml")]
    if "PYTEST_XDIST_WORKER" in os.environ:  # snakemake sets a job's OMP_NUM_THREADS to its threads
        cmd += ["--max-threads", str(cpus_per_worker())]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=snakemake_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session", autouse=True)
def private_torch_home(tmp_path_factory):
    """No test reads or writes the user's torch cache (~/.cache/torch)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home_default")))
    yield
    patch.undo()


@pytest.fixture
def test_config() -> dict:
    """A fresh copy of config/test.yaml (the tiny end-to-end configuration)."""
    return yaml.safe_load((REPO / "config" / "test.yaml").read_text())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The whole workflow run once on config/test.yaml (session-wide); returns its work folder.

    End-to-end tests share it: inspect its outputs, or dry-run new targets in it (never modify
    its files in a test that others rely on). List their modules in TINY_RUN_MODULES.
    """
    workdir = tmp_path_factory.mktemp("tiny_run")
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    run_snakemake(workdir, "--cores", "2", config=config, timeout=1200)
    return workdir
