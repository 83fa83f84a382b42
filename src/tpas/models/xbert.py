"""BERT text encoder whose upper layers cross-attend to image tokens (X-VLM's ``xbert``).

Written in plain torch because the cross-attention keys/values come from image tokens of another
width (``encoder_width``), which transformers' BERT cannot express. Module names follow upstream
(``embeddings``, ``encoder.layer.i.attention.self.query`` ...), after X-VLM's ``bert.`` prefix
is stripped, so official state dicts load directly.

Layers ``[0, fusion_layer)`` run in *text* mode (self-attention only); layers
``[fusion_layer, num_layers)`` run in *fusion* mode on the text-mode output (self-attention,
cross-attention to the image, feed-forward). Masks are additive ``(1 - mask) * -10000``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASK_VALUE = -10000.0


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B,L] 1/0 key mask -> [B,1,1,L] additive scores bias (0 / -10000), as upstream BERT."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, max_position: int, type_vocab: int, eps: float, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_position, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = dropout
        self.register_buffer("position_ids", torch.arange(max_position)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_ids.shape[1]:
            raise ValueError(f"text of {length} tokens exceeds max_position {self.position_ids.shape[1]}")
        # token types are all 0; same summation order as upstream (word + type, then + position)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(self.position_ids[:, :length])
        return F.dropout(self.LayerNorm(x), self.dropout, self.training)


class BertSelfAttention(nn.Module):
    """Queries from the text; keys/values from the text (self) or image tokens of ``kv_width`` (cross)."""

    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(context)), self._split(self.value(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).flatten(2)


class BertSelfOutput(nn.Module):
    """Post-norm residual: LN(dropout(dense(h)) + input)."""

    def __init__(self, in_dim: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = dropout

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.dropout(self.dense(h), self.dropout, self.training) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float, dropout: float, attn_dropout: float):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads, kv_width, attn_dropout)
        self.output = BertSelfOutput(hidden, hidden, eps, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, context, bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU, as BERT's "gelu"


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, dropout: float,
                 attn_dropout: float, encoder_width: int | None):
        super().__init__()
        self.attention = BertAttention(hidden, heads, hidden, eps, dropout, attn_dropout)
        if encoder_width is not None:
            self.crossattention = BertAttention(hidden, heads, encoder_width, eps, dropout, attn_dropout)
        self.intermediate = BertIntermediate(hidden, intermediate)
        self.output = BertSelfOutput(intermediate, hidden, eps, dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, image: torch.Tensor | None = None,
                image_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attention(x, x, bias)
        if image is not None:
            x = self.crossattention(x, image, image_bias)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, layers: list[BertLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class XBert(nn.Module):
    """Text encoder (``text``) and image-grounded fusion encoder (``fusion``) sharing one layer stack."""

    def __init__(self, vocab_size: int, hidden: int, num_layers: int, fusion_layer: int, heads: int,
                 intermediate: int, max_position: int, type_vocab: int, eps: float, encoder_width: int,
                 dropout: float = 0.1, attn_dropout: float = 0.1):
        super().__init__()
        if not 0 <= fusion_layer <= num_layers:
            raise ValueError(f"fusion_layer {fusion_layer} outside [0, {num_layers}]")
        self.fusion_layer = fusion_layer
        self.embeddings = BertEmbeddings(vocab_size, hidden, max_position, type_vocab, eps, dropout)
        self.encoder = BertEncoder([
            BertLayer(hidden, heads, intermediate, eps, dropout, attn_dropout,
                      encoder_width if i >= fusion_layer else None)
            for i in range(num_layers)
        ])

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Embeddings + text-only layers -> [B,L,H]; appends each stage to ``hidden_states`` if given."""
        x = self.embeddings(input_ids)
        bias = additive_mask(attention_mask, x.dtype)
        if hidden_states is not None:
            hidden_states.append(x)
        for layer in self.encoder.layer[: self.fusion_layer]:
            x = layer(x, bias)
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def fusion(self, text_states: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor,
               image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fusion layers on the text-mode output, cross-attending to ``image_tokens`` -> [B,L,H]."""
        x = text_states
        bias = additive_mask(attention_mask, x.dtype)
        image_bias = None if image_mask is None else additive_mask(image_mask, x.dtype)
        for layer in self.encoder.layer[self.fusion_layer:]:
            x = layer(x, bias, image_tokens.to(x.dtype), image_bias)
        return x
