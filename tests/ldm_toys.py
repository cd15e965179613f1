"""Toy latents and settings for the diffusion-stage tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medldm.data.h5layout import Header, create_latents
from medldm.provenance import sha256_file
from tests.conftest import validated_config

SCHEMA = Path(__file__).resolve().parent.parent / "config" / "schemas" / "config.schema.yaml"
SHAPE = (2, 4, 4, 4)  # (C, d, h, w)
CLASSES = ["HC", "TLE"]
TINY_UNET = {"name": "unet", "channels": [16, 32], "attention_levels": [False, False], "norm_num_groups": 8}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast as two, and far faster when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ldm_settings(**sections) -> dict:
    """A tiny ldm entry with schema defaults filled; ``sections`` update them, e.g. train={"steps": 5}."""
    tiny = {
        "vae": "toy",
        "model": TINY_UNET,
        "strategy": {"name": "rflow"},
        "train": {"steps": 40, "batch_size": 16, "lr": 2e-3, "warmup_steps": 5, "log_every": 4,
                  "val_every": 8, "checkpoint_every": 8, "ema_decay": 0.9},
    }
    for name, values in sections.items():
        tiny[name] = {**tiny.get(name, {}), **values} if isinstance(values, dict) else values
    return validated_config({"ldm": {"tiny": tiny}})["ldm"]["tiny"]


def sample_set_settings(**values) -> dict:
    return validated_config({"sample_sets": {"s": {"ldm": "tiny", **values}}})["sample_sets"]["s"]


def make_vae_file(path: Path, content: bytes = b"toy autoencoder") -> Path:
    path.write_bytes(content)
    return path


def make_latents(path: Path, vae: Path, n: int = 24, scale_factor: float = 0.5, means=(-2.0, 2.0)) -> Path:
    """n toy latents (unscaled): class c has mean means[c] and std 1; the last quarter is `val`."""
    rng = np.random.default_rng(0)
    header = Header(grid_affine=np.diag([4.0, 4.0, 4.0, 1.0]), grid_shape=(16, 16, 16), class_names=CLASSES,
                    label_names=[], settings={"toy": True}, scale_factor=scale_factor,
                    vae_sha256=sha256_file(vae))
    with create_latents(path, n, SHAPE, header) as writer:
        for i in range(n):
            mu = means[i % 2] + rng.normal(size=SHAPE)
            writer.append(f"toy{i:02d}", i % 2, "val" if i >= n * 3 // 4 else "train",
                          mu=mu.astype(np.float32), logvar=np.full(SHAPE, -6.0, np.float32))
        writer.set_latent_stats(np.zeros(SHAPE[0]), np.full(SHAPE[0], 2.0), scale_factor)
    return path
