"""Diffusion in latent space: training strategies, the loss, guided sampling, and the ``ldm.pt`` file.

Strategies (``strategy`` section of an ``ldm`` config entry):

``ddpm``
    Gaussian diffusion with MONAI's ``DDPMScheduler`` (linear, scaled-linear or cosine schedule,
    ``timesteps`` training steps); the network predicts the noise (``epsilon``) or the velocity
    (``v_prediction``). Sampled with ``ddpm`` (ancestral, every training step) or ``ddim``.
``rflow``
    Rectified flow with MONAI's ``RFlowScheduler``: x_t = (1 - t/T) x0 + (t/T) noise, the network
    predicts the velocity x0 - noise. Sampled with ``rflow`` (Euler steps).

Class conditioning: labels are ints in ``0..K-1`` and ``K`` (= ``null_class``) is the null label;
training drops labels to it with a probability, and sampling mixes the conditional and the null
prediction: ``uncond + scale * (cond - uncond)`` (classifier-free guidance; scale 0 ignores the
class, 1 is the plain conditional model, larger values push samples further towards their class).

All latents here are *scaled* (multiplied by the autoencoder's ``scale_factor``); the caller scales
before training and unscales sampled latents once.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from torch import nn
from tqdm.auto import tqdm

from medldm.checkpoint import load_model_file, save_torch
from medldm.diffusion.backbones import build_diffusion_model
from medldm.errors import InputError
from medldm.provenance import check_autoencoder
from medldm.runtime import autocast

SCHEDULES = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta", "cosine": "cosine"}
PREDICTIONS = ("epsilon", "v_prediction")
SAMPLERS = {"ddpm": "ddpm", "ddim": "ddpm", "rflow": "rflow"}  # sampler -> strategy it needs


class DDPMStrategy:
    """Gaussian diffusion (DDPM noise schedule) with epsilon or v prediction.

    Args:
        schedule: ``linear``, ``scaled_linear`` or ``cosine``.
        prediction: ``epsilon`` or ``v_prediction``.
        timesteps: number of training timesteps T.
        beta_start, beta_end: schedule ends (linear and scaled-linear only).
    """

    name = "ddpm"

    def __init__(self, schedule: str = "scaled_linear", prediction: str = "epsilon", timesteps: int = 1000,
                 beta_start: float | None = None, beta_end: float | None = None):
        if schedule not in SCHEDULES:
            raise InputError(f"strategy schedule {schedule!r} is unknown; choose one of {sorted(SCHEDULES)}")
        if prediction not in PREDICTIONS:
            raise InputError(f"strategy prediction {prediction!r} is unknown; choose one of {list(PREDICTIONS)}")
        betas = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
        if betas and schedule == "cosine":
            raise InputError("strategy beta_start/beta_end do not apply to the cosine schedule; remove them")
        self.schedule_kwargs = {"num_train_timesteps": timesteps, "schedule": SCHEDULES[schedule],
                                "prediction_type": prediction, "clip_sample": False, **betas}
        # clip_sample=False: scaled latents have unit variance, so clipping x0 to [-1, 1] would distort them
        self.scheduler = DDPMScheduler(**self.schedule_kwargs)
        self.prediction = prediction
        self.num_train_timesteps = timesteps

    def sample_timesteps(self, x0: torch.Tensor) -> torch.Tensor:
        """(B,) long timesteps, uniform in 0..T-1."""
        return torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device)

    def noisy_and_target(self, x0, noise, t) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t and the regression target (noise, or velocity), both shaped like x0."""
        x_t = self.scheduler.add_noise(x0, noise, t)
        target = noise if self.prediction == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        return x_t, target

    def snr_and_x0_gain(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal-to-noise ratio at t, and |d x0_pred / d output|^2 (how output errors reach x0)."""
        abar = self.scheduler.alphas_cumprod.to(t.device)[t.long()]
        snr = abar / (1 - abar)
        gain = 1 / snr if self.prediction == "epsilon" else 1 / (snr + 1)
        return snr, gain


class RFlowStrategy:
    """Rectified flow (MONAI ``RFlowScheduler``) with velocity prediction.

    Args:
        timesteps: number of training timesteps T (times are t / T in [0, 1)).
        sample_method: training time distribution, ``uniform`` or ``logit-normal``.
    """

    name = "rflow"
    prediction = "v_prediction"

    def __init__(self, timesteps: int = 1000, sample_method: str = "uniform"):
        if sample_method not in ("uniform", "logit-normal"):
            raise InputError(f"strategy sample_method {sample_method!r} is unknown; use uniform or logit-normal")
        self.scheduler = RFlowScheduler(num_train_timesteps=timesteps, sample_method=sample_method)
        self.num_train_timesteps = timesteps

    def sample_timesteps(self, x0: torch.Tensor) -> torch.Tensor:
        return self.scheduler.sample_timesteps(x0)

    def noisy_and_target(self, x0, noise, t) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scheduler.add_noise(x0, noise, t), x0 - noise

    def snr_and_x0_gain(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = t.float() / self.num_train_timesteps  # noise fraction; x0_pred = x_t + s * v
        return ((1 - s) / s) ** 2, s**2


Strategy = DDPMStrategy | RFlowStrategy


def build_strategy(settings: dict) -> Strategy:
    """A strategy from the ``strategy`` settings: ``name``, and that strategy's arguments (keys
    meant for the other strategy, such as a ddpm ``schedule`` for rflow, are ignored)."""
    builders = {"ddpm": DDPMStrategy, "rflow": RFlowStrategy}
    name = settings.get("name", "ddpm")
    if name not in builders:
        raise InputError(f"ldm strategy name {name!r} is unknown; choose one of {sorted(builders)}")
    accepted = inspect.signature(builders[name]).parameters
    return builders[name](**{k: v for k, v in settings.items() if k in accepted})


def drop_labels(labels: torch.Tensor, p: float, null_class: int) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability p (classifier-free guidance training)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def with_condition(x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """The network input: x, with the (B, K, D, H, W) condition channels appended when given."""
    return x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1)


def diffusion_loss(model: nn.Module, strategy: Strategy, x0: torch.Tensor, labels: torch.Tensor,
                   min_snr_gamma: float | None = None, cond: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the network's prediction at random timesteps.

    Args:
        x0: (B, C, D, H, W) scaled latents; labels: (B,) long class labels (null included).
        cond: (B, K, D, H, W) extra input channels (an inpainting model's condition), or None.
        min_snr_gamma: Min-SNR-gamma weighting (Hang et al. 2023): each sample's loss is weighted by
            min(SNR, gamma) times how its output error reaches x0, i.e. as an x0 loss clipped at
            gamma. None: unweighted.
        weight: (B, 1, D, H, W) non-negative voxel weights (an inpainting model's mask region
            weighted up), normalised per sample so the loss keeps its scale; None: uniform.
    Returns:
        scalar loss (float32).
    """
    noise = torch.randn_like(x0)
    t = strategy.sample_timesteps(x0)
    x_t, target = strategy.noisy_and_target(x0, noise, t)
    pred = model(with_condition(x_t, cond), t, class_labels=labels)
    error = (pred.float() - target.float()).pow(2)
    if weight is None:
        per_sample = error.flatten(1).mean(1)
    else:
        weight = weight.float().expand_as(error)
        per_sample = (error * weight).flatten(1).mean(1) / weight.flatten(1).mean(1).clamp_min(1e-8)
    if min_snr_gamma is not None:
        snr, gain = strategy.snr_and_x0_gain(t)
        per_sample = per_sample * torch.clamp(snr, max=min_snr_gamma) * gain
    return per_sample.mean()


def guided_prediction(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                      scale: float, null_class: int, cond: torch.Tensor | None = None,
                      map_scale: float = 1.0) -> torch.Tensor:
    """Classifier-free guided output ``uncond + scale * (cond - uncond)``, shape of x (float32).

    Scale 1 needs one forward pass, scale 0 one unconditional pass, else one pass over the
    doubled batch. ``cond`` (extra input channels) is given to both passes: guidance is over the class.
    ``map_scale`` other than 1 also guides over spatial condition maps (``cond``; all-zero maps are
    "no map", ``medldm.diffusion.spatial``): ``e(0, null) + map_scale (e(m, null) - e(0, null)) +
    scale (e(m, c) - e(m, null))``, one pass over the tripled batch.
    """
    null = torch.full_like(labels, null_class)
    if cond is not None and map_scale != 1:
        bare = with_condition(x, torch.zeros_like(cond))
        x = with_condition(x, cond)
        out = model(torch.cat([x, x, bare]), torch.cat([t, t, t]),
                    class_labels=torch.cat([labels, null, null])).float()
        both, maps_only, neither = out.chunk(3)
        return neither + map_scale * (maps_only - neither) + scale * (both - maps_only)
    x = with_condition(x, cond)
    if scale == 1:
        return model(x, t, class_labels=labels).float()
    if scale == 0:
        return model(x, t, class_labels=null).float()
    out = model(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([labels, null])).float()
    cond, uncond = out.chunk(2)
    return uncond + scale * (cond - uncond)


@dataclass
class _Plan:
    """A sampler's timesteps and its update ``step(output, i, x) -> (x_next, x0_pred)``."""

    timesteps: list[int]
    step: Callable[[torch.Tensor, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sampling_plan(strategy: Strategy, sampler: str, steps: int, generator: torch.Generator | None) -> _Plan:
    if sampler not in SAMPLERS:
        raise InputError(f"sampler {sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
    if SAMPLERS[sampler] != strategy.name:
        raise InputError(
            f"sampler {sampler!r} does not fit a model trained with strategy {strategy.name!r}: "
            f"use {' or '.join(s for s, n in SAMPLERS.items() if n == strategy.name)}"
        )
    T = strategy.num_train_timesteps
    if not 1 <= steps <= T:
        raise InputError(f"sampling steps must be in 1..{T}, got {steps}")
    if sampler == "ddpm":
        if steps != T:
            raise InputError(f"the ddpm sampler runs every training step: set steps to {T}, or use ddim for fewer")
        sched = strategy.scheduler
        return _Plan(list(range(T - 1, -1, -1)), lambda out, i, x: sched.step(out, T - 1 - i, x, generator))
    if sampler == "ddim":
        sched = DDIMScheduler(**strategy.schedule_kwargs)
        sched.set_timesteps(steps)
        # evenly spaced from T-1, matching DDIMScheduler.step's previous step t - T // steps exactly
        ratio = T // steps
        ts = [T - 1 - i * ratio for i in range(steps)]
        return _Plan(ts, lambda out, i, x: sched.step(out, ts[i], x))
    sched = RFlowScheduler(num_train_timesteps=T)
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    nxt = [*ts[1:], 0]
    return _Plan(ts, lambda out, i, x: sched.step(out, ts[i], x, nxt[i]))


@torch.no_grad()
def sample(model: nn.Module, strategy: Strategy, noise: torch.Tensor, labels: torch.Tensor, *,
           sampler: str, steps: int, guidance_scale: float, null_class: int,
           generator: torch.Generator | None = None, progress: bool = False,
           cond: torch.Tensor | None = None, map_guidance_scale: float = 1.0) -> torch.Tensor:
    """Run the reverse process from ``noise``.

    Args:
        noise: (B, C, D, H, W) standard normal start; labels: (B,) long (``null_class`` = none).
        sampler: ``ddpm`` (ancestral, all T steps), ``ddim`` (deterministic) or ``rflow`` (Euler).
        generator: for the ddpm sampler's per-step noise (on noise's device).
        cond: (B, K, D, H, W) extra input channels of a model trained with them, or None.
        map_guidance_scale: guidance over spatial condition maps in ``cond`` (1: none).
    Returns:
        (B, C, D, H, W) scaled latents: the final clean prediction x0.
    """
    plan = sampling_plan(strategy, sampler, steps, generator)
    if bool((labels == null_class).all()):  # unconditional: guidance has nothing to mix
        guidance_scale = 1.0
    x, x0 = noise, noise
    for i, t in enumerate(tqdm(plan.timesteps, desc=sampler, disable=None if progress else True, leave=False)):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = guided_prediction(model, x, tt, labels, guidance_scale, null_class, cond, map_guidance_scale)
        x, x0 = plan.step(out, i, x)
    return x0


def start_noise(latent_shape, seed: int, indices) -> torch.Tensor:
    """(N, *latent_shape) float32 standard normal noise, sample i drawn from its own seed (seed, i).

    So sample i is the same whatever the batch size or device (CPU generator).
    """
    gens = (torch.Generator().manual_seed(_seed(seed, i)) for i in indices)
    return torch.stack([torch.randn(tuple(latent_shape), generator=g) for g in gens])


def allocate_classes(n: int, class_names: list[str], cls: str | None = None,
                     proportions: dict[str, float] | None = None) -> np.ndarray:
    """(n,) class indices for a sample set, grouped by class; -1 everywhere for an unconditional model.

    ``cls`` gives every volume one class; ``proportions`` maps class names to weights (largest
    remainder rounding); neither gives equal shares.
    """
    if not class_names:
        if cls or proportions:
            raise InputError("sample set asks for a class, but the ldm was trained without classes")
        return np.full(n, -1, dtype=np.int64)
    if cls is not None and proportions:
        raise InputError("sample set: give `class` or `class_proportions`, not both")
    weights = dict.fromkeys(class_names, 1.0) if cls is None and not proportions else (
        {cls: 1.0} if cls is not None else dict(proportions))
    unknown = sorted(set(weights) - set(class_names))
    if unknown:
        raise InputError(f"sample set: unknown class(es) {unknown}; the ldm knows {class_names}")
    w = np.array([max(0.0, float(weights.get(c, 0.0))) for c in class_names])
    if w.sum() <= 0:
        raise InputError("sample set: class_proportions must have a positive total")
    exact = n * w / w.sum()
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact, kind="stable")[: n - counts.sum()]] += 1
    return np.repeat(np.arange(len(class_names)), counts)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def generate(ldm: LDM, class_index: np.ndarray, *, sampler: str, steps: int, guidance_scale: float,
             seed: int, batch_size: int, device: torch.device, progress: bool = True,
             rows: dict[str, torch.Tensor] | None = None, reverse: Callable = sample,
             map_guidance_scale: float = 1.0) -> np.ndarray:
    """Sample one latent per entry of ``class_index`` (-1: no class).

    Volume i starts from noise seeded by (seed, i); the ddpm sampler's step noise is seeded by
    (seed, first index of the batch, 1). Returns (N, C, d, h, w) float32 UNSCALED latents (divided by
    the scale factor once), ready for the decoder.
    ``rows``: per-volume inputs of ``reverse`` (name -> (N, ...) tensor, e.g. an inpainting
    ``cond``), sliced per batch and passed as keywords; ``reverse``: the reverse process, ``sample``
    or one with its signature (``medldm.diffusion.inpainting.repaint``); ``map_guidance_scale``:
    ``sample``'s guidance over spatial condition maps (passed on only when not 1).
    """
    rows = rows or {}
    extra = {"map_guidance_scale": map_guidance_scale} if map_guidance_scale != 1 else {}
    labels = torch.from_numpy(np.where(class_index < 0, ldm.null_class, class_index)).long()
    out = []
    for start in tqdm(range(0, len(labels), batch_size), desc="batches", disable=None if progress else True):
        idx = range(start, min(start + batch_size, len(labels)))
        noise = start_noise(ldm.latent_shape, seed, idx).to(device)
        generator = torch.Generator(device).manual_seed(_seed(seed, start, 1))  # not a start-noise seed
        batch = {name: value[start:idx.stop].to(device) for name, value in rows.items()}
        with autocast(device):
            x = reverse(ldm.model, ldm.strategy, noise, labels[start:idx.stop].to(device), sampler=sampler,
                        steps=steps, guidance_scale=guidance_scale, null_class=ldm.null_class,
                        generator=generator, progress=progress, **batch, **extra)
        out.append((x.float() / ldm.scale_factor).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *ldm.latent_shape), np.float32)


# ---- the ldm.pt file -------------------------------------------------------------------------

LDM_FORMAT, LDM_VERSION = "medldm-ldm", 1


@dataclass
class LDM:
    """A loaded ``ldm.pt``: EMA network (eval mode) plus everything sampling and decoding need."""

    model: nn.Module
    strategy: Strategy
    scale_factor: float
    latent_shape: tuple[int, ...]  # (C, d, h, w)
    class_names: list[str]
    label_names: list[str]
    grid_affine: np.ndarray
    grid_shape: tuple[int, int, int]
    vae_sha256: str
    latents_sha256: str
    settings: dict
    task: str = "generate"  # or "inpaint": the network also takes a condition (medldm.diffusion.inpainting)
    conditioning: dict | None = None  # extra input channels and how they were made: an inpainting model's
    # condition, or a spatially conditioned model's maps (``maps``, ``pooling``: medldm.diffusion.spatial)

    @property
    def null_class(self) -> int:
        return len(self.class_names)


def save_ldm(path: str | os.PathLike, *, model_state: dict, ema_state: dict, settings: dict,
             scale_factor: float, latent_shape, class_names, label_names, grid_affine, grid_shape,
             vae_sha256: str, latents_sha256: str, step: int, provenance: dict,
             selection: dict | None = None, task: str = "generate", conditioning: dict | None = None) -> None:
    """Write ``ldm.pt`` atomically: raw and EMA weights (of ``step``), architecture, strategy, latent
    geometry, the task (``generate`` or ``inpaint`` with its ``conditioning``), the sha256 of the
    latents file and of the ``vae.pt`` it was trained against, and ``selection``: how the step was
    chosen (``checkpoint.BestCheckpoint.record()``)."""
    save_torch(path, {
        "format": LDM_FORMAT, "format_version": LDM_VERSION,
        "model_state": model_state, "ema_state": ema_state,
        "model": settings["model"], "strategy": settings["strategy"], "settings": settings,
        "scale_factor": float(scale_factor), "latent_shape": [int(s) for s in latent_shape],
        "class_names": list(class_names), "label_names": list(label_names),
        "grid_affine": np.asarray(grid_affine, dtype=np.float64).tolist(),
        "grid_shape": [int(s) for s in grid_shape],
        "vae_sha256": vae_sha256, "latents_sha256": latents_sha256,
        "step": int(step), "selection": selection or {}, "provenance": provenance,
        "task": task, "conditioning": conditioning,
    })


def load_ldm(path: str | os.PathLike, vae_path: str | os.PathLike | None = None,
             device: torch.device | str = "cpu") -> LDM:
    """Load ``ldm.pt`` with its EMA weights; with ``vae_path``, refuse an autoencoder other than
    the one it was trained against."""
    payload = load_model_file(path, ("format", LDM_FORMAT), LDM_VERSION, "train_ldm")
    if vae_path is not None:
        check_autoencoder(vae_path, payload["vae_sha256"], path, "decode with the autoencoder the model was "
                          "trained against, or retrain the ldm on this autoencoder's latents")
    shape = tuple(payload["latent_shape"])
    conditioning = payload.get("conditioning")  # files from before inpainting have neither key
    model = build_diffusion_model(payload["model"], shape[0], len(payload["class_names"]),
                                  cond_channels=conditioning["channels"] if conditioning else 0,
                                  spatial_dims=len(shape) - 1)
    model.load_state_dict(payload["ema_state"])
    model.to(device).eval()
    return LDM(
        model=model, strategy=build_strategy(payload["strategy"]),
        scale_factor=payload["scale_factor"], latent_shape=shape,
        class_names=payload["class_names"], label_names=payload["label_names"],
        grid_affine=np.asarray(payload["grid_affine"]), grid_shape=tuple(payload["grid_shape"]),
        vae_sha256=payload["vae_sha256"], latents_sha256=payload["latents_sha256"],
        settings=payload["settings"], task=payload.get("task", "generate"), conditioning=conditioning,
    )
