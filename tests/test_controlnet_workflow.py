"""ControlNets in the workflow: config/controlnet.yaml's plan, and the refusals before any job."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from tests.conftest import REPO, run_snakemake
from tests.test_spatial_workflow import refusal
from tests.test_workflow_samples import planned_rules


def test_dry_run_of_config_controlnet_plans_training_sets_and_adherence(tmp_path):
    configs = [str(REPO / "config" / name) for name in ("config.yaml", "controlnet.yaml")]
    out = run_snakemake(tmp_path, "-n", "-p", "--configfile", *configs).stdout
    plan = planned_rules(out)
    assert plan["train_controlnet"] == 1 and plan["train_ldm"] == 1, plan
    assert plan["evaluate_segmentation"] == 3 and plan["sample"] == 3, plan  # demo, controlnet, control
    for name, scale in (("controlnet", 1.0), ("control", 0.0)):
        job = [b for b in out.split("\n\n") if "rule sample:" in b and f"sample_set={name}\n" in b + "\n"]
        assert len(job) == 1, name
        assert "--controlnet results/controlnet/controlnet/tissue/controlnet.pt" in job[0]
        assert "--real results/controlnet/vae/demo/latents.h5" in job[0]
        assert f'"conditioning_scale": {scale}' in job[0] and "ldm=demo" in job[0]
    train = [b for b in out.split("\n\n") if "rule train_controlnet:" in b][0]
    assert "--ldm results/controlnet/ldm/demo/ldm.pt" in train and "controlnet/tissue/controlnet.pt" in train


def controlnet_config() -> dict:
    """config/test.yaml (paired-label demo) with a ControlNet on its ldm and a set of it."""
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config["controlnet"] = {"edges": {"ldm": "demo", "maps": "label", "transform": "contour", "train": {"steps": 5}}}
    config["sample_sets"]["steered"] = {"controlnet": "edges", "conditions": {"from": "test"}, "sampler": "rflow",
                                        "steps": 5, "batch_size": 4}
    return config


def test_a_controlnet_set_plans_its_training_and_samples_its_base(tmp_path):
    out = run_snakemake(tmp_path, "-n", config=controlnet_config()).stdout
    assert planned_rules(out)["train_controlnet"] == 1
    assert re.search(r"wildcards: ldm=demo, sample_set=steered", out)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["controlnet"]["edges"].update({"ldm": "nosuch"}),
     r"controlnet.edges.ldm names 'nosuch', which is not in `ldm`"),
    (lambda c: c["ldm"]["demo"].update({"model": {"name": "dit3d", "variant": "S/2"}}),
     r"controlnet.edges.ldm names ldm.demo, a 'dit3d' model"),
    (lambda c: c["ldm"]["demo"].update({"conditions": ["label"]}),
     r"controlnet.edges.ldm names ldm.demo, which takes extra input channels"),
    (lambda c: c["ldm"]["demo"].update({"task": "inpaint"}),
     r"controlnet.edges.ldm names ldm.demo, which takes extra input channels \(task 'inpaint'"),
    (lambda c: c["controlnet"]["edges"].update({"maps": "mask"}),
     r"controlnet.edges.maps is 'mask', but the sample sheet .* has no `mask`"),
    (lambda c: c["sample_sets"]["steered"].pop("conditions"),
     r"sample_sets.steered names controlnet 'edges' but has no `conditions`"),
    (lambda c: c["sample_sets"]["steered"].update({"controlnet": "nosuch"}),
     r"sample_sets.steered.controlnet names 'nosuch', which is not in `controlnet`"),
    (lambda c: (c["ldm"].update({"other": copy.deepcopy(c["ldm"]["demo"])}),
                c["sample_sets"]["steered"].update({"ldm": "other"})),
     r"sample_sets.steered names ldm 'other' and controlnet 'edges', whose base is ldm 'demo'"),
    (lambda c: c["sample_sets"]["demo"].update({"conditioning_scale": 0.5}),
     r"sample_sets.demo.conditioning_scale is set but the set names no `controlnet`"),
])
def test_bad_controlnets_stop_before_any_job(tmp_path, change, message):
    config = controlnet_config()
    change(config)
    out = refusal(tmp_path, config)
    assert re.search(message, out), out[-2000:]
