"""Training loop of the latent diffusion model (rule ``train_ldm``).

The whole latent set is read once into (device) memory; each step draws a batch by index, so the
data path never waits on disk. Randomness is re-seeded from (seed, rank, step) at every step: a
resumed run continues exactly as an uninterrupted one, and DDP ranks draw different batches.

Model selection: ldm.pt holds the weights (raw and EMA) of the validation with the best
``train.select`` metric, and training stops after ``train.patience`` validations without a better
one; that state is part of every checkpoint. Every ``train.sample_every`` steps a few fixed-seed
samples of the EMA model are decoded to a PNG montage (run_dir/samples/, and TensorBoard).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medldm.autoencoder import networks as ae
from medldm.checkpoint import BestCheckpoint, Checkpoints, StopFlag, claim_run_dir
from medldm.data.h5layout import Header, open_latents
from medldm.diffusion import inpainting, spatial
from medldm.diffusion import process as diffusion
from medldm.diffusion.backbones import build_diffusion_model, check_latent_shape
from medldm.diffusion.ema import EMA
from medldm.errors import EXIT_INTERRUPTED, InputError
from medldm.provenance import check_autoencoder, code_version, config_hash, sha256_file
from medldm.report.montage import save_montage
from medldm.runtime import (
    MetricsLog,
    autocast,
    init_distributed,
    is_main_process,
    seed_everything,
    stop_agreed,
    warmup_cosine,
)

log = logging.getLogger(__name__)

# train settings a run may change and still resume (more steps continue it, as more epochs do a VAE's)
# (patience too: a run stopped early continues when it grows; live samples change no weights)
_RESUMABLE = ("steps", "checkpoint_every", "log_every", "val_every", "compile", "patience",
              "sample_every", "sample_volumes", "sample_steps")
_VAL_SAMPLES = 64  # latents (with repeats) per validation loss, so the curve is not too noisy


@dataclass
class LatentSet:
    """Latents of the chosen splits, unscaled, in memory.

    mu, std: (N, C, d, h, w) float32 posterior mean and std (std None unless posterior sampling);
    labels: (N,) long class labels, the null class (K) where the file has no class;
    voided, mask: (N, C, d, h, w) voided-image latents (unscaled) and (N, 1, d, h, w) latent-grid
    masks, for an inpainting model (else None); maps: (N, K, d, h, w) spatial condition maps on
    the latent grid, for a spatially conditioned model (else None).
    """

    mu: torch.Tensor
    std: torch.Tensor | None
    labels: torch.Tensor
    header: Header
    voided: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    maps: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.header.class_names)


def load_latent_set(path: str | os.PathLike, splits, posterior: bool = False, inpaint: bool = False,
                    conditions=(), pooling: str = "area") -> LatentSet:
    """Read the rows of ``splits`` from a latents HDF5 file (via ``medldm.data.h5layout``); with
    ``inpaint``, only rows with a non-empty mask, and their voided latents and masks; with
    ``conditions`` (``label``, ``mask``), those maps brought to the latent grid by ``pooling``."""
    with open_latents(path) as f:
        idx = np.sort(np.concatenate([f.indices(s) for s in splits]))
        voided = mask = None
        if inpaint:
            voided, mask = inpainting.read_masks(f, path, idx, voided=True)
            filled = mask.flatten(1).any(1).numpy()
            idx, voided, mask = idx[filled], voided[filled], mask[filled]
        if len(idx) == 0:
            raise InputError(f"{path}: no latents{' with masks' if inpaint else ''} in split(s) {list(splits)}; "
                             "check the ldm train `splits`")
        if posterior and f.logvar is None:
            raise InputError(f"{path} has no logvar: set ldm train latent_sampling to 'mean'")
        mu = torch.from_numpy(f.mu[idx])
        std = torch.from_numpy(np.exp(0.5 * f.logvar[idx])) if posterior else None
        k = len(f.header.class_names)
        cls = f.class_index[idx]
        if cls.max(initial=-1) >= k:
            raise InputError(f"{path}: class index {cls.max()} but only {k} class names")
        labels = torch.from_numpy(np.where(cls < 0, k, cls)).long()
        maps = condition_maps(f, path, idx, conditions, pooling) if conditions else None
        return LatentSet(mu=mu, std=std, labels=labels, header=f.header, voided=voided, mask=mask, maps=maps)


def condition_maps(f, path, rows, conditions, pooling: str) -> torch.Tensor:
    """(N, K, d, h, w) latent-grid condition maps of ``rows`` of an open latents file."""
    missing = [kind for kind in conditions if getattr(f, kind) is None]
    if missing:
        raise InputError(
            f"{path} has no {' or '.join(repr(k) for k in missing)} dataset, but the ldm's `conditions` name "
            f"{missing}: the sample sheet needs a {' and '.join(missing)} column filled for every row; then "
            "rerun export_latents"
        )
    return spatial.read_latent_maps(lambda kind, idx: getattr(f, kind)[idx], conditions, f.mu.shape[2:], pooling,
                                    len(f.header.label_names), rows, where=str(path))


def batch_weights(labels: torch.Tensor, balance: bool) -> torch.Tensor:
    """(N,) sampling weights: equal per class when ``balance`` (every class drawn equally often)."""
    if not balance:
        return torch.ones(len(labels))
    counts = torch.bincount(labels)
    return 1.0 / counts[labels].float()


def run_key(settings: dict, latents_sha256: str) -> str:
    """Identity of a training run: model, strategy, train settings (bar the resumable ones), data,
    and the task when it is not the default (so generation runs keep their keys)."""
    task = settings.get("task", "generate")
    maps = {"conditions": settings["conditions"], "conditions_pooling": settings.get("conditions_pooling", "area")} \
        if settings.get("conditions") else {}
    return config_hash({
        "model": settings["model"], "strategy": settings["strategy"],
        "train": {k: v for k, v in settings["train"].items() if k not in _RESUMABLE},
        "latents_sha256": latents_sha256, **({"task": task} if task != "generate" else {}), **maps,
    })


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class Trainer:
    """One training run. ``run()`` returns 0 when done, ``EXIT_INTERRUPTED`` after a stop request.

    Args:
        settings: an ``ldm`` config entry (``model``, ``strategy``, ``train``; keys as in the schema).
        latents_path: the autoencoder's latents HDF5; vae_path: its ``vae.pt`` (checked against the
            sha256 the latents file records).
        run_dir: checkpoints, metrics.csv, tensorboard, live samples (not a workflow output);
            out_path: ``ldm.pt``.
        stop: polled once per step (a ``StopFlag``); when true the run checkpoints and returns.
        decoding: the autoencoder's ``inference`` settings, for decoding live samples.
    """

    def __init__(self, settings: dict, latents_path, vae_path, run_dir, out_path,
                 device: torch.device, stop: StopFlag | None = None, progress: bool = True,
                 decoding: dict | None = None, init_path=None):
        self.settings, self.device, self.stop, self.progress = settings, device, stop, progress
        self.decoding = decoding or {"batch_size": 1}
        self.cfg = settings["train"]
        self.run_dir, self.out_path = Path(run_dir), Path(out_path)
        self.rank, self.world = init_distributed()
        self.latents_path, self.vae_path = Path(latents_path), vae_path
        self.init_path = init_path
        self._load_data()
        self._build()

    # -- set-up ---------------------------------------------------------------------------------
    def _load_data(self) -> None:
        cfg = self.cfg
        mode = cfg["latent_sampling"]
        if mode not in ("mean", "posterior"):
            raise InputError(f"ldm train latent_sampling {mode!r} must be 'mean' or 'posterior'")
        self.task = self.settings.get("task", "generate")
        if self.task not in inpainting.TASKS:
            raise InputError(f"ldm task {self.task!r} is unknown; choose one of {list(inpainting.TASKS)}")
        inpaint = self.task == "inpaint"
        self.conditions = spatial.check_kinds(self.settings.get("conditions") or [], "ldm conditions")
        self.pooling = self.settings.get("conditions_pooling", "area")
        if inpaint and self.conditions:
            raise InputError("an ldm with task inpaint cannot also have spatial `conditions` (yet); drop one")
        maps = {"conditions": self.conditions, "pooling": self.pooling}
        data = load_latent_set(self.latents_path, cfg["splits"], posterior=mode == "posterior", inpaint=inpaint,
                               **maps)
        self.header = data.header
        if not data.header.scale_factor or data.header.scale_factor <= 0:
            raise InputError(f"{self.latents_path}: scale_factor {data.header.scale_factor} is not positive")
        self.latents_sha256 = sha256_file(self.latents_path)
        self.vae_sha256 = data.header.vae_sha256
        if self.vae_path is not None:
            self.vae_sha256 = check_autoencoder(self.vae_path, self.vae_sha256, self.latents_path,
                                                "rerun export_latents")
        self.num_classes, self.null_class = data.num_classes, data.num_classes
        self.latent_shape = tuple(data.mu.shape[1:])
        check_latent_shape(self.settings["model"], self.latent_shape)
        self.mu = data.mu.to(self.device)
        self.std = None if data.std is None else data.std.to(self.device)
        self.labels = data.labels.to(self.device)
        self.cond = self._condition(data)
        self.weights = batch_weights(data.labels, cfg["balance_classes"]).to(self.device)
        with open_latents(self.latents_path) as f:  # val rows (with masks, for inpainting) not trained on
            val_rows = f.indices("val") if "val" not in cfg["splits"] else []
            has_val = any(not inpaint or f.mask[int(i)].any() for i in val_rows)
        self.val_mu = self.val_labels = self.val_cond = None
        if has_val:  # validation loss on the held-out posterior means
            val = load_latent_set(self.latents_path, ["val"], inpaint=inpaint, **maps)
            self.val_mu, self.val_labels = val.mu.to(self.device), val.labels.to(self.device)
            self.val_cond = self._condition(val)
        select = cfg["select"]
        if self.val_mu is None and select["metric"] != "last":
            log.warning("no validation latents: ldm.pt holds the last weights (no model selection or early stop)")
        self.best = BestCheckpoint(select["metric"] if self.val_mu is not None else "last", select["mode"],
                                   cfg["patience"])
        self.vae, self.vae_labels = None, 0  # the decoder of the live samples; L of a label-map autoencoder
        if cfg["sample_every"] and self.cond is not None:
            log.warning("train.sample_every: live samples are drawn for models without extra input "
                        "channels only; this (inpainting or spatially conditioned) model shows none")
        elif cfg["sample_every"] and is_main_process():
            if self.vae_path is None:
                raise InputError("ldm train.sample_every > 0 needs the autoencoder (--vae vae.pt) to decode "
                                 "samples; pass it, or set sample_every to 0")
            self.vae, vae_file = ae.load_vae(self.vae_path, self.device)
            self.vae_labels = len(vae_file["labels"]) if ae.labels_only(vae_file["settings"]) else 0
        log.info("training on %d latents of shape %s (%d classes)", len(self.mu), self.latent_shape, self.num_classes)

    def _condition(self, data: LatentSet) -> torch.Tensor | None:
        """An inpainting model's (N, C + 1, d, h, w) condition for every row (scaled), a spatially
        conditioned model's (N, K, d, h, w) maps, else None."""
        if data.maps is not None:
            return data.maps.to(self.device)
        if data.voided is None:
            return None
        return inpainting.conditioning(data.voided * self.header.scale_factor, data.mask).to(self.device)

    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(cfg["seed"])
        self.strategy = diffusion.build_strategy(self.settings["strategy"])
        self.min_snr_gamma = self.settings["strategy"].get("min_snr_gamma")
        self.conditioning = None
        if self.conditions:
            self.conditioning = spatial.record(self.conditions, self.header.label_names, self.pooling)
        elif self.cond is not None:
            self.conditioning = inpainting.conditioning_record(self.latent_shape[0])
        self.model = build_diffusion_model(self.settings["model"], self.latent_shape[0], self.num_classes,
                                           cond_channels=self.conditioning["channels"] if self.conditioning else 0,
                                           spatial_dims=len(self.latent_shape) - 1)
        self.model.to(self.device)
        self.ema = EMA(self.model, cfg["ema_decay"])
        # foreach: one fused update of all tensors; torch picks it on GPUs only, and on CPU it pays
        # for the EMA and clipping (2D benchmark: 7 vs 11 ms per step, benchmarks/bench_ldm.py)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg["lr"],
                                           weight_decay=cfg["weight_decay"], foreach=True)
        self._schedule(cfg["steps"])
        if is_main_process():
            claim_run_dir(self.run_dir, run_key(self.settings, self.latents_sha256))
        if self.world > 1:
            torch.distributed.barrier()
        self.start = self._resume()
        self.init_sha256 = None
        if self.init_path is not None:
            self.init_sha256 = sha256_file(self.init_path)
            if self.start == 0:
                self._init_from_ldm()
        self.net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg["compile"]:
            if self.device.type == "cuda":
                self.net = torch.compile(self.net)
            else:
                log.info("torch.compile skipped on CPU (about 1.03x there, after minutes of compiling)")

    def _init_from_ldm(self) -> None:
        """Start from the EMA weights of another ldm of the same autoencoder and backbone (an
        inpainting model from a generative one): input-channel rows it lacks start at zero, so the
        new model first behaves as the old one and learns to use its condition."""
        base = diffusion.load_ldm(self.init_path)
        where = f"init_from {self.init_path}"
        if base.latents_sha256 != self.latents_sha256 or list(base.class_names) != list(self.header.class_names):
            raise InputError(f"{where}: that ldm was trained on other latents (or classes); init_from must name "
                             "an ldm of the same `vae`")
        if base.settings["model"] != self.settings["model"]:
            raise InputError(f"{where}: its `model` {base.settings['model']} differs from this ldm's "
                             f"{self.settings['model']}; give both the same model settings")
        state = self.model.state_dict()
        for key, old in base.model.state_dict().items():
            new = state[key]
            if new.shape == old.shape:
                new.copy_(old)
            else:  # the first layer: more input channels (the condition), which start at zero
                new.zero_()
                new[:, :old.shape[1]].copy_(old)
        self.ema = EMA(self.model, self.cfg["ema_decay"])
        log.info("initialised from %s (%s)", self.init_path, base.settings.get("task", "generate"))

    def _schedule(self, horizon: int) -> None:
        """Warm-up and cosine decay over ``horizon`` steps, fixed when the run starts: raising
        ``steps`` later continues at the final LR (lr x min_lr_ratio) rather than jumping back up."""
        self.lr_horizon = horizon
        self.lr_schedule = warmup_cosine(self.optimizer, horizon, self.cfg["warmup_steps"], self.cfg["min_lr_ratio"])

    def _resume(self) -> int:
        state = Checkpoints(self.run_dir).load_latest(map_location=self.device)
        if state is None:
            return 0
        world = state.get("world", self.world)  # older checkpoints do not record it
        if world != self.world:  # steps, LR schedule and per-rank seeds are per step: resuming is sound
            log.warning("resuming a run of %d process(es) with %d: the batch per step changes from %d to %d",
                        world, self.world, world * self.cfg["batch_size"], self.world * self.cfg["batch_size"])
        self._schedule(state.get("lr_horizon", self.lr_horizon))  # before the optimiser's LR is restored
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if "best" in state:  # older checkpoints do not hold one
            self.best.load_state_dict(state["best"])
        return int(state["step"])

    # -- the loop -------------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A (B, C, d, h, w) batch of scaled latents, its (B,) labels (class-dropout applied) and
        its condition (None unless inpainting)."""
        # drawn on the device: a host-to-GPU copy every step would stall the GPU queue
        idx = torch.multinomial(self.weights, self.cfg["batch_size"], replacement=True)
        x0 = self.mu[idx]
        if self.std is not None:
            x0 = x0 + self.std[idx] * torch.randn_like(x0)
        labels = diffusion.drop_labels(self.labels[idx], self.cfg["class_dropout"], self.null_class)
        cond = None if self.cond is None else self.cond[idx]
        if self.conditions:
            cond = spatial.drop_maps(cond, self.cfg.get("condition_dropout", 0.0))
        return x0 * self.header.scale_factor, labels, cond

    def _mask_weight(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """An inpainting model's loss weights: ``train.mask_weight`` inside the latent-grid mask (the
        condition's last channel), 1 outside; None (uniform) otherwise."""
        weight = self.cfg.get("mask_weight", 1.0)
        if self.task != "inpaint" or weight == 1.0:
            return None
        return 1.0 + (weight - 1.0) * cond[:, -1:]

    def _loss_of(self, model: nn.Module, x0, labels, cond) -> torch.Tensor:
        """The diffusion loss of ``model`` (the trained network, or its EMA copy) on one batch."""
        return diffusion.diffusion_loss(model, self.strategy, x0, labels, self.min_snr_gamma, cond,
                                        self._mask_weight(cond))

    def _train_step(self) -> torch.Tensor:
        x0, labels, cond = self._batch()
        with autocast(self.device, self.cfg["bf16"]):
            loss = self._loss_of(self.net, x0, labels, cond)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg["grad_clip"]:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update()
        return loss.detach()

    @torch.no_grad()
    def val_loss(self) -> float:
        """Loss of the EMA model on the validation latents (posterior means), fixed noise and times."""
        torch.manual_seed(self.cfg["seed"])
        model = self.ema.module
        bs, n = self.cfg["batch_size"], len(self.val_mu)
        copies = math.ceil(_VAL_SAMPLES / n)
        x_all = torch.cat([self.val_mu] * copies) * self.header.scale_factor
        y_all = self.val_labels.repeat(copies)
        c_all = None if self.val_cond is None else torch.cat([self.val_cond] * copies)
        total = 0.0
        for i in range(0, len(x_all), bs):
            x0, y = x_all[i:i + bs], y_all[i:i + bs]
            c = None if c_all is None else c_all[i:i + bs]
            with autocast(self.device, self.cfg["bf16"]):
                total += float(self._loss_of(model, x0, y, c)) * len(x0)
        return total / len(x_all)

    def _validating(self, step: int) -> bool:
        """Whether ``step`` computes the validation loss (every rank gets the same answer)."""
        cfg, last = self.cfg, step == self.cfg["steps"]
        logged = step % cfg["log_every"] == 0 or last
        return self.val_mu is not None and logged and (step % cfg["val_every"] == 0 or last)

    def _select(self, step: int, val_loss: float) -> dict[str, float]:
        """Offer this validation to the model selection (rank 0); its metrics-log columns."""
        def weights():
            return {"model": self.model.state_dict(), "ema": self.ema.module.state_dict()}

        if self.best.update({"loss": val_loss}, weights, step=step):
            log.info("new best: %s", self.best.describe())
        elif self.best.exhausted:
            log.info("early stop: %d validations without a better loss; exporting %s", self.best.since,
                     self.best.describe())
        return {"best/step": self.best.where["step"]}

    @torch.no_grad()
    def live_samples(self, step: int, metrics: MetricsLog | None = None) -> Path:
        """Decode ``sample_volumes`` samples of the EMA model, the same seeds at every call (plain
        conditional, classes in equal shares), to run_dir/samples/step-<step>.png and TensorBoard."""
        h, cfg = self.header, self.cfg
        ldm = diffusion.LDM(
            model=self.ema.module, strategy=self.strategy, scale_factor=h.scale_factor,
            latent_shape=self.latent_shape, class_names=h.class_names, label_names=h.label_names,
            grid_affine=h.grid_affine, grid_shape=h.grid_shape, vae_sha256=self.vae_sha256,
            latents_sha256=self.latents_sha256, settings=self.settings,
        )
        classes = diffusion.allocate_classes(cfg["sample_volumes"], h.class_names)
        latents = diffusion.generate(
            ldm, classes, sampler="ddim" if self.strategy.name == "ddpm" else "rflow", steps=cfg["sample_steps"],
            guidance_scale=1.0, seed=cfg["seed"], batch_size=len(classes), device=self.device, progress=False,
        )
        decoded = ae.decode_set(self.vae, latents, self.decoding, self.device, progress=False,
                                only_labels=self.vae_labels > 0)  # label maps shown as label / (L - 1)
        images = [v for _, batch, labels in decoded
                  for v in (batch if batch is not None else labels / (self.vae_labels - 1))]
        titles = [f"{h.class_names[c] if c >= 0 else 'sample'} {i}" for i, c in enumerate(classes)]
        path = self.run_dir / "samples" / f"step-{step:09d}.png"
        save_montage(path, images, titles)
        if metrics is not None:
            metrics.log_image("samples", path, step)
        return path

    def _should_stop(self) -> bool:
        """The stop flag, agreed by all ranks at every step (under DDP: one tiny all-reduce)."""
        return stop_agreed(bool(self.stop), self.device)

    def run(self) -> int:
        cfg, main = self.cfg, is_main_process()
        total, step = cfg["steps"], self.start
        metrics = MetricsLog(self.run_dir, resume_step=step) if main else None
        if step:
            log.info("resumed at step %d of %d from %s", step, total, self.run_dir)
        bar = tqdm(total=total, initial=step, desc="train_ldm",  # off when not a TTY: log lines instead
                   disable=None if main and self.progress else True)
        running, count, tic = torch.zeros((), device=self.device), 0, time.perf_counter()
        self.model.train()
        while step < total and not self.best.exhausted:
            torch.manual_seed(_step_seed(cfg["seed"], self.rank, step))
            running += self._train_step()
            step, count = step + 1, count + 1
            bar.update()
            if main and (step % cfg["log_every"] == 0 or step == total):
                loss, rate = float(running) / count, count / (time.perf_counter() - tic)
                values = {"loss": loss, "lr": self.lr_schedule.get_last_lr()[0], "steps_per_s": rate}
                if self._validating(step):
                    values["val_loss"] = self.val_loss()
                    values |= self._select(step, values["val_loss"])
                    self.model.train()
                metrics.log(step, **values)
                bar.set_postfix(loss=f"{loss:.4f}")
                if bar.disable:
                    log.info("step %d/%d %s", step, total, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
                running.zero_()
                count, tic = 0, time.perf_counter()
            if self.vae is not None and step % cfg["sample_every"] == 0:
                started = time.perf_counter()
                self.live_samples(step, metrics)
                tic += time.perf_counter() - started  # steps_per_s counts training only
            stopping = self._should_stop()
            early = self._validating(step) and stop_agreed(self.best.exhausted, self.device)
            if main and (stopping or early or step % cfg["checkpoint_every"] == 0 or step == total):
                self._checkpoint(step)
            if stopping:  # even at the last step: the rerun resumes there and writes ldm.pt
                if self.world > 1:
                    torch.distributed.barrier()  # no rank exits before the checkpoint is written
                log.warning("stopped at step %d; checkpoint written, a rerun resumes", step)
                bar.close()
                return EXIT_INTERRUPTED
            if early:
                break
        bar.close()
        if main:
            self._save_final(step)
            metrics.close()
        return 0

    def _checkpoint(self, step: int) -> None:
        Checkpoints(self.run_dir).save(step, {
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
            "lr_horizon": self.lr_horizon, "world": self.world, "best": self.best.state_dict(),
        })

    def _save_final(self, step: int) -> None:
        """ldm.pt with the selected weights (the last ones when nothing was validated)."""
        h, best = self.header, self.best
        weights = best.weights or {"model": self.model.state_dict(), "ema": self.ema.module.state_dict()}
        selection = best.record() if best.weights else {"metric": "last", "step": step}
        selection["steps_trained"] = step
        diffusion.save_ldm(
            self.out_path, model_state=weights["model"], ema_state=weights["ema"], selection=selection,
            settings=self.settings, scale_factor=h.scale_factor, latent_shape=self.latent_shape,
            class_names=h.class_names, label_names=h.label_names, grid_affine=h.grid_affine,
            grid_shape=h.grid_shape, vae_sha256=self.vae_sha256, latents_sha256=self.latents_sha256,
            step=selection["step"], task=self.task, conditioning=self.conditioning, provenance={
                "config_hash": config_hash(self.settings), "code_version": code_version(),
                "inputs_sha256": {"latents": self.latents_sha256, "vae": self.vae_sha256,
                                  **({"init_from": self.init_sha256} if self.init_sha256 else {})},
            },
        )
        log.info("wrote %s: %s", self.out_path, best.describe() if best.weights else f"step {step}")
