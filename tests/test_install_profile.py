"""workflow_scripts/install_profile.py: installs profiles/slurm as the user's "slurm" profile."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "profiles" / "slurm"

_spec = importlib.util.spec_from_file_location(
    "install_profile", REPO / "workflow_scripts" / "install_profile.py"
)
install_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_profile)


@pytest.fixture
def xdg(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "snakemake" / "slurm"


def test_links_then_is_idempotent(xdg, capsys):
    assert install_profile.main([]) == 0
    assert xdg.is_symlink() and xdg.resolve() == SOURCE
    assert install_profile.main([]) == 0
    assert "already" in capsys.readouterr().out


def test_default_is_home_config_without_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert install_profile.main([]) == 0
    assert (tmp_path / ".config" / "snakemake" / "slurm").resolve() == SOURCE


def test_refuses_a_different_profile_unless_forced(xdg, capsys):
    xdg.mkdir(parents=True)
    (xdg / "config.yaml").write_text("executor: slurm\njobs: 1\n")
    assert install_profile.main([]) == 2
    assert "--force" in capsys.readouterr().err
    assert (xdg / "config.yaml").read_text() == "executor: slurm\njobs: 1\n"  # untouched
    assert install_profile.main(["--force"]) == 0
    assert xdg.resolve() == SOURCE


def test_refuses_a_foreign_link(xdg, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    xdg.parent.mkdir(parents=True)
    xdg.symlink_to(other)
    assert install_profile.main([]) == 2
    assert xdg.resolve() == other


def test_copy_is_idempotent_and_replaces_our_link(xdg, capsys):
    assert install_profile.main([]) == 0  # link first; --copy may replace our own link
    assert install_profile.main(["--copy"]) == 0
    assert not xdg.is_symlink()
    assert (xdg / "config.yaml").read_text() == (SOURCE / "config.yaml").read_text()
    assert install_profile.main(["--copy"]) == 0
    assert "already" in capsys.readouterr().out
    (xdg / "config.yaml").write_text("jobs: 1\n")  # a locally edited copy is not ours
    assert install_profile.main(["--copy"]) == 2


def test_snakemake_finds_it_by_name(xdg, tmp_path):
    """The literal `snakemake --profile slurm` resolves the installed profile (dry run)."""
    assert install_profile.main([]) == 0
    work = tmp_path / "wf"
    work.mkdir()
    (work / "Snakefile").write_text('rule a:\n    output: "a.txt"\n    shell: "touch {output}"\n')
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", "slurm", "-n"],
        cwd=work, env=dict(os.environ), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Using profile slurm" in res.stderr
