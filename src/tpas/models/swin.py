"""Swin Transformer image tower, numerically matching the one X-VLM and CMP load.

Parameter names follow the upstream module tree (``patch_embed``, ``layers.i.blocks.j``,
``layers.i.downsample``, ``norm``) so that official state dicts load without renaming. The
constant buffers (relative position index, shift masks) are rebuilt here and never saved: the
checkpoint loader drops them, which lets one checkpoint run at another window or input size.

Non-square inputs (e.g. 384x128 person crops) work when every stage grid is divisible by its
window; as upstream, a stage whose smaller side is <= the window uses that side as its window
and no shift.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (identity in eval)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * noise / keep


def relative_position_index(window: int) -> torch.Tensor:
    """[w*w, w*w] index into the (2w-1)^2 bias table: (dh + w-1) * (2w-1) + (dw + w-1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # 2, N, N
    return rel[0] * (2 * window - 1) + rel[1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B,H,W,C] -> [B*nW, window*window, C], windows ordered batch, row, column."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B*nW, window*window, C] -> [B,H,W,C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shift_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """[nW, N, N] additive mask (0 / -100) that keeps rolled-in regions from attending to each other."""
    labels = torch.zeros(1, h, w, 1)
    bounds = lambda n: ((0, n - window), (n - window, n - shift), (n - shift, n))  # noqa: E731
    for r, (r0, r1) in enumerate(bounds(h)):
        for c, (c0, c1) in enumerate(bounds(w)):
            labels[:, r0:r1, c0:c1] = 3 * r + c
    lw = window_partition(labels, window).squeeze(-1)  # nW, N
    diff = lw[:, None, :] - lw[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.window = window
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, attn_drop: float = 0.0) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).to(attn.dtype)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.heads, n, n) + mask.to(attn.dtype)[None, :, None]
            attn = attn.view(bw, self.heads, n, n)
        attn = F.dropout(attn.softmax(dim=-1), attn_drop, self.training)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm block: (shifted) window attention, then MLP, both residual."""

    def __init__(self, dim: int, grid: tuple[int, int], heads: int, window: int, shift: int,
                 mlp_ratio: float, eps: float, drop_path: float):
        super().__init__()
        self.grid = grid
        if min(grid) <= window:  # the whole (short side of the) grid fits one window: no shift
            window, shift = min(grid), 0
        if grid[0] % window or grid[1] % window:
            raise ValueError(f"Swin stage grid {grid[0]}x{grid[1]} is not divisible by window {window}; "
                             "pick an input size / window_size whose stage grids are multiples of the window")
        self.window, self.shift, self.drop_path = window, shift, drop_path
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shift_mask(grid[0], grid[1], window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), b, c = self.grid, x.shape[0], x.shape[-1]
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), self.attn_mask)
        y = window_merge(y, self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + drop_path(y.reshape(b, h * w, c), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: concat (even,even), (odd,even), (even,odd), (odd,odd), LN, Linear."""

    def __init__(self, dim: int, grid: tuple[int, int], eps: float):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), b, c = self.grid, x.shape[0], x.shape[-1]
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, grid: tuple[int, int], depth: int, heads: int, window: int,
                 mlp_ratio: float, eps: float, drop_paths: Sequence[float], downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, grid, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, eps, drop_paths[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, grid, eps) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class SwinTransformer(nn.Module):
    """Returns ``[B, 1+N, C]``: the mean of the final normalised tokens (image CLS) then the tokens."""

    def __init__(self, image_size: tuple[int, int], patch: int, dim: int, depths: Sequence[int],
                 heads: Sequence[int], window: int, mlp_ratio: float = 4.0, eps: float = 1e-5,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if image_size[0] % patch or image_size[1] % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        if len(depths) != len(heads):
            raise ValueError(f"depths {list(depths)} and heads {list(heads)} differ in length")
        self.patch_embed = PatchEmbed(patch, dim, eps)
        total = sum(depths)  # stochastic depth grows linearly over all blocks (plain floats: meta-device safe)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        grid = (image_size[0] // patch, image_size[1] // patch)
        stages, start = [], 0
        for i, (depth, nh) in enumerate(zip(depths, heads)):
            last = i == len(depths) - 1
            if not last and (grid[0] % 2 or grid[1] % 2):
                raise ValueError(f"Swin stage {i} grid {grid} cannot be halved by patch merging")
            stages.append(SwinStage(dim, grid, depth, nh, window, mlp_ratio, eps, rates[start:start + depth], not last))
            start += depth
            if not last:
                dim, grid = dim * 2, (grid[0] // 2, grid[1] // 2)
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.num_features = dim
        self.grid = grid

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
