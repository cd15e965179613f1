"""Settings that rules pass to scripts: a JSON string on the command line, or a YAML/JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from medldm.errors import InputError


def load_settings(value: str) -> dict:
    """Parse ``--settings``: inline JSON (what the rules pass) or the path of a YAML/JSON file."""
    text = value.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"--settings is not valid JSON: {err}") from None
    path = Path(value)
    if not path.is_file():
        raise InputError(f"--settings: {path} is neither inline JSON nor an existing YAML/JSON file")
    try:  # JSON files by json: PyYAML reads JSON's 1e-06 as a string
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise InputError(f"--settings file {path} is not valid YAML/JSON: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"--settings file {path} must hold a mapping of settings")
    return data


def require(settings: dict, key: str, where: str):
    """A required settings key, or an InputError naming where it belongs."""
    if key not in settings:
        raise InputError(f"missing setting {key!r} in {where}")
    return settings[key]


def with_cadence(settings: dict, cadence: str | None) -> dict:
    """``settings`` with the trainer's ``--cadence`` (how often it validates, logs, checkpoints;
    not a rerun trigger in the workflow) merged into its ``train`` section."""
    if not cadence:
        return settings
    return {**settings, "train": {**settings["train"], **load_settings(cadence)}}


def name_list(text: str) -> list[str]:
    """A comma-separated list of names, as rules pass `classes` and `labels` ("HC,TLE"; "" is
    none): the argparse ``type`` of every script's --classes and --labels."""
    return [name for name in text.split(",") if name]
