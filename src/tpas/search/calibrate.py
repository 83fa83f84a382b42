"""Pick the re-rank fusion weight of a model on a validation split (never the test set).

The upstream fusion ``minmax(ITM) + 0.002 * minmax(ITC)`` lets ITM decide the order of the ITC
top-k. That is right for a fusion encoder trained as long as X-VLM's; after a short schedule
(lite on a CPU) the ITM head can be weaker than ITC and re-ranking would undo good ITC rankings.
Training therefore ranks the validation queries once (ITC top-k, ITM on all of them), tries a
grid of weights (:data:`WEIGHT_GRID`) on those raw scores and stores the best in
``model.config.rerank_weight``, which :func:`tpas.search.ranking.resolve_weight` then uses wherever
no weight is given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from tpas.data.records import EvalSet
from tpas.search.ranking import fuse, rank_evalset

log = logging.getLogger(__name__)

__all__ = ["WEIGHT_GRID", "calibrate_on_evalset", "calibrate_weight"]

# ITC weights tried by calibrate_weight: from upstream's 0.002 (ITM decides) to 100 (ITC decides, ITM breaks ties)
WEIGHT_GRID = (0.002, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def calibrate_weight(itm: np.ndarray, itc: np.ndarray, positives: np.ndarray,
                     grid: Sequence[float] = WEIGHT_GRID) -> tuple[float, dict[float, float]]:
    """Pick the fusion weight with the best R@1 over the queries' re-ranked candidates.

    ``itm``, ``itc`` [Q,k]: the scores of each query's ITC top-k, in ITC order (ties in the fused
    score keep that order); ``positives`` [Q,k] bool: which candidates are true matches. Ties
    between weights go to the smaller weight (closer to upstream). Returns (best weight,
    {weight: R@1 in percent}).
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


def calibrate_on_evalset(model, evalset: EvalSet, k: int = 16, grid: Sequence[float] = WEIGHT_GRID,
                         batch_size: int = 64, progress: bool = False) -> tuple[float, dict[float, float]]:
    """Best fusion weight for ``model`` on ``evalset`` (R@1 of the re-ranked top-``k``) and the R@1 per weight."""
    if not evalset.has_ground_truth or not evalset.queries:
        raise ValueError(f"{evalset.name}: calibration needs queries with ground truth")
    ranking = rank_evalset(model, evalset, rerank=k, depth=k, batch_size=batch_size, progress=progress)
    # the ranking lists the head in fused order; calibration wants ITC order (ties: lower gallery row first)
    order = np.lexsort((ranking.rows, -ranking.itc), axis=-1)
    rows, itc, itm = (np.take_along_axis(a, order, axis=1) for a in (ranking.rows, ranking.itc, ranking.itm))
    gallery_targets = np.array(evalset.gallery_targets(), dtype=object)
    query_targets = np.array(evalset.query_targets(), dtype=object)
    positives = gallery_targets[rows] == query_targets[:, None]
    weight, table = calibrate_weight(itm, itc, positives, grid)
    log.info("re-rank fusion weight %g (top-%d R@1 per weight: %s)", weight, k,
             ", ".join(f"{w:g}: {r:.1f}" for w, r in table.items()))
    return weight, table
