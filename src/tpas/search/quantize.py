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
TINY = np.float32(2.0**-14)  # smallest normal float16: a scale that survives being stored in fp16


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
    """[n,T,D] float tokens -> (codes, scales) as stored; ``scales`` is None for fp16.

    Runs in torch (in place, multi-threaded): the index writer encodes every gallery image once,
    and numpy's small-axis reductions made this the slowest step of a large build.
    """
    import torch

    if codec not in TOKEN_CODECS:
        raise ValueError(f"unknown token codec {codec!r}; choose from {TOKEN_CODECS}")
    if codec == "fp16":
        return np.asarray(tokens).astype(np.float16, copy=False), None
    x = torch.from_numpy(np.asarray(tokens)).float()  # a copy unless the input was float32 already
    if x.data_ptr() == np.asarray(tokens).__array_interface__["data"][0]:
        x = x.clone()  # never write into the caller's array
    n, t, d = x.shape
    if codec == "int8":
        scale = (x.abs().amax(2, keepdim=True) / 127.0).clamp_min(TINY).half().float()  # [n,T,1]
        codes = x.div_(scale).round_().clamp_(-127, 127).to(torch.int8)  # [n,T,D]
        return codes.numpy(), scale[..., 0].half().numpy()  # [n,T]
    dp = _padded(d)
    if dp != d:  # pad with each token's last channel: the group range stays the data's
        x = torch.cat([x, x[..., -1:].expand(n, t, dp - d)], dim=2)
    groups = x.view(n, t, dp // GROUP, GROUP)
    lo, hi = torch.aminmax(groups, dim=3, keepdim=True)  # [n,T,g,1]
    lo = lo.half().float()
    scale = ((hi - lo) / 15.0).clamp_min(TINY).half().float()
    q = groups.sub_(lo).div_(scale).round_().clamp_(0, 15).to(torch.uint8).view(n, t, dp)
    codes = q[..., 0::2] | (q[..., 1::2] << 4)  # [n,T,dp/2]
    return codes.numpy(), torch.cat([scale, lo], dim=3).half().numpy()  # [n,T,g,2]


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
