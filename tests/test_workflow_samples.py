"""Named sample sets: a new set added to a finished run plans only its own jobs, never training."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import run_snakemake

TRAINING_RULES = {"demo_cohort", "prepare", "manifest", "train_vae", "export_latents", "train_ldm"}


def planned_rules(stdout: str) -> dict[str, int]:
    """{rule: job count} from the 'Job stats' table of a dry run (empty when nothing is to be done)."""
    if "Job stats:" not in stdout:
        return {}
    table = stdout.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)
            if m.group(1) != "total"}


@pytest.mark.slow
def test_new_sample_set_runs_only_its_sampling_and_decoding(tiny_run, test_config, tmp_path):
    finished = run_snakemake(tiny_run, "-n", "--configfile", str(tiny_run / "config.yaml"))
    assert planned_rules(finished.stdout) == {}, "the tiny run is not finished"
    first = next(iter(test_config["sample_sets"].values()))
    ldm = first["ldm"]
    test_config["sample_sets"]["extra"] = {**first, "n": 2, "seed": 123}
    config_file = tmp_path / "config.yaml"  # the shared run's own config stays untouched
    config_file.write_text(yaml.safe_dump(test_config))

    results = test_config["results"]
    target = f"{results}/synthetic/{ldm}/extra/volumes.h5"
    plan = planned_rules(run_snakemake(tiny_run, "-n", target, "--configfile", str(config_file)).stdout)
    assert plan == {"sample": 1, "decode_synthetic": 1}, plan

    everything = planned_rules(run_snakemake(tiny_run, "-n", "--configfile", str(config_file)).stdout)
    assert not TRAINING_RULES & set(everything), everything
    assert everything.get("sample") == 1 and everything.get("decode_synthetic") == 1, everything


def test_shared_classifier_arms_are_planned_once_for_two_sample_sets(test_config, tmp_path):
    """The real arm (once per run) and the reconstruction arm (once per autoencoder) are their own
    jobs, shared by every sample set's classifier evaluation."""
    first = next(iter(test_config["sample_sets"].values()))
    test_config["sample_sets"]["extra"] = {**first, "seed": 123}
    evaluations = [f"{test_config['results']}/eval/synthetic/{s['ldm']}/{name}/classifier.json"
                   for name, s in test_config["sample_sets"].items()]
    plan = planned_rules(run_snakemake(tmp_path, "-n", *evaluations, config=test_config).stdout)
    assert plan["evaluate_classifier"] == 2, plan
    assert plan["evaluate_classifier_real"] == 1, plan
    assert plan["evaluate_classifier_reconstructions"] == len(test_config["vae"]), plan


def test_old_rule_names_still_work_as_resources_keys(test_config, tmp_path):
    """`decode_samples` became `decode_synthetic` ("samples" only means subjects): an old
    `resources` key still applies to the renamed rule, with a deprecation message."""
    test_config["resources"] = {"decode_samples": {"mem_mb": 1234}}
    target = f"{test_config['results']}/synthetic/demo/demo/volumes.h5"
    proc = run_snakemake(tmp_path, "-n", target, config=test_config)
    assert "resources.decode_samples is deprecated" in proc.stdout + proc.stderr
    job = proc.stdout.split("rule decode_synthetic:")[1].split("\n\n")[0]
    assert "mem_mb=1234" in job, job

    test_config["resources"]["decode_synthetic"] = {"mem_mb": 1}
    out = run_snakemake(tmp_path, "-n", target, config=test_config, check=False)
    assert out.returncode != 0 and "keep only `decode_synthetic`" in out.stdout + out.stderr


def test_a_set_runs_only_the_evaluations_it_names(test_config, tmp_path):
    """sample_sets.<name>.evaluate: a set naming only image_metrics gets no classifier job and no
    classifier.json in the report; its twin without the key gets both."""
    first = next(iter(test_config["sample_sets"].values()))
    test_config["sample_sets"] = {"all": dict(first), "fid_only": {**first, "evaluate": ["image_metrics"]}}
    proc = run_snakemake(tmp_path, "-n", config=test_config)
    plan = planned_rules(proc.stdout)
    assert plan["evaluate_synthetic"] == 2 and plan["evaluate_classifier"] == 1, plan
    assert "/all/classifier.json" in proc.stdout and "/fid_only/classifier.json" not in proc.stdout
