"""ITM re-ranking of the ITC top-k, and score fusion (DESIGN section 4).

ITC (a dot product of two embeddings) is cheap enough for the whole gallery but cannot look at
details; the ITM head runs cross-attention between the caption and the image tokens and can, but
costs one fusion forward per (query, image) pair. So: take each query's top-k by ITC, score those
pairs with ITM, and fuse.

Batching: every (query, candidate) pair of a set of queries goes into one flat list and is scored
in large batches mixing queries and candidates — text tokens are repeated by indexing, image
tokens are gathered (each distinct image once per batch) from the memory-mapped token store.
This is exact: batched scores equal the pair-by-pair ones (tested to 1e-5).

Fusion, per query (the normalisation scope): over that query's k candidates,
``final = minmax(ITM) + weight * minmax(ITC)`` with ``weight = 0.002`` (upstream default), where
``minmax(x) = (x - min x) / (max x - min x)`` over the k candidates of that one query (0 when all
k are equal). ITM is the match logit (upstream default) or the softmax probability of "match".
Gallery items outside the top-k keep their ITC order, strictly below every re-ranked item.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

DEFAULT_K = 128
DEFAULT_WEIGHT = 0.002
ITM_MODES = ("logit", "prob")
TOP_K_CELLS = 1 << 23  # score cells per chunk in top_k (~8M: some 100 MB of temporaries)


def default_itm_batch(device) -> int:
    """Pairs per fusion forward: large on GPUs (launch overhead dominates), modest on CPUs.

    On a CPU the fusion compute dominates and batches beyond ~100 pairs only cost cache
    (``benchmarks/results/rerank.md``).
    """
    return 1024 if str(device).startswith("cuda") else 128


# -- ranking helpers ---------------------------------------------------------------------------
def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of every row, best first, ties broken by column order (stable).

    Returns (columns [Q,k] int64, values [Q,k]). ``np.argpartition`` alone would pick arbitrary
    members of a tie at the cut; here all values above the k-th are taken, then the lowest
    columns among those equal to it.
    """
    scores = np.asarray(scores)
    q, g = scores.shape
    k = min(int(k), g)
    if k <= 0:
        return np.zeros((q, 0), np.int64), np.zeros((q, 0), scores.dtype)
    rows = max(1, TOP_K_CELLS // max(1, g))
    if q > rows:  # bounded working memory: a few temporaries of rows x g per chunk
        parts = [top_k(scores[s:s + rows], k) for s in range(0, q, rows)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]
    above = scores > kth
    need = k - above.sum(axis=1, keepdims=True)
    tied = scores == kth
    take = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= need))
    cols = np.nonzero(take)[1].reshape(q, k)  # ascending column order within each row
    vals = np.take_along_axis(scores, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


def minmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """(x - min) / (max - min) along ``axis``; a constant slice maps to 0."""
    lo = x.min(axis=axis, keepdims=True)
    span = x.max(axis=axis, keepdims=True) - lo
    return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1), 0).astype(np.float32)


def resolve_weight(model, weight: float | None) -> float:
    """The fusion weight to use: ``weight`` if given, else the model's calibrated one, else upstream's."""
    if weight is not None:
        return float(weight)
    calibrated = getattr(getattr(model, "config", None), "rerank_weight", None)
    return DEFAULT_WEIGHT if calibrated is None else float(calibrated)


# ITC weights tried by calibrate_weight: from upstream's 0.002 (ITM decides) to 100 (ITC decides, ITM breaks ties)
WEIGHT_GRID = (0.002, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def calibrate_weight(itm: np.ndarray, itc: np.ndarray, positives: np.ndarray,
                     grid: Sequence[float] = WEIGHT_GRID) -> tuple[float, dict[float, float]]:
    """Pick the fusion weight with the best R@1 over the queries' re-ranked candidates.

    ``itm``, ``itc`` [Q,k]: the scores of each query's ITC top-k (as re-ranking sees them);
    ``positives`` [Q,k] bool: which candidates are true matches. Run it on a validation split
    (never the test set). Why: upstream's 0.002 trusts ITM fully, which suits a well-trained
    fusion encoder but lets a weak one (short CPU schedules) undo what ITC got right. Ties go to
    the smaller weight (closer to upstream). Returns (best weight, {weight: R@1 in percent}).
    """
    itm, itc, positives = np.asarray(itm), np.asarray(itc), np.asarray(positives, dtype=bool)
    if itm.shape != itc.shape or itm.shape != positives.shape or itm.ndim != 2 or not len(itm):
        raise ValueError("itm, itc and positives must be non-empty [Q,k] arrays of one shape")
    table: dict[float, float] = {}
    for weight in grid:
        fused = fuse(itm, itc, weight)
        best = np.argmax(fused, axis=1)  # first maximum: ties keep ITC order
        table[float(weight)] = float(positives[np.arange(len(best)), best].mean() * 100)
    chosen = max(table, key=lambda w: (table[w], -w))
    return chosen, table


def fuse(itm: np.ndarray, itc: np.ndarray, weight: float = DEFAULT_WEIGHT) -> np.ndarray:
    """Per-query fusion of [Q,k] candidate scores: minmax(ITM) + weight * minmax(ITC)."""
    return minmax(itm, axis=1) + np.float32(weight) * minmax(itc, axis=1)


# -- ITM scoring ---------------------------------------------------------------------------------
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


def rerank_candidates(model, text_tokens, text_mask, image_tokens, candidates: np.ndarray, itc: np.ndarray,
                      weight: float = DEFAULT_WEIGHT, mode: str = "logit", batch_size: int | None = None,
                      progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """ITM-score every query's candidate list and fuse it with ITC.

    ``candidates`` [Q,k] gallery rows (e.g. FAISS output; -1 = no candidate) with their ITC
    scores ``itc`` [Q,k]. Returns (itm [Q,k], fused [Q,k]); a -1 slot gets NaN ITM and -inf fused.
    Re-order each row by ``fused`` (stable) to get the re-ranked list.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    itc = np.asarray(itc, dtype=np.float32)
    q, k = candidates.shape
    valid = candidates >= 0
    rows = np.repeat(np.arange(q), k).reshape(q, k)
    itm = np.full((q, k), np.nan, dtype=np.float32)
    itm[valid] = itm_scores(model, text_tokens, text_mask, image_tokens, rows[valid], candidates[valid],
                            batch_size=batch_size, mode=mode, progress=progress)
    if valid.all():
        return itm, fuse(itm, itc, weight)
    fused = np.full((q, k), -np.inf, dtype=np.float32)
    for i in range(q):  # ragged rows (FAISS found fewer than k): fuse each one on its valid part
        v = valid[i]
        if v.any():
            fused[i, v] = fuse(itm[i:i + 1, v], itc[i:i + 1, v], weight)[0]
    return itm, fused


def rerank_scores(model, itc_scores: np.ndarray, text_tokens, text_mask, image_tokens, k: int = DEFAULT_K,
                  weight: float = DEFAULT_WEIGHT, mode: str = "logit", batch_size: int | None = None,
                  progress: bool = False) -> np.ndarray:
    """Full re-ranked score rows [Q,G] from ITC scores [Q,G]: the top-k re-scored and fused, the rest below.

    Re-ranked items get their fused score (>= 0); every other item gets ``itc - max(itc) - 1``
    (<= -1), so it stays below all re-ranked items and in ITC order. Only the order is meaningful
    across the two groups.
    """
    itc_scores = np.asarray(itc_scores, dtype=np.float32)
    if k <= 0:
        return itc_scores.copy()
    cols, vals = top_k(itc_scores, k)
    _, fused = rerank_candidates(model, text_tokens, text_mask, image_tokens, cols, vals, weight=weight,
                                 mode=mode, batch_size=batch_size, progress=progress)
    out = itc_scores - itc_scores.max(axis=1, keepdims=True) - 1.0
    np.put_along_axis(out, cols, fused, axis=1)
    return out
