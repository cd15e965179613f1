"""Settings that do not change a rule's output are not its rerun triggers: changing one in a
finished run plans no training job (snakemake's own dry-run plan, on the shared tiny run)."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.conftest import run_snakemake
from tests.test_workflow_samples import planned_rules

TRAINING = {"train_vae", "export_latents", "train_ldm"}
TRAINED = ["results/vae/demo/latents.h5", "results/ldm/demo/ldm.pt"]  # every training job is upstream


def _set(config: dict, path: str, value) -> dict:
    """A copy of ``config`` with the dotted ``path`` set to ``value``."""
    config = copy.deepcopy(config)
    *parents, key = path.split(".")
    node = config
    for name in parents:
        node = node.setdefault(name, {})
    node[key] = value
    return config


def _plan(tiny_run, config, tmp_path) -> dict[str, int]:
    config_file = tmp_path / "config.yaml"  # the shared run's own config stays untouched
    config_file.write_text(yaml.safe_dump(config))
    return planned_rules(run_snakemake(tiny_run, "-n", *TRAINED, "--configfile", str(config_file)).stdout)


@pytest.mark.slow
@pytest.mark.parametrize("path, value", [
    ("vae.demo.inference.batch_size", 1),            # how many volumes at once
    ("vae.demo.inference.sw_batch_size", 2),
    ("vae.demo.inference.overlap", 0.75),           # no sliding windows without roi_size
    ("vae.demo.train.val_every", 5),                 # how a run proceeds, not what it learns
    ("vae.demo.train.checkpoint_every", 5),
    ("ldm.demo.train.log_every", 5),
    ("ldm.demo.train.val_every", 15),
    ("ldm.demo.train.checkpoint_every", 15),
    ("ldm.demo.train.compile", True),
    ("ldm.demo.train.sample_every", 10),            # live samples: what the run shows, not learns
    ("resources.train_vae", {"gpu": 2}),             # the GPU count (a run resumes or refuses)
    ("resources.train_ldm", {"gres": "gpu:a100:2"}),
])
def test_setting_that_does_not_change_a_model_plans_no_training(tiny_run, test_config, tmp_path, path, value):
    finished = run_snakemake(tiny_run, "-n", *TRAINED, "--configfile", str(tiny_run / "config.yaml"))
    assert planned_rules(finished.stdout) == {}, "the tiny run is not finished"
    plan = _plan(tiny_run, _set(test_config, path, value), tmp_path)
    assert not TRAINING & set(plan), f"changing {path} plans {plan}"


@pytest.mark.slow
def test_a_setting_that_changes_the_model_still_plans_training(tiny_run, test_config, tmp_path):
    plan = _plan(tiny_run, _set(test_config, "vae.demo.train.lr", 1e-3), tmp_path)
    assert {"train_vae", "export_latents", "train_ldm"} <= set(plan), plan


@pytest.mark.slow
def test_sliding_windows_re_export_the_latents_without_retraining(tiny_run, test_config, tmp_path):
    plan = _plan(tiny_run, _set(test_config, "vae.demo.inference.roi_size", [8, 8, 8]), tmp_path)
    assert "export_latents" in plan and "train_vae" not in plan, plan
