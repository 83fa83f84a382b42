"""Readers for PAB (Pedestrian Anomaly Behaviour) and everything shaped like it (mini-PAB).

Layout under the dataset root (DESIGN section 3)::

    annotation/train/pair_{0..74}.json | attr_{0..74}.json   JSON Lines, one training pair a line
    annotation/test/attr.json | pair.json                    JSON Lines, one gallery image a line
    annotation/test/ucc.json                                 same shape (UCC split)
    train/imgs_*/...  test/...                               images, paths as written in the files

    <challenge dir>/query.json                               JSON Lines: query_index, caption
    <challenge dir>/gallery/<ID>.jpg                         gallery images, ID = file stem
    <challenge dir>/answer_key.json                          optional ground truth (see below)

    <track4 dir>/query_index.txt                             AICity'26 Track 4: one query name a line
    <track4 dir>/query_text.json                             one JSON object {query name: caption}
    <track4 dir>/gallery/<NAME>.jpg                          gallery images (with distractors)
    <track4 dir>/answer_key.json                             optional ground truth (see below)

Training pairs map to :class:`ImageText` with ``person_id = image_id``: PAB's normal and anomalous
image of one person are different retrieval targets, so they must not count as positives of each
other. Test lines carry a list of captions; each caption is one :class:`Query` whose target is the
line's ``image_id``.

Answer key contract (written by mini-PAB for its masked sets, read here): JSON Lines next to the
queries, one line per query, ``{"query_index": int, "image_id": "<gallery ID>", "behaviour":
"normal"|"anomaly"}`` (WWW'25 form; a Track 4 key names the query with ``"query_id": "<name>"``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from tpas.data.jsonl import (
    FirstSeen,
    Problems,
    Where,
    collecting,
    get_caption,
    get_captions,
    get_id,
    get_str,
    iter_jsonl,
    optional_id,
    optional_str,
)
from tpas.data.images import ImageCheck
from tpas.data.records import Behaviour, EvalSet, GalleryImage, ImageText, Query, TrainSet
from tpas.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "train_files",
    "read_pab_train",
    "read_pab_test",
    "read_pab_challenge",
    "read_track4",
    "read_query_names",
    "read_challenge_key",
    "attach_challenge_key",
    "challenge_gallery",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TRACK4_INDEX = "query_index.txt"  # AICity'26 Track 4: the query order of the answer file
TRACK4_TEXT = "query_text.json"
TRAIN_KINDS = ("pair", "attr", "auto")
TEST_FILES = {"test": ("attr.json", "pair.json"), "ucc": ("ucc.json",)}


def _behaviour(obj: dict, where: Where) -> tuple[Behaviour, str | None]:
    """PAB marks behaviour with a key: ``"normal": <action>`` or ``"anomaly": <action>``."""
    normal, anomaly = obj.get("normal"), obj.get("anomaly")
    if normal is not None and anomaly is not None:
        raise where.error("has both 'normal' and 'anomaly' fields; a record is one or the other")
    if normal is not None:
        return Behaviour.NORMAL, get_str(obj, "normal", where)
    if anomaly is not None:
        return Behaviour.ANOMALY, get_str(obj, "anomaly", where)
    return Behaviour.UNKNOWN, None


def train_files(root: str | os.PathLike, files: str = "auto") -> list[Path]:
    """The training annotation files, in numeric order (``pair_2`` before ``pair_10``).

    ``files="auto"`` prefers ``attr_*.json`` (they add behaviour and scene labels) and falls back to
    ``pair_*.json``.
    """
    if files not in TRAIN_KINDS:
        raise ValueError(f"files must be one of {TRAIN_KINDS}, got {files!r}")
    folder = Path(root) / "annotation" / "train"
    if not folder.is_dir():
        raise DataError("no annotation/train folder (is this a PAB dataset root?)", folder)
    kinds = ("attr", "pair") if files == "auto" else (files,)
    for kind in kinds:
        pattern = re.compile(rf"{kind}_(\d+)\.json")
        found = []
        for path in folder.iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
        if found:
            return [path for _, path in sorted(found)]
    wanted = " or ".join(f"{kind}_<n>.json" for kind in kinds)
    raise DataError(f"no training files named {wanted}", folder)


_TRAIN_FIELDS = ("image", "caption", "image_id", "normal", "anomaly", "scene", "hard_i", "hard_c", "hard_i_id",
                 "source_id", "source_caption")
_STR_OR_NONE = {str, type(None)}


def _train_fields(obj: dict, path: Path, line_no: int) -> tuple:
    """The validated field values of one training line, in ``_TRAIN_FIELDS`` order.

    The common case (every field a well-formed string) is checked with a few C-level operations;
    anything else goes through the per-field getters, which convert integer ids and raise a
    DataError naming the line and field.
    """
    values = list(map(obj.get, _TRAIN_FIELDS))
    image, caption, image_id, normal, anomaly, _, _, _, hard_id, source_id, _ = values
    if (
        set(map(type, values)) <= _STR_OR_NONE
        and image is not None
        and caption is not None and not caption.isspace() and caption
        and image_id is not None and image_id.strip()
        and (normal is None or anomaly is None)
        and (hard_id is None or hard_id.strip())
        and (source_id is None or source_id.strip())
    ):
        return tuple(values)
    where = Where(path, line_no)
    behaviour, action = _behaviour(obj, where)
    return (
        get_str(obj, "image", where),
        get_caption(obj, "caption", where),
        get_id(obj, "image_id", where),
        action if behaviour is Behaviour.NORMAL else None,
        action if behaviour is Behaviour.ANOMALY else None,
        optional_str(obj, "scene", where),
        optional_str(obj, "hard_i", where),
        optional_str(obj, "hard_c", where),
        optional_id(obj, "hard_i_id", where),
        optional_id(obj, "source_id", where),
        optional_str(obj, "source_caption", where),
    )


def _read_train_file(path: Path, images: ImageCheck | None, problems: Problems | None,
                     seen: FirstSeen, duplicates: Problems) -> Iterable[ImageText]:
    # Per-file string sharing: a line's hard caption/image/id is usually its partner's caption/
    # image/id in the same file and the source caption is shared by both, so one copy is kept.
    shared: dict[str, str] = {}
    share = shared.setdefault
    normal_, anomaly_, unknown_ = Behaviour.NORMAL, Behaviour.ANOMALY, Behaviour.UNKNOWN
    for line_no, obj in iter_jsonl(path, problems):
        with collecting(problems):
            (image, caption, image_id, normal, anomaly, scene, hard_i, hard_c, hard_id, source_id,
             source_caption) = _train_fields(obj, path, line_no)
            hard_image = None if hard_i is None else share("train/" + hard_i, "train/" + hard_i)
            where = Where(path, line_no)
            first = seen.duplicate(image_id, where)
            if first is not None:
                duplicates.add(f"{where}: duplicate image_id '{image_id}' (first seen at {first})")
            if images is not None:
                if not (images.ok(image, where) and (hard_image is None or images.ok(hard_image, where))):
                    continue
            action = normal if normal is not None else anomaly
            image_id = share(image_id, image_id)
            yield ImageText(
                share(image, image),
                share(caption, caption),
                image_id,
                image_id,
                normal_ if normal is not None else anomaly_ if anomaly is not None else unknown_,
                None if action is None else share(action, action),
                None if scene is None else share(scene, scene),
                hard_image,
                None if hard_c is None else share(hard_c, hard_c),
                None if hard_id is None else share(hard_id, hard_id),
                source_id,
                None if source_caption is None else share(source_caption, source_caption),
            )


def read_pab_train(
    root: str | os.PathLike,
    files: str = "auto",
    on_bad_image: str = "error",
    check_images: bool = False,
    progress: bool = True,
    problems: Problems | None = None,
) -> TrainSet:
    """Read every ``annotation/train/{attr,pair}_<n>.json`` under ``root`` into one TrainSet.

    Images are only looked at when ``check_images`` is set (the pre-flight check of
    :mod:`tpas.data.images`); then ``on_bad_image`` decides whether pairs whose image or hard image
    is missing or unreadable stop the read with a list of them ("error") or are dropped and
    reported ("skip"). An ``image_id`` seen twice is logged as a warning (a duplicate does not stop
    training; ``tpas check-data`` reports it as a problem). With ``problems`` (check-data) a bad line
    is recorded there, with the duplicates, and reading goes on.
    """
    root = Path(root)
    paths = train_files(root, files)
    images = ImageCheck(root, on_bad_image, "pairs") if check_images else None
    seen, duplicates = FirstSeen(), Problems(limit=5 if problems is None else problems.limit)
    pairs: list[ImageText] = []
    bar = None
    if progress and len(paths) > 1:
        from tqdm import tqdm

        bar = tqdm(paths, desc="read PAB train", unit="file", leave=False)
    for path in bar if bar is not None else paths:
        pairs.extend(_read_train_file(path, images, problems, seen, duplicates))
    if images is not None:
        images.finish(root / "annotation" / "train")
    if problems is not None:
        problems.extend(duplicates)
    elif duplicates:
        log.warning("%s: %d duplicate image_id lines, e.g. %s", root / "annotation" / "train", duplicates.count,
                    "; ".join(duplicates.messages))
    log.info("read %d training pairs from %d files under %s", len(pairs), len(paths), root)
    return TrainSet(name=f"pab:{root.name}", root=root, pairs=pairs)


def _test_file(root: Path, split: str) -> Path:
    if split not in TEST_FILES:
        raise ValueError(f"PAB split must be one of {tuple(TEST_FILES)} (or 'challenge'), got {split!r}")
    folder = root / "annotation" / "test"
    for name in TEST_FILES[split]:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"no {' or '.join(TEST_FILES[split])} for split '{split}'", folder)


def read_pab_test(
    root: str | os.PathLike,
    split: str = "test",
    on_bad_image: str = "error",
    check_images: bool = True,
    problems: Problems | None = None,
) -> EvalSet:
    """Read ``annotation/test/attr.json`` (or ``pair.json``; ``ucc.json`` for split="ucc").

    Each line is one gallery image; each of its captions becomes a query whose target is the line's
    ``image_id`` (query ids ``"<image_id>#<k>"``). A duplicate ``image_id`` is an error: it would
    make the ground truth ambiguous. With ``on_bad_image="skip"`` a line whose image is missing or
    unreadable is dropped together with its queries (they would have no positive left). With
    ``problems`` (check-data) a bad line is recorded there and reading goes on.
    """
    root = Path(root)
    path = _test_file(root, split)
    images = ImageCheck(root, on_bad_image, "gallery images") if check_images else None
    queries: list[Query] = []
    gallery: list[GalleryImage] = []
    first_line: dict[str, int] = {}
    for line_no, obj in iter_jsonl(path, problems):
        with collecting(problems):
            where = Where(path, line_no)
            image = get_str(obj, "image", where)
            image_id = get_id(obj, "image_id", where)
            captions = get_captions(obj, "caption", where)
            behaviour, action = _behaviour(obj, where)
            scene = optional_str(obj, "scene", where)
            if image_id in first_line:
                raise where.error(f"duplicate image_id '{image_id}' (first seen on line {first_line[image_id]})")
            first_line[image_id] = line_no
            if images is not None and not images.ok(image, where):
                continue
            gallery.append(GalleryImage(image, image_id, image_id, behaviour, action, scene))
            for k, caption in enumerate(captions):
                queries.append(Query(f"{image_id}#{k}", caption, image_id, behaviour, action))
    if images is not None:
        images.finish(path)
    if not gallery:
        raise DataError("no gallery images (file is empty or every image was skipped)", path)
    log.info("read %d queries, %d gallery images from %s", len(queries), len(gallery), path)
    return EvalSet(name=f"pab-{split}:{root.name}", root=root, queries=queries, gallery=gallery)


def _stem_key(stem: str) -> tuple[int, int, str]:
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def challenge_gallery(gallery_dir: str | os.PathLike) -> dict[str, str]:
    """Map gallery ID (file stem) -> file name, in ID order (numeric IDs numerically).

    Two files with the same stem (``7.jpg`` and ``7.png``) are an error: the ID would be ambiguous.
    """
    gallery_dir = Path(gallery_dir)
    if not gallery_dir.is_dir():
        raise DataError("gallery folder not found", gallery_dir)
    names: dict[str, str] = {}
    for entry in os.scandir(gallery_dir):
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() not in IMAGE_EXTENSIONS or not entry.is_file():
            continue
        if stem in names:
            raise DataError(f"duplicate gallery id '{stem}': {names[stem]} and {entry.name}", gallery_dir)
        names[stem] = entry.name
    if not names:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the gallery folder", gallery_dir)
    return {stem: names[stem] for stem in sorted(names, key=_stem_key)}


def _query_index(obj: dict, where: Where) -> int:
    value = get_id(obj, "query_index", where)
    try:
        return int(value)
    except ValueError:
        raise where.error(f"field 'query_index' must be an integer, got {value!r}") from None


def read_pab_challenge(root: str | os.PathLike, problems: Problems | None = None) -> EvalSet:
    """Read a masked challenge set: ``query.json`` + ``gallery/<ID>.jpg`` under ``root``.

    Targets are None (the ground truth is hidden); queries keep ``query.json`` order, which is the
    order ``answer.txt`` must follow. Query ids are the ``query_index`` values as strings. With
    ``problems`` (check-data) a bad line is recorded there and reading goes on.
    """
    root = Path(root)
    path = root / "query.json"
    queries: list[Query] = []
    first_line: dict[int, int] = {}
    for line_no, obj in iter_jsonl(path, problems):
        with collecting(problems):
            where = Where(path, line_no)
            index = _query_index(obj, where)
            caption = get_caption(obj, "caption", where)
            if index in first_line:
                raise where.error(f"duplicate query_index {index} (first seen on line {first_line[index]})")
            first_line[index] = line_no
            queries.append(Query(str(index), caption, None))
    if not queries:
        raise DataError("no queries", path)
    gallery = [
        GalleryImage(f"gallery/{name}", stem, None) for stem, name in challenge_gallery(root / "gallery").items()
    ]
    log.info("read %d challenge queries, %d gallery images from %s", len(queries), len(gallery), root)
    return EvalSet(name=f"pab-challenge:{root.name}", root=root, queries=queries, gallery=gallery)


def read_query_names(path: str | os.PathLike) -> list[str]:
    """Track 4's ``query_index.txt``: one query name a line, in answer-file order.

    A blank line, a name with whitespace in it, or a repeated name is an error naming the line.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except UnicodeDecodeError:
        raise DataError("not valid UTF-8", path) from None
    names: list[str] = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        name = line.rstrip("\r")
        if not name or any(ch.isspace() for ch in name):
            raise DataError("expected one query name (no spaces) on every line", path, line_no)
        if name in first_line:
            raise DataError(f"duplicate query name '{name}' (first seen on line {first_line[name]})", path, line_no)
        first_line[name] = line_no
        names.append(name)
    if not names:
        raise DataError("no query names", path)
    return names


def _read_query_texts(path: Path) -> dict[str, str]:
    """Track 4's ``query_text.json``: one JSON object mapping query names to captions."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except UnicodeDecodeError:
        raise DataError("not valid UTF-8", path) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc.msg} (column {exc.colno})", path, exc.lineno) from None
    if not isinstance(data, dict):
        raise DataError(f"expected one JSON object {{query name: caption}}, got a {type(data).__name__}", path)
    for name, caption in data.items():
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"query '{name}': the caption must be a non-empty string", path)
    return data


def read_track4(root: str | os.PathLike) -> EvalSet:
    """Read an AICity'26 Track 4 masked test set: ``query_index.txt``, ``query_text.json`` and
    ``gallery/<NAME>.<ext>`` under ``root``.

    Queries keep ``query_index.txt`` order (the order the answer file must follow); their ids are
    the query names; targets are None (the ground truth is hidden). Gallery ids are file stems.
    """
    root = Path(root)
    names = read_query_names(root / TRACK4_INDEX)
    texts = _read_query_texts(root / TRACK4_TEXT)
    missing = [n for n in names if n not in texts]
    if missing:
        raise DataError(f"{len(missing)} query names of {TRACK4_INDEX} have no caption, e.g. '{missing[0]}'",
                        root / TRACK4_TEXT)
    queries = [Query(name, texts[name], None) for name in names]
    gallery = [
        GalleryImage(f"gallery/{name}", stem, None) for stem, name in challenge_gallery(root / "gallery").items()
    ]
    log.info("read %d Track 4 queries, %d gallery images from %s", len(queries), len(gallery), root)
    return EvalSet(name=f"pab-track4:{root.name}", root=root, queries=queries, gallery=gallery)


def _key_query(obj: dict, where: Where) -> int | str:
    """The query a key line answers: ``query_index`` (WWW'25, an integer) or ``query_id`` (Track 4, a name)."""
    if "query_id" in obj:
        return get_id(obj, "query_id", where)
    return _query_index(obj, where)


def _read_key(path: str | os.PathLike) -> dict[int | str, tuple[str, Behaviour]]:
    key: dict[int | str, tuple[str, Behaviour]] = {}
    first_line: dict[int | str, int] = {}
    for line_no, obj in iter_jsonl(path):
        where = Where(path, line_no)
        index = _key_query(obj, where)
        image_id = get_id(obj, "image_id", where)
        label = optional_str(obj, "behaviour", where) or Behaviour.UNKNOWN.value
        try:
            behaviour = Behaviour(label)
        except ValueError:
            raise where.error(f"field 'behaviour' must be 'normal' or 'anomaly', got {label!r}") from None
        if index in first_line:
            raise where.error(f"duplicate query {index!r} (first seen on line {first_line[index]})")
        first_line[index] = line_no
        key[index] = (image_id, behaviour)
    return key


def read_challenge_key(path: str | os.PathLike) -> dict[int | str, str]:
    """``answer_key.json`` -> {query_index (WWW'25) or query name (Track 4): gallery image ID}."""
    return {index: image_id for index, (image_id, _) in _read_key(path).items()}


def attach_challenge_key(evalset: EvalSet, key_path: str | os.PathLike) -> EvalSet:
    """Return a copy of a masked EvalSet (WWW'25 challenge or Track 4) with targets (and behaviour
    labels) from the key.

    Every gallery image becomes its own target (one positive per query, like PAB test); every query
    must be in the key and point at an existing gallery ID.
    """
    key = {str(index): answer for index, answer in _read_key(key_path).items()}
    gallery_ids = {g.image_id for g in evalset.gallery}
    www25 = evalset.name.startswith("pab-challenge")
    label, source = ("query_index", "query.json") if www25 else ("query", TRACK4_INDEX)
    queries = []
    for q in evalset.queries:
        if q.query_id not in key:
            raise DataError(f"{label} {q.query_id} of {source} has no answer", key_path)
        image_id, behaviour = key[q.query_id]
        if image_id not in gallery_ids:
            raise DataError(f"{label} {q.query_id}: image_id '{image_id}' is not in the gallery", key_path)
        queries.append(Query(q.query_id, q.caption, image_id, behaviour, q.action))
    extra = set(key) - {q.query_id for q in evalset.queries}
    if extra:
        log.warning("%s: %d answers for query indices not in query.json (ignored), e.g. %s",
                    key_path, len(extra), sorted(extra)[:5])
    gallery = [GalleryImage(g.image, g.image_id, g.image_id, g.behaviour, g.action, g.scene) for g in evalset.gallery]
    return EvalSet(name=evalset.name, root=evalset.root, queries=queries, gallery=gallery)
