"""Compact codes for the re-rank store: image tokens in 8 or 4 bits instead of 16.

The image tokens an index keeps for ITM re-ranking are its bulk (lite: 19 x 1280 fp16 = 48.6 KB
per image, 48.6 GB per million). Re-ranking reads a few dozen rows per query, so the store is
sized by disk and page cache, not by compute: smaller codes mean a bigger gallery stays in RAM.

Codecs, for a token shape [T, D] (``token_bytes`` gives the exact size):

* ``fp16`` — the tokens as they were: ``2·T·D`` bytes;
* ``int8`` — per token, symmetric: ``q = round(x / s)``, ``s = max|x| / 127`` (fp16):
  ``T·D + 2·T`` bytes;
* ``int4`` — per group of ``GROUP`` channels of a token, asymmetric: ``q = round((x - lo) / s)``
  in 0..15, two codes per byte, ``(s, lo)`` fp16 per group: ``T·D/2 + 4·T·D/GROUP`` bytes
  (``D`` rounded up to a multiple of ``GROUP``).

Every codec is generic over ``[T, D]`` (any token count and width a tower produces).
``benchmarks/equivalence.py`` checks that re-ranking through a codec keeps the fp16 order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GROUP", "TOKEN_CODECS", "decode_tokens", "encode_tokens", "token_bytes"]

TOKEN_CODECS = ("fp16", "int8", "int4")
GROUP = 64  # int4 channels per (scale, offset) pair


def _padded(d: int) -> int:
    return -(-d // GROUP) * GROUP


def token_bytes(token_shape, codec: str) -> int:
    """Bytes per image of the store for tokens of shape [T, D] (codes + scales)."""
    t, d = (int(s) for s in token_shape)
    if codec == "fp16":
        return 2 * t * d
    if codec == "int8":
        return t * d + 2 * t
    if codec == "int4":
        return t * _padded(d) // 2 + 4 * t * (_padded(d) // GROUP)
    raise ValueError(f"unknown token codec {codec!r}; choose from {TOKEN_CODECS}")


def encode_tokens(tokens: np.ndarray, codec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """[n,T,D] float tokens -> (codes, scales) as stored; ``scales`` is None for fp16."""
    x = np.asarray(tokens, dtype=np.float32)
    if codec == "fp16":
        return x.astype(np.float16), None
    n, t, d = x.shape
    if codec == "int8":
        scale = np.abs(x).max(axis=2, keepdims=True) / 127.0  # [n,T,1]
        scale = np.maximum(scale, np.float32(1e-8)).astype(np.float16).astype(np.float32)
        codes = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
        return codes, scale[..., 0].astype(np.float16)  # [n,T,D], [n,T]
    if codec == "int4":
        dp = _padded(d)
        if dp != d:  # pad with each token's last channel: the group range stays the data's
            x = np.concatenate([x, np.repeat(x[..., -1:], dp - d, axis=2)], axis=2)
        groups = x.reshape(n, t, dp // GROUP, GROUP)
        lo = groups.min(axis=3, keepdims=True).astype(np.float16).astype(np.float32)  # [n,T,g,1]
        scale = (groups.max(axis=3, keepdims=True) - lo) / 15.0
        scale = np.maximum(scale, np.float32(1e-8)).astype(np.float16).astype(np.float32)
        q = np.clip(np.rint((groups - lo) / scale), 0, 15).astype(np.uint8).reshape(n, t, dp)
        codes = q[..., 0::2] | (q[..., 1::2] << 4)  # [n,T,dp/2]
        params = np.concatenate([scale, lo], axis=3).astype(np.float16)  # [n,T,g,2]
        return codes, params
    raise ValueError(f"unknown token codec {codec!r}; choose from {TOKEN_CODECS}")


def decode_tokens(codes: np.ndarray, scales: np.ndarray | None, codec: str, width: int) -> np.ndarray:
    """Stored (codes, scales) -> tokens [n,T,width]: float16 for fp16, else float32."""
    if codec == "fp16":
        return np.asarray(codes)
    if codec == "int8":
        return codes.astype(np.float32) * scales.astype(np.float32)[..., None]
    if codec == "int4":
        n, t, half = codes.shape
        q = np.empty((n, t, 2 * half), dtype=np.uint8)
        q[..., 0::2] = codes & 0x0F
        q[..., 1::2] = codes >> 4
        params = scales.astype(np.float32)  # [n,T,g,2]
        groups = q.reshape(n, t, params.shape[2], GROUP).astype(np.float32)
        x = groups * params[..., 0:1] + params[..., 1:2]
        return x.reshape(n, t, -1)[..., :width]
    raise ValueError(f"unknown token codec {codec!r}; choose from {TOKEN_CODECS}")
