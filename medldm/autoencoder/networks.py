"""The autoencoder: MONAI ``AutoencoderKL`` built from settings, its losses, the paired
image + label-map channels, and encode/decode helpers used by training, export and decode.

Shapes: images ``(B, K, X, Y, Z)`` in [0, 1] (K image channels, 1 unless ``image_channels``);
label maps ``(B, X, Y, Z)`` int with values 0..L-1; network input/output ``(B, C, X, Y, Z)`` where
C = K (image only), K + L (paired: image plus one-hot labels in, image plus label logits out) or L
(``inputs: labels``: one-hot label maps in, label logits out, no image); latents
``(B, latent_channels, x, y, z)`` with x = X / 2**(levels - 1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss, PatchAdversarialLoss, PerceptualLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from tqdm import tqdm

from medldm.checkpoint import load_model_file, save_torch
from medldm.errors import InputError

VAE_KIND, VAE_FORMAT_VERSION = "medldm-vae", 1


def labels_only(settings: dict) -> bool:
    """True for an autoencoder of label maps alone (``inputs: labels``; vae.pt files written
    before the key existed are image autoencoders)."""
    return settings.get("inputs", "image") == "labels"


def io_channels(paired_labels: bool, n_labels: int, *, only_labels: bool = False, image_channels: int = 1) -> int:
    """Channels in and out of the network: the image's, plus one per label in paired mode; one
    per label and no image for a label-map autoencoder (``only_labels``)."""
    if only_labels:
        if paired_labels:
            raise InputError("vae inputs: labels encodes label maps alone; set paired_labels: false "
                             "(paired_labels: true is the image + labels autoencoder)")
        if n_labels < 2:
            raise InputError("vae inputs is labels but config 'labels' names fewer than 2 labels")
        return n_labels
    if paired_labels and n_labels < 2:
        raise InputError("vae.paired_labels is true but config 'labels' names fewer than 2 labels")
    return image_channels + (n_labels if paired_labels else 0)


def image_channel_names(vae: dict) -> list[str]:
    """The image channels a ``vae.pt`` payload was trained on (``["image"]``: one, the default)."""
    return vae.get("image_channels") or ["image"]


def build_autoencoder(model: dict, channels: int) -> AutoencoderKL:
    """``AutoencoderKL`` from the ``model`` settings section, ``channels`` in and out; with
    ``name: maisi`` MONAI's ``AutoencoderKlMaisi`` (NVIDIA MAISI's network, the same interface and
    outputs; ``num_splits`` / ``dim_split`` split its convolutions' inputs to save memory)."""
    levels = len(model["channels"])
    attention = model.get("attention_levels") or [False] * levels
    if len(attention) != levels:
        raise InputError(
            f"vae model.attention_levels has {len(attention)} entries, model.channels has {levels}"
        )
    groups = model["norm_num_groups"]
    if any(c % groups for c in model["channels"]):
        raise InputError(f"vae model.channels {model['channels']} must all be divisible by norm_num_groups={groups}")
    if model.get("name", "autoencoderkl") == "maisi":
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

        return AutoencoderKlMaisi(
            spatial_dims=model["spatial_dims"], in_channels=channels, out_channels=channels,
            num_channels=tuple(model["channels"]), num_res_blocks=[model["num_res_blocks"]] * levels,
            attention_levels=tuple(attention), latent_channels=model["latent_channels"], norm_num_groups=groups,
            with_encoder_nonlocal_attn=model["nonlocal_attention"],
            with_decoder_nonlocal_attn=model["nonlocal_attention"],
            use_checkpointing=model["gradient_checkpointing"], num_splits=model["num_splits"],
            dim_split=model["dim_split"], norm_float16=False, save_mem=False,
        )
    return AutoencoderKL(
        spatial_dims=model["spatial_dims"],
        in_channels=channels,
        out_channels=channels,
        channels=tuple(model["channels"]),
        num_res_blocks=model["num_res_blocks"],
        attention_levels=tuple(attention),
        latent_channels=model["latent_channels"],
        norm_num_groups=groups,
        with_encoder_nonlocal_attn=model["nonlocal_attention"],
        with_decoder_nonlocal_attn=model["nonlocal_attention"],
        use_checkpoint=model["gradient_checkpointing"],
    )


def downsampling(model: dict) -> int:
    """Spatial reduction factor of the encoder (2 per level after the first)."""
    return 2 ** (len(model["channels"]) - 1)


def check_grid(model: dict, shape: Sequence[int]) -> None:
    """The prepared grid must divide evenly into the latent grid."""
    factor = downsampling(model)
    if any(s % factor for s in shape):
        raise InputError(
            f"prepared shape {list(shape)} is not divisible by {factor} (the VAE downsamples "
            f"{len(model['channels']) - 1} times): change prepare.shape or vae model.channels"
        )


def to_network_input(image: torch.Tensor | None, label: torch.Tensor | None, n_labels: int) -> torch.Tensor:
    """Image ``(B,1,X,Y,Z)`` plus, when ``label`` ``(B,X,Y,Z)`` is given, its one-hot channels;
    the one-hot channels alone (float32) when ``image`` is None (a label-map autoencoder)."""
    if label is None:
        return image
    onehot = F.one_hot(label.long(), n_labels).movedim(-1, 1)
    if image is None:
        return onehot.float()
    return torch.cat([image, onehot.to(image.dtype)], dim=1)


def split_output(out: torch.Tensor, only_labels: bool = False,
                 image_channels: int = 1) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Network output ``(B,C,...)`` -> image ``(B,K,...)`` and label logits ``(B,C-K,...)`` or None;
    (None, all channels as logits) for a label-map autoencoder."""
    if only_labels:
        return None, out
    k = image_channels
    return out[:, :k], (out[:, k:] if out.shape[1] > k else None)


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over all latent elements of each sample, averaged
    over the batch. Summing (not averaging over voxels) keeps the 3D term at its intended
    strength relative to ``kl_weight``."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 2 * torch.log(sigma) - 1)
    return kl.flatten(1).sum(1).mean()


def gradient_loss(recon: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the finite differences of ``recon`` and ``image`` along every
    spatial axis: penalises blurred edges (tissue boundaries), which a voxel loss lets through."""
    axes = range(2, image.ndim)
    return sum(F.l1_loss(recon.diff(dim=d), image.diff(dim=d)) for d in axes) / len(axes)


def kl_weight(loss: dict, epoch: int) -> float:
    """KL weight at ``epoch`` (0-based): rises linearly from ``kl_weight_start`` to ``kl_weight``
    over ``kl_warmup_epochs`` epochs, constant after."""
    warm = loss["kl_warmup_epochs"]
    if warm <= 0 or epoch >= warm:
        return loss["kl_weight"]
    start, end = loss["kl_weight_start"], loss["kl_weight"]
    return start + (end - start) * epoch / warm


class Losses:
    """The generator-side loss terms of one step, configured from the ``loss`` settings.

    ``__call__(out, image, label, mu, sigma, epoch)`` returns a dict of scalar tensors with the
    weighted ``total`` and its parts (``recon``, ``kl``, ``label``, ``perceptual``, ``adv``).
    """

    def __init__(self, loss: dict, spatial_dims: int, discriminator: torch.nn.Module | None = None,
                 only_labels: bool = False):
        self.cfg, self.only_labels = loss, only_labels
        if only_labels:
            image_terms = [k for k in ("perceptual_weight", "adversarial_weight") if loss[k] > 0]
            if image_terms:
                raise InputError(f"vae inputs: labels has no image for loss.{' and loss.'.join(image_terms)}: "
                                 "set them to 0 (label maps train with loss.label_loss)")
        if loss["reconstruction"] not in ("l1", "l2"):
            raise InputError(f"vae loss.reconstruction must be l1 or l2, got {loss['reconstruction']!r}")
        self.recon = F.l1_loss if loss["reconstruction"] == "l1" else F.mse_loss
        if loss["label_loss"] == "dice_ce":
            self.label = DiceCELoss(to_onehot_y=True, softmax=True)
        elif loss["label_loss"] == "ce":
            self.label = lambda logits, y: F.cross_entropy(logits, y[:, 0].long())
        else:
            raise InputError(f"vae loss.label_loss must be ce or dice_ce, got {loss['label_loss']!r}")
        self.perceptual = perceptual_loss(loss, spatial_dims)
        self.discriminator = discriminator
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def adversarial_on(self, epoch: int) -> bool:
        return self.discriminator is not None and epoch >= self.cfg["adversarial_start_epoch"]

    def __call__(self, out, image, label, mu, sigma, epoch: int) -> dict[str, torch.Tensor]:
        if self.only_labels:  # label maps alone: the label loss is the reconstruction term
            parts = {"label": self.label(out.float(), label.unsqueeze(1)), "kl": kl_loss(mu.float(), sigma.float())}
            parts["total"] = parts["label"] + kl_weight(self.cfg, epoch) * parts["kl"]
            return parts
        recon_image, logits = split_output(out.float(), image_channels=image.shape[1])
        parts = {"recon": self.recon(recon_image, image), "kl": kl_loss(mu.float(), sigma.float())}
        total = parts["recon"] + kl_weight(self.cfg, epoch) * parts["kl"]
        if self.cfg["gradient_weight"] > 0:
            parts["gradient"] = gradient_loss(recon_image, image)
            total = total + self.cfg["gradient_weight"] * parts["gradient"]
        if logits is not None:
            parts["label"] = self.label(logits, label.unsqueeze(1))
            total = total + self.cfg["label_weight"] * parts["label"]
        if self.perceptual is not None:
            parts["perceptual"] = sum(self.perceptual(recon_image[:, c:c + 1], image[:, c:c + 1])
                                      for c in range(image.shape[1])) / image.shape[1]
            total = total + self.cfg["perceptual_weight"] * parts["perceptual"]
        if self.adversarial_on(epoch):
            fake = self.discriminator(recon_image.contiguous())[-1]
            parts["adv"] = self.adversarial(fake, target_is_real=True, for_discriminator=False)
            total = total + self.cfg["adversarial_weight"] * parts["adv"]
        parts["total"] = total
        return parts

    def discriminator_loss(self, disc, recon_image: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Least-squares patch loss of ``disc`` (the possibly DDP-wrapped discriminator): real
        images -> 1, reconstructions (detached) -> 0, in one forward pass."""
        logits = disc(torch.cat([recon_image.detach(), image]).contiguous())[-1]
        fake, real = logits.chunk(2)
        return 0.5 * (
            self.adversarial(fake, target_is_real=False, for_discriminator=True)
            + self.adversarial(real, target_is_real=True, for_discriminator=True)
        )


def build_discriminator(loss: dict, spatial_dims: int, image_channels: int = 1) -> PatchDiscriminator | None:
    """The patch discriminator on the image channels, or None when the adversarial loss is off."""
    if loss["adversarial_weight"] <= 0:
        return None
    disc = loss["discriminator"]
    return PatchDiscriminator(
        spatial_dims=spatial_dims, channels=disc["channels"], in_channels=image_channels, num_layers_d=disc["num_layers"]
    )


def perceptual_loss(loss: dict, spatial_dims: int) -> PerceptualLoss | None:
    """2.5D ResNet50 perceptual loss from a local weights file; never downloads at run time."""
    if loss["perceptual_weight"] <= 0:
        return None
    weights = loss.get("perceptual_weights")
    if not weights or not Path(weights).is_file():
        raise InputError(
            f"vae loss.perceptual_weight > 0 needs loss.perceptual_weights: a local torchvision "
            f"ResNet50 state-dict file (got {weights!r}); download it once beforehand, or set "
            "perceptual_weight to 0"
        )
    return PerceptualLoss(
        spatial_dims=spatial_dims, network_type="resnet50", is_fake_3d=spatial_dims == 3,
        pretrained=True, pretrained_path=str(weights),
    )


@torch.no_grad()
def encode_posterior(model: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``mu`` and ``logvar``, each ``(B, latent_channels, x, y, z)`` float32."""
    mu, sigma = model.encode(x)
    return mu.float(), 2 * torch.log(sigma.float())


def net_downsampling(model: AutoencoderKL) -> int:
    """Spatial reduction factor of a built network (as ``downsampling`` of its settings): 2 per
    downsampling block of its encoder (MONAI's and MAISI's encoders alike)."""
    return 2 ** sum(type(m).__name__.endswith("Downsample") for m in model.encoder.modules())


def check_windows(inference: dict, factor: int, where: str = "vae inference.roi_size") -> None:
    """Sliding-window ROIs must divide into latent voxels: an InputError naming the key otherwise."""
    roi = inference.get("roi_size")
    if roi and any(r % factor for r in roi):
        raise InputError(
            f"{where} {list(roi)} is not divisible by {factor} (the autoencoder downsamples by {factor}): "
            f"use multiples of {factor}, e.g. {[max(factor, r // factor * factor) for r in roi]}"
        )


def _overlap_for(roi: int, step: int) -> float:
    """The overlap for which MONAI's scan interval ``int(roi * (1 - overlap))`` is exactly ``step``."""
    return max(0.0, 1 - (step + 0.5) / roi)


def _inferer(inference: dict, roi: Sequence[int], steps: Sequence[int]) -> SlidingWindowInferer:
    return SlidingWindowInferer(
        roi_size=list(roi), sw_batch_size=inference.get("sw_batch_size", 1),
        overlap=[_overlap_for(r, s) for r, s in zip(roi, steps, strict=True)], mode=inference.get("mode", "gaussian"),
    )


def window_grid(inference: dict, factor: int, shape: Sequence[int]) -> tuple[list[int], list[int]] | None:
    """(ROI, step between windows), both in image voxels and multiples of ``factor``, for volumes
    of ``shape``; None without ``inference.roi_size`` (whole volumes). An ROI larger than the
    volume is clipped to it; the step is ``roi * (1 - overlap)`` rounded down to a multiple of
    ``factor``, so encoder windows start on latent voxels and decoder windows line up with them."""
    if not inference.get("roi_size"):
        return None
    check_windows(inference, factor)
    roi = [min(r, s) for r, s in zip(inference["roi_size"], shape, strict=True)]
    overlap = inference.get("overlap", 0.5)
    steps = [max(factor, int(r * (1 - overlap)) // factor * factor) for r in roi]
    return roi, steps


def make_encoder(model: AutoencoderKL, inference: dict, shape: Sequence[int]):
    """A function network input ``(B,C,X,Y,Z)`` of spatial ``shape`` -> (``mu``, ``logvar``), each
    ``(B,c,x,y,z)`` float32: whole volumes, or MONAI sliding windows of ``inference.roi_size``
    image voxels (blending ``inference.mode``, ``overlap``) whose latent outputs MONAI stitches
    at 1/factor of the input resolution."""
    grid = window_grid(inference, net_downsampling(model), shape)
    if grid is None:
        return lambda x: encode_posterior(model, x)
    inferer = _inferer(inference, *grid)
    return lambda x: inferer(x, lambda window: encode_posterior(model, window))


def make_decoder(model: AutoencoderKL, inference: dict):
    """A function latents ``(B,c,x,y,z)`` -> network output ``(B,C,X,Y,Z)``: whole volumes or, when
    ``inference.roi_size`` is set (image voxels), MONAI sliding windows of roi_size / factor
    latent voxels, the same windows as ``make_encoder``'s. Peak memory then follows the window,
    not the volume. Windowed decoding is approximate (GroupNorm statistics and zero padding are
    per window); overlap and Gaussian blending hide the seams."""
    if not inference.get("roi_size"):
        return model.decode
    factor = net_downsampling(model)
    check_windows(inference, factor)

    def decode(z: torch.Tensor) -> torch.Tensor:
        roi, steps = window_grid(inference, factor, [s * factor for s in z.shape[2:]])
        return _inferer(inference, [r // factor for r in roi], [s // factor for s in steps])(z, model.decode)

    return decode


def to_volumes(out: torch.Tensor, only_labels: bool = False,
               image_channels: int = 1) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Network output ``(B,C,X,Y,Z)`` -> images ``(B,X,Y,Z)`` (``(B,K,X,Y,Z)`` for K > 1 image
    channels) float32 clipped to [0, 1] (None for a label-map autoencoder) and, in paired or label
    mode, label maps ``(B,X,Y,Z)`` uint8 (argmax of the logits)."""
    image, logits = split_output(out.float(), only_labels, image_channels)
    if image is not None:
        image = (image[:, 0] if image_channels == 1 else image).clamp(0, 1).cpu().numpy()
    label = None if logits is None else logits.argmax(1).to(torch.uint8).cpu().numpy()
    return image, label


@torch.no_grad()
def encode_set(net: AutoencoderKL, images: torch.Tensor | None, labels: torch.Tensor | None, n_labels: int,
               device: torch.device, inference: dict,
               progress: bool = True) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Encode ``images`` ``(N,K,X,Y,Z)`` (with ``labels`` ``(N,X,Y,Z)`` in paired mode; ``labels``
    alone, ``images`` None, for a label-map autoencoder) in fp32 batches of
    ``inference.batch_size``, by sliding windows when ``inference.roi_size`` is set; yields
    (first index, mu, logvar), each ``(b, c, x, y, z)`` float32."""
    n, shape = (len(labels), labels.shape[1:]) if images is None else (len(images), images.shape[2:])
    encode = make_encoder(net, inference, shape)
    batch_size = inference["batch_size"]
    for start in tqdm(range(0, n, batch_size), desc="encoding", unit="batch", disable=None if progress else True):
        stop = start + batch_size
        label = None if labels is None else labels[start:stop].to(device)
        x = to_network_input(None if images is None else images[start:stop].to(device), label, n_labels)
        mu, logvar = encode(x)
        yield start, mu.cpu().numpy(), logvar.cpu().numpy()


@torch.no_grad()
def decode_set(net: AutoencoderKL, latents, inference: dict, device: torch.device,
               progress: bool = True, only_labels: bool = False,
               image_channels: int = 1) -> Iterator[tuple[int, np.ndarray | None, np.ndarray | None]]:
    """Decode ``latents`` (array-like ``(N,c,x,y,z)``, e.g. an HDF5 dataset, used as stored) in
    fp32 batches; yields (first index, images ``(b,X,Y,Z)`` (``(b,K,X,Y,Z)`` for K > 1 image
    channels) or None for a label-map autoencoder (``only_labels``), label maps ``(b,X,Y,Z)`` or None)."""
    decode = make_decoder(net, inference)
    size = inference["batch_size"]
    for start in tqdm(range(0, len(latents), size), desc="decoding", unit="batch", disable=None if progress else True):
        z = torch.as_tensor(np.asarray(latents[start : start + size]), dtype=torch.float32, device=device)
        yield start, *to_volumes(decode(z), only_labels, image_channels)


class LatentStats:
    """Per-channel mean and std, and the overall std, of latents over all their voxels (float64)."""

    def __init__(self, channels: int):
        self.n = 0
        self.sum = np.zeros(channels)
        self.sumsq = np.zeros(channels)

    def add(self, mu: np.ndarray) -> None:
        """``mu`` (b, C, x, y, z)."""
        values = np.moveaxis(mu.astype(np.float64), 1, 0).reshape(mu.shape[1], -1)
        self.n += values.shape[1]
        self.sum += values.sum(1)
        self.sumsq += (values**2).sum(1)

    def result(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(channel mean, channel std, scale factor = 1 / std of all values)."""
        if self.n == 0:
            raise InputError("no training subjects in the manifest: cannot estimate the latent scale")
        mean = self.sum / self.n
        std = np.sqrt(np.maximum(self.sumsq / self.n - mean**2, 0))
        total = self.n * len(self.sum)
        overall = np.sqrt(max(self.sumsq.sum() / total - (self.sum.sum() / total) ** 2, 0))
        if overall == 0:
            raise InputError("all training latents are identical: the autoencoder is degenerate")
        return mean, std, 1.0 / overall


def save_vae(path: str | Path, model: AutoencoderKL, meta: dict) -> None:
    """Write ``vae.pt``: weights plus ``meta`` (settings, channels, classes, labels, prepare,
    grid_affine, grid_shape, latent_shape, provenance, ...), atomically."""
    save_torch(path, {"kind": VAE_KIND, "format_version": VAE_FORMAT_VERSION,
                      "state_dict": model.state_dict(), **meta})


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> tuple[AutoencoderKL, dict]:
    """Model (eval mode, on ``device``) and the whole ``vae.pt`` payload."""
    payload = load_model_file(path, ("kind", VAE_KIND), VAE_FORMAT_VERSION, "train_vae")
    model = build_autoencoder(payload["settings"]["model"], payload["channels"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload
