# Makes the harness fixtures available to every test in tests/slurm/.
from pathlib import Path

import pytest
from slurm_harness import slurm_cluster  # noqa: F401


def pytest_collection_modifyitems(items):
    """All SLURM tests share one local cluster: under pytest-xdist (--dist loadgroup) they run in
    one worker, one after the other."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.xdist_group("slurm"))
