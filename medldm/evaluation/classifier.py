"""Train on synthetic, test on real: a 3D classifier trained on real volumes, the autoencoder's
reconstructions of them, synthetic volumes, or real plus synthetic volumes, each tested on the same
real test subjects, with bootstrap 95 % intervals of each arm and paired bootstrap intervals of
the differences between arms (the same resampled test subjects for both arms).

Every arm gets the same network, seed and number of optimiser steps; batches are drawn
class-balanced (each class equally likely, then a random volume of it) so the arms differ only in
where the training volumes come from. No left-right flips: laterality can be the signal (the demo's
TLE class is a left-sided atrophy).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata
from torch.utils.data import ConcatDataset

from medldm.data.cohort import Rows
from medldm.errors import InputError
from medldm.runtime import seed_everything

log = logging.getLogger(__name__)

ARMS = ("real", "reconstructions", "synthetic", "real+synthetic")
# (arm, baseline) pairs whose difference arm - baseline the report shows, when both arms exist:
# what synthetic data lose or add against real data, and against the autoencoder's floor.
DIFFERENCES = (("synthetic", "real"), ("real+synthetic", "real"), ("synthetic", "reconstructions"),
               ("reconstructions", "real"))
METRICS = ("accuracy", "balanced_accuracy", "roc_auc")
GRADCAM_LAYER = {"densenet": "class_layers.relu", "efficientnet": "_swish"}


@dataclass
class Dataset:
    """Volumes (N, X, Y, Z) float32 in [0, 1] with class indices (N,) int64. ``images`` is an
    array or a lazy ``cohort.Rows`` (read a volume at a time): ``images[rows]`` stacks a batch."""

    images: np.ndarray | Rows
    labels: np.ndarray

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(*parts: Dataset) -> Dataset:
        return Dataset(Rows(ConcatDataset([p.images for p in parts])), np.concatenate([p.labels for p in parts]))


def build_classifier(settings: dict, n_classes: int, spatial_dims: int = 3) -> torch.nn.Module:
    """A MONAI classifier from scratch: (B, 1, X, Y, Z) (or (B, 1, X, Y), ``spatial_dims`` 2) ->
    logits (B, n_classes).

    ``network`` "densenet" (``DenseNet`` with ``init_features``, ``growth_rate``, ``block_config``,
    ``bn_size``; DenseNet121's are 64, 32, [6, 12, 24, 16], 4) or "efficientnet" (``EfficientNetBN``
    ``efficientnet-b0``, batch norm). DenseNet's ``norm`` is "instance" (default) or "batch": with
    a few volumes per batch, batch-norm running statistics are poor and the demo's classifier then
    predicts one class.
    """
    from monai.networks.nets import DenseNet, EfficientNetBN

    network, norm = settings.get("network", "densenet"), settings.get("norm", "instance")
    if network == "densenet":
        return DenseNet(
            spatial_dims=spatial_dims, in_channels=1, out_channels=n_classes, norm=norm,
            init_features=settings.get("init_features", 64), growth_rate=settings.get("growth_rate", 32),
            block_config=tuple(settings.get("block_config", (6, 12, 24, 16))), bn_size=settings.get("bn_size", 4),
        )
    if network == "efficientnet":
        return EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=spatial_dims, in_channels=1,
                              num_classes=n_classes)
    raise InputError(f"evaluate.classifier.network is {network!r}; use 'densenet' or 'efficientnet'")


def balanced_batches(labels: np.ndarray, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """(steps, batch_size) row indices: each draw picks a class uniformly, then one of its rows."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    picks = rng.integers(len(classes), size=(steps, batch_size))
    return np.array([[members[k][rng.integers(len(members[k]))] for k in row] for row in picks],
                    dtype=np.int64).reshape(steps, batch_size)


def train_classifier(data: Dataset, settings: dict, n_classes: int, device: torch.device,
                     seed: int = 0) -> torch.nn.Module:
    """Train a fresh classifier for ``settings['steps']`` steps of ``settings['batch_size']``."""
    from tqdm import tqdm

    if len(np.unique(data.labels)) < 2:
        raise InputError(f"classifier training data hold only class(es) {np.unique(data.labels).tolist()}; "
                         "it needs at least two")
    seed_everything(seed)
    model = build_classifier(settings, n_classes, spatial_dims=np.ndim(data.images[0])).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.get("lr", 1e-3),
                                  weight_decay=settings.get("weight_decay", 1e-4))
    batches = balanced_batches(data.labels, settings.get("steps", 100), settings.get("batch_size", 4), seed)
    model.train()
    for rows in tqdm(batches, desc="classifier", disable=not sys.stderr.isatty()):
        x = torch.from_numpy(data.images[rows])[:, None].to(device)
        y = torch.from_numpy(data.labels[rows]).to(device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model.eval()


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, device: torch.device,
                  batch_size: int = 8) -> np.ndarray:
    """Class probabilities (N, n_classes) for volumes (N, X, Y, Z)."""
    out = [torch.softmax(model(torch.from_numpy(images[i:i + batch_size])[:, None].to(device)), 1).cpu().numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def roc_auc(labels: np.ndarray, proba: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties counted half); one-vs-rest macro average for more than two
    classes, as scikit-learn's ``roc_auc_score(multi_class="ovr")``; NaN when a class is missing."""
    classes = [1] if proba.shape[1] == 2 else range(proba.shape[1])
    values = []
    for c in classes:
        positive = labels == c
        n_pos, n_neg = positive.sum(), (~positive).sum()
        if not n_pos or not n_neg:
            return float("nan")
        ranks = rankdata(proba[:, c])
        values.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(values))


def _score(labels: np.ndarray, proba: np.ndarray, metric: str) -> float:
    predicted = proba.argmax(1)
    if metric == "accuracy":
        return float((predicted == labels).mean())
    if metric == "balanced_accuracy":  # mean recall over the classes present, as scikit-learn
        return float(np.mean([(predicted[labels == c] == c).mean() for c in np.unique(labels)]))
    return roc_auc(labels, proba)


def bootstrap_rows(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) test rows drawn with replacement: the same draws for every arm of a run, so
    that each arm's interval and the paired intervals of differences use the same resamples."""
    return np.random.default_rng(seed).integers(n, size=(n_boot, n))


def _interval(values: np.ndarray) -> tuple[float, float]:
    """Percentile 95 % interval of the finite values (NaN, NaN when there are none)."""
    values = values[np.isfinite(values)]
    return tuple(float(v) for v in np.percentile(values, [2.5, 97.5])) if values.size else (np.nan, np.nan)


def scores(labels: np.ndarray, proba: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy, balanced accuracy and ROC AUC (one-vs-rest for more than two classes), each with a
    percentile bootstrap 95 % interval over test subjects: {metric: {value, ci_low, ci_high}}."""
    boots = bootstrap_rows(len(labels), n_boot, seed)
    out = {}
    for metric in METRICS:
        low, high = _interval(np.array([_score(labels[b], proba[b], metric) for b in boots]))
        out[metric] = {"value": float(_score(labels, proba, metric)), "ci_low": low, "ci_high": high}
    return out


def paired_differences(labels: np.ndarray, probabilities: dict[str, np.ndarray], n_boot: int = 1000,
                       seed: int = 0) -> dict:
    """Differences arm - baseline of each metric for the ``DIFFERENCES`` pairs present in
    ``probabilities`` ({arm: (N, C) test probabilities}), with paired percentile bootstrap 95 %
    intervals: both arms are scored on the same resampled test subjects, so the interval reflects
    the uncertainty of the difference, not of each arm separately.

    Returns {"arm - baseline": {"arm", "baseline", metric: {value, ci_low, ci_high}}}.
    """
    boots = bootstrap_rows(len(labels), n_boot, seed)
    out = {}
    for arm, baseline in DIFFERENCES:
        if arm not in probabilities or baseline not in probabilities:
            continue
        a, b = np.asarray(probabilities[arm]), np.asarray(probabilities[baseline])
        entry = {"arm": arm, "baseline": baseline}
        for metric in METRICS:
            deltas = np.array([_score(labels[r], a[r], metric) - _score(labels[r], b[r], metric) for r in boots])
            low, high = _interval(deltas)
            entry[metric] = {"value": _score(labels, a, metric) - _score(labels, b, metric),
                             "ci_low": low, "ci_high": high}
        out[f"{arm} - {baseline}"] = entry
    return out


def run_arms(arms: dict[str, Dataset], test: Dataset, settings: dict, n_classes: int,
             device: torch.device) -> tuple[dict, dict[str, torch.nn.Module]]:
    """Train one classifier per arm and test each on ``test``.

    Returns ({arm: {n_train, metrics: {...}, probabilities: (N, C) list}}, {arm: model}).
    """
    seed = settings.get("seed", 0)
    results, models = {}, {}
    for arm, data in arms.items():
        log.info("classifier arm %s: %d training volumes, %d steps", arm, len(data), settings.get("steps", 100))
        model = train_classifier(data, settings, n_classes, device, seed)
        proba = predict_proba(model, test.images, device)
        results[arm] = {
            "n_train": len(data),
            "n_train_per_class": np.bincount(data.labels, minlength=n_classes).tolist(),
            "metrics": scores(test.labels, proba, settings.get("bootstrap", 1000), seed),
            "probabilities": proba.tolist(),
        }
        models[arm] = model
    return results, models


def gradcam(model: torch.nn.Module, images: np.ndarray, settings: dict, device: torch.device) -> np.ndarray:
    """Grad-CAM maps (N, X, Y, Z) in [0, 1] for the predicted class (MONAI ``GradCAM``)."""
    from monai.visualize import GradCAM

    layer = GRADCAM_LAYER[settings.get("network", "densenet")]
    cam = GradCAM(nn_module=model, target_layers=layer)
    x = torch.from_numpy(images)[:, None].to(device)
    return cam(x).detach().cpu().numpy()[:, 0]

