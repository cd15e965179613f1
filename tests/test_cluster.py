"""Cluster behaviour that needs no cluster: GPU requests, the SLURM preflight, training without a
GPU inside a SLURM job, and the stop decision under torchrun. tests/slurm/ runs them on SLURM."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from medldm.errors import EXIT_BAD_INPUT, InputError
from medldm.preflight import Request, check, parse_sinfo, slurm_minutes
from medldm.resources import gres_gpus
from medldm.runtime import training_device
from tests.conftest import REPO, run_snakemake, snakemake_env
from tests.ldm_toys import ldm_settings, make_latents, make_vae_file

SINFO = "cpu*|8|64000|(null)|infinite\ngpu|16|128000|gpu:a100:2(S:0-1)|2-00:00:00\ngpu|32|256000|gpu:a100:4|2-00:00:00\n"


def test_sinfo_partitions_take_their_largest_node():
    parts = parse_sinfo(SINFO)
    assert parts["cpu"].default and not parts["gpu"].default
    gpu = parts["gpu"]
    assert (gpu.cpus, gpu.mem_mb, gpu.gpus, gpu.minutes) == (32, 256000, 4, 2880)
    assert gres_gpus("gpu:2,shard:8") == 2 and gres_gpus("(null)") == 0
    assert [slurm_minutes(t) for t in ("30", "30:00", "2:00:00", "1-12:00")] == [30, 30, 120, 2160]


def test_preflight_names_rule_request_and_limit():
    parts = parse_sinfo(SINFO)
    fine = [Request("prepare", None, 8, 8000, 0, 10), Request("train_ldm", "gpu", 32, 200000, 4, 1440)]
    check(fine, parts)  # nothing raised
    with pytest.raises(InputError) as err:
        check([*fine, Request("train_vae", None, 16, 8000, 1, 3000), Request("sample", "gpux", 1, 1, 1, 1)],
              parts)
    text = str(err.value)
    assert "rule train_vae: 16 CPUs per task (threads), but the nodes of partition 'cpu' have at most 8" in text
    assert "rule train_vae: 1 GPUs, but the nodes of partition 'cpu' have at most 0" in text
    assert "rule train_vae: runtime 3000 min, but partition 'cpu'" not in text  # infinite there
    assert "rule sample: partition 'gpux' does not exist (sinfo lists cpu, gpu)" in text
    assert "prepare" not in text and "train_ldm" not in text
    assert "add `max-threads: 8` to the profile" in text


def _dry_run_resources(tmp_path, test_config, rule, **cluster) -> str:
    """The `resources:` line of `rule`'s job in a dry run of the tiny config."""
    test_config["cluster"] = cluster
    proc = run_snakemake(tmp_path, "-n", "results/ldm/demo/ldm.pt", config=test_config, timeout=300)
    block = re.search(rf"rule {rule}:\n(.*?)\n\n", proc.stdout, re.S)
    assert block, proc.stdout
    return re.search(r"resources: (.*)", block.group(1)).group(1)


def test_gpu_rules_request_one_gpu_unless_switched_off(tmp_path, test_config):
    assert "gpu=1" in _dry_run_resources(tmp_path, test_config, "train_ldm").split(", ")
    test_config["resources"] = {"train_ldm": {"gres": "gpu:a100:2", "runtime": 60}}
    res = _dry_run_resources(tmp_path, test_config, "train_ldm").split(", ")
    assert "gres=gpu:a100:2" in res and "runtime=60" in res and "gpu=1" not in res, res
    test_config["resources"] = {}
    assert "gpu" not in _dry_run_resources(tmp_path, test_config, "train_vae", gpu=False)
    assert "gpu" not in _dry_run_resources(tmp_path, test_config, "prepare")  # CPU rules never


def test_training_in_a_slurm_job_without_gpu_refuses_unless_cpu(monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="SLURM job 4242 has no GPU.*cluster.device: cpu"):
        training_device("auto")
    with caplog.at_level(logging.INFO):
        assert training_device("cpu").type == "cpu"
    assert "SLURM job 4242 has no GPU that torch can use" in caplog.text and "training on cpu" in caplog.text
    monkeypatch.delenv("SLURM_JOB_ID")
    assert training_device("auto").type == "cpu"  # a workstation without GPU: fine


@pytest.mark.parametrize("script", ["train_vae", "train_ldm"])
def test_trainers_refuse_before_reading_inputs(tmp_path, script):
    """The refusal is the first thing the job logs: before any input is opened."""
    env = {**snakemake_env(), "SLURM_JOB_ID": "77", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    env.pop("MEDLDM_DEVICE", None)
    missing = str(tmp_path / "missing")
    args = {"train_vae": ["--settings", "{}", "--prepare", "{}", "--manifest", missing, "--classes", "a",
                          "--run-dir", missing, "--out", missing],
            "train_ldm": ["--settings", "{}", "--latents", missing, "--run-dir", missing, "--out", missing]}
    proc = subprocess.run([sys.executable, "-m", f"workflow_scripts.{script}", *args[script]], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "SLURM job 77 has no GPU that torch can use" in proc.stderr.splitlines()[0]
    assert "error: SLURM job 77 has no GPU" in proc.stderr and "missing" not in proc.stderr


def _worker_pid(parent: int, local_rank: int) -> int | None:
    """The torchrun worker of ``parent`` with LOCAL_RANK=local_rank."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(pid)
    return None


def test_ddp_stop_is_agreed_at_every_step(tmp_path):
    """SIGTERM to rank 1 only, between log steps: both ranks stop at the same step, rank 0
    writes the checkpoint (a SLURM warning must produce it within the grace time)."""
    vae = make_vae_file(tmp_path / "vae.pt")
    latents = make_latents(tmp_path / "latents.h5", vae)
    settings = ldm_settings(train={"steps": 100000, "log_every": 100000, "checkpoint_every": 100000,
                                   "batch_size": 4})
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "workflow_scripts.train_ldm", "--settings", json.dumps(settings), "--latents", str(latents),
           "--vae", str(vae), "--run-dir", str(run_dir), "--out", str(tmp_path / "ldm.pt"), "--device", "cpu"]
    env = {**snakemake_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "metrics.csv").is_file():  # rank 0 is in its loop (rank 1 past the barrier)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        time.sleep(1)
        rank1 = _worker_pid(proc.pid, 1)
        assert rank1, "no torchrun worker with LOCAL_RANK=1"
        os.kill(rank1, signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)  # before: rank 0 never heard of it and trained on
    finally:  # torchrun and both workers, whatever happened (they catch SIGTERM)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    stopped = re.findall(r"stopped at step (\d+); checkpoint written", out)
    assert len(stopped) == 2 and stopped[0] == stopped[1], out[-3000:]
    assert [p.name for p in run_dir.glob("ckpt-*.pt")] == [f"ckpt-{int(stopped[0]):09d}.pt"], out[-3000:]
    assert not (tmp_path / "ldm.pt").exists()
