"""What a rule's cluster resources ask for (no torch import: the Snakefile uses it)."""

from __future__ import annotations

import re
from collections.abc import Mapping


def gpus_requested(resources: Mapping) -> int:
    """GPUs a rule's resources ask for: ``gpu: N``, ``gres: gpu[:type]:N``, or 1 for ``gpu_model``
    alone; 0 when none."""
    if resources.get("gpu") is not None:
        return int(resources["gpu"])
    match = re.fullmatch(r"gpu(?::[^:,]+)?:(\d+)", str(resources.get("gres") or ""))
    return int(match.group(1)) if match else int(resources.get("gpu_model") is not None)
