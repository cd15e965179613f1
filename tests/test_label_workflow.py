"""The workflow of label-map generation (config/test_labels.yaml over config/test.yaml): what a dry
run plans for a label-map generator's sample set, and the refusals of bad label-autoencoder
settings before any job."""

from __future__ import annotations

import yaml

from tests.conftest import REPO, run_snakemake
from tests.test_config_validation import dry_run_error, good_rows, user_config


def label_config() -> dict:
    """config/test.yaml with the label-map autoencoder, ldm and sample set of config/test_labels.yaml."""
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    for section, entries in yaml.safe_load((REPO / "config" / "test_labels.yaml").read_text()).items():
        config[section] = {**config.get(section, {}), **entries}
    return config


def planned_outputs(workdir, config) -> str:
    return run_snakemake(workdir, "--summary", config=config).stdout


def test_a_label_set_plans_label_evaluations_and_no_image_evaluations(tmp_path):
    outputs = planned_outputs(tmp_path, label_config())
    assert "results/eval/synthetic/labels/labels/label_maps.json" in outputs
    assert "results/eval/vae/labels/reconstruction.json" in outputs  # Dice per label
    for image_only in ("synthetic/labels/labels/image_metrics.json", "synthetic/labels/labels/classifier.json",
                       "vae/labels/fid_features.npz", "vae/labels/classifier"):
        assert f"results/eval/{image_only}" not in outputs
    # the image set beside it keeps its image evaluations
    assert "results/eval/synthetic/demo/demo/image_metrics.json" in outputs
    assert "results/eval/synthetic/demo/demo/label_maps.json" not in outputs


def test_the_test_config_alone_plans_no_label_evaluation(tmp_path):
    outputs = planned_outputs(tmp_path, yaml.safe_load((REPO / "config" / "test.yaml").read_text()))
    assert "label_maps.json" not in outputs and "results/eval/synthetic/demo/demo/image_metrics.json" in outputs


def test_label_autoencoder_with_paired_labels_is_refused(tmp_path):
    config = label_config()
    config["vae"]["labels"]["paired_labels"] = True
    assert "vae.labels.inputs is labels" in dry_run_error(tmp_path, config)


def test_label_autoencoder_without_label_maps_is_refused(tmp_path):
    config = user_config(tmp_path, [r[:2] + ["", r[3]] for r in good_rows(tmp_path)])
    config["vae"] = {"demo": {"inputs": "labels"}}
    message = dry_run_error(tmp_path, config)
    assert "vae.demo.inputs is labels but the sample sheet has no label maps" in message


def test_imported_label_autoencoder_is_refused(tmp_path):
    config = label_config()
    config["vae"]["labels"]["pretrained"] = str(tmp_path / "weights.pt")
    assert "vae.labels.inputs is labels but vae.labels.pretrained" in dry_run_error(tmp_path, config)
