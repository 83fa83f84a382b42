"""Shared blocks for the lite and CLIP families: projection heads, cross-attention fusion, ITM head.

The fusion layer follows the X-VLM/ALBEF recipe: each layer is BERT-style **post-norm**
(sub-layer -> dropout -> residual add -> LayerNorm), which is what X-VLM's cross-attention BERT
layers do, so the lite/CLIP heads behave like the model the method was tuned on:

    t = LN(t + SelfAttn(t, key_padding=text_mask))
    t = LN(t + CrossAttn(q=t, kv=image_tokens))        # image tokens may have another width
    t = LN(t + FFN(t))

X-VLM itself (``xvlm.py``) keeps its own upstream-exact layers; these are for the new families.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT-style init (normal(0, 0.02) weights, zero bias, unit LayerNorm) for new heads."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ProjectionHead(nn.Module):
    """Map tower features to the shared ITC space and L2-normalise.

    ``hidden=0`` gives a single Linear (X-VLM's ``vision_proj``/``text_proj``); ``hidden>0`` an
    MLP (Linear -> GELU -> Linear), which helps when the towers are frozen.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0):
        super().__init__()
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        else:
            self.net = nn.Linear(in_dim, out_dim)
        init_weights(self)

    def forward(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        y = self.net(x)
        return F.normalize(y, dim=-1) if normalize else y


class Attention(nn.Module):
    """Multi-head attention whose keys/values may have a different width than the queries."""

    def __init__(self, width: int, heads: int, kv_width: int | None = None, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        kv_width = kv_width or width
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask`` [B,Nk]: 1/True = attend, 0/False = padding (an attention_mask, not its inverse)."""
        context = x if context is None else context
        q, k, v = self._split(self.query(x)), self._split(self.key(context)), self._split(self.value(context))
        bias = None
        if key_mask is not None:
            bias = key_mask[:, None, None, :].to(torch.bool)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.dropout if self.training else 0.0)
        b, h, n, dh = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, h * dh))


class FusionLayer(nn.Module):
    """Post-norm text self-attention + cross-attention to image tokens + FFN (see module doc)."""

    def __init__(self, text_width: int, image_width: int, heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.1, eps: float = 1e-12):
        super().__init__()
        self.self_attn = Attention(text_width, heads, dropout=dropout)
        self.self_norm = nn.LayerNorm(text_width, eps=eps)
        self.cross_attn = Attention(text_width, heads, kv_width=image_width, dropout=dropout)
        self.cross_norm = nn.LayerNorm(text_width, eps=eps)
        hidden = int(text_width * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(text_width, hidden), nn.GELU(), nn.Linear(hidden, text_width))
        self.ffn_norm = nn.LayerNorm(text_width, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor | None, image: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        text = self.self_norm(text + self.drop(self.self_attn(text, key_mask=text_mask)))
        text = self.cross_norm(text + self.drop(self.cross_attn(text, image, key_mask=image_mask)))
        return self.ffn_norm(text + self.drop(self.ffn(text)))


class FusionStack(nn.Module):
    """``num_layers`` fusion layers; returns the fused text states [B,L,text_width]."""

    def __init__(self, num_layers: int, text_width: int, image_width: int, heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(
            FusionLayer(text_width, image_width, heads, mlp_ratio=mlp_ratio, dropout=dropout)
            for _ in range(num_layers)
        )
        init_weights(self)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor | None, image: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        if text_mask is not None and text_mask.dtype != torch.bool:
            text_mask = text_mask.bool()
        for layer in self.layers:
            text = layer(text, text_mask, image, image_mask)
        return text


class ITMHead(nn.Module):
    """X-VLM's ITM head: Linear(H,2H) -> LayerNorm -> GELU -> Linear(2H,2); index 1 = match."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
                                 nn.Linear(2 * width, 2))
        init_weights(self)

    def forward(self, cls_state: torch.Tensor) -> torch.Tensor:
        return self.net(cls_state)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens`` [B,L,D] over positions where ``mask`` [B,L] is set."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1e-6)


def train_top_blocks(tower: nn.Module, blocks: list[nn.Module] | nn.ModuleList, top: int) -> None:
    """Freeze ``tower`` except its last ``top`` blocks; ``top < 0`` trains everything, 0 nothing."""
    tower.requires_grad_(top < 0)
    if top > 0:
        for block in list(blocks)[-top:]:
            block.requires_grad_(True)


class MLMHead(nn.Module):
    """BERT-style LM head: Linear -> GELU -> LayerNorm, then logits against the word embeddings.

    The decoder reuses the embedding matrix by value at call time (``F.linear``) instead of sharing
    a Parameter, so ``save_pretrained``'s safetensors file never holds aliased tensors.
    """

    def __init__(self, width: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=eps))
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        init_weights(self)

    def forward(self, states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(states), word_embeddings, self.bias)
