"""ITM scoring of (query, gallery image) pairs: the expensive half of re-ranking.

ITC (a dot product of two embeddings) is cheap enough for the whole gallery but cannot look at
details; the ITM head runs cross-attention between the caption and the image tokens and can, but
costs one fusion forward per (query, image) pair. :mod:`tpas.search.ranking` decides which pairs
(each query's ITC top-k) and how their scores are fused; this module only scores pairs.

Batching: every (query, candidate) pair of a set of queries goes into one flat list and is scored
in large batches mixing queries and candidates — text tokens are repeated by indexing, image
tokens are gathered (each distinct image once per batch) from the memory-mapped token store.
This is exact: batched scores equal the pair-by-pair ones (tested to 1e-5).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_K", "ITM_MODES", "default_itm_batch", "itm_scores"]

DEFAULT_K = 128  # re-rank depth of the X-VLM recipe
ITM_MODES = ("logit", "prob")


def default_itm_batch(device) -> int:
    """Pairs per fusion forward: large on GPUs (launch overhead dominates), modest on CPUs.

    On a CPU the fusion compute dominates and batches beyond ~100 pairs only cost cache
    (``benchmarks/results/rerank.md``).
    """
    return 1024 if str(device).startswith("cuda") else 128


def itm_scores(model, text_tokens, text_mask, image_tokens, query_rows: Sequence[int], image_rows: Sequence[int],
               batch_size: int | None = None, mode: str = "logit", progress: bool = False) -> np.ndarray:
    """ITM score of each pair (``text_tokens[query_rows[i]]``, ``image_tokens[image_rows[i]]``), float32 [P].

    ``text_tokens`` [Q,L,D] / ``text_mask`` [Q,L] (numpy or torch); ``image_tokens`` is anything
    that returns a [n,T,D] array for an integer row array (a numpy array, a memmap, the index's
    TokenStore). Pairs are processed ``batch_size`` at a time, ordered by text length (stable) so
    that each batch is padded only to the longest text it holds; results come back in input order.
    ``batch_size`` None = :func:`default_itm_batch` for the model's device.
    """
    from tqdm.auto import tqdm

    from tpas.search.encode import inference

    if mode not in ITM_MODES:
        raise ValueError(f"ITM score mode must be one of {ITM_MODES}, got {mode!r}")
    batch_size = batch_size or default_itm_batch(model.device)
    query_rows = np.asarray(query_rows, dtype=np.int64)
    image_rows = np.asarray(image_rows, dtype=np.int64)
    if query_rows.shape != image_rows.shape:
        raise ValueError("query_rows and image_rows must have the same length")
    device = model.device
    text_tokens = torch.as_tensor(text_tokens)
    text_mask = torch.as_tensor(text_mask)
    dtype = next(model.parameters()).dtype
    # visit pairs by text length so a batch pads its texts to similar widths (less wasted fusion work)
    lengths = text_mask.sum(1).numpy() if len(text_mask) else np.zeros(0, np.int64)
    order = np.argsort(lengths[query_rows], kind="stable") if len(query_rows) else np.zeros(0, np.int64)
    query_rows, image_rows = query_rows[order], image_rows[order]
    out = np.empty(len(query_rows), dtype=np.float32)
    with inference(model):
        for start in tqdm(range(0, len(query_rows), batch_size), desc="ITM re-rank", unit="batch",
                          disable=not progress, leave=False):
            q = torch.from_numpy(query_rows[start:start + batch_size])
            g = image_rows[start:start + batch_size]
            mask = text_mask[q]
            width = int(mask.sum(1).max()) if mask.numel() else 0  # trailing padding is masked anyway
            txt = text_tokens[q, :width].to(device=device, dtype=dtype)
            uniq, inverse = np.unique(g, return_inverse=True)  # each image read once per batch
            img = torch.from_numpy(np.asarray(image_tokens[uniq])).to(device=device, dtype=dtype)
            img = img[torch.from_numpy(inverse.reshape(-1)).to(device)]
            logits = model.itm_logits(img, txt, mask[:, :width].to(device)).float()
            score = logits[:, 1] - logits[:, 0] if mode == "logit" else logits.softmax(-1)[:, 1]
            out[start:start + len(g)] = score.cpu().numpy()
    result = np.empty_like(out)
    result[order] = out
    return result
