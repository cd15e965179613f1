"""Train-on-synthetic classifier arms, metrics and bootstrap intervals, Grad-CAM saliency."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medldm.errors import InputError
from medldm.evaluation.classifier import (
    Dataset,
    balanced_batches,
    gradcam,
    paired_differences,
    roc_auc,
    run_arms,
    scores,
)

CPU = torch.device("cpu")
SETTINGS = {"network": "densenet", "init_features": 8, "growth_rate": 4, "block_config": [2, 2], "bn_size": 2,
            "steps": 30, "batch_size": 4, "lr": 3e-3, "bootstrap": 200, "seed": 0}


def toy(n: int, seed: int, shape=(16, 16, 16)) -> Dataset:
    """Clearly separable: class 1 is bright in the left half, class 0 in the right half."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.random((n, *shape)).astype(np.float32) * 0.3
    images[labels == 1, : shape[0] // 2] += 0.5
    images[labels == 0, shape[0] // 2:] += 0.5
    return Dataset(images, labels.astype(np.int64))


def test_arms_reach_high_accuracy_on_separable_toy_set():
    test = toy(20, 2)
    results, models = run_arms({"real": toy(12, 0), "synthetic": toy(12, 1)}, test, SETTINGS, 2, CPU)
    assert set(results) == {"real", "synthetic"}
    for arm in results.values():
        metrics = arm["metrics"]
        assert metrics["accuracy"]["value"] > 0.9
        for m in metrics.values():
            assert m["ci_low"] <= m["value"] + 1e-9 and m["value"] <= m["ci_high"] + 1e-9
        assert arm["n_train_per_class"] == [6, 6]
    # Seeded: the same arm trained again gives the same probabilities.
    again, _ = run_arms({"real": toy(12, 0)}, test, SETTINGS, 2, CPU)
    assert np.allclose(again["real"]["probabilities"], results["real"]["probabilities"], atol=1e-5)
    maps = gradcam(models["real"], test.images[:2], SETTINGS, CPU)
    assert maps.shape == (2, 16, 16, 16) and 0 <= maps.min() and maps.max() <= 1


def test_training_needs_two_classes():
    one = Dataset(np.zeros((4, 8, 8, 8), np.float32), np.zeros(4, np.int64))
    with pytest.raises(InputError, match="at least two"):
        run_arms({"synthetic": one}, one, {**SETTINGS, "steps": 1}, 2, CPU)


def test_balanced_batches_draw_classes_equally():
    labels = np.array([0] * 90 + [1] * 10)
    rows = balanced_batches(labels, steps=200, batch_size=8, seed=0)
    assert rows.shape == (200, 8)
    assert abs(labels[rows].mean() - 0.5) < 0.05


def test_metrics_match_scikit_learn_and_intervals_cover():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n_classes in (2, 3):
        labels = rng.integers(n_classes, size=40)
        proba = rng.random((40, n_classes))
        proba[:, 0] = np.round(proba[:, 0], 1)  # ties
        proba /= proba.sum(1, keepdims=True)
        expected = (sklearn.roc_auc_score(labels, proba[:, 1]) if n_classes == 2
                    else sklearn.roc_auc_score(labels, proba, multi_class="ovr"))
        assert roc_auc(labels, proba) == pytest.approx(expected)
        out = scores(labels, proba, n_boot=300)
        assert out["balanced_accuracy"]["value"] == pytest.approx(
            sklearn.balanced_accuracy_score(labels, proba.argmax(1)))
        assert out["accuracy"]["ci_low"] < out["accuracy"]["value"] < out["accuracy"]["ci_high"]


def two_class_predictions(n: int = 40, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Test labels and the probabilities of made-up arms: a perfect one and two random ones."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    perfect = np.eye(2)[labels] * 0.8 + 0.1
    random = [rng.random(n) for _ in range(2)]
    return labels, {"perfect": perfect, **{name: np.stack([1 - r, r], 1) for name, r in zip(("random", "other"), random,
                                                                                            strict=True)}}


def test_paired_difference_of_identical_arms_is_exactly_zero(monkeypatch):
    labels, proba = two_class_predictions()
    monkeypatch.setattr("medldm.evaluation.classifier.DIFFERENCES", (("synthetic", "real"),))
    out = paired_differences(labels, {"real": proba["random"], "synthetic": proba["random"].copy()}, n_boot=200)
    assert list(out) == ["synthetic - real"]
    for metric in ("accuracy", "balanced_accuracy", "roc_auc"):
        # Paired: both arms see the same resampled subjects, so every resampled difference is 0.
        assert out["synthetic - real"][metric] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_paired_difference_of_perfect_and_random_arm_excludes_zero():
    labels, proba = two_class_predictions()
    arms = {"real": proba["perfect"], "synthetic": proba["random"], "reconstructions": proba["other"]}
    out = paired_differences(labels, arms, n_boot=300)
    assert set(out) == {"synthetic - real", "synthetic - reconstructions", "reconstructions - real"}
    worse = out["synthetic - real"]
    assert (worse["arm"], worse["baseline"]) == ("synthetic", "real")
    for metric in ("accuracy", "balanced_accuracy", "roc_auc"):
        d = worse[metric]
        perfect, random = scores(labels, arms["real"], 10)[metric], scores(labels, arms["synthetic"], 10)[metric]
        assert d["value"] == pytest.approx(random["value"] - perfect["value"])
        assert d["ci_low"] <= d["value"] <= d["ci_high"] < 0
