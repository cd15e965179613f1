"""envs/*.yaml parse, and their version pins agree with pyproject.toml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))
CONDA_TO_PYPI = {"matplotlib-base": "matplotlib"}


def _split(spec: str) -> tuple[str, str]:
    """'scipy>=1.11,<1.18' -> ('scipy', '>=1.11,<1.18')."""
    name, rest = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", spec.strip()).groups()
    return CONDA_TO_PYPI.get(name.lower(), name.lower()), rest.replace(" ", "")


def _pyproject_pins() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(_split(d) for d in deps)


def test_there_are_envs():
    assert {p.name for p in ENVS} >= {"cpu.yaml", "torch.yaml"}


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_parses_and_pins_match_pyproject(path):
    env = yaml.safe_load(path.read_text())
    assert env["name"].startswith("medldm-")
    assert "conda-forge" in env["channels"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = [p for d in env["dependencies"] if isinstance(d, dict) for p in d["pip"]]
    assert any(d.startswith("python=") for d in conda)
    pins = _pyproject_pins()
    for spec in conda + [p for p in pip if not p.startswith("-")]:
        name, version = _split(spec)
        if name in pins and version:
            assert version == pins[name], f"{path.name}: {spec} vs pyproject {name}{pins[name]}"
