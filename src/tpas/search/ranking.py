"""Queries x gallery -> ranking: the one path that eval, the search engine (and so the server),
training validation, re-rank calibration and the benchmarks all call.

Per chunk of queries, in order:

1. encode the texts (:mod:`tpas.search.encode`);
2. ITC: each query's best candidates by embedding cosine, either exactly (a matrix product with
   every gallery embedding) or from the gallery's own search structure (the index's FAISS);
3. ITM: re-score each query's top-``rerank`` candidates with the fusion head (:mod:`tpas.search.rerank`);
4. fuse: order that head by ``minmax(ITM) + weight * minmax(ITC)`` over the query's own head
   (upstream's fusion; ``weight`` 0.002 lets ITM decide), the rest stays below in ITC order.

The :class:`Ranking` keeps the raw per-pair scores (ITC cosine for every listed candidate, the ITM
score for the re-ranked head) next to the display order and the fused values, because query-set
post-processing must compare scores *across* queries, and per-query min-max values are not
comparable between queries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tpas.data.records import EvalSet
from tpas.search.encode import EncodedImages, encode_images, encode_texts
from tpas.search.rerank import itm_scores

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_WEIGHT", "Ranking", "fuse", "minmax", "rank", "rank_evalset", "ranking_from_scores",
           "resolve_weight", "top_k"]

DEFAULT_WEIGHT = 0.002  # upstream X-VLM's ITC weight in the fusion
TOP_K_CELLS = 1 << 23  # score cells per chunk in top_k (~8M: some 100 MB of temporaries)


# -- ranking arithmetic (numpy) ----------------------------------------------------------------
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


def fuse(itm: np.ndarray, itc: np.ndarray, weight: float = DEFAULT_WEIGHT) -> np.ndarray:
    """Per-query fusion of [Q,k] candidate scores: minmax(ITM) + weight * minmax(ITC)."""
    return minmax(itm, axis=1) + np.float32(weight) * minmax(itc, axis=1)


def resolve_weight(model, weight: float | None, depth: int | None = None) -> float:
    """The fusion weight to use: ``weight`` if given, else the model's calibrated one, else upstream's.

    A calibrated weight was fitted at one re-rank depth (``config.rerank_depth``); re-ranking at
    another ``depth`` logs a warning, once per (depth, fitted depth), since the best weight moves
    with the number of candidates ITM has to sort.
    """
    if weight is not None:
        return float(weight)
    config = getattr(model, "config", None)
    calibrated = getattr(config, "rerank_weight", None)
    fitted = getattr(config, "rerank_depth", None)
    if calibrated is not None and fitted and depth and depth != fitted and (depth, fitted) not in _WARNED_DEPTHS:
        _WARNED_DEPTHS.add((depth, fitted))
        log.warning("re-ranking the top-%d with a fusion weight fitted at top-%d on validation; "
                    "expect less than the validated gain", depth, fitted)
    return DEFAULT_WEIGHT if calibrated is None else float(calibrated)


_WARNED_DEPTHS: set[tuple[int, int]] = set()


# -- the result ----------------------------------------------------------------------------------
@dataclass
class Ranking:
    """Each query's ``depth`` best gallery rows, best first, with their raw and fused scores.

    ``rows`` [Q,D] int64 gallery rows (-1 where the gallery had fewer candidates);
    ``itc`` [Q,D] float32 raw ITC cosine of each listed row;
    ``itm`` [Q,D] float32 raw ITM score of the re-ranked head, NaN below it;
    ``score`` [Q,D] float32 the value that orders the list: the fused score in the head
    (``[0, 1 + weight]``), ``itc - max(itc) - 1`` below it (so the tail sorts under the head);
    ``itc_scores`` [Q,G] ITC against the whole gallery, when asked for (``keep_scores``);
    ``scorer``: what ``itc``/``itc_scores`` hold: ``"itc"`` for a model's ranking, the fusion's name
    (``"rrf"``, ``"minmax"``) for a ranking built from several systems (:mod:`tpas.search.fusion`);
    ``post``: the query-set post-processing that re-ordered it (:mod:`tpas.search.postprocess`;
    its re-ordered rows carry order-only ``score`` values, their raw ``itc``/``itm`` unchanged).
    """

    rows: np.ndarray
    itc: np.ndarray
    itm: np.ndarray
    score: np.ndarray
    text_embeds: np.ndarray
    rerank: int
    weight: float | None
    itc_scores: np.ndarray | None = None
    scorer: str = "itc"
    post: str = "none"

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def head(self) -> int:
        """How many listed candidates per query were re-scored with ITM."""
        return min(self.rerank, self.rows.shape[1])

    def itc_only(self, depth: int = 10) -> Ranking:
        """The ranking by first-stage scores alone (no re-ranked head), from ``itc_scores``: one
        encoding scores both the ITC row and the re-ranked row of an ablation or a validation."""
        if self.itc_scores is None:
            raise ValueError("this ranking was made without keep_scores=True: no first-stage score matrix")
        return ranking_from_scores(self.itc_scores, depth=depth, text_embeds=self.text_embeds, scorer=self.scorer)

    def take(self, queries: np.ndarray) -> Ranking:
        """The ranking of a subset of the queries (``queries``: their indices), against the same gallery."""
        queries = np.asarray(queries, dtype=np.int64)
        return replace(self, rows=self.rows[queries], itc=self.itc[queries], itm=self.itm[queries],
                       score=self.score[queries], text_embeds=self.text_embeds[queries],
                       itc_scores=None if self.itc_scores is None else self.itc_scores[queries])

    def score_matrix(self) -> np.ndarray:
        """A [Q,G] float32 matrix whose descending order per row is this ranking (for the metrics).

        The re-ranked head carries its fused values; every other gallery item ``itc - max - 1``
        (it ranks below the head, in ITC order). Without re-ranking it is the ITC matrix itself.
        Every listed row carries its ``score``, so a post-processed order (which may lift a row
        from below the head) is what the matrix sorts to.
        """
        if self.itc_scores is None:
            raise ValueError("this ranking was made without keep_scores=True: no full score matrix")
        if self.head == 0:
            out = self.itc_scores.copy()
        else:
            out = self.itc_scores - self.itc_scores.max(axis=1, keepdims=True) - 1.0
        listed = self.rows >= 0
        q_idx = np.broadcast_to(np.arange(len(self.rows))[:, None], self.rows.shape)
        out[q_idx[listed], self.rows[listed]] = self.score[listed]
        return out


def ranking_from_scores(scores: np.ndarray, *, depth: int = 10, text_embeds: np.ndarray | None = None,
                        scorer: str = "itc") -> Ranking:
    """A :class:`Ranking` of a [Q,G] matrix holding one raw score per pair (no re-ranking).

    For score matrices made elsewhere: a fusion of several systems (``scorer`` names it), an
    external system's ``.npy``, a test. ``text_embeds`` [Q,E] feed SCA's similarity gate (none: [Q,0]).
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a [queries, gallery] matrix, got shape {scores.shape}")
    rows, values = top_k(scores, max(1, depth))
    q = len(scores)
    embeds = np.zeros((q, 0), np.float32) if text_embeds is None else np.asarray(text_embeds, np.float32)
    if len(embeds) != q:
        raise ValueError(f"{len(embeds)} text embeddings for {q} queries")
    return Ranking(rows=rows, itc=values.astype(np.float32), itm=np.full(rows.shape, np.nan, np.float32),
                   score=values.astype(np.float32), text_embeds=embeds, rerank=0, weight=None,
                   itc_scores=scores, scorer=scorer)


# -- the path ------------------------------------------------------------------------------------
def _rerank_head(model, text_tokens, text_mask, image_tokens, rows: np.ndarray, itc: np.ndarray, weight: float,
                 itm_mode: str, batch_size: int | None, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """ITM-score each query's head candidates ``rows`` [q,h] (-1 = none) and fuse with their ``itc``.

    Returns (itm [q,h], fused [q,h]); an empty slot gets NaN ITM and -inf fused.
    """
    q, h = rows.shape
    valid = rows >= 0
    itm = np.full((q, h), np.nan, dtype=np.float32)
    query_rows = np.repeat(np.arange(q), h).reshape(q, h)
    itm[valid] = itm_scores(model, text_tokens, text_mask, image_tokens, query_rows[valid], rows[valid],
                            batch_size=batch_size, mode=itm_mode, progress=progress)
    if valid.all():
        return itm, fuse(itm, itc, weight)
    fused = np.full((q, h), -np.inf, dtype=np.float32)
    for i in range(q):  # ragged rows (the index found fewer than h): fuse each one on its valid part
        v = valid[i]
        if v.any():
            fused[i, v] = fuse(itm[i:i + 1, v], itc[i:i + 1, v], weight)[0]
    return itm, fused


def rank(model, texts: Sequence[str], gallery, *, depth: int = 10, rerank: int = 0, weight: float | None = None,
         itm_mode: str = "logit", exact: bool = True, keep_scores: bool = False, chunk_size: int = 512,
         itm_batch_size: int | None = None, progress: bool = False) -> Ranking:
    """Rank ``gallery`` for every text: ITC candidates, ITM re-rank of the top-``rerank``, fused order.

    ``gallery`` has ``embeds`` [G,E] and, for re-ranking, row-gatherable ``tokens`` [G,T,D]: a
    :class:`~tpas.search.index.GalleryIndex` or in-memory :class:`~tpas.search.encode.EncodedImages`.
    ``exact`` scores every gallery embedding; otherwise candidates come from ``gallery.search``
    (the index's FAISS structure, approximate for IVF/HNSW). ``keep_scores`` keeps the full ITC
    matrix (exact only) for :meth:`Ranking.score_matrix`. ``weight`` None = the model's calibrated
    fusion weight, else upstream's.
    """
    if rerank < 0:
        raise ValueError(f"rerank must be >= 0, got {rerank}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if keep_scores and not exact:
        raise ValueError("keep_scores needs exact=True (the full ITC matrix)")
    texts = list(texts)
    n, g = len(texts), len(gallery.embeds)
    width = min(max(depth, rerank), g)
    weight = resolve_weight(model, weight, rerank or None)
    gallery_embeds = np.ascontiguousarray(gallery.embeds)
    image_tokens = gallery.tokens if rerank > 0 else None
    if rerank > 0 and image_tokens is None:
        raise ValueError("re-ranking needs the gallery's image tokens (encode or index them with tokens)")

    rows = np.full((n, width), -1, dtype=np.int64)
    itc = np.full((n, width), -np.inf, dtype=np.float32)
    itm = np.full((n, width), np.nan, dtype=np.float32)
    score = np.full((n, width), -np.inf, dtype=np.float32)
    text_embeds = np.empty((n, gallery_embeds.shape[1]), dtype=np.float32)
    itc_scores = np.empty((n, g), dtype=np.float32) if keep_scores else None

    from tqdm.auto import tqdm

    for start in tqdm(range(0, n, chunk_size), desc="rank queries", unit="chunk",
                      disable=not progress or n <= chunk_size, leave=False):
        stop = min(n, start + chunk_size)
        enc = encode_texts(model, texts[start:stop], keep_tokens=rerank > 0, progress=False)
        text_embeds[start:stop] = enc.embeds
        if exact:
            scores = enc.embeds @ gallery_embeds.T  # [q,G]
            if itc_scores is not None:
                itc_scores[start:stop] = scores
            c_rows, c_itc = top_k(scores, width)
        else:
            c_itc, c_rows = gallery.search(enc.embeds, width)
        c_itm = np.full(c_rows.shape, np.nan, dtype=np.float32)
        c_score = c_itc.astype(np.float32, copy=True)
        head = min(rerank, width)
        if head > 0:
            h_itm, fused = _rerank_head(model, enc.tokens, enc.mask, image_tokens, c_rows[:, :head],
                                        c_itc[:, :head], weight, itm_mode, itm_batch_size,
                                        progress and n <= chunk_size)
            order = np.argsort(-fused, axis=1, kind="stable")  # ties keep ITC order
            c_rows[:, :head] = np.take_along_axis(c_rows[:, :head], order, axis=1)
            c_itc[:, :head] = np.take_along_axis(c_itc[:, :head], order, axis=1)
            c_itm[:, :head] = np.take_along_axis(h_itm, order, axis=1)
            c_score[:, :head] = np.take_along_axis(fused, order, axis=1)
            if width > head:
                with np.errstate(invalid="ignore"):
                    c_score[:, head:] = c_itc[:, head:] - np.nanmax(c_itc, axis=1, keepdims=True) - 1.0
        rows[start:stop], itc[start:stop], itm[start:stop], score[start:stop] = c_rows, c_itc, c_itm, c_score
    return Ranking(rows=rows, itc=itc, itm=itm, score=score, text_embeds=text_embeds, rerank=rerank,
                   weight=weight if rerank > 0 else None, itc_scores=itc_scores)


def rank_evalset(model, evalset: EvalSet, *, rerank: int = 0, weight: float | None = None,
                 itm_mode: str = "logit", depth: int = 10, index_dir: str | Path | None = None, batch_size: int = 64, workers: int = 0,
                 progress: bool = True) -> Ranking:
    """Rank an evaluation split's gallery for each of its queries, exactly, keeping the full ITC matrix.

    With ``index_dir`` the gallery goes through a persisted index (built, resumed or reused there:
    image tokens live in a memory-mapped fp16 file); without, it is encoded in memory.
    """
    if not evalset.queries or not evalset.gallery:
        raise ValueError(f"{evalset.name}: nothing to rank ({len(evalset.queries)} queries, "
                         f"{len(evalset.gallery)} gallery images)")
    if index_dir is not None:
        from tpas.search.index import index_evalset

        gallery = index_evalset(model, evalset, index_dir, keep_tokens=rerank > 0, batch_size=batch_size,
                                workers=workers, progress=progress)
    else:
        gallery: EncodedImages = encode_images(model, [evalset.image_path(g.image) for g in evalset.gallery],
                                               batch_size=batch_size, workers=workers, keep_tokens=rerank > 0,
                                               progress=progress)
    return rank(model, [q.caption for q in evalset.queries], gallery, depth=depth, rerank=rerank, weight=weight,
                itm_mode=itm_mode, keep_scores=True, progress=progress)
