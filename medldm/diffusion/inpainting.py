"""Inpainting in latent space: the trained model's condition, and training-free RePaint.

A mask (1 = region to fill) lives on the prepared image grid; diffusion works on the latent grid,
``f`` times coarser per axis. ``latent_mask`` brings it there by max-pooling: a latent voxel is
masked when any voxel of its block is. That errs towards "unknown", which is what RePaint needs
(a latent voxel whose block is partly masked must not be clamped to the real latent, whose
decoding contains the tissue to be replaced), and it gives the trained model the same
conservative map. The decoder's paste-back restores the exact voxels outside the mask.

Trained model (``ldm.<name>.task: inpaint``): the network input is the noisy latent with
``conditioning`` appended: the scaled latent of the voided image (mask voxels set to 0 before
encoding, ``voided_mu`` in latents.h5) and the latent-grid mask, C + 1 channels in all.

RePaint (Lugmayr et al. 2022) with any ldm: after every reverse step the known region (outside
the latent-grid mask) is replaced by the real latent noised to the current level, and the
schedule jumps back ``jump_length`` steps ``jump_n_sample - 1`` times at every ``jump_length``-th
step (re-noising the whole latent), which costs about ``jump_n_sample`` times a plain sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from medldm.data.h5layout import H5File, open_latents
from medldm.diffusion.process import (
    LDM,
    Strategy,
    generate,
    guided_prediction,
    sample,
    sampling_plan,
)
from medldm.errors import InputError

TASKS = ("generate", "inpaint")
MASK_POOLING = "max"  # how the mask reaches the latent grid (recorded in ldm.pt)


def condition_channels(latent_channels: int) -> int:
    """Extra input channels of an inpainting model: the voided latent's C, and the mask."""
    return latent_channels + 1


def conditioning_record(latent_channels: int) -> dict:
    """What ``ldm.pt`` records about an inpainting model's condition."""
    return {"channels": condition_channels(latent_channels),
            "layout": ["voided_mu x scale_factor"] * latent_channels + ["mask on the latent grid"],
            "mask_pooling": MASK_POOLING}


def latent_mask(mask: torch.Tensor | np.ndarray, latent_grid) -> torch.Tensor:
    """(N, X, Y, Z) masks on the image grid -> (N, 1, d, h, w) float32 0/1 on the latent grid.

    A latent voxel is 1 when any image voxel of its block is masked (adaptive max-pooling, so a
    grid that does not divide evenly still gets every block covered).
    """
    mask = torch.as_tensor(mask)
    return F.adaptive_max_pool3d((mask > 0).float()[:, None], tuple(int(s) for s in latent_grid))


def conditioning(voided: torch.Tensor, mask_latent: torch.Tensor) -> torch.Tensor:
    """The trained model's condition: (N, C, d, h, w) SCALED voided latents and (N, 1, d, h, w)
    latent-grid masks -> (N, C + 1, d, h, w)."""
    return torch.cat([voided, mask_latent.to(voided.dtype)], dim=1)


def read_masks(f: H5File, path: str | os.PathLike, rows, *, voided: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The voided latents (unscaled, when ``voided``) and latent-grid masks of ``rows`` of a latents file."""
    needed = ["mask", "voided_mu"] if voided else ["mask"]
    missing = [name for name in needed if getattr(f, name) is None]
    if missing:
        raise InputError(
            f"{path} has no {' or '.join(missing)}: inpainting needs latents exported from a sample "
            "sheet with a `mask` column (demo: set `demo.masks`); then rerun export_latents"
        )
    rows = np.asarray(rows, dtype=np.int64)
    grid = f.mu.shape[2:]
    # a few full-resolution masks at a time: a whole cohort's would not fit in memory
    masks = [latent_mask(f.mask[rows[i:i + 16]], grid) for i in range(0, len(rows), 16)]
    if not masks:
        return (torch.zeros((0, *f.mu.shape[1:])) if voided else None), torch.zeros((0, 1, *grid))
    return (torch.from_numpy(f.voided_mu[rows]) if voided else None), torch.cat(masks)


def masked_rows(f: H5File, path, split: str) -> np.ndarray:
    """Rows of ``split`` whose mask marks at least one voxel; refuses a split without any."""
    read_masks(f, path, [], voided=False)  # the file must have masks
    rows = [int(i) for i in f.indices(split) if f.mask[int(i)].any()]
    if not rows:
        raise InputError(f"{path}: no row of split {split!r} has a non-empty inpainting mask; "
                         "choose another `split` for the inpaint set, or give those subjects masks")
    return np.array(rows, dtype=np.int64)


# ---- RePaint ---------------------------------------------------------------------------------

def repaint_schedule(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """Positions visited in the sampler's step list, 0 (pure noise) .. ``steps`` (clean).

    With r steps remaining at a multiple of ``jump_length`` (and at least ``jump_length`` steps
    done), the path jumps back ``jump_length`` positions, ``jump_n_sample - 1`` times (the RePaint
    paper's schedule, in the sampler's steps). jump_n_sample 1: the plain path 0, 1, .., steps.
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise InputError(f"repaint jump_length ({jump_length}) and jump_n_sample ({jump_n_sample}) must be >= 1")
    jumps = dict.fromkeys(range(jump_length, steps - jump_length + 1, jump_length), jump_n_sample - 1)
    p, path = 0, [0]
    while p < steps:
        p += 1
        path.append(p)
        if jumps.get(steps - p, 0) > 0:
            jumps[steps - p] -= 1
            p -= jump_length
            path.append(p)
    return path


def _signal_noise(strategy: Strategy, t: int | None) -> tuple[float, float]:
    """(a, b) with x_t = a x0 + b noise at training timestep t (None: clean, a = 1, b = 0)."""
    if t is None:
        return 1.0, 0.0
    if strategy.name == "rflow":
        s = float(t) / strategy.num_train_timesteps
        return 1.0 - s, s
    abar = float(strategy.scheduler.alphas_cumprod[int(t)])
    return abar**0.5, (1.0 - abar) ** 0.5


def renoise(strategy: Strategy, x: torch.Tensor, t_from: int | None, t_to: int, noise: torch.Tensor) -> torch.Tensor:
    """Forward process from level t_from to the noisier t_to: x_to = (a_to/a_from) x + sqrt(b_to^2 - (a_to/a_from)^2 b_from^2) noise."""
    a1, b1 = _signal_noise(strategy, t_from)
    a2, b2 = _signal_noise(strategy, t_to)
    gain = a2 / a1
    return gain * x + max(b2**2 - (gain * b1) ** 2, 0.0) ** 0.5 * noise


@torch.no_grad()
def repaint(model: nn.Module, strategy: Strategy, noise: torch.Tensor, labels: torch.Tensor, *,
            sampler: str, steps: int, guidance_scale: float, null_class: int, real: torch.Tensor,
            known: torch.Tensor, jump_length: int = 1, jump_n_sample: int = 1,
            generator: torch.Generator | None = None, progress: bool = False,
            cond: torch.Tensor | None = None) -> torch.Tensor:
    """RePaint in latent space with any ldm (``medldm.diffusion.process.sample``'s signature, plus):

    Args:
        real: (B, C, d, h, w) scaled real latents; known: (B, 1, d, h, w) 1 where the latent is kept
            (outside the latent-grid mask).
        jump_length, jump_n_sample: the resampling schedule (``repaint_schedule``).
        cond: a trained inpainting model's condition (``conditioning``), or None.
        generator: the re-noising draws (and the ddpm sampler's step noise), on noise's device.
    Returns:
        (B, C, d, h, w) scaled latents: ``real`` where known, the model's clean prediction elsewhere.
    """
    plan = sampling_plan(strategy, sampler, steps, generator)
    if bool((labels == null_class).all()):
        guidance_scale = 1.0
    levels = [*plan.timesteps, None]  # the noise level of the state at each position; None = clean
    known = known.to(real.dtype)

    def draw() -> torch.Tensor:
        return torch.randn(real.shape, generator=generator, device=real.device, dtype=real.dtype)

    def keep_known(x: torch.Tensor, p: int) -> torch.Tensor:
        return known * renoise(strategy, real, None, levels[p], draw()) + (1 - known) * x

    path = repaint_schedule(steps, jump_length, jump_n_sample)
    x, x0 = keep_known(noise, 0), noise
    pairs = list(zip(path[:-1], path[1:], strict=True))
    for here, there in tqdm(pairs, desc="repaint", disable=None if progress else True, leave=False):
        if there < here:  # jump back: re-noise the whole latent
            x = renoise(strategy, x, levels[here], levels[there], draw())
            continue
        tt = torch.full((x.shape[0],), levels[here], device=x.device, dtype=torch.long)
        out = guided_prediction(model, x, tt, labels, guidance_scale, null_class, cond)
        x, x0 = plan.step(out, here, x)
        if there < steps:
            x = keep_known(x, there)
    return known * real + (1 - known) * x0


# ---- inpaint sample sets ---------------------------------------------------------------------

METHODS = ("trained", "repaint")


@dataclass
class InpaintedSet:
    """An inpaint set's latents (N, C, d, h, w) UNSCALED, and per latent its source row (index
    into the real latents file) and draw index."""

    latents: np.ndarray
    source_rows: np.ndarray
    draws: np.ndarray


def inpaint_set(ldm: LDM, real_path: str | os.PathLike, *, method: str, split: str, draws: int, sampler: str,
                steps: int, guidance_scale: float, seed: int, batch_size: int, device: torch.device,
                repaint_settings: dict | None = None, keep_known: bool = False,
                progress: bool = True) -> InpaintedSet:
    """Inpaint ``draws`` latents per masked row of ``split`` in the real latents file ``real_path``.

    ``method``: ``trained`` (an ldm trained with task inpaint) or ``repaint`` (any ldm; settings
    ``jump_length``, ``jump_n_sample``). Draw k of the j-th row starts from noise seeded by
    (seed, j * draws + k), so adding rows or draws keeps the earlier ones.
    """
    if method not in METHODS:
        raise InputError(f"inpaint set method {method!r} is unknown; choose one of {list(METHODS)}")
    if method == "trained" and ldm.task != "inpaint":
        raise InputError(f"inpaint set method 'trained' needs an ldm trained with `task: inpaint`, but this "
                         f"one was trained with task {ldm.task!r}: use method 'repaint', or train an ldm with "
                         "task: inpaint")
    with open_latents(real_path) as f:
        if f.header.vae_sha256 != ldm.vae_sha256 or list(f.header.class_names) != list(ldm.class_names):
            raise InputError(f"{real_path}: these latents are not from the autoencoder (or classes) the ldm was "
                             "trained on; give the latents.h5 of the ldm's own `vae`")
        rows = masked_rows(f, real_path, split)
        voided, mask = read_masks(f, real_path, rows, voided=method == "trained")
        real, cls = torch.from_numpy(f.mu[rows]), f.class_index[rows]
    each = np.repeat(np.arange(len(rows)), draws)
    sf = ldm.scale_factor
    if method == "trained":
        inputs, reverse = {"cond": conditioning(voided * sf, mask)[each]}, sample
        if keep_known:  # the known latent clamped at every step, as RePaint without jumps
            inputs |= {"real": (real * sf)[each], "known": (1 - mask)[each]}
            reverse = repaint
    else:
        inputs = {"real": (real * sf)[each], "known": (1 - mask)[each]}
        reverse = partial(repaint, **(repaint_settings or {}))
    conditioned = cls[each] if ldm.class_names else np.full(len(each), -1, dtype=np.int64)
    latents = generate(ldm, conditioned, sampler=sampler, steps=steps, guidance_scale=guidance_scale, seed=seed,
                       batch_size=batch_size, device=device, progress=progress, rows=inputs, reverse=reverse)
    return InpaintedSet(latents=latents, source_rows=rows[each], draws=np.tile(np.arange(draws), len(rows)))
