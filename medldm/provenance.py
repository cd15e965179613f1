"""Provenance: file hashes, config hashes and the code version recorded in every model file."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from medldm import __version__
from medldm.errors import InputError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_autoencoder(vae_path: str | os.PathLike, recorded: str, made: str, fix: str) -> str:
    """The sha256 of ``vae_path``, once checked against ``recorded``: the sha256 of the
    autoencoder that ``made`` (a latents or model file) was made with. A mismatch is an
    InputError naming both files and ``fix``; an empty ``recorded`` is not checked."""
    found = sha256_file(vae_path)
    if recorded and found != recorded:
        raise InputError(
            f"{made} was made with another autoencoder (sha256 {recorded[:12]}...) than {vae_path} "
            f"(sha256 {found[:12]}...): {fix}"
        )
    return found


def config_hash(settings) -> str:
    """Stable hash of a JSON-serialisable settings object (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_version() -> str:
    """Package version plus the git commit of the checkout, when there is one."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return f"{__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def provenance(settings, inputs: dict[str, str | os.PathLike]) -> dict:
    """What made a model file: settings hash, code version, sha256 of each named input."""
    return {
        "config_hash": config_hash(settings),
        "code_version": code_version(),
        "inputs_sha256": {name: sha256_file(p) for name, p in inputs.items()},
    }
