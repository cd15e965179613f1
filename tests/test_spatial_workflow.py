"""Spatially conditioned sets in the workflow: the chain's DAG and the refusals before any job."""

from __future__ import annotations

import copy
import csv
import io
import re

import pytest
import yaml

from tests.conftest import REPO, run_snakemake
from tests.test_workflow_samples import planned_rules

UPSTREAM = {"demo_cohort", "prepare", "manifest", "train_vae", "export_latents", "train_ldm"}


def spatial_config() -> dict:
    """config/test.yaml with a label-conditioned ldm, a set on the test subjects' maps and a set
    chained on the paired-label set `demo` (whose volumes.h5 has decoded label maps)."""
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config["ldm"]["spatial"] = {**copy.deepcopy(config["ldm"]["demo"]), "conditions": ["label"]}
    base = {"ldm": "spatial", "sampler": "rflow", "steps": 10, "batch_size": 4}
    config["sample_sets"]["real_maps"] = {**base, "conditions": {"from": "test"}}
    config["sample_sets"]["chained"] = {**base, "conditions": {"from": "demo"}}
    return config


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A work folder where every output of spatial_config() exists, recorded by Snakemake (params
    included) as after a finished run, without running a job."""
    workdir = tmp_path_factory.mktemp("spatial_recorded")
    config = spatial_config()
    summary = run_snakemake(workdir, "--summary", config=config).stdout
    for row in csv.DictReader(io.StringIO(summary[summary.index("output_file"):]), delimiter="\t"):
        path = workdir / row["output_file"]
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    run_snakemake(workdir, "--touch", "--cores", "1", config=config)
    return workdir, config


def dry_run(workdir, config, *args):
    out = run_snakemake(workdir, "-n", *args, config=config).stdout
    sets = set(re.findall(r"wildcards: ldm=\w+, sample_set=([\w.-]+)", out))
    return planned_rules(out), sets, out


def test_a_dry_run_shows_the_chain(tmp_path):
    """The chained set's sample job takes the source set's decoded volumes as input."""
    _, _, out = dry_run(tmp_path, spatial_config())
    chained = [block for block in out.split("\n\n") if "rule sample:" in block and "sample_set=chained" in block]
    assert len(chained) == 1 and "results/synthetic/demo/demo/volumes.h5" in chained[0], chained


def test_a_new_chained_set_plans_only_its_own_jobs(recorded):
    workdir, config = recorded
    assert dry_run(workdir, config)[0] == {}, "the recorded run is not finished"
    config = copy.deepcopy(config)
    config["sample_sets"]["chained2"] = {**config["sample_sets"]["chained"], "seed": 7}
    plan, sets, _ = dry_run(workdir, config)
    assert not UPSTREAM & set(plan), plan
    assert sets == {"chained2"} and plan["sample"] == 1 and plan["decode_synthetic"] == 1, plan


def test_a_new_seed_of_the_source_set_replans_both_sets_and_nothing_upstream(recorded):
    workdir, config = recorded
    config = copy.deepcopy(config)
    config["sample_sets"]["demo"]["seed"] = 11
    plan, sets, _ = dry_run(workdir, config)
    assert not UPSTREAM & set(plan), plan
    assert sets == {"demo", "chained"} and plan["sample"] == 2, (sets, plan)


def refusal(tmp_path, config) -> str:
    proc = run_snakemake(tmp_path, "-n", config=config, check=False)
    assert proc.returncode != 0
    assert not (tmp_path / "results").exists()  # stopped before any job
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("change, message", [
    (lambda c: c["sample_sets"]["chained"]["conditions"].update({"from": "nosuch"}),
     r"sample_sets.chained.conditions.from names 'nosuch': neither a split"),
    (lambda c: c["vae"]["demo"].update({"paired_labels": False}),
     r"sample_sets.chained.conditions.from names set 'demo', which has no label maps"),
    (lambda c: c["sample_sets"]["real_maps"].pop("conditions"),
     r"sample_sets.real_maps has no `conditions`, but ldm.spatial is conditioned on \['label'\]"),
    (lambda c: c["sample_sets"]["demo"].update({"conditions": {"from": "test"}}),
     r"sample_sets.demo.conditions is set, but ldm.demo has no `conditions`"),
    (lambda c: (c["split"].update({"val_fraction": 0}), c["sample_sets"]["real_maps"]["conditions"].update(
        {"from": "val"})), r"sample_sets.real_maps.conditions.from is 'val', but no subject is in split 'val'"),
    (lambda c: c["ldm"]["spatial"].update({"conditions": ["image"]}), r"another image channel is not supported yet"),
    (lambda c: c["ldm"]["spatial"].update({"conditions": ["label", "mask"]}),
     r"ldm.spatial.conditions names 'mask', but the sample sheet .* has no `mask` column value"),
    (lambda c: c["sample_sets"]["real_maps"].update({"condition_guidance_scale": 2.0}),
     r"condition_guidance_scale is 2.0 but ldm.spatial.train.condition_dropout is 0"),
])
def test_bad_conditions_stop_before_any_job(tmp_path, change, message):
    config = spatial_config()
    change(config)
    assert re.search(message, refusal(tmp_path, config))


def test_a_label_column_missing_for_some_rows_stops_before_any_job(tmp_path):
    import nibabel as nib
    import numpy as np

    rows = []
    for i in range(6):
        image, label = tmp_path / f"s{i}.nii.gz", tmp_path / f"s{i}_label.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), image)
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), label)
        rows.append(f"s{i}\t{image}\t{'' if i == 2 else label}\t{['HC', 'TLE'][i % 2]}")
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("subject_id\timage\tlabel\tclass\n" + "\n".join(rows) + "\n")
    config = spatial_config()
    config["demo"] = {"enabled": False}
    config["samples"] = str(sheet)
    out = refusal(tmp_path, config)
    # the sample sheet check (medldm.data.samplesheet) refuses it before the ldm's conditions are read
    assert re.search(r"samples.tsv: label maps are given for some subjects but not for \['s2'\]", out), out
