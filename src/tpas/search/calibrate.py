"""Pick a model's re-rank fusion weight and its query-set post-processing settings on a validation
split (never the test set).

**Fusion weight.**

The upstream fusion ``minmax(ITM) + 0.002 * minmax(ITC)`` lets ITM decide the order of the ITC
top-k. That is right for a fusion encoder trained as long as X-VLM's; after a short schedule
(lite on a CPU) the ITM head can be weaker than ITC and re-ranking would undo good ITC rankings.
Training therefore ranks the validation queries once (ITC top-k, ITM on all of them), tries a
grid of weights (:data:`WEIGHT_GRID`) on those raw scores and stores the best in
``model.config.rerank_weight``, which :func:`tpas.search.ranking.resolve_weight` then uses wherever
no weight is given.

**Post-processing.** SCA's text-similarity gate (:data:`THRESHOLD_GRID`), its margin ``tau`` and the
assignment's slack price are chosen the same way: post-process a validation ranking with each
value and keep the best R@1 (:func:`calibrate_post`, :func:`pick_post` over the compared raw
scores). :func:`calibrate_sca` picks SCA's threshold, rule, tau and compared score together, as
training does after its last step (stored as ``model.config.sca_threshold`` and ``sca_options``);
:func:`calibrate_sca_threshold` picks the threshold alone. Ties go to the most conservative value,
the one that moves fewest queries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from tpas.data.records import EvalSet
from tpas.search.postprocess import NO_GATE, candidates, postprocess
from tpas.search.ranking import Ranking, fuse, rank_evalset

log = logging.getLogger(__name__)

__all__ = ["CONFIDENCES", "GAP_MULTIPLES", "THRESHOLD_GRID", "WEIGHT_GRID", "calibrate_on_evalset", "calibrate_post",
           "calibrate_ranking", "calibrate_sca", "calibrate_sca_on_evalset", "calibrate_sca_threshold",
           "calibrate_weight", "gap_grid", "median_gap", "pick_post", "top1_recall"]

# ITC weights tried by calibrate_weight: from upstream's 0.002 (ITM decides) to 100 (ITC decides, ITM breaks ties)
WEIGHT_GRID = (0.002, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
# SCA's text-cosine thresholds tried by calibrate_sca_threshold: from "every pair" (-1) to near-duplicates only
THRESHOLD_GRID = (NO_GATE, 0.0, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98)
# the raw scores a query-set method may compare (tpas.search.postprocess.candidates); ties keep the first
CONFIDENCES = ("itm", "itc", "fused")
# tau and slack grids, in units of the median top-1 - top-2 gap of the compared confidence
GAP_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


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
    return calibrate_ranking(ranking, evalset, grid)


def calibrate_ranking(ranking: Ranking, evalset: EvalSet, grid: Sequence[float] = WEIGHT_GRID
                      ) -> tuple[float, dict[float, float]]:
    """:func:`calibrate_weight` on a ranking of ``evalset`` made with re-ranking (its head's raw ITC and ITM)."""
    k = ranking.head
    if k == 0:
        raise ValueError("calibration needs a ranking with an ITM re-ranked head")
    # the ranking lists the head in fused order; calibration wants ITC order (ties: lower gallery row first)
    order = np.lexsort((ranking.rows[:, :k], -ranking.itc[:, :k]), axis=-1)
    rows, itc, itm = (np.take_along_axis(a[:, :k], order, axis=1) for a in (ranking.rows, ranking.itc, ranking.itm))
    gallery_targets = np.array(evalset.gallery_targets(), dtype=object)
    query_targets = np.array(evalset.query_targets(), dtype=object)
    positives = gallery_targets[rows] == query_targets[:, None]
    weight, table = calibrate_weight(itm, itc, positives, grid)
    log.info("re-rank fusion weight %g (top-%d R@1 per weight: %s)", weight, k,
             ", ".join(f"{w:g}: {r:.1f}" for w, r in table.items()))
    return weight, table


def top1_recall(ranking: Ranking, query_targets: Sequence, gallery_targets: Sequence) -> float:
    """R@1 in percent of a ranking's first listed rows (what post-processing changes)."""
    gallery = np.asarray(gallery_targets, dtype=object)
    first = ranking.rows[:, 0]
    hits = (first >= 0) & (gallery[np.maximum(first, 0)] == np.asarray(query_targets, dtype=object))
    return float(hits.mean() * 100) if len(hits) else 0.0


def calibrate_post(ranking: Ranking, query_targets: Sequence, gallery_targets: Sequence, method: str, option: str,
                   grid: Sequence[float], conservative: str, **fixed) -> tuple[float, dict[float, float]]:
    """The value of ``option`` in ``grid`` whose ``postprocess(ranking, method, option=value, **fixed)``
    has the best R@1 on this (validation) ranking.

    ``conservative`` ("max" or "min") says which end of the grid moves fewest queries (SCA's
    threshold and tau: "max"; the assignment's slack price: "min"); ties go there. Returns
    (chosen value, {value: R@1 in percent}).
    """
    if conservative not in ("max", "min"):
        raise ValueError(f"conservative must be 'max' or 'min', got {conservative!r}")
    if not len(grid):
        raise ValueError("calibrate_post: empty grid")
    table = {float(v): top1_recall(postprocess(ranking, method, **{**fixed, option: v}), query_targets,
                                   gallery_targets) for v in grid}
    sign = 1 if conservative == "max" else -1
    chosen = max(table, key=lambda v: (table[v], sign * v))
    log.info("%s %s = %g on validation (R@1 per value: %s)", method, option, chosen,
             ", ".join(f"{v:g}: {r:.1f}" for v, r in table.items()))
    return chosen, table


def calibrate_sca_threshold(ranking: Ranking, query_targets: Sequence, gallery_targets: Sequence,
                            grid: Sequence[float] = THRESHOLD_GRID, **sca_options) -> tuple[float, dict[float, float]]:
    """SCA's text-similarity threshold with the best validation R@1, and R@1 per threshold.

    ``ranking``: the validation queries ranked as they will be evaluated (same re-rank depth and
    fusion weight); targets as in :class:`~tpas.data.records.EvalSet`; ``sca_options`` (``rule``,
    ``tau``, ``max_passes``) are held fixed. Store the result as ``model.config.sca_threshold``.
    """
    return calibrate_post(ranking, query_targets, gallery_targets, "sca", "threshold", grid, "max", **sca_options)


def calibrate_sca_on_evalset(model, evalset: EvalSet, rerank: int = 16, grid: Sequence[float] = THRESHOLD_GRID,
                             batch_size: int = 64, progress: bool = False, **sca_options
                             ) -> tuple[float, dict[float, float]]:
    """Rank ``evalset`` (a validation split) with ``model`` at re-rank depth ``rerank`` (its stored
    fusion weight) and pick SCA's threshold on it (:func:`calibrate_sca_threshold`)."""
    if not evalset.has_ground_truth or not evalset.queries:
        raise ValueError(f"{evalset.name}: calibration needs queries with ground truth")
    ranking = rank_evalset(model, evalset, rerank=rerank, depth=max(rerank, 10), batch_size=batch_size,
                           progress=progress)
    return calibrate_sca_threshold(ranking, evalset.query_targets(), evalset.gallery_targets(), grid, **sca_options)


def median_gap(ranking: Ranking, confidence: str = "auto") -> float:
    """Median over queries of the gap between their two best raw confidences: the unit tau and
    slack grids scale by, so that they follow the score's units (ITM margins, cosines, RRF values)."""
    best_two = -np.sort(-candidates(ranking, confidence).conf, axis=1)[:, :2]
    gap = best_two[:, 0] - best_two[:, 1]
    gap = gap[np.isfinite(gap)]
    return float(np.median(gap)) if len(gap) and np.median(gap) > 0 else 1.0


def gap_grid(ranking: Ranking, confidence: str) -> tuple[float, ...]:
    """:data:`GAP_MULTIPLES` of the ranking's :func:`median_gap` for ``confidence``."""
    return tuple(float(f"{median_gap(ranking, confidence) * m:.3g}") for m in GAP_MULTIPLES)


def pick_post(ranking: Ranking, query_targets: Sequence, gallery_targets: Sequence, method: str, option: str,
              grid_for, conservative: str, confidences: Sequence[str] = CONFIDENCES, **fixed) -> dict:
    """The best (confidence, value) on a validation ranking: :func:`calibrate_post` for each
    confidence over ``grid_for(confidence)``; a later confidence must do strictly better to win.
    Returns ``{"confidence", "value", "r1", "tables": {confidence: {value: R@1}}}``."""
    best: dict = {"tables": {}}
    for confidence in confidences:
        value, table = calibrate_post(ranking, query_targets, gallery_targets, method, option, grid_for(confidence),
                                      conservative, confidence=confidence, **fixed)
        best["tables"][confidence] = table
        if "r1" not in best or table[value] > best["r1"]:
            best.update(confidence=confidence, value=value, r1=table[value])
    return best


def calibrate_sca(ranking: Ranking, query_targets: Sequence, gallery_targets: Sequence) -> tuple[dict, dict]:
    """SCA's options picked on a validation ranking: the text threshold and the compared score for
    the seed rule (the lower confidence moves), then tau for the margin rule (the query that loses
    least by moving moves); the margin rule is kept only when it does strictly better.

    Returns (options for ``postprocess(ranking, "sca", **options)``, a record of every R@1 tried).
    Store ``options["threshold"]`` as ``config.sca_threshold`` and the rest as ``config.sca_options``.
    """
    confidences = CONFIDENCES if ranking.head > 0 else ("itc",)  # ITM and the fusion need a re-ranked head
    threshold = pick_post(ranking, query_targets, gallery_targets, "sca", "threshold", lambda c: THRESHOLD_GRID, "max",
                          confidences)
    options = {"threshold": threshold["value"], "confidence": threshold["confidence"]}
    tau = pick_post(ranking, query_targets, gallery_targets, "sca", "tau",
                    lambda c: (0.0, *gap_grid(ranking, c)), "max", confidences, threshold=threshold["value"],
                    rule="margin")
    if tau["r1"] > threshold["r1"]:
        options.update(rule="margin", tau=tau["value"], confidence=tau["confidence"])
    record = {"options": options, "r1": max(threshold["r1"], tau["r1"]), "threshold": threshold, "tau": tau}
    log.info("sca on validation: %s (R@1 %.2f; seed rule %.2f, margin rule %.2f)", options, record["r1"],
             threshold["r1"], tau["r1"])
    return options, record
