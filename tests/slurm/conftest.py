# Makes the harness fixtures available to every test in tests/slurm/.
from slurm_harness import slurm_cluster  # noqa: F401
