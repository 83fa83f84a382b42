"""Text -> images over a persisted index: the one search function the CLI and the web server share.

``SearchEngine.search`` encodes the text, takes the FAISS top candidates by ITC and, when asked,
re-ranks the first ``rerank`` of them with ITM (:mod:`tpas.search.rerank`). Query-set
post-processing (SCA and relatives) is deliberately absent here: a single query has no other
queries to be compared with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpas.search.encode import encode_texts
from tpas.search.index import GalleryIndex, open_index
from tpas.search.rerank import rerank_candidates, resolve_weight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One result. ``score`` orders the list: the fused score for re-ranked hits, else ITC.

    Hits below the re-ranked head carry ``itc - max(itc) - 1`` as ``score`` (they rank below every
    re-ranked hit, in ITC order) and ``itm_score=None``.
    """

    rank: int
    image_id: str
    score: float
    itc_score: float
    itm_score: float | None
    path: Path


class SearchEngine:
    """Search one gallery index with the model it was built with."""

    def __init__(self, index: str | Path | GalleryIndex, model, *, itm_mode: str = "logit",
                 weight: float | None = None, batch_size: int | None = None, root: str | Path | None = None):
        self.model = model
        self.index = index if isinstance(index, GalleryIndex) else open_index(index, model, root=root)
        self.itm_mode, self.weight, self.batch_size = itm_mode, resolve_weight(model, weight), batch_size

    def __len__(self) -> int:
        return len(self.index)

    def image_path(self, image_id: str) -> Path:
        """File of a gallery image by id; KeyError for ids the index does not hold."""
        return self.index.image_path(image_id)

    def search(self, text: str, k: int = 10, rerank: int = 0) -> list[Hit]:
        """Top-``k`` images for ``text``; ``rerank`` > 0 re-scores the ITC top-``rerank`` with ITM."""
        return self.search_batch([text], k=k, rerank=rerank)[0]

    def search_batch(self, texts: Sequence[str], k: int = 10, rerank: int = 0) -> list[list[Hit]]:
        """:meth:`search` for several texts; their ITM pairs share batches."""
        texts = list(texts)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if rerank < 0:
            raise ValueError(f"rerank must be >= 0, got {rerank}")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise ValueError("empty query text")
        if not texts:
            return []
        enc = encode_texts(self.model, texts, keep_tokens=rerank > 0, progress=False)
        itc, rows = self.index.search(enc.embeds, max(k, rerank))
        head = min(rerank, rows.shape[1])
        itm = np.full(rows.shape, np.nan, dtype=np.float32)
        final = itc.copy()
        if head > 0:
            itm_head, fused = rerank_candidates(self.model, enc.tokens, enc.mask, self.index.tokens,
                                                rows[:, :head], itc[:, :head], weight=self.weight,
                                                mode=self.itm_mode, batch_size=self.batch_size)
            order = np.argsort(-fused, axis=1, kind="stable")
            take = lambda a: np.take_along_axis(a[:, :head], order, axis=1)  # noqa: E731
            rows[:, :head], itc[:, :head], itm[:, :head] = take(rows), take(itc), take(itm_head)
            final[:, :head] = np.take_along_axis(fused, order, axis=1)
            if rows.shape[1] > head:
                final[:, head:] = itc[:, head:] - np.nanmax(itc, axis=1, keepdims=True) - 1.0
        return [self._hits(rows[i], final[i], itc[i], itm[i], k) for i in range(len(texts))]

    def _hits(self, rows, final, itc, itm, k) -> list[Hit]:
        hits = []
        for row, score, s_itc, s_itm in zip(rows, final, itc, itm):
            if row < 0 or not np.isfinite(score):
                continue  # FAISS found fewer candidates than asked for
            item = self.index.items[int(row)]
            hits.append(Hit(rank=len(hits) + 1, image_id=item.image_id, score=float(score), itc_score=float(s_itc),
                            itm_score=None if np.isnan(s_itm) else float(s_itm), path=self.index.root / item.image))
            if len(hits) == k:
                break
        return hits
