"""Evaluation of label maps (a label-map autoencoder's reconstructions, a label-map generator's
sample sets): per-label volume fractions and per-label Dice. Label maps are ``(X, Y, Z)`` integer
arrays with values 0..L-1 (index into the label names)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from medldm.evaluation.diversity import summary


def volume_fractions(maps: Iterable[np.ndarray], n_labels: int) -> np.ndarray:
    """``(N, L)``: the fraction of each map's voxels that carry each label (rows sum to 1)."""
    rows = [np.bincount(np.asarray(m, np.int64).ravel(), minlength=n_labels)[:n_labels] / np.asarray(m).size
            for m in maps]
    return np.array(rows, np.float64).reshape(len(rows), n_labels)


def fraction_summary(fractions: np.ndarray, names: Sequence[str]) -> dict[str, dict]:
    """{label name: {mean, std, n}} of ``volume_fractions``."""
    return {name: summary(fractions[:, i]) for i, name in enumerate(names)}


def dice_per_label(pred: np.ndarray, ref: np.ndarray, n_labels: int) -> np.ndarray:
    """``(L - 1,)`` Dice of each foreground label (1..L-1) between two maps; NaN where the label
    is in neither."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    out = np.full(n_labels - 1, np.nan)
    for label in range(1, n_labels):
        p, r = pred == label, ref == label
        total = p.sum() + r.sum()
        if total:
            out[label - 1] = 2.0 * np.logical_and(p, r).sum() / total
    return out
