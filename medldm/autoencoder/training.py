"""The autoencoder training loop: seeded, AdamW, gradient clipping, bf16 autocast on CUDA,
optional patch-adversarial loss with its own optimiser, validation SSIM/PSNR (and Dice in
paired-label mode) with a montage, metrics to CSV/TensorBoard, checkpoints and exact resume,
model selection (the best validation by ``train.select``, exported) and early stopping
(``train.patience``).

Resume is exact: a checkpoint holds the model, optimisers, RNG states, the epoch and the number
of batches already done in it; the batch order of an epoch is a function of (seed, epoch), so a
run stopped mid-epoch (SIGTERM/SIGUSR1) continues with the very batch it would have seen next.
Under torchrun every rank trains on its shard (DistributedSampler); only rank 0 writes.
Subjects are read from disk by a DataLoader (``train.workers`` processes, optional RAM cache of
``train.cache_mb``) that only fetches the batches the trainer planned, so workers change speed,
never the batches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.metrics import DiceMetric, PSNRMetric
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from medldm.autoencoder import networks as ae
from medldm.autoencoder.patches import check_patches, crop_batch, patch_size_at
from medldm.checkpoint import BestCheckpoint, Checkpoints
from medldm.data import cohort
from medldm.data.cohort import PreparedSet
from medldm.errors import InputError
from medldm.evaluation.diversity import ssim_metric
from medldm.report.montage import save_montage
from medldm.runtime import (
    MetricsLog,
    autocast,
    is_main_process,
    memory_format,
    seed_everything,
    stop_agreed,
    warmup_cosine,
)

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """What ``train`` returns: the unwrapped model and where the run stands."""

    model: torch.nn.Module
    epochs_done: int
    interrupted: bool
    eval_split: str = "val"
    val_metrics: dict = field(default_factory=dict)
    montage: Path | None = None
    selection: dict = field(default_factory=dict)  # BestCheckpoint.record() of the exported weights


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's batches of sample indices for ``epoch``; the order depends only on (seed, epoch)."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.long)
    return list(order.split(batch_size))


class VAETrainer:
    """Trains one autoencoder from the ``vae`` settings section on prepared data (read from disk).

    ``stop`` is polled after every step (a ``checkpoint.StopFlag`` in the script); when it is
    true the trainer writes a checkpoint and returns with ``interrupted=True``. ``inference``
    (the entry's inference section) says how validation encodes and decodes whole volumes
    (sliding windows or not); it is not part of the run's identity.
    """

    def __init__(self, settings: dict, train: PreparedSet, val: PreparedSet, run_dir: str | Path,
                 n_labels: int, device: torch.device, stop=None, inference: dict | None = None):
        self.cfg, self.train_cfg = settings, settings["train"]
        self.train_set, self.val_set = train, val
        self.run_dir, self.device, self.stop = Path(run_dir), device, stop
        self.paired, self.only_labels = settings["paired_labels"], ae.labels_only(settings)
        if (self.paired or self.only_labels) and train.labels is None:
            key = "inputs is labels" if self.only_labels else "paired_labels is true"
            raise InputError(f"vae.{key} but the manifest has no label maps: add a label column to the sample sheet")
        if len(train) == 0:
            raise InputError("the manifest has no subjects in the train split")
        self.n_labels = n_labels
        factor = ae.downsampling(settings["model"])
        check_patches(self.train_cfg, train.shape, factor)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.main = is_main_process()
        seed_everything(self.train_cfg["seed"] + self.rank)

        spatial_dims = settings["model"]["spatial_dims"]
        if len(train.shape) != spatial_dims:
            raise InputError(f"the prepared images are {len(train.shape)}D (grid {list(train.shape)}) but the "
                             f"autoencoder is {spatial_dims}D (config spatial_dims): set spatial_dims to "
                             f"{len(train.shape)}, or re-run the prepare stage")
        self.layout = memory_format(device, spatial_dims)
        self.image_channels = len(train.channel_names)
        self.net = ae.build_autoencoder(settings["model"], ae.io_channels(
            self.paired, n_labels, only_labels=self.only_labels, image_channels=self.image_channels))
        self.net.to(device, memory_format=self.layout)
        self.disc = ae.build_discriminator(settings["loss"], spatial_dims, self.image_channels)
        self.losses = ae.Losses(settings["loss"], spatial_dims, self.disc, self.only_labels)
        if self.losses.perceptual is not None:
            self.losses.perceptual.to(device)
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=self.train_cfg["lr"], weight_decay=self.train_cfg["weight_decay"]
        )
        per_epoch = len(epoch_batches(len(train), self.train_cfg["batch_size"], 0, 0, self.rank, self.world))
        self._schedule(per_epoch * self.train_cfg["epochs"])
        self.model, self.disc_model, self.opt_d = self.net, None, None
        if self.disc is not None:
            self.disc.to(device)
            self.disc_model = self.disc
            self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=settings["loss"]["discriminator"]["lr"],
                                           betas=(0.5, 0.999))
        if self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)
            if self.disc is not None:
                self.disc_model = DistributedDataParallel(self.disc, device_ids=ids)
        if len(val):
            self.eval_set, self.eval_split = val, "val"
        else:  # no validation subjects: report the reconstruction of a few training subjects
            log.warning("no validation subjects: reconstruction metrics use training subjects")
            self.eval_set = train.select(list(range(min(len(train), max(self.train_cfg["montage_subjects"], 1)))))
            self.eval_split = "train"
        self.loader, self.sampler = cohort.training_loader(train, self.train_cfg["workers"], self.train_cfg["cache_mb"],
                                                    pin_memory=device.type == "cuda")
        self.ckpts = Checkpoints(self.run_dir)
        select = self.train_cfg["select"]
        if select["metric"] == "dice" and not (self.paired or self.only_labels):
            raise InputError("vae train.select.metric 'dice' needs paired_labels: true; use ssim or psnr")
        if self.only_labels and select["metric"] not in ("dice", "last"):
            raise InputError(f"vae inputs: labels is scored by Dice, not {select['metric']!r}: set "
                             "train.select.metric to dice (mode max) or last")
        self.best = BestCheckpoint(select["metric"], select["mode"], self.train_cfg["patience"])
        self.epoch, self.batch, self.step, self.partial = 0, 0, 0, {}
        self.val_metrics: dict = {}
        self.montage: Path | None = None
        self.validated = False  # in this process (the same on every rank)
        # the inference section is not a setting of this run, so changing it never retrains
        self.validation_decoding = {**(inference or {}), "batch_size": self.train_cfg["batch_size"]}
        ae.check_windows(self.validation_decoding, factor)

    def _schedule(self, horizon: int) -> None:
        """Warm-up and cosine decay over ``horizon`` steps, fixed when the run starts: more epochs
        later continue at the final LR (lr x min_lr_ratio) rather than jumping back up."""
        self.lr_horizon = horizon
        self.lr_schedule = warmup_cosine(self.opt, horizon, self.train_cfg["warmup_steps"],
                                         self.train_cfg["min_lr_ratio"])

    # -- state ---------------------------------------------------------------------------------
    def _state(self) -> dict:
        state = {"model": self.net.state_dict(), "opt": self.opt.state_dict(),
                 "lr_schedule": self.lr_schedule.state_dict(), "lr_horizon": self.lr_horizon,
                 "world": self.world, "epoch": self.epoch,
                 "batch": self.batch, "partial": self.partial, "val_metrics": self.val_metrics,
                 "best": self.best.state_dict()}
        if self.disc is not None:
            state |= {"disc": self.disc.state_dict(), "opt_d": self.opt_d.state_dict()}
        return state

    def resume(self) -> None:
        """Load the newest checkpoint of the run directory, if any (every rank reads it)."""
        state = self.ckpts.load_latest(map_location=self.device)
        if state is None:
            log.info("no checkpoint in %s: training from scratch", self.run_dir)
            return
        world = state.get("world", self.world)  # older checkpoints do not record it
        if world != self.world:
            raise InputError(
                f"{self.run_dir}: its checkpoints were written by {world} training process(es) and this "
                f"job runs {self.world}; an autoencoder run's batches and LR schedule depend on that "
                f"number. Give train_vae {world} GPU(s) again to resume, or move {self.run_dir} away "
                "to train afresh"
            )
        self._schedule(state.get("lr_horizon", self.lr_horizon))  # before the optimiser's LR is restored
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.partial, self.val_metrics = state["partial"], state["val_metrics"]
        if "best" in state:  # older checkpoints do not hold one
            self.best.load_state_dict(state["best"])
        log.info("resumed at epoch %d, batch %d (step %d)", self.epoch + 1, self.batch, self.step)

    def _checkpoint(self) -> None:
        if self.main:
            path = self.ckpts.save(self.step, self._state())
            log.info("checkpoint %s (%d epochs and %d batches done)", path.name, self.epoch, self.batch)
        self._barrier()

    # -- distributed helpers --------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _stop_requested(self) -> bool:
        return stop_agreed(bool(self.stop), self.device)

    # -- one step -------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        non_blocking = self.device.type == "cuda"
        image = batch["image"].to(self.device, non_blocking=non_blocking)
        label = batch["label"].to(self.device, non_blocking=non_blocking) if self.paired or self.only_labels else None
        return image, label

    def train_step(self, image: torch.Tensor, label: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One optimiser step of the autoencoder (and of the discriminator when it is on)."""
        self.model.train()
        image, label = self._crop(image, label)
        x = ae.to_network_input(None if self.only_labels else image, label, self.n_labels)
        x = x.contiguous(memory_format=self.layout)
        with autocast(self.device, self.train_cfg["bf16"]):
            out, mu, sigma = self.model(x)
            parts = self.losses(out, image, label, mu, sigma, self.epoch)
        self.opt.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.train_cfg["grad_clip"])
        self.opt.step()
        self.lr_schedule.step()
        if self.losses.adversarial_on(self.epoch):
            with autocast(self.device, self.train_cfg["bf16"]):
                parts["disc"] = self.losses.discriminator_loss(self.disc_model, out[:, :self.image_channels].float(),
                                                              image)
            self.opt_d.zero_grad(set_to_none=True)
            parts["disc"].backward()
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), self.train_cfg["grad_clip"])
            self.opt_d.step()
        return {k: v.detach() for k, v in parts.items()}

    def _crop(self, image: torch.Tensor, label: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch as the step trains on it: whole volumes, or random crops of this epoch's
        patch size, a function of (seed, epoch, batch, rank)."""
        size = patch_size_at(self.train_cfg, self.epoch)
        if size is None:
            return image, label
        return crop_batch(image, label, size, self.train_cfg, (self.train_cfg["seed"], self.epoch, self.batch, self.rank))

    # -- epochs ---------------------------------------------------------------------------------
    def train_epoch(self) -> bool:
        """Run the rest of the current epoch; False when a stop was requested (checkpoint written)."""
        cfg = self.train_cfg
        batches = epoch_batches(len(self.train_set), cfg["batch_size"], self.epoch, cfg["seed"], self.rank, self.world)
        sums = {k: torch.tensor(v, device=self.device) for k, v in self.partial.get("sums", {}).items()}
        count, seconds = self.partial.get("count", 0), self.partial.get("seconds", 0.0)
        self.sampler.plan = [idx.tolist() for idx in batches[self.batch:]]
        bar = tqdm(zip(self.sampler.plan, self.loader, strict=True), total=len(self.sampler.plan),
                   desc=f"epoch {self.epoch + 1}/{cfg['epochs']}", unit="batch",
                   disable=None if self.main else True, leave=False)  # None: off when not a TTY
        tic = time.perf_counter()
        for idx, batch in bar:
            parts = self.train_step(*self._to_device(batch))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
            count += len(idx)
            self.batch += 1
            self.step += 1
            if self.main and (self.batch % 10 == 0 or self.batch == len(batches)):
                rate = count * self.world / (seconds + time.perf_counter() - tic)
                bar.set_postfix(loss=f"{sums['total'].item() / count:.4f}", vol_s=f"{rate:.2f}")
            if self._stop_requested():
                self.partial = {"sums": {k: float(v) for k, v in sums.items()}, "count": count,
                                "seconds": seconds + time.perf_counter() - tic}
                self._checkpoint()
                return False
        seconds += time.perf_counter() - tic
        names = sorted(sums)
        totals = torch.stack([sums[k].float() for k in names] + [torch.tensor(float(count), device=self.device)])
        if self.world > 1:
            dist.all_reduce(totals)
        means = {k: (totals[i] / totals[-1]).item() for i, k in enumerate(names)}
        self._end_epoch(means, totals[-1].item() / seconds)
        return True

    def _end_epoch(self, means: dict[str, float], vols_per_s: float) -> None:
        cfg, done = self.train_cfg, self.epoch + 1
        last = done == cfg["epochs"]
        metrics = {f"train/{k}": v for k, v in means.items()}
        metrics |= {"train/kl_weight": ae.kl_weight(self.cfg["loss"], self.epoch),
                    "train/volumes_per_s": vols_per_s, "epoch": done}
        if done % cfg["val_every"] == 0 or last:
            self.validate(done)
            metrics |= {f"{self.eval_split}/{k}": v for k, v in self.val_metrics.items()}
            metrics |= self._select(done)
        if self.main:
            self.metrics.log(self.step, **metrics)
            log.info("epoch %d/%d: %s", done, cfg["epochs"],
                     ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
        self.epoch, self.batch, self.partial = done, 0, {}
        if done % cfg["checkpoint_every"] == 0 or last or self.best.exhausted:
            self._checkpoint()

    def _select(self, epoch: int) -> dict[str, float]:
        """Offer this validation to the model selection; its metrics-log columns."""
        if self.best.update(self.val_metrics, lambda: {"model": self.net.state_dict()}, epoch=epoch, step=self.step):
            log.info("new best: %s", self.best.describe())
        elif self.best.exhausted:
            log.info("early stop: %d validations without a better %s; exporting %s", self.best.since,
                     self.best.metric, self.best.describe())
        return {"best/step": self.best.where["step"], "best/epoch": self.best.where["epoch"]}

    @torch.no_grad()
    def validate(self, epoch: int) -> None:
        """Reconstruct the evaluation subjects from ``mu``, sharded over the ranks: SSIM, PSNR,
        Dice; rank 0 writes the montage."""
        shard = self.eval_set
        if len(shard) >= self.world:
            shard = shard.select(list(range(self.rank, len(shard), self.world)))
        montage = self.run_dir / "montages" / f"epoch-{epoch:04d}.png" if self.main else None
        self.val_metrics, montage = evaluate_reconstruction(
            self.net, shard, self.n_labels, self.paired, self.device, self.validation_decoding, montage,
            self.train_cfg["montage_subjects"], only_labels=self.only_labels,
        )
        self.montage, self.validated, self.last_validated = montage, True, epoch

    def run(self) -> Trained:
        """Resume if possible, train to ``train.epochs``; returns the unwrapped model and status."""
        self.resume()
        self.metrics = MetricsLog(self.run_dir, resume_step=self.step) if self.main else None
        try:
            while self.epoch < self.train_cfg["epochs"] and not self.best.exhausted:
                if not self.train_epoch():
                    return Trained(self.net, self.epoch, True, self.eval_split, self.val_metrics, self.montage)
        finally:
            if self.metrics is not None:
                self.metrics.close()
        if self._stop_requested():  # signal during the last epoch's end (its checkpoint is written)
            return Trained(self.net, self.epoch, True, self.eval_split, self.val_metrics, self.montage)
        return self._selected()

    def _selected(self) -> Trained:
        """The selected weights in ``self.net``, with their metrics and montage. They are evaluated
        again (same numbers, the montage written anew) unless this process just validated them."""
        if self.best.weights is None:  # a run finished by a checkpoint that predates selection
            self.validate(self.epoch)
            self.best.update(self.val_metrics, lambda: {"model": self.net.state_dict()},
                             epoch=self.epoch, step=self.step)
        self.net.load_state_dict(self.best.weights["model"])
        if not self.validated or self.last_validated != self.best.where["epoch"]:
            self.validate(self.best.where["epoch"])
        log.info("exporting %s", self.best.describe())
        return Trained(self.net, self.epoch, False, self.eval_split, self.val_metrics, self.montage,
                       self.best.record())


def evaluate_reconstruction(net, data: PreparedSet, n_labels: int, paired: bool, device, inference: dict,
                            montage_path: Path | None = None, montage_subjects: int = 3,
                            only_labels: bool = False) -> tuple[dict, Path | None]:
    """Mean SSIM, PSNR (and label Dice, foreground labels) of ``mu`` reconstructions of ``data``
    (fp32), plus a montage of originals and reconstructions of the first ``montage_subjects``
    subjects (each image channel). Reads ``inference.batch_size`` subjects at a time. Under torchrun this is collective
    (MONAI metrics gather over ranks): every rank calls it with its shard. A label-map
    autoencoder (``only_labels``) is scored by Dice alone (``dice``, and ``dice_<index>`` per
    foreground label)."""
    net.eval()
    if only_labels:
        return _evaluate_label_reconstruction(net, data, n_labels, device, inference, montage_path, montage_subjects)
    ssim = ssim_metric(data.shape)
    psnr = PSNRMetric(max_val=1.0)
    dice = DiceMetric(include_background=False, reduction="mean")
    size = inference["batch_size"]
    shown = min(montage_subjects, len(data))
    volumes = []
    for _, images, labels in cohort.batches(data, size):
        labels = labels if paired else None
        mu = np.concatenate([m for _, m, _ in ae.encode_set(net, images, labels, n_labels, device, inference, progress=False)])
        decoded = list(ae.decode_set(net, mu, inference, device, progress=False, image_channels=images.shape[1]))
        recon = torch.from_numpy(np.concatenate([image for _, image, _ in decoded])).reshape(images.shape)
        ssim(recon, images)
        psnr(recon, images)
        if paired:
            recon_label = torch.from_numpy(np.concatenate([label for _, _, label in decoded]))
            dice(_onehot(recon_label, n_labels), _onehot(labels, n_labels))
        per_subject = 2 * len(data.channel_names)
        volumes += [v for i in range(min(len(images), shown - len(volumes) // per_subject))
                    for c in range(images.shape[1]) for v in (images[i, c].numpy(), recon[i, c].numpy())]
    metrics = {"ssim": float(ssim.aggregate()), "psnr": float(psnr.aggregate())}
    if paired:
        metrics["dice"] = float(dice.aggregate())
    if montage_path is None or not shown:
        return metrics, None
    names = data.channel_names if len(data.channel_names) > 1 else [""]
    titles = [t for sid in data.subject_ids[:shown] for name in names
              for t in (f"{sid} {name} input".replace("  ", " "), f"{sid} {name} recon".replace("  ", " "))]
    save_montage(montage_path, volumes, titles)
    return metrics, montage_path


def _evaluate_label_reconstruction(net, data: PreparedSet, n_labels: int, device, inference: dict,
                                   montage_path: Path | None, montage_subjects: int) -> tuple[dict, Path | None]:
    """``evaluate_reconstruction`` of a label-map autoencoder: mean and per-label Dice (foreground
    labels) of the argmax of its reconstructions; the montage shows label maps scaled to [0, 1]."""
    dice = DiceMetric(include_background=False, reduction="mean_batch")
    shown, volumes = min(montage_subjects, len(data)), []
    for _, _, labels in cohort.batches(data, inference["batch_size"]):
        mu = np.concatenate([m for _, m, _ in ae.encode_set(net, None, labels, n_labels, device, inference,
                                                            progress=False)])
        recon = torch.from_numpy(np.concatenate([label for _, _, label in ae.decode_set(
            net, mu, inference, device, progress=False, only_labels=True)]))
        dice(_onehot(recon, n_labels), _onehot(labels, n_labels))
        scale = 1.0 / (n_labels - 1)
        volumes += [v.numpy() * scale for i in range(min(len(labels), shown - len(volumes) // 2))
                    for v in (labels[i].float(), recon[i].float())]
    per_label = dice.aggregate().tolist()
    metrics = {"dice": float(np.nanmean(per_label))} | {f"dice_{i + 1}": float(v) for i, v in enumerate(per_label)}
    if montage_path is None or not shown:
        return metrics, None
    titles = [t for sid in data.subject_ids[:shown] for t in (f"{sid} labels", f"{sid} recon")]
    save_montage(montage_path, volumes, titles)
    return metrics, montage_path


def _onehot(label: torch.Tensor, n_labels: int) -> torch.Tensor:
    """``(B, X, Y, Z)`` integer labels -> ``(B, L, X, Y, Z)`` one-hot."""
    return torch.nn.functional.one_hot(label.long(), n_labels).movedim(-1, 1)
