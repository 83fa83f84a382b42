"""The evaluation pipeline: gallery index -> ITC -> (ITM re-rank) -> (post-processing) -> metrics, answer, report.

Memory: the gallery goes through :func:`tpas.search.index.build_index`, so image tokens live in
a memory-mapped fp16 file and only the rows of the current candidates are read; queries are
encoded, scored and re-ranked in chunks. What stays in RAM is the final score matrix (Q x G
float32: 20,000 x 20,000 = 1.6 GB; post-processing makes one copy) — needed because query-set
post-processing (SCA and relatives) and the metrics look at every row.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tpas.data.records import EvalSet
from tpas.search.postprocess import POST_METHODS, postprocess
from tpas.search.rerank import DEFAULT_WEIGHT, rerank_scores, resolve_weight, top_k
from tpas.utils.io import write_json

log = logging.getLogger(__name__)

TOP = 10  # ranking depth kept for answer.txt and the report


def is_challenge(evalset: EvalSet) -> bool:
    """A masked challenge set (its results go to ``answer.txt``)."""
    return evalset.name.startswith("pab-challenge")


def gallery_index(model, evalset: EvalSet, index_dir: str | Path, keep_tokens: bool, batch_size: int = 64,
                  workers: int = 0, progress: bool = True):
    """Build (or reuse, or resume) the index of ``evalset``'s gallery in ``index_dir`` and open it."""
    from tpas.search.index import build_index, open_index

    index_dir = Path(index_dir)
    build_index(model, evalset.gallery, evalset.root, index_dir, batch_size=batch_size, workers=workers,
                keep_tokens=keep_tokens, progress=progress)
    index = open_index(index_dir, model, root=evalset.root)
    if keep_tokens and not index.has_tokens:  # an earlier ITC-only run left an index without tokens
        build_index(model, evalset.gallery, evalset.root, index_dir, batch_size=batch_size, workers=workers,
                    keep_tokens=True, overwrite=True, progress=progress)
        index = open_index(index_dir, model, root=evalset.root)
    if index.ids != [g.image_id for g in evalset.gallery]:
        raise ValueError(f"index {index_dir} does not hold this gallery")
    return index


def score_queries(model, evalset: EvalSet, index, rerank: int = 0, chunk_size: int = 512, text_batch_size: int = 128,
                  itm_mode: str = "logit", weight: float = DEFAULT_WEIGHT, itm_batch_size: int | None = None,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q,G] float32, text embeddings [Q,E]): ITC for every pair, ITM-fused on each top-``rerank``."""
    from tqdm.auto import tqdm

    from tpas.search.encode import encode_texts

    captions = [q.caption for q in evalset.queries]
    n, g = len(captions), len(index)
    scores = np.empty((n, g), dtype=np.float32)
    text_embeds = np.empty((n, index.embeds.shape[1]), dtype=np.float32)
    gallery = np.ascontiguousarray(index.embeds)
    for start in tqdm(range(0, n, chunk_size), desc="score queries", unit="chunk", disable=not progress or n <= chunk_size):
        stop = min(n, start + chunk_size)
        enc = encode_texts(model, captions[start:stop], batch_size=text_batch_size, keep_tokens=rerank > 0,
                           progress=False)
        text_embeds[start:stop] = enc.embeds
        itc = enc.embeds @ gallery.T
        if rerank > 0:
            itc = rerank_scores(model, itc, enc.tokens, enc.mask, index.tokens, k=rerank, weight=weight,
                                mode=itm_mode, batch_size=itm_batch_size, progress=progress and n <= chunk_size)
        scores[start:stop] = itc
    return scores, text_embeds


def _first_positive_ranks(scores: np.ndarray, evalset: EvalSet, queries: list[int]) -> list[int | None]:
    from tpas.eval.metrics import positive_ranks

    targets = np.array([g.target for g in evalset.gallery], dtype=object)
    ranks: list[int | None] = []
    for i in queries:
        target = evalset.queries[i].target
        pos = np.flatnonzero(targets == target) if target is not None else np.zeros(0, np.int64)
        ranks.append(int(positive_ranks(scores[i], pos)[0]) if len(pos) else None)
    return ranks


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


def run_eval(model, evalset: EvalSet, rerank: int = 0, post: str = "none", out_dir: str | Path | None = None, *,
             index_dir: str | Path | None = None, post_options: dict[str, Any] | None = None,
             itm_mode: str = "logit", weight: float | None = None, batch_size: int = 64, workers: int = 0,
             query_chunk: int = 512, itm_batch_size: int | None = None, report_queries: int = 24, seed: int = 0,
             score_cache: dict | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` on ``evalset``; write ``metrics.json``, ``report.html`` (and ``answer.txt``) to ``out_dir``.

    ``rerank`` = ITC top-k re-scored by ITM (0 = ITC only); ``post`` = none | sca | one_to_one |
    dual_softmax (valid only when each gallery image answers at most one query; see
    :mod:`tpas.search.postprocess`), with ``post_options`` passed to it. The gallery index goes to
    ``index_dir`` (default ``out_dir/index``; reused when it already matches). Returns the metrics
    (``R@1``, ``R@5``, ``R@10``, ``mAP``, ``mINP``, ``num_queries``, ``groups``) when the ground
    truth is known, plus ``settings``, ``timings`` and ``outputs``.
    """
    if post not in POST_METHODS:
        raise ValueError(f"unknown post-processing {post!r}; choose from {POST_METHODS}")
    if rerank < 0:
        raise ValueError("rerank must be >= 0")
    if not evalset.queries or not evalset.gallery:
        raise ValueError(f"{evalset.name}: nothing to evaluate ({len(evalset.queries)} queries, "
                         f"{len(evalset.gallery)} gallery images)")
    weight = resolve_weight(model, weight)
    out = Path(out_dir) if out_dir is not None else None
    scratch = None
    if index_dir is None:
        if out is None:
            scratch = tempfile.TemporaryDirectory(prefix="tpas-eval-")
            index_dir = Path(scratch.name) / "index"
        else:
            index_dir = out / "index"
    post_options = dict(post_options or {})
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        index = gallery_index(model, evalset, index_dir, keep_tokens=rerank > 0, batch_size=batch_size,
                              workers=workers, progress=progress)
        timings["gallery_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        key = (rerank, itm_mode, weight)
        if score_cache is not None and key in score_cache:
            log.info("reusing the query scores of re-rank depth %d", rerank)
        else:
            computed = score_queries(model, evalset, index, rerank=rerank, chunk_size=query_chunk, itm_mode=itm_mode,
                                     weight=weight, itm_batch_size=itm_batch_size, progress=progress)
            if score_cache is None:
                score_cache = {}
            score_cache[key] = computed
        scores, text_embeds = (a.copy() for a in score_cache[key])  # post-processing must not alter the cache
        timings["queries_s"] = time.perf_counter() - t0
    finally:
        if scratch is not None:
            scratch.cleanup()
    t0 = time.perf_counter()
    sample = sample_queries(evalset, report_queries, seed)
    shown = scores[sample].copy()  # the report shows similarity scores, not post-processing's order-only values
    if post != "none":
        scores = postprocess(scores, post, text_embeds, **post_options)
    timings["post_s"] = time.perf_counter() - t0

    settings = {"model_family": getattr(model, "family", type(model).__name__), "eval_set": evalset.name,
                "queries": len(evalset.queries), "gallery": len(evalset.gallery), "rerank": rerank,
                "itm": itm_mode if rerank else None, "fusion_weight": weight if rerank else None, "post": post,
                "post_options": post_options}
    result: dict[str, Any] = {}
    if evalset.has_ground_truth:
        from tpas.eval.metrics import evaluate

        groups = evalset.query_groups()
        t0 = time.perf_counter()
        result.update(evaluate(scores, evalset.query_targets(), evalset.gallery_targets(),
                               query_groups=groups if any(g != "unknown" for g in groups) else None))
        timings["metrics_s"] = time.perf_counter() - t0
    else:
        log.info("%s has no ground truth: no metrics", evalset.name)
    top_rows, _ = _top_rows(scores, TOP)
    outputs: dict[str, str] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if is_challenge(evalset) and len(evalset.gallery) < TOP:
            log.warning("gallery has %d images: answer.txt needs %d per query; not written", len(evalset.gallery), TOP)
        elif is_challenge(evalset):
            outputs["answer"] = str(_write_answer(out / "answer.txt", evalset, top_rows, result))
        from tpas.eval.report import ReportRow, write_report

        ranks = _first_positive_ranks(scores, evalset, sample)
        rows = [ReportRow(q, top_rows[q], shown[i, top_rows[q]], rank) for i, (q, rank) in enumerate(zip(sample, ranks))]
        outputs["report"] = str(write_report(out / "report.html", evalset, rows, metrics=result, settings=settings,
                                             title=f"tpas retrieval report: {evalset.name}"))
        outputs["metrics"] = str(out / "metrics.json")
    result.update(settings=settings, timings={k: round(v, 3) for k, v in timings.items()}, outputs=outputs)
    if out is not None:
        write_json(out / "metrics.json", result)
    return result


def _top_rows(scores: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    rows, vals = [], []
    for s in range(0, scores.shape[0], chunk):
        r, v = top_k(scores[s:s + chunk], k)
        rows.append(r)
        vals.append(v)
    return np.concatenate(rows), np.concatenate(vals)


def _write_answer(path: Path, evalset: EvalSet, top_rows: np.ndarray, result: dict[str, Any]) -> Path:
    """answer.txt from the top-10; scored against the answer key when the set carries one."""
    from tpas.data.submission import write_answer

    ids = [g.image_id for g in evalset.gallery]
    rankings = [[ids[j] for j in row] for row in top_rows]
    write_answer(path, rankings)
    if evalset.has_ground_truth:
        from tpas.eval.metrics import evaluate_rankings

        targets = {g.image_id: g.target for g in evalset.gallery}
        groups = evalset.query_groups()
        result["answer_scores"] = evaluate_rankings(
            rankings, evalset.query_targets(), targets,
            query_groups=groups if any(g != "unknown" for g in groups) else None)
    log.info("wrote %s (%d queries)", path, len(rankings))
    return path
