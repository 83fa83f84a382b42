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

from tpas.data.images import ImageCheck
from tpas.data.jsonl import FirstSeen, Problems, Where, collecting, get_captions, get_id, get_str, read_json_list
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


def _entries(root: Path, fmt: str, split: str, problems: Problems | None = None):
    """Yield (where, image path relative to root, person id, captions) for one split; with
    ``problems`` a bad entry is recorded there and skipped."""
    names, path_field, splits = _spec(fmt)
    if split not in splits:
        raise ValueError(f"{fmt} has splits {splits}, got {split!r}")
    path = annotation_file(root, fmt)
    for index, obj in enumerate(read_json_list(path, problems)):
        if obj is None:  # not an object: recorded in problems already
            continue
        with collecting(problems):
            where = Where(path, entry=index)
            entry_split = get_str(obj, "split", where)
            if entry_split != split:
                continue
            image = "imgs/" + get_str(obj, path_field, where).lstrip("/")
            yield where, image, get_id(obj, "id", where), get_captions(obj, "captions", where)


def read_tbps_train(root: str | os.PathLike, fmt: str, on_bad_image: str = "error", check_images: bool = False,
                    split: str = "train", problems: Problems | None = None) -> TrainSet:
    """One ImageText per caption of every ``split`` entry; ``person_id`` is the dataset's person id.

    An image listed by two entries is logged as a warning (``tpas check-data``, which passes
    ``problems``, reports it as a problem).
    """
    root = Path(root)
    images = ImageCheck(root, on_bad_image, "images") if check_images else None
    seen, duplicates = FirstSeen(), Problems(limit=5 if problems is None else problems.limit)
    pairs = []
    for where, image, pid, captions in _entries(root, fmt, split, problems):
        first = seen.duplicate(image, where)
        if first is not None:
            duplicates.add(f"{where}: image '{image}' is listed again (first at {first})")
        if images is not None and not images.ok(image, where):
            continue
        pairs.extend(ImageText(image=image, caption=c, image_id=image, person_id=pid) for c in captions)
    source = annotation_file(root, fmt)
    if images is not None:
        images.finish(source)
    if problems is not None:
        problems.extend(duplicates)
    elif duplicates:
        log.warning("%s: %d images listed twice, e.g. %s", source, duplicates.count, "; ".join(duplicates.messages))
    if not pairs:
        raise DataError(f"no '{split}' entries", source)
    log.info("read %d %s training pairs from %s", len(pairs), fmt, root)
    return TrainSet(name=f"{fmt}:{root.name}", root=root, pairs=pairs)


def read_tbps_eval(root: str | os.PathLike, fmt: str, split: str = "test", on_bad_image: str = "error",
                   check_images: bool = True, problems: Problems | None = None) -> EvalSet:
    """Gallery = every image of ``split`` (id = its path), queries = all their captions.

    Query ids are ``"<image path>#<k>"``; a query's positives are all gallery images of its person.
    """
    root = Path(root)
    images = ImageCheck(root, on_bad_image, "images") if check_images else None
    queries: list[Query] = []
    gallery: list[GalleryImage] = []
    seen: dict[str, int | None] = {}
    for where, image, pid, captions in _entries(root, fmt, split, problems):
        with collecting(problems):
            if image in seen:
                raise where.error(f"duplicate image '{image}' (first seen at entry {seen[image]})")
            seen[image] = where.entry
            if images is not None and not images.ok(image, where):
                continue
            gallery.append(GalleryImage(image=image, image_id=image, target=pid))
            queries.extend(Query(f"{image}#{k}", c, pid) for k, c in enumerate(captions))
    if images is not None:
        images.finish(annotation_file(root, fmt))
    if not gallery:
        raise DataError(f"no '{split}' entries", annotation_file(root, fmt))
    log.info("read %d %s %s queries, %d gallery images", len(queries), fmt, split, len(gallery))
    return EvalSet(name=f"{fmt}-{split}:{root.name}", root=root, queries=queries, gallery=gallery)
