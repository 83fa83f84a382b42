"""Text -> images over a persisted index: the search function the CLI and the web server share.

``SearchEngine.search`` ranks the index for a text through :func:`tpas.search.ranking.rank`
(FAISS candidates by ITC, optional ITM re-rank of the first ``rerank``) and turns the ranking
into :class:`Hit` records. Query-set post-processing (SCA and relatives) is deliberately absent
here: a single query has no other queries to be compared with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpas.search.index import GalleryIndex, open_index
from tpas.search.ranking import Ranking, rank

log = logging.getLogger(__name__)

__all__ = ["Hit", "SearchEngine"]


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
        self.itm_mode, self.batch_size = itm_mode, batch_size
        self.weight = weight  # None: the model's validated weight (resolved per re-rank depth by rank())

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
        ranking = rank(self.model, texts, self.index, depth=k, rerank=rerank, weight=self.weight,
                       itm_mode=self.itm_mode, exact=False, itm_batch_size=self.batch_size)
        return [self._hits(ranking, i, k) for i in range(len(texts))]

    def _hits(self, ranking: Ranking, query: int, k: int) -> list[Hit]:
        hits: list[Hit] = []
        for row, score, itc, itm in zip(ranking.rows[query], ranking.score[query], ranking.itc[query],
                                        ranking.itm[query]):
            if row < 0 or not np.isfinite(score):
                continue  # FAISS found fewer candidates than asked for
            item = self.index.items[int(row)]
            hits.append(Hit(rank=len(hits) + 1, image_id=item.image_id, score=float(score), itc_score=float(itc),
                            itm_score=None if np.isnan(itm) else float(itm), path=self.index.root / item.image))
            if len(hits) == k:
                break
        return hits
