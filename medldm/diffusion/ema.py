"""Exponential moving average (EMA) of a network's weights: the copy that sampling uses."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """EMA of ``model``'s parameters with decay min(decay, (1 + n) / (10 + n)) at update n.

    The warm-up keeps early updates from being dominated by the random initial weights. One fused
    ``_foreach_lerp_`` per update and a Python step counter: no host-device synchronisation.
    Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        self._source = model
        self._ema_params, self._params = list(self.module.parameters()), list(model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._ema_params, self._params, 1 - decay)
        for ema_buf, buf in zip(self.module.buffers(), self._source.buffers(), strict=True):
            ema_buf.copy_(buf)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
