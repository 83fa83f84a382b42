"""Search: encode galleries and queries, persist an index, rank (ITC, ITM re-rank, fusion), post-process,
fuse several systems.

The one ranking path is :func:`rank` (and :func:`rank_evalset` for an evaluation split); the
:class:`SearchEngine` serves single queries over a persisted index with it.
"""

from tpas.search.calibrate import calibrate_on_evalset, calibrate_sca_threshold, calibrate_weight
from tpas.search.encode import EncodedImages, EncodedTexts, encode_images, encode_texts
from tpas.search.engine import Hit, SearchEngine
from tpas.search.index import GalleryIndex, build_index, gallery_from_folder, open_index
from tpas.search.fusion import fuse_scores
from tpas.search.postprocess import POST_METHODS, postprocess
from tpas.search.ranking import DEFAULT_WEIGHT, Ranking, rank, rank_evalset, ranking_from_scores, top_k

__all__ = [
    "DEFAULT_WEIGHT",
    "POST_METHODS",
    "EncodedImages",
    "EncodedTexts",
    "GalleryIndex",
    "Hit",
    "Ranking",
    "SearchEngine",
    "build_index",
    "calibrate_on_evalset",
    "calibrate_sca_threshold",
    "calibrate_weight",
    "encode_images",
    "encode_texts",
    "fuse_scores",
    "gallery_from_folder",
    "open_index",
    "postprocess",
    "rank",
    "rank_evalset",
    "ranking_from_scores",
    "top_k",
]
