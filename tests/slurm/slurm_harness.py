"""Harness for tests that run Snakemake against the local SLURM of cluster.sh.

Reusable by any test in tests/slurm/: the `slurm_cluster` fixture, `merged_profile`
(profiles/slurm + tests/slurm/profile + per-test overrides) and `run_snakemake`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = Path(__file__).with_name("cluster.sh")
BASE_PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
TEST_PROFILE = Path(__file__).with_name("profile") / "config.yaml"


def skip_reason() -> str | None:
    """Why the local SLURM cannot be used here, or None."""
    if os.geteuid() != 0:
        return "SLURM tests need root (cluster.sh installs and starts slurm)"
    if shutil.which("apt-get") is None:
        return "SLURM tests need a Debian-like system (apt-get)"
    return None


def _cluster(cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLUSTER_SH), cmd], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Bring the cluster up; bring it down afterwards only if this session started it."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    was_up = _cluster("status", timeout=30).returncode == 0
    up = _cluster("up")
    assert up.returncode == 0, f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
    yield
    if not was_up:
        _cluster("down", timeout=60)


def _merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; values of `over` win, mappings merge key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def merged_profile(dest: Path, overrides: dict | None = None) -> Path:
    """Write profiles/slurm + tests/slurm/profile + overrides as one profile dir."""
    config = yaml.safe_load(BASE_PROFILE.read_text())
    config = _merge(config, yaml.safe_load(TEST_PROFILE.read_text()))
    config = _merge(config, overrides or {})
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def run_snakemake(
    workdir: Path, profile: Path, *args: str, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run snakemake in `workdir` under `timeout -k 10` (the plugin can hang on
    status queries); stdout and stderr are combined into `.stdout`."""
    env = dict(os.environ)
    # jobs re-invoke snakemake inside SLURM: keep this interpreter's bin dir first
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        "timeout", "-k", "10", str(timeout),
        sys.executable, "-m", "snakemake", "--profile", str(profile), *args,
    ]  # fmt: skip
    return subprocess.run(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def scontrol_job(jobid: str) -> dict:
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge=300 s)."""
    out = subprocess.run(
        ["scontrol", "show", "job", str(jobid)], capture_output=True, text=True, check=True
    ).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
