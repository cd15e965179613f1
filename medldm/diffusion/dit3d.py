"""3D Diffusion Transformer (DiT) with window attention, a drop-in for MONAI ``DiffusionModelUNet``.

Shapes: latents may have any spatial shape. The model zero-pads each axis at its far end to a multiple of
the patch size, works on the padded token grid and crops its prediction back to the input shape, so a loss
on the output never sees padded voxels.

Attention: windowed blocks attend inside non-overlapping windows of the token grid; the blocks listed in
``global_blocks`` attend over the whole grid. A window larger than the grid is clamped to it. When the grid
is not a multiple of the window, it is padded at its far end and padded tokens are masked out as keys
(every window keeps at least one real token); their outputs are cropped away.

Conditioning: adaLN-Zero on the sum of a timestep embedding and a class embedding. Class labels are ints
in ``0..num_classes - 1``; index ``num_classes`` is the null class for classifier-free guidance, so the
class table has ``num_classes + 1`` rows (same convention as ``DiffusionModelUNet(num_class_embeds=K + 1)``).

Reference: Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn
from torch.utils.checkpoint import checkpoint

Triple = tuple[int, int, int]

# name: (hidden_size, depth, num_heads), the standard DiT sizes.
VARIANTS: dict[str, Triple] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
FREQ_DIM = 256  # sinusoidal timestep features fed to the timestep MLP


def _triple(value: int | Sequence[int], name: str) -> Triple:
    """An int or 3 ints -> 3 positive ints; ValueError naming ``name`` otherwise."""
    t = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(t) != 3 or not all(isinstance(v, int) and v > 0 for v in t):
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {value!r}")
    return t  # type: ignore[return-value]


def _pad_end(x: torch.Tensor, pad: Sequence[int], first_dim: int) -> torch.Tensor:
    """Zero-pad 3 consecutive dims of ``x`` starting at ``first_dim`` by ``pad`` at their far end."""
    trailing = x.ndim - first_dim - 3  # dims after the three padded ones
    return F.pad(x, (0, 0) * trailing + (0, pad[2], 0, pad[1], 0, pad[0]))


def _pad_to_multiple(grid: Sequence[int], unit: Sequence[int]) -> list[int]:
    """Padding per axis that brings ``grid`` to a multiple of ``unit``."""
    return [-g % u for g, u in zip(grid, unit, strict=True)]


def sincos_pos_embed_3d(
    grid: Sequence[int], dim: int, device: torch.device | None = None
) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding of a token grid (gd, gh, gw) -> (gd, gh, gw, dim) float32.

    Each axis gets ``2 * (dim // 6)`` channels (half sin, half cos); the last ``dim % 6`` channels are zero.
    """
    half = dim // 6
    omega = 1.0 / 10000 ** (torch.arange(half, device=device, dtype=torch.float32) / half)
    axes = []
    for axis, n in enumerate(grid):
        args = torch.arange(n, device=device, dtype=torch.float32)[:, None] * omega
        shape = [1, 1, 1, 2 * half]
        shape[axis] = n
        axes.append(torch.cat([args.sin(), args.cos()], dim=1).view(shape).expand(*grid, -1))
    return F.pad(torch.cat(axes, dim=-1), (0, dim - 6 * half))


def window_partition(x: torch.Tensor, window: Triple) -> torch.Tensor:
    """(B, D, H, W, C), D, H, W multiples of ``window`` -> (B * num_windows, prod(window), C), batch-major."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.view(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def window_merge(windows: torch.Tensor, window: Triple, grid: Sequence[int]) -> torch.Tensor:
    """Inverse of ``window_partition``: (B * num_windows, prod(window), C) -> (B, *grid, C)."""
    d, h, w = grid
    wd, wh, ww = window
    x = windows.view(-1, d // wd, h // wh, w // ww, wd, wh, ww, windows.shape[-1])
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, d, h, w, windows.shape[-1])


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head self-attention on a token grid, over the whole grid or in non-overlapping windows."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, window: Triple | None = None) -> torch.Tensor:
        """x (B, D, H, W, C) -> (B, D, H, W, C); ``window`` None attends over the whole grid."""
        b, *grid, c = x.shape
        if window is None:
            return self._attend(x.reshape(b, -1, c)).view_as(x)
        window = tuple(min(w, g) for w, g in zip(window, grid, strict=True))
        pad = _pad_to_multiple(grid, window)
        padded_grid = [g + p for g, p in zip(grid, pad, strict=True)]
        mask = None
        if any(pad):  # True where a key is a real token; (B * num_windows, 1, 1, prod(window))
            real = _pad_end(x.new_ones(1, *grid, 1), pad, first_dim=1)
            mask = window_partition(real, window)[..., 0].bool().repeat(b, 1)[:, None, None]
        out = self._attend(window_partition(_pad_end(x, pad, first_dim=1), window), mask)
        return window_merge(out, window, padded_grid)[:, : grid[0], : grid[1], : grid[2]]

    def _attend(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, L, C) -> (N, L, C); ``mask`` (N, 1, 1, L) bool, True where a key may be attended."""
        n, length, c = tokens.shape
        qkv = self.qkv(tokens).view(n, length, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(n, length, c))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: x (B, D, H, W, C), c (B, C) -> (B, D, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window: Triple | None) -> None:
        super().__init__()
        self.window = window  # None: global attention
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        mlp_dim = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_dim, dim)
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.modulation(c)[:, None, None, None]  # (B, 1, 1, 1, 6 * C)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), self.window)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated projection to patches: x (B, D, H, W, C), c (B, C) -> (B, D, H, W, out_dim)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c)[:, None, None, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT3D(nn.Module):
    """3D DiT predicting noise or velocity; ``forward`` matches MONAI ``DiffusionModelUNet``.

    Args:
        in_channels: latent channels C (also the output channels).
        num_classes: K real classes; label K is the null class. 0 gives an unconditional model.
        patch_size: int or (pd, ph, pw), voxels per token along each axis.
        hidden_size, depth, num_heads, mlp_ratio: transformer width, number of blocks, heads, MLP expansion.
        window_size: int or 3 ints, attention window in tokens (clamped to the token grid).
        global_blocks: indices of blocks with global attention; None: every 4th block (3, 7, 11, ...).
        learn_pos_embed: learn the position embedding (initialised to sin-cos). Needs ``input_size`` and
            then only accepts latents of that spatial shape.
        input_size: (D, H, W) latent shape, only used with ``learn_pos_embed``.
        gradient_checkpointing: recompute blocks in the backward pass while training, to save memory.
        cond_channels: extra input channels after the latent's (an inpainting condition); the
            output keeps ``in_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        patch_size: int | Sequence[int] = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        window_size: int | Sequence[int] = 4,
        global_blocks: Sequence[int] | None = None,
        learn_pos_embed: bool = False,
        input_size: Sequence[int] | None = None,
        gradient_checkpointing: bool = False,
        cond_channels: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("hidden_size", hidden_size),
            ("depth", depth),
            ("num_heads", num_heads),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size < 6:
            raise ValueError(
                f"hidden_size must be at least 6 for the 3D position embedding, got {hidden_size}"
            )
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        self.patch_size = _triple(patch_size, "patch_size")
        window = _triple(window_size, "window_size")
        global_blocks = set(range(3, depth, 4) if global_blocks is None else global_blocks)
        if any(not 0 <= i < depth for i in global_blocks):
            raise ValueError(
                f"global_blocks {sorted(global_blocks)} must be block indices in 0..{depth - 1}"
            )
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.gradient_checkpointing = gradient_checkpointing

        self.patch_embed = nn.Conv3d(
            in_channels + cond_channels, hidden_size, self.patch_size, stride=self.patch_size
        )
        self.pos_embed = self._learned_pos_embed(input_size) if learn_pos_embed else None
        self.t_embed = nn.Sequential(
            nn.Linear(FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.class_embed = nn.Embedding(num_classes + 1, hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, None if i in global_blocks else window)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, in_channels * math.prod(self.patch_size))
        self._init_weights()

    def _learned_pos_embed(self, input_size: Sequence[int] | None) -> nn.Parameter:
        """Position embedding parameter (gd, gh, gw, hidden) for the padded token grid of ``input_size``."""
        if input_size is None:
            raise ValueError("learn_pos_embed needs input_size, the (D, H, W) latent shape")
        size = _triple(input_size, "input_size")
        grid = [math.ceil(s / p) for s, p in zip(size, self.patch_size, strict=True)]
        return nn.Parameter(sincos_pos_embed_3d(grid, self.hidden_size))

    def _init_weights(self) -> None:
        """DiT initialisation; adaLN and output projections are zero, so the model outputs zero at init."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.out_channels, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        zeroed = [block.modulation[-1] for block in self.blocks]
        zeroed += [self.final_layer.modulation[-1], self.final_layer.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict noise (or velocity) for a noisy latent.

        Args:
            x: (B, C + cond_channels, D, H, W) noisy latent (and condition), any D, H, W.
            timesteps: (B,) or (1,) int or float times in [0, num_train_timesteps); (1,) is broadcast,
                as MONAI ``DiffusionInferer.sample`` passes it.
            context: unsupported (no cross-attention); must be None. Kept for the MONAI signature.
            class_labels: (B,) long in 0..num_classes, num_classes being the null class; None: null class.
        Returns:
            (B, C, D, H, W) prediction.
        """
        if context is not None:
            raise ValueError("DiT3D has no cross-attention: pass class_labels, not context")
        if x.ndim != 5:
            raise ValueError(f"x must be (B, C, D, H, W), got shape {tuple(x.shape)}")
        size = x.shape[2:]
        c = self._condition(timesteps, class_labels, x)
        x = _pad_end(x, _pad_to_multiple(size, self.patch_size), first_dim=2)
        tokens = self.patch_embed(x).permute(0, 2, 3, 4, 1)  # (B, gd, gh, gw, hidden)
        tokens = tokens + self._pos_embed(tokens.shape[1:4], tokens.device).to(tokens.dtype)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            tokens = (
                checkpoint(block, tokens, c, use_reentrant=False) if recompute else block(tokens, c)
            )
        out = self._unpatchify(self.final_layer(tokens, c))
        return out[:, :, : size[0], : size[1], : size[2]]

    def _condition(
        self, timesteps: torch.Tensor, class_labels: torch.Tensor | None, x: torch.Tensor
    ) -> torch.Tensor:
        """Timesteps (B,) or (1,) and labels (B,) -> conditioning vector (B, hidden)."""
        batch = x.shape[0]
        t = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps
        t_emb = self.t_embed(get_timestep_embedding(t, FREQ_DIM).to(x.dtype))
        if class_labels is None:
            class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=x.device)
        elif class_labels.numel() and (
            class_labels.min() < 0 or class_labels.max() > self.num_classes
        ):
            raise ValueError(
                f"class_labels must be in 0..{self.num_classes} ({self.num_classes} = null class), "
                f"got values in {class_labels.min().item()}..{class_labels.max().item()}"
            )
        return t_emb + self.class_embed(class_labels).to(t_emb.dtype)

    def _pos_embed(self, grid: Sequence[int], device: torch.device) -> torch.Tensor:
        """(gd, gh, gw, hidden) position embedding of the padded token grid."""
        if self.pos_embed is None:
            return sincos_pos_embed_3d(grid, self.hidden_size, device)
        if tuple(self.pos_embed.shape[:3]) != tuple(grid):
            raise ValueError(
                f"learned position embedding is for token grid {tuple(self.pos_embed.shape[:3])}, "
                f"got {tuple(grid)}: latents must have the input_size the model was built with"
            )
        return self.pos_embed

    def _unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, gd, gh, gw, pd * ph * pw * C) -> (B, C, gd * pd, gh * ph, gw * pw)."""
        b, gd, gh, gw, _ = patches.shape
        pd, ph, pw = self.patch_size
        x = patches.reshape(b, gd, gh, gw, pd, ph, pw, self.in_channels)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(
            b, self.in_channels, gd * pd, gh * ph, gw * pw
        )


def build_dit3d(
    variant: str,
    in_channels: int,
    num_classes: int,
    patch_size: int | Sequence[int] | None = None,
    window_size: int | Sequence[int] = 4,
    global_blocks: Sequence[int] | None = None,
    learn_pos_embed: bool = False,
    **overrides,
) -> DiT3D:
    """Build a DiT3D by variant name: "S", "B", "L" or "XL", with "/p" for patch size p on every axis ("S/4").

    ``patch_size`` (int or 3 ints) overrides the variant's patch. ``overrides`` are further ``DiT3D``
    arguments: hidden_size, depth, num_heads, mlp_ratio (e.g. a tiny model for tests), input_size,
    gradient_checkpointing.
    """
    match = re.fullmatch(rf"({'|'.join(VARIANTS)})(?:/(\d+))?", variant)
    if match is None:
        raise ValueError(
            f"unknown DiT variant {variant!r}; expected one of {list(VARIANTS)}, optionally with '/<patch>'"
        )
    name, variant_patch = match.groups()
    if patch_size is None and variant_patch is None:
        raise ValueError(
            f"variant {variant!r} sets no patch size: use e.g. '{name}/2' or pass patch_size"
        )
    hidden_size, depth, num_heads = VARIANTS[name]
    kwargs = {"hidden_size": hidden_size, "depth": depth, "num_heads": num_heads, **overrides}
    return DiT3D(
        in_channels,
        num_classes,
        patch_size=int(variant_patch) if patch_size is None else patch_size,
        window_size=window_size,
        global_blocks=global_blocks,
        learn_pos_embed=learn_pos_embed,
        **kwargs,
    )
