"""envs/*.yaml parse, their version pins agree with pyproject.toml, and each holds every
package that the scripts of its rules import (directly or through medldm)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))
CONDA_TO_PYPI = {"matplotlib-base": "matplotlib"}
IMPORT_TO_PACKAGE = {"yaml": "pyyaml", "skimage": "scikit-image", "pytorch_fid": "pytorch-fid",
                     "PIL": "pillow", "sklearn": "scikit-learn"}


def _split(spec: str) -> tuple[str, str]:
    """'scipy>=1.11,<1.18' -> ('scipy', '>=1.11,<1.18')."""
    name, rest = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", spec.strip()).groups()
    return CONDA_TO_PYPI.get(name.lower(), name.lower()), rest.replace(" ", "")


def _pyproject_pins() -> dict[str, str]:
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


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _imports(path: Path) -> set[str]:
    """Every absolute import in a file, function-level ones included ("a.b" for from a import b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def packages_imported(script: str) -> set[str]:
    """Third-party packages that workflow_scripts/<script>.py imports, following medldm modules
    (and the packages above them) transitively."""
    todo, seen, found = [f"workflow_scripts.{script}"], set(), set()
    while todo:
        parts = todo.pop().split(".")
        if parts[0] in ("medldm", "workflow_scripts"):
            for i in range(1, len(parts) + 1):
                path = _module_file(".".join(parts[:i]))
                if path is not None and path not in seen:
                    seen.add(path)
                    todo.extend(_imports(path))
        elif parts[0] not in sys.stdlib_module_names:
            found.add(IMPORT_TO_PACKAGE.get(parts[0], parts[0]).lower())
    return found


def rule_scripts() -> list[tuple[str, str, str]]:
    """(rule, script, env file name) of every rule in rules/*.smk that runs a workflow script."""
    found = []
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"^rule ", smk.read_text(), flags=re.MULTILINE)[1:]:
            script = re.search(r"-m workflow_scripts\.(\w+)", block)
            if script:
                env = re.search(r'conda:\s*"\.\./envs/([\w.-]+)"', block)
                found.append((block.split(":")[0], script.group(1), env.group(1) if env else None))
    return found


def test_rules_that_run_scripts_are_found():
    rules = {rule for rule, _, _ in rule_scripts()}
    assert {"demo_cohort", "prepare", "train_vae", "train_ldm", "sample", "report"} <= rules


@pytest.mark.parametrize("rule, script, env", rule_scripts(), ids=lambda v: v if isinstance(v, str) else "")
def test_env_holds_every_import_of_the_rule_script(rule, script, env):
    assert env, f"rule {rule} names no conda env"
    spec = yaml.safe_load((REPO / "envs" / env).read_text())["dependencies"]
    listed = {_split(d)[0] for d in spec if isinstance(d, str)}
    listed |= {_split(p)[0] for d in spec if isinstance(d, dict) for p in d["pip"] if not p.startswith("-")}
    missing = packages_imported(script) - listed
    assert not missing, f"envs/{env} (rule {rule}) lacks {sorted(missing)}, which {script}.py imports"
