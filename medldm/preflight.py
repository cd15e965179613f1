"""SLURM preflight: before any job is submitted, check every job's request against the partitions.

A job that asks for more CPUs, memory, GPUs or time than any node of its partition has never starts:
SLURM keeps it PENDING (reason ``PartitionConfig``) and Snakemake shows nothing wrong. The workflow
(``onstart`` in rules/common.smk) runs :func:`check` with what ``sinfo`` reports and stops with one
line per impossible request naming the rule, the request and the limit.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from medldm.errors import InputError
from medldm.resources import gres_gpus

SINFO_FORMAT = "%P|%c|%m|%G|%l"  # partition, CPUs per node, memory per node (MB), GRES, time limit


@dataclass(frozen=True)
class Partition:
    """The largest node of a partition (a job fits if it fits one node) and its time limit."""

    name: str
    cpus: int
    mem_mb: int
    gpus: int
    minutes: float  # inf when unlimited
    default: bool = False


@dataclass(frozen=True)
class Request:
    """What one job will ask SLURM for."""

    rule: str
    partition: str | None  # None: the cluster's default partition
    cpus: int
    mem_mb: int | None
    gpus: int
    minutes: float | None


def slurm_minutes(limit: str) -> float:
    """A SLURM time limit (``infinite``, ``30``, ``30:00``, ``2:00:00``, ``1-12:00``) in minutes."""
    if limit.strip().lower() in ("infinite", "unlimited"):
        return float("inf")
    days, _, clock = limit.strip().rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH[:MM[:SS]]
        hours, mins, secs = parts + [0] * (3 - len(parts))
    else:  # MM, MM:SS or HH:MM:SS
        hours, mins, secs = ([0, *parts, 0] if len(parts) == 1 else [0, *parts])[-3:]
    return int(days or 0) * 1440 + hours * 60 + mins + secs / 60


def parse_sinfo(text: str) -> dict[str, Partition]:
    """Partitions from ``sinfo -h -o SINFO_FORMAT`` (one line per node type; the largest wins)."""
    partitions: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, cpus, mem, gres, limit = line.strip().split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        new = Partition(name, int(cpus.rstrip("+")), int(mem.rstrip("+")), gres_gpus(gres),
                        slurm_minutes(limit), default)
        old = partitions.get(name)
        if old:
            new = Partition(name, max(old.cpus, new.cpus), max(old.mem_mb, new.mem_mb),
                            max(old.gpus, new.gpus), max(old.minutes, new.minutes), default)
        partitions[name] = new
    return partitions


def read_partitions() -> dict[str, Partition]:
    """What ``sinfo`` says about every partition."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", SINFO_FORMAT], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise InputError(f"SLURM preflight: `sinfo` failed ({err}); is this a SLURM login node?") from err
    return parse_sinfo(out)


def partition_of(request: Request, partitions: dict[str, Partition]) -> Partition | None:
    """The partition a request goes to (the default one when it names none), None if unknown."""
    if request.partition is None:
        return next((p for p in partitions.values() if p.default), None)
    return partitions.get(request.partition)


def problems(request: Request, partitions: dict[str, Partition]) -> list[str]:
    """Why ``request`` can never start on its partition (empty when it can)."""
    part = partition_of(request, partitions)
    if part is None:
        return [f"rule {request.rule}: partition {request.partition or '(default)'!r} does not exist "
                f"(sinfo lists {', '.join(sorted(partitions))})"]
    where = f"partition {part.name!r}"
    found = []
    if request.cpus > part.cpus:
        found.append(f"rule {request.rule}: {request.cpus} CPUs per task (threads), but the nodes of "
                     f"{where} have at most {part.cpus} CPUs")
    if request.mem_mb is not None and request.mem_mb > part.mem_mb:
        found.append(f"rule {request.rule}: mem_mb {request.mem_mb}, but the nodes of {where} have at "
                     f"most {part.mem_mb} MB")
    if request.gpus > part.gpus:
        found.append(f"rule {request.rule}: {request.gpus} GPUs, but the nodes of {where} have at most "
                     f"{part.gpus}")
    if request.minutes is not None and request.minutes > part.minutes:
        found.append(f"rule {request.rule}: runtime {request.minutes:g} min, but {where} allows at most "
                     f"{part.minutes:g} min")
    return found


def check(requests: list[Request], partitions: dict[str, Partition]) -> None:
    """Raise InputError listing every request that no node of its partition can satisfy."""
    found = sorted({line for request in requests for line in problems(request, partitions)})
    if not found:
        return
    fix = ("Nothing was submitted: such jobs would wait forever (PENDING, reason PartitionConfig). "
           "Lower the request in the config's `resources` or the profile's `set-resources` / "
           "`set-threads`, or pick another partition (`slurm_partition`).")
    cpu_limits = [part.cpus for r in requests
                  if (part := partition_of(r, partitions)) is not None and r.cpus > part.cpus]
    if cpu_limits:
        fix += (f" To cap every job's threads at the node size instead, add `max-threads: {min(cpu_limits)}` "
                "to the profile.")
    raise InputError("SLURM preflight:\n  " + "\n  ".join(found) + "\n" + fix + " See profiles/README.md.")
