"""One entry point per use: ``load_train`` and ``load_eval`` for every supported format.

Everything downstream (loader, search, evaluation, CLI) calls these two functions with a format
name instead of importing a specific reader, so adding a dataset means adding one line here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tpas.data.images import check_gallery
from tpas.data.jsonl import Problems
from tpas.data.pab import TRACK4_INDEX, attach_challenge_key, read_pab_challenge, read_pab_test, read_pab_train, read_track4
from tpas.data.records import EvalSet, TrainSet
from tpas.data.tbps import TBPS_FORMATS, read_tbps_eval, read_tbps_train

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "EVAL_SPLITS", "challenge_root", "load_train", "load_eval", "track4_root"]

FORMATS = ("pab", "cuhk", "icfg", "rstp")
EVAL_SPLITS = {"pab": ("test", "ucc", "challenge", "track4"), **{fmt: spec[2][1:] for fmt, spec in TBPS_FORMATS.items()}}
ANSWER_KEY = "answer_key.json"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")


def challenge_root(root: str | os.PathLike) -> Path:
    """The folder holding a masked challenge set: ``root`` itself, or ``root/challenge`` when the
    dataset root keeps its masked copy there (mini-PAB does)."""
    root = Path(root)
    if not (root / "query.json").is_file() and (root / "challenge" / "query.json").is_file():
        return root / "challenge"
    return root


def track4_root(root: str | os.PathLike) -> Path:
    """The folder holding an AICity'26 Track 4 masked set: ``root`` itself, or ``root/track4`` when
    the dataset root keeps one there (mini-PAB written with distractors does)."""
    root = Path(root)
    if not (root / TRACK4_INDEX).is_file() and (root / "track4" / TRACK4_INDEX).is_file():
        return root / "track4"
    return root


def load_train(root: str | os.PathLike, fmt: str, on_bad_image: str = "error", check_images: bool = False,
               problems: Problems | None = None) -> TrainSet:
    """Training pairs of a dataset root in format ``fmt`` (pab, cuhk, icfg, rstp).

    ``check_images`` runs the pre-flight image check (:mod:`tpas.data.images`); ``on_bad_image``
    then raises with a list of the bad images or skips-and-reports them. ``problems`` collects
    annotation errors instead of raising at the first (``tpas check-data``).
    """
    _check_format(fmt)
    if fmt == "pab":
        return read_pab_train(root, on_bad_image=on_bad_image, check_images=check_images, problems=problems)
    return read_tbps_train(root, fmt, on_bad_image=on_bad_image, check_images=check_images, problems=problems)


def load_eval(root: str | os.PathLike, fmt: str, split: str = "test", on_bad_image: str = "error",
              check_images: bool = True, problems: Problems | None = None) -> EvalSet:
    """Queries + gallery of one evaluation split.

    PAB splits: ``test`` (annotation/test/attr.json or pair.json), ``ucc`` (ucc.json),
    ``challenge`` (WWW'25 masked set: ``root`` or ``root/challenge`` holds query.json and gallery/)
    and ``track4`` (AICity'26 Track 4 masked set: ``root`` or ``root/track4`` holds query_index.txt,
    query_text.json and gallery/); for both, ``answer_key.json`` beside them, when present, fills
    the targets. TBPS splits: ``test`` and, for cuhk/rstp, ``val``.
    """
    _check_format(fmt)
    if split not in EVAL_SPLITS[fmt]:
        raise ValueError(f"{fmt} evaluation splits are {', '.join(EVAL_SPLITS[fmt])}; got {split!r}")
    if fmt != "pab":
        return read_tbps_eval(root, fmt, split, on_bad_image=on_bad_image, check_images=check_images,
                              problems=problems)
    if split not in ("challenge", "track4"):
        return read_pab_test(root, split, on_bad_image=on_bad_image, check_images=check_images, problems=problems)
    if split == "challenge":
        root = challenge_root(root)
        evalset = read_pab_challenge(root, problems)
    else:
        root = track4_root(root)
        evalset = read_track4(root)
    key = root / ANSWER_KEY
    if key.is_file():
        log.info("attaching ground truth from %s", key)
        evalset = attach_challenge_key(evalset, key)
    if check_images:
        evalset = _checked_gallery(evalset, on_bad_image)
    return evalset


def _checked_gallery(evalset: EvalSet, on_bad_image: str) -> EvalSet:
    """``evalset`` without the gallery images that fail the pre-flight check (and without queries
    whose answer was one of them)."""
    gallery = check_gallery(evalset.root, evalset.gallery, on_bad_image, evalset.root / "gallery")
    if len(gallery) == len(evalset.gallery):
        return evalset
    targets = {g.target for g in gallery}
    queries = [q for q in evalset.queries if q.target is None or q.target in targets]
    return EvalSet(name=evalset.name, root=evalset.root, queries=queries, gallery=gallery)
