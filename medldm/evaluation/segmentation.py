"""Segmentation evaluation of label-conditioned synthesis: a small MONAI segmenter (3D, or 2D for
2D images: the dimension follows the data) trained on (image, label map) pairs, Dice per label,
and percentile bootstrap 95 % intervals.

Three uses, all with the same network, seed and number of optimiser steps so their numbers
compare: the ceiling (trained on the real training subjects, scored on the real test subjects);
adherence (that segmenter's output on each synthetic volume against the map the volume carries,
its condition or generated map; a set without maps is the control, scored against randomly
paired real test maps); train on synthetic, test on real (the network trained on synthetic pairs
alone, and on real plus synthetic, scored on the real test subjects).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from medldm.data.cohort import Rows, load_prepared
from medldm.errors import InputError
from medldm.evaluation.classifier import bootstrap_rows
from medldm.evaluation.inpainting import summarise
from medldm.runtime import seed_everything

log = logging.getLogger(__name__)

ARMS = ("real", "synthetic", "real+synthetic")
MODEL_TAG = ("kind", "segmenter")
FORMAT_VERSION = 1


@dataclass
class Pairs:
    """Images (N, X, Y, Z) or (N, X, Y) float32 in [0, 1] and their label maps of the same shape, integer 0..L-1,
    each an array or a lazy ``cohort.Rows`` (``[rows]`` stacks a batch); the subjects' ids if known."""

    images: np.ndarray | Rows
    labels: np.ndarray | Rows
    subject_ids: list[str] | None = None

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} label maps")

    def __len__(self) -> int:
        return len(self.images)

    def in_memory(self, limit_mb: float = 256) -> Pairs:
        """These pairs read into arrays once, when they fit in ``limit_mb`` (training draws every
        pair many times); else themselves, read when indexed."""
        if len(self) * np.asarray(self.images[0]).nbytes * 1.25 > limit_mb * 2**20:
            return self
        return Pairs(self.images[:], self.labels[:], self.subject_ids)

    @property
    def spatial_dims(self) -> int:
        return np.ndim(self.images[0])

    @staticmethod
    def concat(*parts: Pairs) -> Pairs:
        return Pairs(Rows(ConcatDataset([p.images for p in parts])), Rows(ConcatDataset([p.labels for p in parts])))


def build_segmenter(settings: dict, n_labels: int, spatial_dims: int = 3) -> torch.nn.Module:
    """(B, 1, X, Y, Z) (or (B, 1, X, Y), ``spatial_dims`` 2) -> logits (B, n_labels, ...): MONAI ``UNet``
    (``channels``, stride 2 between levels, ``num_res_units``, instance norm) or ``SegResNet``
    (``init_filters``, one block per level)."""
    from monai.networks.nets import SegResNet, UNet

    network, channels = settings.get("network", "unet"), list(settings.get("channels", [8, 16, 32]))
    if network == "unet":
        return UNet(spatial_dims=spatial_dims, in_channels=1, out_channels=n_labels, channels=channels,
                    strides=[2] * (len(channels) - 1), num_res_units=settings.get("num_res_units", 1),
                    norm="instance")
    if network == "segresnet":
        return SegResNet(spatial_dims=spatial_dims, in_channels=1, out_channels=n_labels,
                         init_filters=settings.get("init_filters", 8), blocks_down=[1] * len(channels),
                         blocks_up=[1] * (len(channels) - 1), norm="instance")
    raise InputError(f"evaluate.segmentation.network is {network!r}; use 'unet' or 'segresnet'")


def divisor(settings: dict) -> int:
    """What each spatial size must be a multiple of for the network (padding brings it there)."""
    return 2 ** (len(settings.get("channels", [8, 16, 32])) - 1)


def _pad(x: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-pad the spatial axes of ``x`` (B, C, ...) up to multiples of ``k`` (at their far ends)."""
    pads = []
    for size in reversed(x.shape[2:]):
        pads += [0, -size % k]
    return torch.nn.functional.pad(x, pads)


def train_segmenter(data: Pairs, settings: dict, n_labels: int, device: torch.device, seed: int = 0,
                    desc: str = "segmenter") -> torch.nn.Module:
    """A fresh segmenter trained for ``steps`` steps of ``batch_size`` pairs drawn uniformly
    (seeded), with MONAI ``DiceCELoss`` (softmax, one-hot targets)."""
    from monai.losses import DiceCELoss
    from tqdm import tqdm

    if not len(data):
        raise InputError(f"{desc}: no (image, label map) pairs to train on")
    seed_everything(seed)
    data = data.in_memory()
    model = build_segmenter(settings, n_labels, data.spatial_dims).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.get("lr", 1e-3),
                                  weight_decay=settings.get("weight_decay", 1e-5))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    steps, batch_size, k = settings.get("steps", 500), settings.get("batch_size", 4), divisor(settings)
    batches = np.random.default_rng(seed).integers(len(data), size=(steps, batch_size))
    model.train()
    for step, rows in enumerate(tqdm(batches, desc=desc, disable=not sys.stderr.isatty()), 1):
        x = _pad(torch.from_numpy(data.images[rows])[:, None], k).to(device)
        y = _pad(torch.from_numpy(data.labels[rows].astype(np.int64))[:, None], k).to(device)
        loss = loss_fn(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            log.info("%s: step %d/%d, Dice-CE loss %.4f", desc, step, steps, loss.item())
    return model.eval()


@torch.no_grad()
def segment(model: torch.nn.Module, images: np.ndarray, device: torch.device, settings: dict) -> np.ndarray:
    """Label maps (N, X, Y, Z) or (N, X, Y) uint8: the argmax of the segmenter on each image of a batch."""
    x = torch.from_numpy(np.asarray(images, np.float32))[:, None]
    logits = model(_pad(x, divisor(settings)).to(device))
    return logits[(..., *(slice(size) for size in x.shape[2:]))].argmax(1).to(torch.uint8).cpu().numpy()


def dice_per_label(predicted: np.ndarray, target: np.ndarray, n_labels: int) -> np.ndarray:
    """Dice (N, n_labels - 1) of each foreground label (1..L-1) per volume (MONAI ``compute_dice``);
    NaN where the target lacks the label (no overlap to score)."""
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    def hot(maps):
        return one_hot(torch.from_numpy(np.asarray(maps, np.int64))[:, None], n_labels)

    return compute_dice(hot(predicted), hot(target), include_background=False, ignore_empty=True).numpy()


def check_label_maps(maps: np.ndarray, n_labels: int, where: str) -> None:
    """An InputError naming ``where`` when a map holds a value outside 0..n_labels-1."""
    top = int(np.max(maps)) if np.size(maps) else 0
    if top >= n_labels:
        raise InputError(f"{where}: label value {top}, but the config's `labels` name {n_labels} labels "
                         f"(values 0..{n_labels - 1}); make the label maps and `labels` agree")


def summarise_dice(values: np.ndarray, label_names: Sequence[str], replicates: int, seed: int) -> dict:
    """{label: {mean, ci_low, ci_high, n}} over volumes (percentile bootstrap 95 % intervals, the
    same resampled rows for every label), plus "mean" (the mean over foreground labels per volume)."""
    values = np.asarray(values, np.float64).reshape(len(values), len(label_names) - 1)
    boots = bootstrap_rows(len(values), replicates, seed) if len(values) else np.zeros((1, 0), np.int64)
    with warnings.catch_warnings():  # a volume or resample with no label present is NaN, and skipped
        warnings.simplefilter("ignore", RuntimeWarning)
        out = {name: summarise(values[:, i], boots) for i, name in enumerate(label_names[1:])}
        out["mean"] = summarise(np.nanmean(values, axis=1), boots)
    return out


def control_pairing(n_volumes: int, n_test: int, seed: int) -> np.ndarray:
    """The real test map (row of the test split) each control volume is scored against: a seeded
    random permutation of the test subjects, repeated when there are more volumes than subjects."""
    if n_test < 1:
        raise InputError("the segmentation control needs real test subjects with label maps; the test split is empty")
    rng = np.random.default_rng(seed)
    reps = -(-n_volumes // n_test)
    return np.concatenate([rng.permutation(n_test) for _ in range(reps)])[:n_volumes].astype(np.int64)


def score(model: torch.nn.Module, data: Pairs, settings: dict, label_names: Sequence[str],
          device: torch.device) -> dict:
    """{per_subject: (N, L-1) Dice list, dice: summary} of ``model`` on ``data``, a batch read at a time."""
    size, values = settings.get("batch_size", 4), []
    for start in range(0, len(data), size):
        rows = np.arange(start, min(start + size, len(data)))
        values.append(dice_per_label(segment(model, data.images[rows], device, settings), data.labels[rows],
                                     len(label_names)))
    values = np.concatenate(values) if values else np.zeros((0, len(label_names) - 1))
    return {"per_subject": values.tolist(), "dice": summarise_dice(values, label_names,
                                                                  settings.get("bootstrap", 1000),
                                                                  settings.get("seed", 0))}


def real_pairs(manifest, classes: list[str], labels: Sequence[str]) -> dict[str, Pairs]:
    """{train, test: the real subjects' (image, label map) pairs}, read a volume at a time; each map
    checked to hold only the config's label values."""
    prepared = load_prepared(manifest, classes, with_labels=True)
    if prepared.labels is None:
        raise InputError(f"{manifest}: the subjects have no label maps (sample sheet column `label`), but "
                         "evaluate.segmentation needs them; add label maps or set evaluate.segmentation.enabled: false")
    pairs = {}
    for split in ("train", "test"):
        subset = prepared.subset(split)
        if not len(subset):
            raise InputError(f"{manifest}: no {split} subjects; the segmentation evaluation needs train and test subjects")
        pairs[split] = Pairs(subset.volumes(), Rows(subset.labels), subset.subject_ids)
        for i, sid in enumerate(subset.subject_ids):
            check_label_maps(pairs[split].labels[i], len(labels), f"{manifest}: label map of {split} subject {sid}")
    return pairs
