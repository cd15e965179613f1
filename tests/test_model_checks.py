"""Models and sample sets that cannot be right are refused before any job, naming the keys."""

from __future__ import annotations

from tests.conftest import run_snakemake
from tests.test_config_validation import dry_run_error


def test_guidance_with_an_untrained_null_class_is_refused(tmp_path, test_config):
    test_config["ldm"]["demo"]["train"]["class_dropout"] = 0
    out = dry_run_error(tmp_path, test_config)
    assert "sample_sets.demo.guidance_scale is 2.0" in out and "ldm.demo.train.class_dropout is 0" in out
    test_config["sample_sets"]["demo"]["guidance_scale"] = 1  # the plain conditional model needs no null class
    assert "train_ldm" in run_snakemake(tmp_path, "-n", config=test_config).stdout


def test_training_on_the_test_split_needs_allow_test_split(tmp_path, test_config):
    test_config["ldm"]["demo"]["train"]["splits"] = ["train", "test"]
    out = dry_run_error(tmp_path, test_config)
    assert "ldm.demo.train.splits includes 'test'" in out and "allow_test_split: true" in out
    test_config["ldm"]["demo"]["train"]["allow_test_split"] = True
    assert "train_ldm" in run_snakemake(tmp_path, "-n", config=test_config).stdout


def test_montage_subjects_0_is_refused_before_training(tmp_path, test_config):
    test_config["vae"]["demo"]["train"]["montage_subjects"] = 0  # crashed train_vae after training
    out = dry_run_error(tmp_path, test_config)
    assert "montage_subjects" in out and "minimum of 1" in out
