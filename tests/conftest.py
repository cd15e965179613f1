"""Shared test helpers: running the workflow with snakemake in a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def snakemake_env() -> dict:
    """The test interpreter's folder first on PATH, so rules' `python` is the project's."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_snakemake(workdir: Path, *args: str, config: dict | None = None, timeout: int = 900,
                  check: bool = True) -> subprocess.CompletedProcess:
    """Run the repo's Snakefile in ``workdir`` with ``config`` (written to workdir/config.yaml)."""
    cmd = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir)]
    if config is not None:
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(workdir / "config.yaml")]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=snakemake_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def test_config() -> dict:
    """A fresh copy of config/test.yaml (the tiny end-to-end configuration)."""
    return yaml.safe_load((REPO / "config" / "test.yaml").read_text())
