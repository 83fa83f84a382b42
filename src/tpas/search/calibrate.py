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
value and keep the best R@1 among the values that beat the untouched ranking by more than noise
(:func:`calibrate_post`, :func:`beats_doing_nothing`, :func:`pick_post` over the compared raw
scores). :func:`calibrate_sca` picks SCA's threshold, rule, tau and compared score together, as
training does after its last step (stored as ``model.config.sca_threshold`` and ``sca_options``);
:func:`calibrate_sca_threshold` picks the threshold alone. :func:`calibrate_assign` picks the
assignment's depth ``k``, slack and compared score together (stored as ``model.config.assign_options``):
the depth matters most, since a query can only be handed one of its top-``k``, and a look-alike
whose true image sits third or fifth is out of reach of the published top-2. Ties go to the most
conservative value, the one that moves fewest queries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np

from tpas.data.records import EvalSet
from tpas.search.postprocess import NO_GATE, candidates, postprocess
from tpas.search.postprocess import log as postprocess_log
from tpas.search.ranking import Ranking, fuse, rank_evalset

log = logging.getLogger(__name__)

__all__ = ["ASSIGN_K_GRID", "CONFIDENCES", "GAP_MULTIPLES", "MIN_Z", "THRESHOLD_GRID", "WEIGHT_GRID",
           "beats_doing_nothing", "calibrate_assign", "calibrate_on_evalset", "calibrate_post", "calibrate_ranking",
           "calibrate_sca", "calibrate_sca_on_evalset", "calibrate_sca_threshold", "calibrate_weight", "gap_grid",
           "median_gap", "pick_post", "post_hits", "top1_hits", "top1_recall"]

# ITC weights tried by calibrate_weight: from upstream's 0.002 (ITM decides) to 100 (ITC decides, ITM breaks ties)
WEIGHT_GRID = (0.002, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
# SCA's text-cosine thresholds tried by calibrate_sca_threshold: from "every pair" (-1) to near-duplicates only
THRESHOLD_GRID = (NO_GATE, 0.0, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98)
# the raw scores a query-set method may compare (tpas.search.postprocess.candidates); ties keep the first
CONFIDENCES = ("itm", "itc", "fused")
# tau and slack grids, in units of the median top-1 - top-2 gap of the compared confidence
GAP_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
# a post-processing setting must beat the untouched ranking by this many standard deviations of a
# sign test on the queries it changed (calibrate.beats_doing_nothing) to be picked
MIN_Z = 2.0
# how many of its candidates a query may be assigned (calibrate_assign); 2 is the published setting
ASSIGN_K_GRID = (2, 3, 5, 10, 16)


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


def top1_hits(ranking: Ranking, query_targets: Sequence, gallery_targets: Sequence) -> np.ndarray:
    """[Q] bool: is each query's first listed row a true match (what post-processing changes)."""
    gallery = np.asarray(gallery_targets, dtype=object)
    first = ranking.rows[:, 0]
    return (first >= 0) & (gallery[np.maximum(first, 0)] == np.asarray(query_targets, dtype=object))


def top1_recall(ranking: Ranking, query_targets: Sequence, gallery_targets: Sequence) -> float:
    """R@1 in percent of a ranking's first listed rows."""
    hits = top1_hits(ranking, query_targets, gallery_targets)
    return float(hits.mean() * 100) if len(hits) else 0.0


def beats_doing_nothing(before: np.ndarray, after: np.ndarray, min_z: float = MIN_Z) -> bool:
    """Does a post-processed top-1 beat the untouched one by more than validation noise?

    A sign test on the queries it changed: ``fixed`` (wrong before, right after) must exceed
    ``broken`` by more than ``min_z`` standard deviations of that difference under "moves are coin
    flips", ``sqrt(fixed + broken)``. A handful of lucky moves on a small validation split (a few
    hundred queries) is not a reason to move a test set's queries.
    """
    fixed = int((after & ~before).sum())
    broken = int((before & ~after).sum())
    return fixed - broken > min_z * np.sqrt(fixed + broken)


@contextmanager
def _quiet(logger: logging.Logger):
    """Hold ``logger`` to errors inside the block."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def post_hits(ranking: Ranking, query_targets: Sequence, gallery_targets: Sequence, method: str = "none",
              folds: Sequence[np.ndarray] | None = None, **options) -> np.ndarray:
    """[Q] bool top-1 hits after ``postprocess(ranking, method, **options)``.

    ``folds``: lists of query indices post-processed as separate query sets (each against the
    whole gallery), hits returned in the order of their concatenation. Folds make one validation
    split mirror a protocol with fewer queries per gallery image: a Track 4-style set asks about one
    person in six, so its collisions are fewer and fall more often on distractors.
    """
    if folds is None:
        return top1_hits(postprocess(ranking, method, **options), query_targets, gallery_targets)
    targets = np.asarray(query_targets, dtype=object)
    return np.concatenate([top1_hits(postprocess(ranking.take(f), method, **options), targets[f], gallery_targets)
                           for f in folds])


def calibrate_post(ranking: Ranking, query_targets: Sequence, gallery_targets: Sequence, method: str, option: str,
                   grid: Sequence[float], conservative: str, min_z: float = MIN_Z,
                   folds: Sequence[np.ndarray] | None = None, **fixed) -> tuple[float, dict[float, float]]:
    """The value of ``option`` in ``grid`` whose ``postprocess(ranking, method, option=value, **fixed)``
    has the best R@1 on this (validation) ranking, among the values that beat the untouched ranking
    by more than noise (:func:`beats_doing_nothing` with ``min_z``; 0 = any gain counts).

    ``conservative`` ("max" or "min") says which end of the grid moves fewest queries (SCA's
    threshold and tau: "max"; the assignment's slack price: "min"); ties go there, and so does the
    choice when no value beats doing nothing. ``folds``: see :func:`post_hits`. Returns (chosen
    value, {value: R@1 in percent}).
    """
    if conservative not in ("max", "min"):
        raise ValueError(f"conservative must be 'max' or 'min', got {conservative!r}")
    if not len(grid):
        raise ValueError("calibrate_post: empty grid")
    before = post_hits(ranking, query_targets, gallery_targets, folds=folds)
    table, better = {}, []
    with _quiet(postprocess_log):  # a grid's extreme values may hit SCA's pass limit: expected, not news
        for v in grid:
            hits = post_hits(ranking, query_targets, gallery_targets, method, folds, **{**fixed, option: v})
            table[float(v)] = float(hits.mean() * 100) if len(hits) else 0.0
            if beats_doing_nothing(before, hits, min_z):
                better.append(float(v))
    sign = 1 if conservative == "max" else -1
    if better:
        chosen = max(better, key=lambda v: (table[v], sign * v))
    else:  # nothing to gain beyond noise: the end of the grid that moves fewest queries
        chosen = max(table, key=lambda v: sign * v)
    log.info("%s %s = %g on validation (R@1 per value: %s%s)", method, option, chosen,
             ", ".join(f"{v:g}: {r:.1f}" for v, r in table.items()),
             "" if better else f"; none beats {before.mean() * 100:.1f} untouched by more than noise")
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


def calibrate_sca(ranking: Ranking, query_targets: Sequence, gallery_targets: Sequence, min_z: float = MIN_Z,
                  folds: Sequence[np.ndarray] | None = None) -> tuple[dict, dict]:
    """SCA's options picked on a validation ranking, for each rule with the compared score: the
    seed rule (the lower confidence moves) over the text threshold; the margin rule (the query
    that loses least by moving moves) over the text threshold and tau together, since a wide gate
    with a margin can beat both a wide gate without one and a narrow gate with one. The margin rule
    is kept only when it does strictly better.

    Returns (options for ``postprocess(ranking, "sca", **options)``, a record of every R@1 tried:
    ``seed`` and ``margin``, the latter with one pick per threshold). Store ``options["threshold"]``
    as ``config.sca_threshold`` and the rest as ``config.sca_options``.
    """
    confidences = CONFIDENCES if ranking.head > 0 else ("itc",)  # ITM and the fusion need a re-ranked head
    targets = (query_targets, gallery_targets)
    seed = pick_post(ranking, *targets, "sca", "threshold", lambda c: THRESHOLD_GRID, "max", confidences,
                     min_z=min_z, folds=folds, rule="score", tau=0.0)
    margin: dict = {"by_threshold": {}}
    for threshold in sorted(THRESHOLD_GRID, reverse=True):  # ties keep the narrower gate
        got = pick_post(ranking, *targets, "sca", "tau", lambda c: (0.0, *gap_grid(ranking, c)), "max", confidences,
                        min_z=min_z, folds=folds, threshold=threshold, rule="margin")
        margin["by_threshold"][threshold] = got
        if "r1" not in margin or got["r1"] > margin["r1"]:
            margin.update(threshold=threshold, confidence=got["confidence"], tau=got["value"], r1=got["r1"])
    options = {"threshold": seed["value"], "rule": "score", "confidence": seed["confidence"]}
    if margin["r1"] > seed["r1"]:
        options = {"threshold": margin["threshold"], "rule": "margin", "tau": margin["tau"],
                   "confidence": margin["confidence"]}
    record = {"options": options, "r1": max(seed["r1"], margin["r1"]), "seed": seed, "margin": margin}
    log.info("sca on validation: %s (R@1 %.2f; seed rule %.2f, margin rule %.2f)", options, record["r1"],
             seed["r1"], margin["r1"])
    return options, record


def calibrate_assign(ranking: Ranking, query_targets: Sequence, gallery_targets: Sequence,
                     k_grid: Sequence[int] = ASSIGN_K_GRID, min_z: float = MIN_Z,
                     folds: Sequence[np.ndarray] | None = None) -> tuple[dict, dict]:
    """The global assignment's options picked on a validation ranking: the depth ``k`` (each
    query's top-``k`` candidates), the slack price and the compared score, jointly.

    When no setting beats the untouched ranking by more than noise (:func:`beats_doing_nothing`),
    the options are ``k=1``: every query keeps its top-1, nothing changes. Depths past a query's
    candidates (the re-ranked head for ITM and the fusion) add nothing and are skipped. Ties go to
    the smaller depth, then the smaller slack (fewer moves). Returns (options for
    ``postprocess(ranking, "assign", **options)``, a record of every R@1 tried, by depth).
    """
    confidences = CONFIDENCES if ranking.head > 0 else ("itc",)
    width = ranking.rows.shape[1]
    depths = sorted({min(int(k), width) for k in k_grid if k >= 1})
    if not depths:
        raise ValueError("calibrate_assign: k_grid needs a depth >= 1")
    best: dict = {}
    tables = {}
    for k in depths:
        got = pick_post(ranking, query_targets, gallery_targets, "assign", "slack",
                        lambda c: (0.0, *gap_grid(ranking, c)), "min", confidences, min_z=min_z, folds=folds, k=k)
        tables[k] = got["tables"]
        if "r1" not in best or got["r1"] > best["r1"]:
            best = {"k": k, **got}
    options = {"k": best["k"], "slack": best["value"], "confidence": best["confidence"]}
    before = post_hits(ranking, query_targets, gallery_targets, folds=folds)
    r1 = best["r1"]
    if not beats_doing_nothing(before, post_hits(ranking, query_targets, gallery_targets, "assign", folds, **options),
                               min_z):
        # nothing beats the untouched ranking by more than noise: k = 1 hands every query its own
        # top-1 back whatever the score (slack 0 alone is no such guarantee when the compared score
        # orders a query's candidates unlike the ranking does)
        options, r1 = {"k": 1, "slack": 0.0, "confidence": best["confidence"]}, float(before.mean() * 100)
    record = {"options": options, "r1": r1, "before": float(before.mean() * 100), "tables": tables}
    log.info("assign on validation: %s (R@1 %.2f, %.2f before)", options, record["r1"], record["before"])
    return options, record
