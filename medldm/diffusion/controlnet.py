"""ControlNet: a trainable copy of a frozen UNet ldm's encoder, steered by condition maps at image resolution.

A ``controlnet`` config entry names a trained ``ldm`` (a ``unet`` generation model without extra
input channels) and its maps: ``label`` (one-hot, one channel per label name) or ``mask`` (one
channel), optionally turned into their boundaries (``transform: contour``: one channel, 1 where
the 3^n neighbourhood of a voxel holds another value). The maps stay on the prepared image grid;
MONAI's ``ControlNet`` conditioning embedding brings them to the latent grid (one stride-2 stage
per halving, so its channel list has log2(f) + 1 entries for an autoencoder of downsampling f).

The ControlNet starts as a copy of the base UNet's encoder and middle block (MONAI
``copy_model_state``) with zero-initialised output convolutions, so at initialisation the
controlled model is the base model exactly. Its residuals, times ``conditioning_scale``, are
added to the base UNet's skip connections and middle block (``down_block_additional_residuals``,
``mid_block_additional_residual``, as MONAI's ``ControlNetDiffusionInferer`` does); scale 0 is the
base model (the control of the adherence measurement).

``controlnet.pt`` holds the ControlNet weights (raw and EMA) and the sha256 of the base ldm.pt it
was trained on; loading refuses any other base file.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import ControlNet
from monai.networks.utils import copy_model_state
from torch import nn

from medldm.checkpoint import BestCheckpoint, claim_run_dir, load_model_file, save_torch
from medldm.data.h5layout import open_latents
from medldm.diffusion import process as diffusion
from medldm.diffusion.backbones import UNET_DEFAULTS
from medldm.diffusion.ema import EMA
from medldm.diffusion.training import _RESUMABLE, Trainer, batch_weights, load_latent_set
from medldm.errors import InputError
from medldm.provenance import code_version, config_hash, sha256_file
from medldm.runtime import is_main_process, seed_everything

log = logging.getLogger(__name__)

MAPS = ("label", "mask")
TRANSFORMS = ("none", "contour")
FORMAT, VERSION = "medldm-controlnet", 1


# ---- the condition maps at image resolution --------------------------------------------------

def check_maps(maps: str, transform: str, where: str) -> None:
    if maps not in MAPS:
        raise InputError(f"{where}.maps {maps!r} is unknown; choose one of {list(MAPS)}")
    if transform not in TRANSFORMS:
        raise InputError(f"{where}.transform {transform!r} is unknown; choose one of {list(TRANSFORMS)}")


def map_channels(maps: str, transform: str, n_labels: int) -> int:
    """Input channels of the conditioning embedding."""
    return n_labels if maps == "label" and transform == "none" else 1


def contour(values: torch.Tensor) -> torch.Tensor:
    """(N, *grid) integer maps -> (N, 1, *grid) float32: 1 where a voxel's 3^n neighbourhood
    (edge-padded) holds a value other than its own."""
    pool = getattr(F, f"max_pool{values.ndim - 1}d")
    v = values[:, None].float()
    pad = [1] * (2 * (values.ndim - 1))
    hi = pool(F.pad(v, pad, mode="replicate"), 3, stride=1)
    lo = -pool(F.pad(-v, pad, mode="replicate"), 3, stride=1)
    return (hi != lo).float()


def control_maps(values, maps: str, transform: str, n_labels: int, where: str = "condition maps") -> torch.Tensor:
    """(N, *grid) label maps or masks -> (N, K, *grid) float32 ControlNet input at image resolution."""
    values = torch.as_tensor(np.asarray(values)).long()
    if maps == "mask":
        values = (values > 0).long()
    elif values.numel() and (int(values.min()) < 0 or int(values.max()) >= n_labels):
        raise InputError(f"{where}: label value {int(values.max())} is outside 0..{n_labels - 1} "
                         f"(labels {n_labels})")
    if transform == "contour":
        return contour(values)
    if maps == "mask":
        return values[:, None].float()
    return F.one_hot(values, n_labels).movedim(-1, 1).float()


# ---- the network -------------------------------------------------------------------------------

def downsampling(grid_shape, latent_grid, where: str) -> int:
    """The autoencoder's downsampling factor f (image grid / latent grid, the same power of 2 on every axis)."""
    factors = {g / s for g, s in zip(grid_shape, latent_grid, strict=True)}
    f = factors.pop() if len(factors) == 1 else 0
    if f < 1 or f != int(f) or int(f) & (int(f) - 1):
        raise InputError(f"{where}: image grid {tuple(grid_shape)} -> latent grid {tuple(latent_grid)} is not one "
                         "power-of-2 downsampling on every axis, which the ControlNet's conditioning embedding needs")
    return int(f)


def embedding_channels(settings: dict, factor: int, where: str) -> list[int]:
    """``conditioning_embedding_num_channels``: as given (checked against f), else 16, 32, ... (log2 f + 1 stages)."""
    stages = int(math.log2(factor)) + 1
    given = settings.get("conditioning_embedding_num_channels")
    if given is None:
        return [16 * 2**i for i in range(stages)]
    if len(given) != stages:
        raise InputError(f"{where}.model.conditioning_embedding_num_channels has {len(given)} entries, but the "
                         f"autoencoder downsamples by {factor} (image to latent grid): give {stages} entries "
                         f"(one stride-2 stage per halving), e.g. {[16 * 2**i for i in range(stages)]}")
    return list(given)


def build_controlnet(base_settings: dict, latent_channels: int, num_classes: int, spatial_dims: int,
                     in_channels: int, embedding: list[int]) -> ControlNet:
    """A MONAI ControlNet shaped like the base ``unet`` (the base's keywords that ControlNet takes),
    whose conditioning embedding takes ``in_channels`` maps through stages of ``embedding`` channels."""
    accepted = inspect.signature(ControlNet).parameters
    base = {k: v for k, v in {**UNET_DEFAULTS, **base_settings}.items() if k in accepted}
    try:
        return ControlNet(spatial_dims=spatial_dims, in_channels=latent_channels, num_class_embeds=num_classes + 1,
                          **base, conditioning_embedding_in_channels=in_channels,
                          conditioning_embedding_num_channels=embedding)
    except (TypeError, ValueError) as err:
        raise InputError(f"controlnet on a base with model settings {base_settings}: {err}") from None


def init_from_base(controlnet: ControlNet, base: nn.Module) -> list[str]:
    """Copy every base UNet weight whose name and shape the ControlNet shares (time and class
    embeddings, input conv, encoder, middle block); returns the copied names."""
    _, copied, _ = copy_model_state(controlnet, base, inplace=True)
    return copied


class Controlled(nn.Module):
    """The frozen base UNet steered by a ControlNet: ``forward(x, t, class_labels)`` with the
    (B', K, *image grid) maps bound by ``bind`` (repeated when the sampler doubles or triples the
    batch for guidance)."""

    def __init__(self, base: nn.Module, controlnet: ControlNet, scale: float = 1.0):
        super().__init__()
        self.base, self.controlnet, self.scale = base, controlnet, scale
        self.maps: torch.Tensor | None = None

    def bind(self, maps: torch.Tensor) -> Controlled:
        self.maps = maps
        return self

    def forward(self, x, timesteps, class_labels=None):
        maps = self.maps.to(device=x.device, dtype=x.dtype)
        if len(maps) != len(x):
            maps = maps.repeat(len(x) // len(maps), *([1] * (maps.ndim - 1)))
        down, mid = self.controlnet(x, timesteps, controlnet_cond=maps, conditioning_scale=self.scale,
                                    class_labels=class_labels)
        return self.base(x, timesteps, class_labels=class_labels, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid)


def freeze(base: nn.Module) -> nn.Module:
    base.requires_grad_(False)
    return base.eval()


def check_base(ldm: diffusion.LDM, where: str, path) -> None:
    """Refuse a base the ControlNet cannot steer: not a unet, or one with extra input channels."""
    name = ldm.settings["model"].get("name", "unet")
    if name != "unet":
        raise InputError(f"{where}: the base {path} is a {name!r} model; a ControlNet needs a unet base")
    if ldm.task != "generate" or ldm.conditioning:
        raise InputError(f"{where}: the base {path} has task {ldm.task!r} with extra input channels "
                         f"({(ldm.conditioning or {}).get('maps') or 'inpainting'}); name a plain generate ldm")


# ---- controlnet.pt -------------------------------------------------------------------------------

def save_controlnet(path, *, model_state: dict, ema_state: dict, settings: dict, base_path, base_sha256: str,
                    spatial_dims: int, in_channels: int, embedding: list[int], label_names, step: int,
                    selection: dict, provenance: dict) -> None:
    save_torch(path, {
        "format": FORMAT, "format_version": VERSION, "model_state": model_state, "ema_state": ema_state,
        "settings": settings, "maps": settings["maps"], "transform": settings.get("transform", "none"),
        "label_names": list(label_names), "spatial_dims": spatial_dims, "in_channels": in_channels,
        "embedding": list(embedding), "base": str(base_path), "base_sha256": base_sha256, "step": int(step),
        "selection": selection, "provenance": provenance,
    })


@dataclass
class LoadedControlNet:
    ldm: diffusion.LDM  # its model is the Controlled network (base + ControlNet)
    maps: str
    transform: str
    base_sha256: str

    def control_maps(self, values, where: str) -> torch.Tensor:
        return control_maps(values, self.maps, self.transform, len(self.ldm.label_names), where)


def load_controlnet(path, ldm_path, vae_path=None, device="cpu", scale: float = 1.0) -> LoadedControlNet:
    """Load controlnet.pt (EMA weights) over its base ldm.pt; refuses a base other than the one it was trained on."""
    payload = load_model_file(path, ("format", FORMAT), VERSION, "train_controlnet")
    actual = sha256_file(ldm_path)
    if actual != payload["base_sha256"]:
        raise InputError(f"{path} was trained on a base ldm.pt with sha256 {payload['base_sha256'][:12]}..., but "
                         f"{ldm_path} has {actual[:12]}...: retrain the controlnet on this ldm")
    ldm = diffusion.load_ldm(ldm_path, vae_path, device)
    net = build_controlnet(ldm.settings["model"], ldm.latent_shape[0], len(ldm.class_names), payload["spatial_dims"],
                           payload["in_channels"], payload["embedding"])
    net.load_state_dict(payload["ema_state"])
    ldm.model = Controlled(freeze(ldm.model), net.to(device).eval(), scale)
    return LoadedControlNet(ldm, payload["maps"], payload["transform"], payload["base_sha256"])


def controlled_sample(model: Controlled, strategy, noise, labels, *, control: torch.Tensor, **kwargs):
    """``process.sample`` with the batch's maps bound (a ``reverse`` for ``process.generate``)."""
    return diffusion.sample(model.bind(control), strategy, noise, labels, **kwargs)


# ---- training (the ldm trainer's loop, checkpoints and model selection) ----------------------------

def read_control_maps(path, rows, maps: str, transform: str, n_labels: int) -> torch.Tensor:
    """(N, K, *image grid) uint8 ControlNet inputs of ``rows`` of a latents file, read a few at a time."""
    with open_latents(path) as f:
        data = getattr(f, maps)
        if data is None:
            raise InputError(f"{path} has no {maps!r} dataset, which the controlnet's `maps` names: the sample "
                             f"sheet needs a {maps} column filled for every row; then rerun export_latents")
        rows = np.asarray(rows, dtype=np.int64)
        parts = [control_maps(data[rows[i:i + 16]], maps, transform, n_labels, str(path)).to(torch.uint8)
                 for i in range(0, len(rows), 16)]
        empty = (0, map_channels(maps, transform, n_labels), *data.shape[1:])
    return torch.cat(parts) if parts else torch.zeros(empty, dtype=torch.uint8)


def split_rows(path, splits) -> np.ndarray:
    """The rows of ``splits`` in the order ``training.load_latent_set`` reads them."""
    with open_latents(path) as f:
        return np.sort(np.concatenate([f.indices(s) for s in splits]))


class ControlNetTrainer(Trainer):
    """Trains a ControlNet on a frozen base ldm with the base's strategy and loss (rule ``train_controlnet``).

    Args:
        settings: a ``controlnet`` config entry (``maps``, ``transform``, ``model``, ``train``);
            train keys it leaves out are the base ldm's.
        ldm_path: the base ldm.pt (never written; its sha256 goes into controlnet.pt);
        latents_path: the latents.h5 the base was trained on (with the named maps).
    """

    def __init__(self, settings: dict, ldm_path, latents_path, run_dir, out_path, device: torch.device,
                 stop=None, progress: bool = True):
        self.ldm_path = Path(ldm_path)
        super().__init__(settings, latents_path, None, run_dir, out_path, device, stop, progress)

    def _load_data(self) -> None:
        where = "controlnet"
        self.base_sha256 = sha256_file(self.ldm_path)
        base = diffusion.load_ldm(self.ldm_path, device=self.device)
        check_base(base, where, self.ldm_path)
        self.base_ldm, self.base = base, freeze(base.model)
        self.maps, self.transform = self.settings["maps"], self.settings.get("transform", "none")
        check_maps(self.maps, self.transform, where)
        self.cfg = cfg = {**base.settings["train"], **self.settings.get("train", {}), "sample_every": 0}
        data = load_latent_set(self.latents_path, cfg["splits"], posterior=cfg["latent_sampling"] == "posterior")
        self.header = data.header
        if data.header.vae_sha256 != base.vae_sha256:
            raise InputError(f"{self.latents_path} was not written by the autoencoder {self.ldm_path} was trained "
                             "on; give the latents.h5 of the base ldm's own vae")
        self.latents_sha256, self.vae_sha256 = sha256_file(self.latents_path), base.vae_sha256
        self.num_classes = self.null_class = len(base.class_names)
        self.latent_shape = tuple(data.mu.shape[1:])
        self.n_labels = len(data.header.label_names)
        self.factor = downsampling(data.header.grid_shape, self.latent_shape[1:], where)
        self.mu, self.labels = data.mu.to(self.device), data.labels.to(self.device)
        self.std = None if data.std is None else data.std.to(self.device)
        self.weights = batch_weights(data.labels, cfg["balance_classes"]).to(self.device)
        self.conditions, self.task, self.conditioning = [], "generate", None
        maps = (self.maps, self.transform, self.n_labels)
        self.cond = read_control_maps(self.latents_path, split_rows(self.latents_path, cfg["splits"]), *maps)
        self.cond = self.cond.to(self.device)
        self.val_mu = self.val_labels = self.val_cond = None
        val_rows = split_rows(self.latents_path, ["val"]) if "val" not in cfg["splits"] else []
        if len(val_rows):
            val = load_latent_set(self.latents_path, ["val"])
            self.val_mu, self.val_labels = val.mu.to(self.device), val.labels.to(self.device)
            self.val_cond = read_control_maps(self.latents_path, val_rows, *maps).to(self.device)
        select = cfg["select"]
        self.best = BestCheckpoint(select["metric"] if self.val_mu is not None else "last", select["mode"],
                                   cfg["patience"])
        self.vae, self.vae_labels = None, 0

    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(cfg["seed"])
        self.strategy = self.base_ldm.strategy
        self.min_snr_gamma = self.base_ldm.settings["strategy"].get("min_snr_gamma")
        self.in_channels = map_channels(self.maps, self.transform, self.n_labels)
        self.embedding = embedding_channels(self.settings.get("model") or {}, self.factor, "controlnet")
        self.spatial_dims = len(self.latent_shape) - 1
        self.model = build_controlnet(self.base_ldm.settings["model"], self.latent_shape[0], self.num_classes,
                                      self.spatial_dims, self.in_channels, self.embedding)
        copied = init_from_base(self.model, self.base)
        log.info("controlnet: %d tensors copied from the base unet", len(copied))
        self.model.to(self.device)
        self.ema = EMA(self.model, cfg["ema_decay"])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self._schedule(cfg["steps"])
        if is_main_process():
            claim_run_dir(self.run_dir, self.run_key())
        if self.world > 1:
            torch.distributed.barrier()
        self.start = self._resume()
        self.net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def run_key(self) -> str:
        train = {k: v for k, v in self.cfg.items() if k not in (*_RESUMABLE, "sample_every")}
        return config_hash({"maps": self.maps, "transform": self.transform, "model": self.settings.get("model"),
                            "train": train, "base_sha256": self.base_sha256, "latents_sha256": self.latents_sha256})

    def _loss_of(self, model: nn.Module, x0, labels, cond) -> torch.Tensor:
        return diffusion.diffusion_loss(Controlled(self.base, model).bind(cond), self.strategy, x0, labels,
                                        self.min_snr_gamma)

    def _save_final(self, step: int) -> None:
        best = self.best
        weights = best.weights or {"model": self.model.state_dict(), "ema": self.ema.module.state_dict()}
        selection = best.record() if best.weights else {"metric": "last", "step": step}
        selection["steps_trained"] = step
        save_controlnet(
            self.out_path, model_state=weights["model"], ema_state=weights["ema"], settings=self.settings,
            base_path=self.ldm_path, base_sha256=self.base_sha256, spatial_dims=self.spatial_dims,
            in_channels=self.in_channels, embedding=self.embedding, label_names=self.header.label_names,
            step=selection["step"], selection=selection, provenance={
                "config_hash": config_hash(self.settings), "code_version": code_version(),
                "inputs_sha256": {"ldm": self.base_sha256, "latents": self.latents_sha256},
            })
        log.info("wrote %s: %s", self.out_path, best.describe() if best.weights else f"step {step}")
