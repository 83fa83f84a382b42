"""Pick the re-rank fusion weight of a model on a validation split (never the test set).

The upstream fusion ``minmax(ITM) + 0.002 * minmax(ITC)`` lets ITM decide the order of the ITC
top-k. That is right for a fusion encoder trained as long as X-VLM's; after a short schedule
(lite on a CPU) the ITM head can be weaker than ITC and re-ranking would undo good ITC rankings.
Training therefore scores the validation queries' top-k once with ITM, tries a grid of weights
(:data:`tpas.search.rerank.WEIGHT_GRID`) and stores the best in ``model.config.rerank_weight``,
which :func:`tpas.search.rerank.resolve_weight` then uses wherever no weight is given.
"""

from __future__ import annotations

import logging

import numpy as np

from tpas.data.records import EvalSet
from tpas.search.encode import encode_images, encode_texts
from tpas.search.rerank import WEIGHT_GRID, calibrate_weight, itm_scores, top_k

log = logging.getLogger(__name__)


def calibrate_on_evalset(model, evalset: EvalSet, k: int = 16, grid=WEIGHT_GRID, batch_size: int = 64,
                         progress: bool = False) -> tuple[float, dict[float, float]]:
    """Best fusion weight for ``model`` on ``evalset`` (R@1 of the re-ranked top-``k``) and the R@1 per weight."""
    if not evalset.has_ground_truth or not evalset.queries:
        raise ValueError(f"{evalset.name}: calibration needs queries with ground truth")
    images = encode_images(model, [evalset.image_path(g.image) for g in evalset.gallery], batch_size=batch_size,
                           keep_tokens=True, progress=progress)
    texts = encode_texts(model, [q.caption for q in evalset.queries], batch_size=batch_size, keep_tokens=True,
                         progress=progress)
    cols, itc = top_k(texts.embeds @ images.embeds.T, k)
    rows = np.repeat(np.arange(len(cols)), cols.shape[1])
    itm = itm_scores(model, texts.tokens, texts.mask, images.tokens, rows, cols.reshape(-1),
                     progress=progress).reshape(cols.shape)
    gallery_targets = np.array([g.target for g in evalset.gallery], dtype=object)
    query_targets = np.array(evalset.query_targets(), dtype=object)
    positives = gallery_targets[cols] == query_targets[:, None]
    weight, table = calibrate_weight(itm, itc, positives, grid)
    log.info("re-rank fusion weight %g (top-%d R@1 per weight: %s)", weight, k,
             ", ".join(f"{w:g}: {r:.1f}" for w, r in table.items()))
    return weight, table
