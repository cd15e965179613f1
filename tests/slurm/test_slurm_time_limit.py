"""A SLURM time limit survived unattended: train_ldm under profiles/slurm, on toy latents, with a
2-minute limit its training outlasts. SLURM warns it with SIGTERM before the limit (slurm_extra
--signal), the trainer writes a checkpoint and exits 75, Snakemake resubmits it with a longer limit
(retries, runtime x attempt) and the resubmitted job resumes; one `snakemake` run ends with ldm.pt.

Also shows what a training job asks SLURM for under the default config (one GPU). Needs root and
apt-get (cluster.sh); about four minutes.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from slurm_harness import REPO, merged_profile, run_snakemake, scontrol_job, skip_reason

_reason = skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

sys.path.insert(0, str(REPO))
from medldm.diffusion.training import Trainer  # noqa: E402
from tests.ldm_toys import ldm_settings, make_latents, make_vae_file  # noqa: E402

pytestmark = pytest.mark.slurm

LDM_OUT = "results/ldm/demo/ldm.pt"
# Training sized to 150 s at this machine's speed: the first job (2 minutes, warned 50 to 80 s
# before its end, after 20 s or more of start-up) cannot finish it; the second (4 minutes) can.
TRAIN_SECONDS = 150


def steps_per_second(tmp_path: Path, vae: Path, latents: Path) -> float:
    """This machine's training speed for the toy model, on one thread as in the 1-CPU job."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = ldm_settings(train={"steps": 40, "log_every": 10, "val_every": 1000, "checkpoint_every": 1000})
        Trainer(settings, latents, vae, tmp_path / "calib", tmp_path / "calib.pt", torch.device("cpu"),
                progress=False).run()
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "calib" / "metrics.csv") as fh:
        rates = [float(r["steps_per_s"]) for r in csv.DictReader(fh)][1:]  # the first holds start-up
    return sum(rates) / len(rates)


def toy_run_dir(workdir: Path, train: dict, resources: dict) -> Path:
    """A workdir whose results/vae/demo holds toy latents and vae.pt, and its config.yaml."""
    vae_dir = workdir / "results" / "vae" / "demo"
    vae_dir.mkdir(parents=True)
    vae = make_vae_file(vae_dir / "vae.pt")
    make_latents(vae_dir / "latents.h5", vae)
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config["ldm"]["demo"]["train"] = ldm_settings(train=train)["train"]
    config["ldm"]["demo"]["model"] = ldm_settings()["model"]
    config["resources"] = resources
    config["cluster"] = {"device": "cpu"}  # the test cluster's GPU is a fake: train on CPU on purpose
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


def run_train_ldm(workdir: Path, profile: Path, timeout: int):
    """snakemake --profile ... ldm.pt; latents.h5 and vae.pt stand in for the upstream stages."""
    return run_snakemake(workdir, profile, LDM_OUT, "--allowed-rules", "train_ldm",
                         "--directory", str(workdir), "--snakefile", str(REPO / "Snakefile"),
                         "--configfile", str(workdir / "config.yaml"), timeout=timeout)


@pytest.fixture(scope="module")
def time_limited(slurm_cluster, tmp_path_factory):
    calib = tmp_path_factory.mktemp("calib")
    vae = make_vae_file(calib / "vae.pt")
    steps = max(200, int(steps_per_second(calib, vae, make_latents(calib / "latents.h5", vae)) * TRAIN_SECONDS))
    # no `gpu`: the default config's request; runtime 2 minutes, x attempt on resubmission
    workdir = toy_run_dir(tmp_path_factory.mktemp("time_limit"),
                          {"steps": steps, "log_every": max(1, steps // 20), "val_every": steps,
                           "checkpoint_every": steps},
                          {"train_ldm": {"runtime": 2, "mem_mb": 2000}})
    # TERM 20 s before the limit (Slurm checks every 30 s: it comes 20 to 50 s early); a
    # signal during start-up (imports) would kill the job before it can checkpoint
    profile = merged_profile(workdir / "profile", {
        "retries": 4,
        "set-threads": {"train_ldm": 1},
        "set-resources": {"train_ldm": {"slurm_extra": "'--signal=TERM@20'"}},
    })
    res = run_train_ldm(workdir, profile, timeout=1200)
    jobs = re.findall(r"SLURM jobid (\d+) \(log: \S+/rule_train_ldm/", res.stdout)
    print(f"\ntime-limit run: {steps} steps, SLURM jobs {jobs}")
    return {"workdir": workdir, "res": res, "jobs": jobs, "steps": steps}


def test_preflight_stops_an_impossible_request_before_any_sbatch(slurm_cluster, tmp_path):
    workdir = toy_run_dir(tmp_path, {"steps": 10}, {"train_ldm": {"cpus_per_task": 64, "gpu": 2}})
    res = run_train_ldm(workdir, merged_profile(workdir / "profile"), timeout=300)
    print(res.stdout[-1500:])
    assert res.returncode != 0 and "SLURM jobid" not in res.stdout, res.stdout
    assert "rule train_ldm: 64 CPUs per task (threads), but the nodes of partition 'gpu' have at most 2 CPUs" \
        in res.stdout, res.stdout
    assert "rule train_ldm: 2 GPUs, but the nodes of partition 'gpu' have at most 1" in res.stdout


def test_time_limited_training_resubmits_and_resumes_unattended(time_limited):
    res, jobs, workdir = time_limited["res"], time_limited["jobs"], time_limited["workdir"]
    assert res.returncode == 0, res.stdout[-6000:]
    assert (workdir / LDM_OUT).is_file()
    assert len(jobs) >= 2, res.stdout[-6000:]
    first, last = scontrol_job(jobs[0]), scontrol_job(jobs[-1])
    # the first job ended on the warning (trainer exit 75, so the job FAILED), before its limit
    assert first["JobState"] == "FAILED", first
    first_log = workdir / ".snakemake/slurm_logs/rule_train_ldm/demo" / f"{jobs[0]}.log"
    assert "returned non-zero exit status 75" in first_log.read_text(), first_log.read_text()[-3000:]
    assert first["TimeLimit"] == "00:02:00" and last["TimeLimit"] == f"00:0{2 * len(jobs)}:00", (first, last)
    assert last["JobState"] == "COMPLETED", last
    # checkpoint_every = steps: a checkpoint before the end comes only from a stop on the signal
    log = (workdir / "results/logs/ldm/demo/train_ldm.log").read_text()
    resumed = re.search(r"resumed at step (\d+) of (\d+)", log)
    assert resumed and 0 < int(resumed.group(1)) < time_limited["steps"], log[-3000:]


def test_training_job_asks_for_a_gpu_under_the_default_config(time_limited):
    job = scontrol_job(time_limited["jobs"][0])
    assert job["TresPerJob"] == "gres:gpu:1" and job["Partition"] == "gpu", job
    log = (time_limited["workdir"] / "results/logs/ldm/demo/train_ldm.log").read_text()
    # the fake GPU has no CUDA behind it: said first, then CPU training as configured
    assert "has no GPU that torch can use (CUDA_VISIBLE_DEVICES=0)" in log.splitlines()[0], log[:500]
    assert "training on cpu" in log
