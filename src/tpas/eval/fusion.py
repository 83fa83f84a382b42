"""Evaluate an ensemble: rank with each system, fuse, then post-process, score and write as ``run_eval``.

A *system* is a [Q,G] score matrix in an evaluation split's query and gallery order, from a tpas
model (:func:`model_system`: its ranking's ``score_matrix()``) or from anywhere else
(:func:`external_system`: a ``.npy`` with one id file per axis). :func:`fuse_systems` combines them
(:mod:`tpas.search.fusion`) into one :class:`~tpas.search.ranking.Ranking`, and :func:`run_fusion`
hands that ranking to :func:`tpas.eval.run.run_eval`, the same path a single model takes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpas.data.records import EvalSet
from tpas.errors import DataError, TpasError
from tpas.eval.run import EvalResult, run_eval
from tpas.search.fusion import RRF_K, fuse_scores
from tpas.search.ranking import Ranking, rank_evalset, ranking_from_scores
from tpas.utils.io import write_json

log = logging.getLogger(__name__)

__all__ = ["System", "external_system", "fuse_systems", "model_system", "read_ids", "run_fusion"]


@dataclass
class System:
    """One system's scores for an evaluation split.

    ``scores`` [Q,G] in the split's query and gallery order (higher = better); ``comparable``:
    whether a value means the same for every query (raw ITC, an external similarity; not a
    re-ranked head's per-query fused values), which min-max fusion needs; ``text_embeds`` [Q,E]
    when the system has them (SCA's similarity gate).
    """

    name: str
    scores: np.ndarray
    weight: float = 1.0
    comparable: bool = True
    text_embeds: np.ndarray | None = None


def model_system(model, evalset: EvalSet, *, rerank: int = 0, weight: float = 1.0, name: str | None = None,
                 index_dir: str | os.PathLike | None = None, batch_size: int = 64, workers: int = 0,
                 progress: bool = True) -> System:
    """A tpas model as a system: the full order of its ranking (ITC, or ITM-re-ranked head on top)."""
    ranking = rank_evalset(model, evalset, rerank=rerank, index_dir=index_dir, batch_size=batch_size,
                           workers=workers, progress=progress)
    return System(name=name or getattr(model, "family", "model"), scores=ranking.score_matrix(), weight=weight,
                  comparable=ranking.head == 0, text_embeds=ranking.text_embeds)


def read_ids(path: str | os.PathLike) -> list[str]:
    """One id a line (trailing ``\\r`` dropped); a blank line is an error naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except UnicodeDecodeError:
        raise DataError("not valid UTF-8", path) from None
    ids = [line.rstrip("\r") for line in lines]
    for n, x in enumerate(ids, 1):
        if not x.strip():
            raise DataError("empty line (one id per line expected)", path, n)
    return ids


def _positions(ids: list[str], wanted: list[str], path: Path, what: str) -> np.ndarray:
    """Index into ``ids`` of every id in ``wanted``; a repeat, or an id the split needs but the
    file lacks, is an error naming the file."""
    where: dict[str, int] = {}
    for n, x in enumerate(ids):
        if x in where:
            raise DataError(f"{what} id '{x}' repeats line {where[x] + 1}", path, n + 1)
        where[x] = n
    missing = [x for x in wanted if x not in where]
    if missing:
        raise DataError(f"{len(missing)} of the split's {len(wanted)} {what} ids are not in this file, "
                        f"e.g. '{missing[0]}'", path)
    return np.fromiter((where[x] for x in wanted), dtype=np.int64, count=len(wanted))


def external_system(scores_path: str | os.PathLike, query_ids_path: str | os.PathLike,
                    gallery_ids_path: str | os.PathLike, evalset: EvalSet, *, weight: float = 1.0,
                    name: str | None = None) -> System:
    """Any system's ``.npy`` [queries, gallery] scores with its query and gallery id files.

    Ids are the split's own: query ids as tpas reads them (PAB test ``<image_id>#<k>``, WWW'25
    challenge ``query_index``, Track 4 query names) and gallery image ids (file stems for masked
    sets). Rows and columns are reordered to the split's order; extra ids are ignored.
    """
    scores_path = Path(scores_path)
    try:
        scores = np.load(scores_path, mmap_mode="r")
    except FileNotFoundError:
        raise DataError("file not found", scores_path) from None
    except ValueError as exc:
        raise DataError(f"not a .npy array: {exc}", scores_path) from None
    query_ids, gallery_ids = read_ids(query_ids_path), read_ids(gallery_ids_path)
    if scores.ndim != 2 or scores.shape != (len(query_ids), len(gallery_ids)):
        raise DataError(f"shape {scores.shape} does not match {len(query_ids)} query ids x {len(gallery_ids)} "
                        "gallery ids", scores_path)
    rows = _positions(query_ids, [q.query_id for q in evalset.queries], Path(query_ids_path), "query")
    cols = _positions(gallery_ids, [g.image_id for g in evalset.gallery], Path(gallery_ids_path), "gallery")
    aligned = np.asarray(scores[rows][:, cols], dtype=np.float32)
    if not np.isfinite(aligned).all():
        raise DataError("scores contain NaN or infinite values", scores_path)
    return System(name=name or scores_path.stem, scores=aligned, weight=weight, comparable=True)


def fuse_systems(systems: list[System], method: str = "rrf", *, k: float = RRF_K, rrf_depth: int | None = None,
                 depth: int = 10) -> Ranking:
    """One ranking from several systems' scores (``method``: ``rrf`` or ``minmax``).

    Its ``itc`` field holds the fused value (``scorer`` names the fusion), which is what
    post-processing compares; the text embeddings are the first system's that has them.
    """
    if not systems:
        raise TpasError("fusion needs at least one system")
    if method == "minmax":
        for s in systems:
            if not s.comparable:
                raise TpasError(f"system '{s.name}': min-max fusion needs scores comparable across queries, but a "
                                "re-ranked order is normalised per query; use --method rrf or --rerank 0")
    fused = fuse_scores([s.scores for s in systems], method, [s.weight for s in systems], k=k, depth=rrf_depth)
    embeds = next((s.text_embeds for s in systems if s.text_embeds is not None), None)
    log.info("fused %d systems by %s: %s", len(systems), method,
             ", ".join(f"{s.name} (w {s.weight:g})" for s in systems))
    return ranking_from_scores(fused, depth=depth, text_embeds=embeds, scorer=method)


def run_fusion(systems: list[System], evalset: EvalSet, *, method: str = "rrf", k: float = RRF_K,
               rrf_depth: int | None = None, post: str = "none", post_options: dict[str, Any] | None = None,
               model=None, out_dir: str | os.PathLike | None = None, assume_one_to_one: bool = False,
               report_queries: int = 24) -> EvalResult:
    """Fuse ``systems``, then post-process, score and write through :func:`~tpas.eval.run.run_eval`.

    ``model`` (optional, e.g. the first system's) supplies the stored SCA text threshold (its stored
    tau and slack are in its own score units, not the fusion's, and are not used). With
    ``out_dir``, ``fusion.json`` records the systems and the fusion next to ``metrics.json``.
    """
    depth = max(10, int((post_options or {}).get("k", 10)))
    ranking = fuse_systems(systems, method, k=k, rrf_depth=rrf_depth, depth=depth)
    result = run_eval(model, evalset, ranking=ranking, post=post, post_options=post_options, out_dir=out_dir,
                      assume_one_to_one=assume_one_to_one, report_queries=report_queries, progress=False)
    if out_dir is not None:
        path = Path(out_dir) / "fusion.json"
        write_json(path, {"method": method, "rrf_k": k if method == "rrf" else None, "rrf_depth": rrf_depth,
                          "systems": [{"name": s.name, "weight": s.weight, "comparable": s.comparable}
                                      for s in systems]})
        result.outputs["fusion"] = str(path)
    return result
