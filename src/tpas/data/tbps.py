"""Readers for the text-based person search (TBPS) benchmarks: CUHK-PEDES, ICFG-PEDES, RSTPReid.

Each dataset root holds one JSON list and an ``imgs/`` folder (the layout IRRA and its successors
use)::

    CUHK-PEDES/reid_raw.json     {"split": "train"|"val"|"test", "captions": [...], "file_path": ..., "id": int}
    ICFG-PEDES/ICFG-PEDES.json   same keys, splits train/test
    RSTPReid/data_captions.json  {"split": ..., "captions": [...], "img_path": ..., "id": int}

``file_path``/``img_path`` are relative to ``imgs/``; records keep ``imgs/<path>`` relative to the
root. The person ``id`` is the retrieval target (several gallery images per query are positives).
CUHK ids are 1-based and the others 0-based in the files; tpas keeps the number as written (a
string), which changes no matching.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tpas.data.jsonl import Where, get_captions, get_id, get_str, read_json_list
from tpas.data.missing import MissingImages
from tpas.data.records import EvalSet, GalleryImage, ImageText, Query, TrainSet
from tpas.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["TBPS_FORMATS", "annotation_file", "read_tbps_train", "read_tbps_eval"]

# format -> (annotation file names accepted, image path field, splits present)
TBPS_FORMATS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "cuhk": (("reid_raw.json",), "file_path", ("train", "val", "test")),
    "icfg": (("ICFG-PEDES.json", "ICFG_PEDES.json"), "file_path", ("train", "test")),
    "rstp": (("data_captions.json",), "img_path", ("train", "val", "test")),
}


def _spec(fmt: str):
    if fmt not in TBPS_FORMATS:
        raise ValueError(f"TBPS format must be one of {tuple(TBPS_FORMATS)}, got {fmt!r}")
    return TBPS_FORMATS[fmt]


def annotation_file(root: str | os.PathLike, fmt: str) -> Path:
    names = _spec(fmt)[0]
    for name in names:
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise DataError(f"no {' or '.join(names)} (is this a {fmt} dataset root?)", root)


def _entries(root: Path, fmt: str, split: str):
    """Yield (where, image path relative to root, person id, captions) for one split."""
    names, path_field, splits = _spec(fmt)
    if split not in splits:
        raise ValueError(f"{fmt} has splits {splits}, got {split!r}")
    path = annotation_file(root, fmt)
    for index, obj in enumerate(read_json_list(path)):
        where = Where(path, entry=index)
        entry_split = get_str(obj, "split", where)
        if entry_split != split:
            continue
        image = "imgs/" + get_str(obj, path_field, where).lstrip("/")
        yield where, image, get_id(obj, "id", where), get_captions(obj, "captions", where)


def read_tbps_train(root: str | os.PathLike, fmt: str, on_missing: str = "error", check_images: bool = False,
                    split: str = "train") -> TrainSet:
    """One ImageText per caption of every ``split`` entry; ``person_id`` is the dataset's person id."""
    root = Path(root)
    missing = MissingImages(root, on_missing, "images") if check_images else None
    pairs = []
    for where, image, pid, captions in _entries(root, fmt, split):
        if missing is not None and not missing.ok(image, where):
            continue
        pairs.extend(ImageText(image=image, caption=c, image_id=image, person_id=pid) for c in captions)
    if missing is not None:
        missing.log_summary(annotation_file(root, fmt))
    if not pairs:
        raise DataError(f"no '{split}' entries", annotation_file(root, fmt))
    log.info("read %d %s training pairs from %s", len(pairs), fmt, root)
    return TrainSet(name=f"{fmt}:{root.name}", root=root, pairs=pairs)


def read_tbps_eval(root: str | os.PathLike, fmt: str, split: str = "test", on_missing: str = "error",
                   check_images: bool = True) -> EvalSet:
    """Gallery = every image of ``split`` (id = its path), queries = all their captions.

    Query ids are ``"<image path>#<k>"``; a query's positives are all gallery images of its person.
    """
    root = Path(root)
    missing = MissingImages(root, on_missing, "images") if check_images else None
    queries: list[Query] = []
    gallery: list[GalleryImage] = []
    seen: dict[str, int | None] = {}
    for where, image, pid, captions in _entries(root, fmt, split):
        if image in seen:
            raise where.error(f"duplicate image '{image}' (first seen at entry {seen[image]})")
        seen[image] = where.entry
        if missing is not None and not missing.ok(image, where):
            continue
        gallery.append(GalleryImage(image=image, image_id=image, target=pid))
        queries.extend(Query(f"{image}#{k}", c, pid) for k, c in enumerate(captions))
    if missing is not None:
        missing.log_summary(annotation_file(root, fmt))
    if not gallery:
        raise DataError(f"no '{split}' entries", annotation_file(root, fmt))
    log.info("read %d %s %s queries, %d gallery images", len(queries), fmt, split, len(gallery))
    return EvalSet(name=f"{fmt}-{split}:{root.name}", root=root, queries=queries, gallery=gallery)
