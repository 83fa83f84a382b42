"""The evaluation pipeline, top to bottom: rank -> post-process -> score -> write.

1. **rank**: :func:`tpas.search.ranking.rank_evalset` (gallery through a persisted index, ITC for
   every pair, ITM re-rank of each query's top-k, fused order);
2. **post-process**: query-set methods (:mod:`tpas.search.postprocess`: SCA and relatives) on the
   ranking's raw scores, after :func:`check_one_to_one` has checked that they apply;
3. **score**: R@K, mAP, mINP, mAP@10, overall and per behaviour, when the ground truth is known;
4. **write**: ``metrics.json``, ``report.html`` and, for a masked challenge set, ``answer.txt``
   (and, for an AICity'26 Track 4 set, ``answer.zip``, the file that is submitted).

Memory: image tokens live in the index's memory-mapped fp16 file and only the rows of the current
candidates are read; queries are encoded and re-ranked in chunks. What stays in RAM is the score
matrix (Q x G float32: 20,000 x 20,000 = 1.6 GB; post-processing makes one copy), because
query-set post-processing and the metrics look at every row.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tpas.data.records import EvalSet
from tpas.errors import TpasError
from tpas.eval.metrics import Metrics, evaluate, evaluate_rankings
from tpas.search.postprocess import POST_METHODS, postprocess, resolve_post_options
from tpas.search.ranking import Ranking, rank_evalset, top_k
from tpas.utils.io import write_json

log = logging.getLogger(__name__)

__all__ = ["EvalResult", "check_one_to_one", "is_challenge", "is_track4", "run_eval", "sample_queries"]

TOP = 10  # ranking depth kept for answer.txt and the report
AP_KS = (10,)  # mAP@10: the AICity'26 Track 4 leaderboard figure
DISTRACTOR_RATIO = 2.0  # a gallery this many times the query count is mostly images no query asks for


@dataclass
class EvalResult:
    """What one evaluation produced. ``metrics`` is None when the ground truth is hidden;
    ``answer_metrics`` scores the written ``answer.txt`` when the set carries an answer key."""

    settings: dict[str, Any]
    metrics: Metrics | None = None
    answer_metrics: Metrics | None = None
    timings: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``metrics.json``): the metrics at the top level, then the rest."""
        out = self.metrics.to_dict() if self.metrics is not None else {}
        if self.answer_metrics is not None:
            out["answer_scores"] = self.answer_metrics.to_dict()
        out.update(settings=self.settings, timings={k: round(v, 3) for k, v in self.timings.items()},
                   outputs=self.outputs)
        return out


def is_challenge(evalset: EvalSet) -> bool:
    """A masked challenge set, WWW'25 or AICity'26 Track 4 (its results go to ``answer.txt``)."""
    return evalset.name.startswith(("pab-challenge", "pab-track4"))


def is_track4(evalset: EvalSet) -> bool:
    """An AICity'26 Track 4 masked set (its ``answer.txt`` is submitted zipped)."""
    return evalset.name.startswith("pab-track4")


def check_one_to_one(evalset: EvalSet, post: str, assume_one_to_one: bool = False) -> None:
    """Refuse query-set post-processing where its premise is known to be false; warn where it may be.

    The premise: each gallery image answers at most one query. With a ground truth it is checked:
    an image that is the target of several queries, or a target with several gallery images
    (TBPS person ids), is a :class:`~tpas.errors.TpasError`. A gallery much larger than the query
    set (distractors) gets a warning, unless ``assume_one_to_one``: every query may still have its
    own image, but most images answer none and nothing here can confirm the rest.
    """
    if post == "none":
        return
    if evalset.has_ground_truth:
        per_query_target = Counter(evalset.query_targets())
        per_gallery_target = Counter(evalset.gallery_targets())
        shared = [t for t, n in per_query_target.items() if n > 1]
        multi = [t for t in per_query_target if per_gallery_target.get(t, 0) > 1]
        if shared or multi:
            problems = []
            if shared:
                problems.append(f"{len(shared)} targets are shared by several queries (up to "
                                f"{max(per_query_target.values())}, e.g. {shared[0]!r})")
            if multi:
                problems.append(f"{len(multi)} targets have several gallery images (e.g. {multi[0]!r})")
            raise TpasError(f"{evalset.name}: post-processing '{post}' assumes that each gallery image answers at "
                            f"most one query, but its ground truth says otherwise: {'; '.join(problems)}. "
                            "Evaluate it without --post.")
    n_queries, n_gallery = len(evalset.queries), len(evalset.gallery)
    if not assume_one_to_one and n_gallery >= DISTRACTOR_RATIO * n_queries:
        log.warning("%s: %d gallery images for %d queries: most images answer no query; post-processing '%s' "
                    "assumes each answers at most one (pass --assume-one-to-one if the protocol says so)",
                    evalset.name, n_gallery, n_queries, post)


def run_eval(model, evalset: EvalSet, *, rerank: int = 0, weight: float | None = None, itm_mode: str = "logit",
             post: str = "none", post_options: dict[str, Any] | None = None, out_dir: str | Path | None = None,
             index_dir: str | Path | None = None, ranking: Ranking | None = None, batch_size: int = 64, workers: int = 0,
             report_queries: int = 24, assume_one_to_one: bool = False, progress: bool = True) -> EvalResult:
    """Evaluate ``model`` on ``evalset``; with ``out_dir``, write ``metrics.json``, ``report.html``
    (and ``answer.txt``) there.

    ``rerank`` = ITC top-k re-scored by ITM (0 = ITC only), fused with ``weight`` (None = the
    model's calibrated weight, else upstream's). ``post`` = none | sca | assign | one_to_one |
    dual_softmax (valid only when each gallery image answers at most one query: see
    :func:`check_one_to_one` and :mod:`tpas.search.postprocess`), with ``post_options`` (missing
    ones come from the model's validation-picked ``config.sca_threshold``, ``sca_options`` and
    ``assign_options``: :func:`resolve_post_options`); ``assume_one_to_one`` silences the warning
    for a gallery much larger than the query set. The gallery index goes to ``index_dir`` (default
    ``out_dir/index``, reused when it matches; in memory when neither is given). ``ranking``: a
    ranking of this evalset made earlier (by :func:`~tpas.search.ranking.rank_evalset`, or a
    fusion) to post-process and score again without re-ranking; ``rerank`` and ``weight`` then
    come from it (``model`` may be None).
    """
    if post not in POST_METHODS:
        raise ValueError(f"unknown post-processing {post!r}; choose from {POST_METHODS}")
    check_one_to_one(evalset, post, assume_one_to_one)
    out = Path(out_dir) if out_dir is not None else None
    timings: dict[str, float] = {}

    # 1. rank
    t0 = time.perf_counter()
    if ranking is None:  # without an index folder the gallery is encoded in memory (training validation)
        ranking = rank_evalset(model, evalset, rerank=rerank, weight=weight, itm_mode=itm_mode,
                               index_dir=index_dir or (out / "index" if out is not None else None),
                               batch_size=batch_size, workers=workers, progress=progress)
    timings["rank_s"] = time.perf_counter() - t0
    post_options = resolve_post_options(model, post, post_options, ranking)

    # 2. post-process (on the ranking's raw scores; a new ranking, the given one stays intact)
    t0 = time.perf_counter()
    sample = sample_queries(evalset, report_queries)
    scores = ranking.score_matrix()
    shown = scores[sample]  # the report shows similarity scores, not post-processing's order
    if post != "none":
        del scores  # one [Q,G] matrix at a time
        scores = postprocess(ranking, post, **post_options).score_matrix()
    timings["post_s"] = time.perf_counter() - t0

    # 3. score
    result = EvalResult(settings={
        "model_family": None if model is None else getattr(model, "family", type(model).__name__),
        "eval_set": evalset.name,
        "queries": len(evalset.queries), "gallery": len(evalset.gallery), "rerank": ranking.rerank,
        "itm": itm_mode if ranking.rerank else None, "fusion_weight": ranking.weight, "scorer": ranking.scorer,
        "post": post, "post_options": post_options})
    if evalset.has_ground_truth:
        t0 = time.perf_counter()
        result.metrics = evaluate(scores, evalset.query_targets(), evalset.gallery_targets(),
                                  query_groups=_groups(evalset), ap_ks=AP_KS)
        timings["metrics_s"] = time.perf_counter() - t0
    else:
        log.info("%s has no ground truth: no metrics", evalset.name)
    result.timings = timings

    # 4. write
    if out is not None:
        _write_outputs(out, result, evalset, scores, sample, shown)
    return result


def _groups(evalset: EvalSet) -> list[str] | None:
    """Behaviour label per query, or None when no query has one (no per-group figures)."""
    groups = evalset.query_groups()
    return groups if any(g != "unknown" for g in groups) else None


def _write_outputs(out: Path, result: EvalResult, evalset: EvalSet, scores: np.ndarray, sample: list[int],
                   shown: np.ndarray) -> None:
    """answer.txt (challenge sets), report.html and metrics.json (last) under ``out``."""
    from tpas.eval.report import ReportRow, write_report

    out.mkdir(parents=True, exist_ok=True)
    top_rows = _top_rows(scores, TOP)
    if is_challenge(evalset) and len(evalset.gallery) < TOP:
        log.warning("gallery has %d images: answer.txt needs %d per query; not written", len(evalset.gallery), TOP)
    elif is_challenge(evalset):
        result.outputs["answer"] = str(_write_answer(out / "answer.txt", evalset, top_rows, result))
        if is_track4(evalset):
            from tpas.data.submission import zip_answer

            result.outputs["answer_zip"] = str(zip_answer(out / "answer.txt", out / "answer.zip"))
    found = _first_positives(scores, evalset, sample)
    rows = [ReportRow(q, top_rows[q], shown[i, top_rows[q]], rank, order_scores=scores[q, top_rows[q]],
                      positive_row=row, positive_score=None if row is None else float(shown[i, row]))
            for i, (q, (rank, row)) in enumerate(zip(sample, found))]
    result.outputs["report"] = str(write_report(out / "report.html", evalset, rows, metrics=result.metrics,
                                                settings=result.settings,
                                                title=f"tpas retrieval report: {evalset.name}"))
    result.outputs["metrics"] = str(out / "metrics.json")
    write_json(out / "metrics.json", result.to_dict())


def _first_positives(scores: np.ndarray, evalset: EvalSet, queries: list[int]
                     ) -> list[tuple[int | None, int | None]]:
    """(rank, gallery row) of each query's best-ranked true match; (None, None) without one."""
    from tpas.eval.metrics import positive_ranks

    targets = np.array([g.target for g in evalset.gallery], dtype=object)
    found: list[tuple[int | None, int | None]] = []
    for i in queries:
        target = evalset.queries[i].target
        pos = np.flatnonzero(targets == target) if target is not None else np.zeros(0, np.int64)
        ranks = [int(positive_ranks(scores[i], pos[j:j + 1])[0]) for j in range(len(pos))]
        found.append((min(ranks), int(pos[int(np.argmin(ranks))])) if ranks else (None, None))
    return found


def sample_queries(evalset: EvalSet, n: int, seed: int = 0) -> list[int]:
    """``n`` query indices spread over the set (same normal/anomaly shares), fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(evalset.queries):
        groups.setdefault(q.behaviour.value, []).append(i)
    total = len(evalset.queries)
    picked: list[int] = []
    for members in groups.values():
        take = min(len(members), max(1, round(n * len(members) / max(1, total))))
        picked.extend(rng.choice(members, take, replace=False).tolist())
    return sorted(picked)[:n] if len(picked) > n else sorted(picked)


def _top_rows(scores: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Gallery rows of each query's top-``k`` [Q,k], in chunks of queries."""
    return np.concatenate([top_k(scores[s:s + chunk], k)[0] for s in range(0, scores.shape[0], chunk)])


def _write_answer(path: Path, evalset: EvalSet, top_rows: np.ndarray, result: EvalResult) -> Path:
    """answer.txt from the top-10; scored against the answer key when the set carries one."""
    from tpas.data.submission import write_answer

    ids = [g.image_id for g in evalset.gallery]
    rankings = [[ids[j] for j in row] for row in top_rows]
    write_answer(path, rankings)
    if evalset.has_ground_truth:
        targets = {g.image_id: g.target for g in evalset.gallery}
        result.answer_metrics = evaluate_rankings(rankings, evalset.query_targets(), targets,
                                                  query_groups=_groups(evalset), ap_ks=AP_KS)
    log.info("wrote %s (%d queries)", path, len(rankings))
    return path
