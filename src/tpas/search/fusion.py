"""Score-level fusion of several retrieval systems: weighted min-max and reciprocal-rank fusion.

Every strong PAB entry ensembles: several models (or checkpoints) rank the same queries against
the same gallery and their [Q,G] score matrices are combined. Two ways, both giving a value that
is comparable *across queries* (so query-set post-processing may read it):

* ``minmax``: ``sum_s w_s * (S_s - min S_s) / (max S_s - min S_s)``, with min and max over each
  system's whole matrix. A per-query min-max would make every query's best candidate score 1
  whatever its evidence: the defect :mod:`tpas.search.postprocess` is written to avoid. The inputs
  must themselves be comparable across queries (raw ITC, an external system's similarities).
* ``rrf``: ``sum_s w_s / (k + rank_s(q, g))``, ranks 1-based in each system's order of the
  query's row (ties by gallery order), k = 60 as in the literature; items below a system's top
  ``depth`` (when given) get nothing from it. Ranks only: any score scale, re-ranked orders too.

Matrices are read in chunks of rows, so inputs may be memory-mapped ``.npy`` files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["FUSIONS", "RRF_K", "fuse_scores", "minmax_fusion", "rrf_fusion"]

FUSIONS = ("minmax", "rrf")
RRF_K = 60
CHUNK_ROWS = 1024


def _check(matrices: Sequence[np.ndarray], weights: Sequence[float] | None) -> tuple[tuple[int, int], list[float]]:
    if not matrices:
        raise ValueError("fusion needs at least one score matrix")
    shape = tuple(matrices[0].shape)
    for i, m in enumerate(matrices):
        if m.ndim != 2 or tuple(m.shape) != shape:
            raise ValueError(f"score matrix {i} has shape {tuple(m.shape)}, expected {shape} like the first")
    weights = [1.0] * len(matrices) if weights is None else [float(w) for w in weights]
    if len(weights) != len(matrices):
        raise ValueError(f"{len(weights)} weights for {len(matrices)} score matrices")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"fusion weights must be >= 0 and not all 0, got {weights}")
    return shape, weights


def minmax_fusion(matrices: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted sum of each matrix min-max-normalised over the whole matrix -> [Q,G] float32."""
    (q, g), weights = _check(matrices, weights)
    out = np.zeros((q, g), dtype=np.float32)
    for m, w in zip(matrices, weights):
        lo = min(float(np.min(m[s:s + CHUNK_ROWS])) for s in range(0, q, CHUNK_ROWS))
        hi = max(float(np.max(m[s:s + CHUNK_ROWS])) for s in range(0, q, CHUNK_ROWS))
        scale = w / (hi - lo) if hi > lo else 0.0  # a constant matrix carries no order
        for s in range(0, q, CHUNK_ROWS):
            out[s:s + CHUNK_ROWS] += ((np.asarray(m[s:s + CHUNK_ROWS], dtype=np.float32) - lo) * scale)
    return out


def rrf_fusion(matrices: Sequence[np.ndarray], weights: Sequence[float] | None = None, k: float = RRF_K,
               depth: int | None = None) -> np.ndarray:
    """Weighted reciprocal-rank fusion -> [Q,G] float32 (see the module docstring)."""
    (q, g), weights = _check(matrices, weights)
    if k <= 0:
        raise ValueError(f"rrf: k must be > 0, got {k}")
    out = np.zeros((q, g), dtype=np.float32)
    for m, w in zip(matrices, weights):
        for s in range(0, q, CHUNK_ROWS):
            block = np.asarray(m[s:s + CHUNK_ROWS])
            order = np.argsort(-block, axis=1, kind="stable")  # [c,G] columns, best first
            ranks = np.empty_like(order)
            np.put_along_axis(ranks, order, np.arange(1, g + 1), axis=1)  # 1-based rank of every column
            contribution = (w / (k + ranks)).astype(np.float32)
            if depth is not None:
                contribution[ranks > depth] = 0.0
            out[s:s + CHUNK_ROWS] += contribution
    return out


def fuse_scores(matrices: Sequence[np.ndarray], method: str = "rrf", weights: Sequence[float] | None = None,
                k: float = RRF_K, depth: int | None = None) -> np.ndarray:
    """Fuse [Q,G] score matrices by ``method`` (``minmax`` or ``rrf``) -> [Q,G] float32."""
    if method == "minmax":
        return minmax_fusion(matrices, weights)
    if method == "rrf":
        return rrf_fusion(matrices, weights, k=k, depth=depth)
    raise ValueError(f"unknown fusion {method!r}; choose from {FUSIONS}")
