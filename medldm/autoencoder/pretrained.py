"""Bring your own autoencoder: an already trained MONAI ``AutoencoderKL`` (or MAISI's
``AutoencoderKlMaisi``) state dict, loaded strictly into the network the config describes."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from monai.networks.nets import AutoencoderKL

from medldm.autoencoder.networks import build_autoencoder
from medldm.errors import InputError

WRAPPER_KEYS = ("state_dict", "model")  # where training scripts commonly keep the weights
SHOWN = 4  # keys named per kind of mismatch


def read_state_dict(path: str | Path, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file: a raw state dict, or one under ``state_dict`` or ``model``
    (a ``module.`` prefix, as DataParallel saves it, is dropped). Loaded with ``weights_only``:
    a file that needs arbitrary code to unpickle is refused."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where}: {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{where}: {path} is not a torch weights file that loads safely ({first})") from None
    for key in WRAPPER_KEYS:
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise InputError(f"{where}: {path} holds no state dict (a mapping of parameter names to tensors, "
                         f"at the top or under {' or '.join(WRAPPER_KEYS)!s})")
    if all(k.startswith("module.") for k in payload):
        payload = {k.removeprefix("module."): v for k, v in payload.items()}
    return payload


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (f", ... ({len(keys)} in all)" if len(keys) > SHOWN else "")


def load_pretrained(path: str | Path, model: dict, channels: int, where: str) -> AutoencoderKL:
    """The network of the ``model`` settings (``channels`` in and out) with the weights of ``path``,
    loaded strictly; keys or shapes that do not match are an InputError naming ``where`` (the config
    key) and a few of them."""
    net = build_autoencoder(model, channels)
    state = read_state_dict(path, where)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        found = []
        if missing:
            found.append(f"missing keys: {_some(missing)}")
        if unexpected:
            found.append(f"unexpected keys: {_some(unexpected)}")
        if reshaped:
            k = reshaped[0]
            found.append(f"other shapes: {_some(reshaped)} (e.g. {k}: file {list(state[k].shape)}, "
                         f"network {list(expected[k].shape)})")
        raise InputError(
            f"{where}: {path} does not fit the network its model section describes ({model.get('name')}, "
            f"channels {model['channels']}, {channels} image/label channel(s)): {'; '.join(found)}. "
            "Set model (name, channels, num_res_blocks, latent_channels, norm_num_groups, attention) and "
            "paired_labels to those the file was trained with"
        )
    net.load_state_dict(state, strict=True)
    return net
