"""What a rule's cluster resources ask for (no torch import: the Snakefile uses it)."""

from __future__ import annotations

import re
from collections.abc import Mapping


def gres_gpus(gres: str) -> int:
    """GPUs in a GRES string: ``gpu:4``, ``gpu:a100:4(S:0-1)``, ``gpu:2,shard:8`` -> 4, 4, 2."""
    total = 0
    for item in gres.split(","):
        match = re.fullmatch(r"gpu(?::[^:(]+)?:(\d+)(?:\(.*\))?", item.strip())
        total += int(match.group(1)) if match else 0
    return total


def gpus_requested(resources: Mapping) -> int:
    """GPUs a rule's resources ask for: ``gpu: N``, ``gres: gpu[:type]:N``, or 1 for ``gpu_model``
    alone; 0 when none."""
    if resources.get("gpu") is not None:
        return int(resources["gpu"])
    gpus = gres_gpus(str(resources.get("gres") or ""))
    return gpus or int(resources.get("gpu_model") is not None)
