"""Diffusion backbones by name, so a new architecture plugs in with one entry in ``BUILDERS``.

Every backbone has MONAI ``DiffusionModelUNet``'s forward: ``model(x, timesteps, class_labels=y)``
with x (B, C, D, H, W) (or (B, C, H, W) for ``spatial_dims`` 2), timesteps (B,), y (B,) long in ``0..num_classes``, where ``num_classes``
is the null class used for classifier-free guidance; the output has x's shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from monai.networks.nets import DiffusionModelUNet
from torch import nn

from medldm.diffusion.dit3d import build_dit3d
from medldm.errors import InputError

UNET_DEFAULTS = {
    "channels": [32, 64],
    "attention_levels": [False, True],
    "num_res_blocks": 1,
    "num_head_channels": 32,
    "norm_num_groups": 16,
}


def _unet(settings: dict, in_channels: int, num_classes: int, cond_channels: int = 0,
          spatial_dims: int = 3) -> nn.Module:
    kwargs = {**UNET_DEFAULTS, **settings}
    return DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels + cond_channels,
        out_channels=in_channels,
        num_class_embeds=num_classes + 1,
        **kwargs,
    )


def _dit3d(settings: dict, in_channels: int, num_classes: int, cond_channels: int = 0,
           spatial_dims: int = 3) -> nn.Module:
    if spatial_dims != 3:
        raise InputError(f"ldm model name dit3d is 3D only, but the latents are {spatial_dims}D "
                         "(spatial_dims 2): use model name unet")
    kwargs = dict(settings)
    variant = kwargs.pop("variant", "S/2")
    # adds the null class itself
    return build_dit3d(variant, in_channels, num_classes, cond_channels=cond_channels, **kwargs)


BUILDERS: dict[str, Callable[..., nn.Module]] = {"unet": _unet, "dit3d": _dit3d}


def build_diffusion_model(settings: dict, in_channels: int, num_classes: int, cond_channels: int = 0,
                          spatial_dims: int = 3) -> nn.Module:
    """Build the backbone named by ``settings["name"]`` (default ``unet``).

    Args:
        settings: the ``model`` section of an ``ldm`` config entry: ``name`` plus the backbone's
            own arguments (``DiffusionModelUNet`` keywords, or ``build_dit3d`` ones with ``variant``).
        in_channels: latent channels C (also the output channels).
        num_classes: number of real classes K; label K is the null (unconditional) class.
        cond_channels: extra input channels appended to the latent (an inpainting model's condition).
        spatial_dims: 3 for volume latents, 2 for image latents (``len(latent_shape) - 1``).
    """
    kwargs = dict(settings)
    name = kwargs.pop("name", "unet")
    if name not in BUILDERS:
        raise InputError(f"ldm model name {name!r} is unknown; choose one of {sorted(BUILDERS)}")
    try:
        return BUILDERS[name](kwargs, in_channels, num_classes, cond_channels, spatial_dims)
    except (TypeError, ValueError) as err:
        raise InputError(f"ldm model settings {settings}: {err}") from None


def check_latent_shape(settings: dict, latent_shape: Sequence[int]) -> None:
    """Raise InputError when the UNet cannot take latents of spatial shape ``latent_shape[1:]``.

    Each UNet level after the first halves the grid, so every axis must divide by 2**(levels-1).
    (DiT3D pads internally and takes any shape.)
    """
    if settings.get("name", "unet") != "unet":
        return
    levels = len(settings.get("channels", UNET_DEFAULTS["channels"]))
    multiple = 2 ** (levels - 1)
    spatial = tuple(int(s) for s in latent_shape[1:])
    if any(s % multiple for s in spatial):
        raise InputError(
            f"latent grid {spatial} does not divide by {multiple}, which a {levels}-level UNet "
            f"needs: use {levels - 1} or fewer levels in the ldm model `channels`, or a prepare "
            f"shape whose latent grid divides by {multiple}"
        )
