"""The real tiny pipeline (config/test.yaml, shrunk further) through the local SLURM.

One module fixture runs the chain to the sample set's volumes.h5 under profiles/slurm:
first in the background, cancelling train_vae (scancel: SIGTERM, then SIGKILL after
KillWait, as at a time limit) once it has written a checkpoint; then a rerun, which must
resume from that checkpoint and finish. The tests check the result: every job went
through SLURM, the GPU rules were allocated the (fake) GPU, the outputs open, a third run
does nothing, and a new sample set only adds `sample` and `decode_synthetic` jobs.

Needs root and apt-get (cluster.sh); several minutes (the training jobs dominate).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from slurm_harness import REPO, merged_profile, run_snakemake, skip_reason

_reason = skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

pytestmark = pytest.mark.slurm

TARGET = "results/synthetic/demo/demo/volumes.h5"
GPU_RULES = ("train_vae", "export_latents", "train_ldm", "sample", "decode_synthetic",
             "decode_reconstructions")  # fmt: skip
# the jobs SLURM runs (manifest is a localrule: it runs beside snakemake, never in sbatch)
CHAIN_RULES = ("demo_cohort", "prepare", "train_vae", "export_latents",
               "train_ldm", "sample", "decode_synthetic")  # fmt: skip
VAE_RUN = "results/runs/vae/demo"


def pipeline_config() -> dict:
    """config/test.yaml with GPU resources per rule and even less training."""
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config["demo"]["n_subjects"] = 6  # 3 per class: one each in train, val and test
    # a checkpoint every epoch, and enough epochs after the first (seconds) for train_vae to be
    # cancelled while it runs; the resumed job finishes them
    config["vae"]["demo"]["train"].update(epochs=60, checkpoint_every=1, val_every=60)
    config["ldm"]["demo"]["train"].update(
        steps=10, warmup_steps=2, log_every=5, val_every=10, checkpoint_every=10
    )
    config["sample_sets"]["demo"].update(steps=4)
    # no `gpu`: GPU rules ask for one by default (cluster.gpu); one GPU -> plain python
    config["resources"] = {r: {"mem_mb": 4000, "runtime": 30} for r in GPU_RULES}
    config["cluster"] = {"device": "cpu"}  # the test cluster's GPU is a fake: train on CPU on purpose
    return config


# the tiny rules ask threads: 4; the test node has 2 CPUs (cpus_per_task = threads)
PROFILE_OVERRIDES = {"set-threads": {r: 2 for r in GPU_RULES}}


class JobWatcher:
    """Snapshots of `scontrol show job -o` every 2 s, by job id (latest wins)."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(2)

    def poll(self):
        out = subprocess.run(
            ["scontrol", "-d", "-o", "show", "job"], capture_output=True, text=True
        )
        for line in out.stdout.splitlines():
            fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            if "JobId" in fields:
                old = self.jobs.get(fields["JobId"], {})
                # GRES=gpu:1(IDX:0): the device a running job holds (empty once it ended)
                fields["GRES"] = fields.get("GRES") or old.get("GRES", "")
                self.jobs[fields["JobId"]] = fields

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        self.poll()


def _snakemake_cmd(profile: Path, workdir: Path, *args: str, timeout: int) -> list[str]:
    # targets first: --configfile takes several values and would swallow them
    return ["timeout", "-k", "10", str(timeout), sys.executable, "-m", "snakemake",
            "--profile", str(profile), *args, "--directory", str(workdir),
            "--snakefile", str(REPO / "Snakefile"), "--configfile", str(workdir / "config.yaml")]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(chain, *args, configfiles=("config.yaml",), timeout=600):
    """snakemake --profile ... <args> on the pipeline (targets in args come before
    --configfile, which takes several values)."""
    workdir, profile = chain["workdir"], chain["profile"]
    extra = ["--directory", str(workdir), "--snakefile", str(REPO / "Snakefile"),
             "--configfile", *(str(workdir / c) for c in configfiles)]  # fmt: skip
    return run_snakemake(workdir, profile, *args, *extra, timeout=timeout)


def _submitted(stdout: str) -> dict[str, str]:
    """SLURM job id -> rule (or group), from the plugin's submission messages."""
    ids = {}
    for m in re.finditer(r"SLURM jobid (\d+) \(log: (\S+)\)", stdout):
        rule = re.search(r"slurm_logs/(?:rule|group)_([^/]+?)(?:_\1)?/", m.group(2))
        ids[m.group(1)] = rule.group(1) if rule else "?"
    return ids


def _wait_for(predicate, timeout: float, what: str, proc, log_path: Path):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(
                f"snakemake ended (rc {proc.returncode}) before {what}:\n{log_path.read_text()}"
            )
        time.sleep(1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def chain(slurm_cluster, tmp_path_factory):
    """Interrupted first run (train_vae cancelled after a checkpoint), then the resuming rerun."""
    workdir = tmp_path_factory.mktemp("pipeline")
    (workdir / "config.yaml").write_text(yaml.safe_dump(pipeline_config(), sort_keys=False))
    profile = merged_profile(workdir / "profile", PROFILE_OVERRIDES)
    state = {"workdir": workdir, "profile": profile, "times": {}}
    watcher = JobWatcher().start()
    t0 = time.monotonic()
    try:
        # 1. background run; cancel train_vae once its run dir holds a checkpoint
        log_path = workdir / "first_run.out"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                _snakemake_cmd(profile, workdir, TARGET, timeout=900),
                cwd=workdir,
                env=_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        ckpts = lambda: list((workdir / VAE_RUN).glob("ckpt-*.pt"))  # noqa: E731
        try:
            _wait_for(ckpts, 600, f"a checkpoint in {VAE_RUN}", proc, log_path)
            assert proc.poll() is None, log_path.read_text()
            running = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True,
                                     text=True, check=True).stdout.split("\n")  # fmt: skip
            vae_jobs = [ln.split()[0] for ln in running if " rule_train_vae" in ln]
            assert len(vae_jobs) == 1, running
            state["cancelled_job"] = vae_jobs[0]
            state["ckpts_at_cancel"] = sorted(p.name for p in ckpts())
            subprocess.run(["scancel", vae_jobs[0]], check=True)
            proc.wait(300)
        finally:
            if proc.poll() is None:
                proc.kill()
        state["first_rc"] = proc.returncode
        state["first_out"] = log_path.read_text()
        state["interrupted_log"] = (workdir / "results/logs/vae/demo/train_vae.log").read_text()
        state["times"]["interrupted"] = time.monotonic() - t0

        # 2. rerun (unlock first if the killed run left a lock)
        if list((workdir / ".snakemake" / "locks").glob("*")):
            _run(state, "--unlock", timeout=120)
        t1 = time.monotonic()
        rerun = _run(state, TARGET, timeout=900)
        state["times"]["rerun"] = time.monotonic() - t1
        state["rerun"] = rerun
    finally:
        watcher.stop()
    state["jobs"] = watcher.jobs
    state["submitted"] = {**_submitted(state["first_out"]), **_submitted(rerun.stdout)}
    print(f"\npipeline chain times: {state['times']}")
    return state


def test_cancelled_training_resumes_from_checkpoint(chain):
    assert chain["first_rc"] != 0, chain["first_out"]
    assert "train_vae" in chain["first_out"] and "CANCELLED" in chain["first_out"], chain[
        "first_out"
    ]
    assert chain["ckpts_at_cancel"], chain
    # the training script caught SIGTERM (its DataLoader workers ignore it) and wrote a checkpoint
    assert "stopped by signal after" in chain["interrupted_log"], chain["interrupted_log"]
    rerun = chain["rerun"]
    assert rerun.returncode == 0, rerun.stdout
    log = (chain["workdir"] / "results/logs/vae/demo/train_vae.log").read_text()
    assert re.search(r"resum", log, re.I) and "from scratch" not in log, log
    assert (chain["workdir"] / "results/vae/demo/vae.pt").is_file()
    # the rerun did not redo what finished before the cancel
    rerun_rules = set(_submitted(rerun.stdout).values())
    assert rerun_rules == {
        "train_vae",
        "export_latents",
        "train_ldm",
        "sample",
        "decode_synthetic",
    }, rerun_rules


def test_every_job_ran_under_slurm(chain):
    logs = chain["workdir"] / ".snakemake" / "slurm_logs"
    for rule in CHAIN_RULES:
        assert list(logs.glob(f"*_{rule}*/**/*.log")), f"no SLURM log for {rule}"  # rule_ or group_
    submitted = chain["submitted"]
    counts = {r: list(submitted.values()).count(r) for r in CHAIN_RULES}
    # prepare: the 6 subjects in one group job (profile group-components); train_vae twice
    # (cancelled + resumed)
    assert counts == {**dict.fromkeys(CHAIN_RULES, 1), "train_vae": 2}, counts
    assert "localrule manifest:" in chain["first_out"] and "manifest" not in submitted.values()


def test_gpu_rules_were_allocated_a_gpu(chain):
    jobs, seen = chain["jobs"], set()
    for jobid, rule in chain["submitted"].items():
        job = jobs.get(jobid)
        assert job is not None, f"job {jobid} ({rule}) never seen by scontrol"
        assert job["Comment"].startswith(f"rule_{rule}"), job
        if rule in GPU_RULES:
            assert job["TresPerJob"] == "gres:gpu:1" and job["Partition"] == "gpu", job
            # allocated, not only requested (TresPerJob): JOB_GRES, and the device index
            # while it ran (CUDA_VISIBLE_DEVICES=0 inside the job)
            assert job["JOB_GRES"] == "gpu:1" and job["GRES"] == "gpu:1(IDX:0)", job
            assert job["NumCPUs"] == "2" and job["MinMemoryNode"] == "4000M", job
            seen.add(rule)
        else:
            assert job.get("JOB_GRES", "(null)") == "(null)" and job["Partition"] == "cpu", job
    assert seen == set(GPU_RULES) - {"decode_reconstructions"}, seen
    # gpu: 1 -> plain python, no torchrun (rules/common.smk python_launcher)
    assert "torchrun" not in chain["rerun"].stdout


def test_outputs_complete_and_readable(chain):
    from medldm.data.h5layout import open_volumes

    out = chain["workdir"] / TARGET
    with open_volumes(out) as volumes:
        assert len(volumes) == 4
        image = volumes.image[:]
        assert image.shape[0] == 4 and np.isfinite(image).all()
    assert len(list((out.parent / "nifti").rglob("*.nii.gz"))) >= 4


def test_second_run_does_nothing(chain):
    again = _run(chain, TARGET, timeout=180)
    assert again.returncode == 0, again.stdout
    assert "Nothing to be done" in again.stdout, again.stdout


def test_new_sample_set_adds_only_sampling_jobs(chain):
    extra = chain["workdir"] / "more.yaml"
    extra.write_text(yaml.safe_dump(
        {"sample_sets": {"more": {"ldm": "demo", "n": 2, "sampler": "rflow", "steps": 4, "batch_size": 2}}}
    ))  # fmt: skip
    dry = _run(chain, "-n", "results/synthetic/demo/more/volumes.h5", TARGET,
               configfiles=("config.yaml", extra.name), timeout=180)  # fmt: skip
    assert dry.returncode == 0, dry.stdout
    table = re.search(r"Job stats:\n(.*?)\n\n", dry.stdout, re.S)
    assert table, dry.stdout
    rules = {
        ln.split()[0]
        for ln in table.group(1).splitlines()[2:]
        if ln.split() and ln.split()[0] != "total"
    }
    assert rules == {"sample", "decode_synthetic"}, dry.stdout
