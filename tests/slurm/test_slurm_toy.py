"""profiles/slurm against a real (local, single-node) SLURM, on a toy workflow.

Needs root and apt-get (cluster.sh installs munge + slurm-wlm); about a minute.
"""

from __future__ import annotations

import re
import time

import pytest
from slurm_harness import merged_profile, run_snakemake, scontrol_job, skip_reason

_reason = skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

pytestmark = pytest.mark.slurm

# `set -u` is on in SLURM job scripts: ${{VAR:-none}} for maybe-unset variables.
TOY_SNAKEFILE = r"""
localrules: all, summary

rule all:
    input: "summary.txt"

rule cpu:
    output: "cpu.txt"
    threads: 2
    shell: "echo job=${{SLURM_JOB_ID:-none}} cpus=${{SLURM_CPUS_PER_TASK:-none}} > {output}"

rule gpu:
    output: "gpu.txt"
    resources: gpu=1
    shell:
        "echo job=${{SLURM_JOB_ID:-none}} cuda=${{CUDA_VISIBLE_DEVICES:-none}}"
        " partition=${{SLURM_JOB_PARTITION:-none}} > {output}"

rule gres:
    output: "gres.txt"
    resources: gres="gpu:1"
    shell: "echo job=${{SLURM_JOB_ID:-none}} cuda=${{CUDA_VISIBLE_DEVICES:-none}} > {output}"

rule combine:
    input: "cpu.txt", "gpu.txt", "gres.txt"
    output: "combined.txt"
    shell: "cat {input} > {output}; echo job=${{SLURM_JOB_ID:-none}} >> {output}"

rule summary:
    input: "combined.txt"
    output: "summary.txt"
    shell: "cp {input} {output}; echo local=${{SLURM_JOB_ID:-none}} >> {output}"

rule fail:
    output: "never.txt"
    shell: "echo failing on purpose >&2; exit 3"
"""

# GPU rules go to the harness's "gpu" partition, as the real profile does for
# the pipeline's GPU rules.
GPU_PARTITION = {"set-resources": {r: {"slurm_partition": "gpu"} for r in ("gpu", "gres")}}


@pytest.fixture(scope="module")
def toy(slurm_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy")
    (workdir / "Snakefile").write_text(TOY_SNAKEFILE)
    profile = merged_profile(workdir / "profile", GPU_PARTITION)
    return workdir, profile


def _fields(path) -> dict:
    return dict(re.findall(r"(\w+)=(\S+)", path.read_text()))


def test_toy_runs_under_slurm_then_nothing_to_do(toy):
    workdir, profile = toy
    t0 = time.monotonic()
    res = run_snakemake(workdir, profile)
    print(f"first run: {time.monotonic() - t0:.0f} s")
    assert res.returncode == 0, res.stdout

    cpu = _fields(workdir / "cpu.txt")
    assert cpu["job"].isdigit() and cpu["cpus"] == "2", cpu  # threads -> --cpus-per-task
    gpu = _fields(workdir / "gpu.txt")
    assert gpu["job"].isdigit() and gpu["cuda"] == "0" and gpu["partition"] == "gpu", gpu
    gres = _fields(workdir / "gres.txt")
    assert gres["job"].isdigit() and gres["cuda"] == "0", gres
    assert len({cpu["job"], gpu["job"], gres["job"]}) == 3
    # what the plugin asked SLURM for: gpu=1 -> --gpus=1, gres="gpu:1" -> --gres=gpu:1,
    # runtime -> --time, mem_mb -> --mem, partitions from default-/set-resources
    gpu_job, gres_job, cpu_job = (scontrol_job(j["job"]) for j in (gpu, gres, cpu))
    assert gpu_job["TresPerJob"] == "gres:gpu:1" and gpu_job["Partition"] == "gpu"
    assert gres_job["TresPerNode"] == "gres:gpu:1" and gres_job["Partition"] == "gpu"
    assert cpu_job["Partition"] == "cpu" and "TresPerJob" not in cpu_job
    assert cpu_job["TimeLimit"] == "00:10:00" and cpu_job["MinMemoryNode"] == "1000M"
    assert _fields(workdir / "combined.txt")["job"].isdigit()
    assert _fields(workdir / "summary.txt")["local"] == "none"  # localrule: not in SLURM
    assert list(workdir.glob(".snakemake/slurm_logs/rule_cpu/*.log"))  # kept on success

    again = run_snakemake(workdir, profile, timeout=120)
    assert again.returncode == 0, again.stdout
    assert "Nothing to be done" in again.stdout, again.stdout


def test_failing_rule_reports_slurm_state(toy):
    workdir, profile = toy
    res = run_snakemake(workdir, profile, "fail", timeout=180)
    assert res.returncode != 0, res.stdout
    assert "FAILED" in res.stdout, res.stdout
    assert not (workdir / "never.txt").exists()


GROUPED_SNAKEFILE = r"""
localrules: all

rule all:
    input: expand("out/{i}.txt", i=range(6))

rule per_subject:
    output: "out/{i}.txt"
    group: "subjects"
    shell: "echo job=${{SLURM_JOB_ID:-none}} > {output}"
"""


def test_grouped_per_subject_jobs_share_sbatch_jobs(slurm_cluster, tmp_path):
    """6 per-subject jobs in groups of 3: 2 sbatch jobs, each sized for jobs run one after
    another (the profile's group_serial): one job's CPUs and memory, the sum of the runtimes."""
    (tmp_path / "Snakefile").write_text(GROUPED_SNAKEFILE)
    profile = merged_profile(tmp_path / "profile", {
        "group-components": ["subjects=3"],
        "set-resources": {"per_subject": {"runtime": 2, "mem_mb": 500}},
    })
    res = run_snakemake(tmp_path, profile, timeout=300)
    assert res.returncode == 0, res.stdout
    jobs = {_fields(p)["job"] for p in (tmp_path / "out").glob("*.txt")}
    assert len(jobs) == 2, jobs
    for job in map(scontrol_job, jobs):
        assert (job["NumCPUs"], job["MinMemoryNode"], job["TimeLimit"]) == ("1", "500M", "00:06:00"), job
