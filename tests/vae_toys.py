"""Toy data and settings for the autoencoder tests: brain-like ellipsoid phantoms with label maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medldm.data.cohort import PreparedSet
from medldm.io import save_nifti
from tests.conftest import validated_config

LABELS = ["background", "CSF", "GM", "WM"]
CLASSES = ["HC", "TLE"]
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def shifted(affine: np.ndarray, i: int) -> np.ndarray:
    """``affine`` with its origin moved by a subject-specific offset (prepared subjects' own positions)."""
    out = affine.copy()
    out[:3, 3] += [3.0 * i, -2.0 * i, 1.5 * i]
    return out


def vae_settings(**sections) -> dict:
    """A tiny autoencoder's settings, schema defaults filled; ``sections`` update the defaults,
    e.g. ``train={"epochs": 3}``."""
    tiny = {
        "model": {"channels": [8, 16], "latent_channels": 2, "norm_num_groups": 4},
        "train": {"batch_size": 2, "lr": 3e-3, "val_every": 1, "checkpoint_every": 1, "bf16": False},
        "inference": {"batch_size": 4},
    }
    for name, values in sections.items():
        tiny[name] = {**tiny.get(name, {}), **values} if isinstance(values, dict) else values
    return validated_config({"vae": {"tiny": tiny}})["vae"]["tiny"]


def phantom(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair: WM core, GM shell, CSF ventricle, on a jittered ellipsoid head."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centre = rng.uniform(-0.08, 0.08, 3)[:, None, None, None]
    radii = rng.uniform(0.7, 0.85, 3)[:, None, None, None]
    r = np.sqrt((((grid - centre) / radii) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[r < 1.0] = 2
    label[r < rng.uniform(0.6, 0.7)] = 3
    vent = np.sqrt((((grid - centre) / (radii * np.array([0.25, 0.4, 0.25])[:, None, None, None])) ** 2).sum(0))
    label[vent < 1.0] = 1
    means = np.array([0.0, 0.25, 0.6, 0.9], np.float32)
    image = means[label] + rng.normal(0, 0.02, shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), label


def toy_set(n: int, shape=(16, 16, 16), seed: int = 0, splits=None) -> PreparedSet:
    """``n`` phantoms on one grid; subject ``i`` has its own origin (``shifted(AFFINE, i)``)."""
    rng = np.random.default_rng(seed)
    pairs = [phantom(rng, shape) for _ in range(n)]
    splits = splits or ["train"] * n
    return PreparedSet(
        subject_ids=[f"toy{i:02d}" for i in range(n)],
        class_index=np.arange(n, dtype=np.int64) % 2,
        splits=list(splits),
        images=torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None],
        labels=torch.from_numpy(np.stack([p[1] for p in pairs])),
        affines=np.stack([shifted(AFFINE, i) for i in range(n)]),
    )


def write_prepared(root: Path, data: PreparedSet) -> Path:
    """Write ``data`` as prepared NIfTI files plus manifest.tsv under ``root``; returns the manifest."""
    rows = []
    for i, sid in enumerate(data.subject_ids):
        image, label = root / sid / "image.nii.gz", root / sid / "label.nii.gz"
        save_nifti(image, data.images[i, 0].numpy(), data.affines[i])
        save_nifti(label, data.labels[i].numpy(), data.affines[i])
        rows.append({"subject_id": sid, "class": CLASSES[data.class_index[i]], "split": data.splits[i],
                     "image": str(image), "label": str(label), "shape": "x".join(map(str, data.shape)),
                     "spacing": "4x4x4", "p_low": "0", "p_high": "1"})
    manifest = root / "manifest.tsv"
    pd.DataFrame(rows).to_csv(manifest, sep="\t", index=False)
    return manifest


@pytest.fixture
def single_thread():
    """Small convolutions run faster on one thread, and far faster on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
