"""Choosing the training pairs: model-free strategies, the id list, and the PAB-format subset folder.

The PAB seed's best result came from fine-tuning on a *selected* ~1% of PAB's pairs. This module
holds what selection needs below the model stage: identity groups as the unit of selection (a
person's normal and anomalous pairs always travel together, so the opposite-behaviour hard
negative stays available), the budget, the ``random`` and ``balanced`` strategies, and the files
a selection is kept in. The strategies that need a model (``diverse``, ``hard``) live in
:mod:`tpas.search.coreset`, one stage up, because they need encoding and FAISS.

A selection on disk (written by ``tpas select``)::

    OUT/ids.txt                   the selected pairs' image_ids, one a line (``data.select`` reads it)
    OUT/selection.json            strategy, budget, counts, settings, timings (written last: complete)
    OUT/annotation/train/*.json   PAB format: the selected lines of the source files, verbatim
    OUT/annotation/test -> ROOT/annotation/test,  OUT/train -> ROOT/train   (symlinks)

so ``OUT`` is itself a PAB dataset root as well as an id list for the original root.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tpas.data.jsonl import Where, get_id
from tpas.data.loader import identity_groups
from tpas.data.pab import train_files
from tpas.data.records import ImageText
from tpas.errors import DataError, TpasError
from tpas.utils.io import atomic_open, write_json

log = logging.getLogger(__name__)

__all__ = ["IDS_FILE", "MODEL_FREE", "SELECTION_FILE", "STRATEGIES", "GroupIndex", "Selection", "apply_selection",
           "budget_pairs", "read_ids", "select_balanced", "select_random", "select_training_pairs",
           "selection_stats", "write_pab_subset", "write_selection"]

STRATEGIES = ("random", "balanced", "diverse", "hard")
MODEL_FREE = ("random", "balanced")  # the ones data.select can apply at load time
IDS_FILE = "ids.txt"
SELECTION_FILE = "selection.json"
_SPEC = re.compile(r"(?P<strategy>[a-z]+):(?P<size>[0-9.eE+-]+)")


# -- the unit of selection -----------------------------------------------------------------------
@dataclass
class GroupIndex:
    """Identity groups of a pair list as flat arrays: pairs ``rows[offsets[g]:offsets[g+1]]`` form
    group ``g`` (first-seen order), ``group_of[i]`` is the group of pair ``i``.

    Arrays rather than lists of lists because the model-based strategies work on a million pairs.
    """

    rows: np.ndarray
    offsets: np.ndarray
    group_of: np.ndarray

    @classmethod
    def of(cls, pairs: Sequence[ImageText]) -> "GroupIndex":
        groups = identity_groups(pairs)
        sizes = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        rows = np.fromiter((i for g in groups for i in g), dtype=np.int64, count=int(offsets[-1]))
        group_of = np.empty(len(rows), dtype=np.int64)
        group_of[rows] = np.repeat(np.arange(len(groups)), sizes)
        return cls(rows=rows, offsets=offsets, group_of=group_of)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def members(self, group: int) -> np.ndarray:
        return self.rows[self.offsets[group]:self.offsets[group + 1]]

    def take(self, order: np.ndarray, budget: int) -> np.ndarray:
        """The first groups of ``order`` until they hold ``budget`` pairs (the last one may overshoot
        by less than its size: a person is never split)."""
        order = np.asarray(order, dtype=np.int64)
        filled = np.cumsum(self.sizes[order])
        return order[:int(np.searchsorted(filled, budget)) + 1] if len(order) else order

    def pair_rows(self, groups: np.ndarray) -> np.ndarray:
        """Pair indices of ``groups``, ascending (training-set order)."""
        mask = np.isin(self.group_of, np.asarray(groups, dtype=np.int64))
        return np.flatnonzero(mask)


def budget_pairs(size: float, total: int) -> int:
    """Pairs to select: ``size`` <= 1 is a fraction of ``total``, > 1 a number of pairs."""
    if size <= 0 or (size > 1 and not float(size).is_integer()):
        raise TpasError(f"selection size must be a fraction in (0, 1] or a whole number of pairs, got {size}")
    n = int(round(size * total)) if size <= 1 else int(size)
    return max(1, min(n, total))


# -- the result ----------------------------------------------------------------------------------
@dataclass
class Selection:
    """Chosen pairs (``rows`` into the candidate list, ascending) and how they were chosen."""

    strategy: str
    rows: np.ndarray
    groups: int
    candidates: int
    candidate_groups: int
    budget: int
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def pairs(self) -> int:
        return len(self.rows)

    def summary(self, pairs: Sequence[ImageText]) -> dict[str, Any]:
        """What ``selection.json`` records: the counts, the settings and the label balance."""
        return {"strategy": self.strategy, "pairs": self.pairs, "groups": self.groups, "budget": self.budget,
                "candidates": self.candidates, "candidate_groups": self.candidate_groups,
                "fraction": round(self.pairs / max(1, self.candidates), 6), "settings": self.settings,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "labels": selection_stats([pairs[i] for i in self.rows])}


def selection_stats(pairs: Sequence[ImageText]) -> dict[str, dict[str, int]]:
    """Pair counts per behaviour, action and scene: what ``balanced`` evens out."""
    return {"behaviour": dict(Counter(p.behaviour.value for p in pairs).most_common()),
            "action": dict(Counter(f"{p.behaviour.value}:{p.action}" for p in pairs if p.action).most_common()),
            "scene": dict(Counter(p.scene for p in pairs if p.scene).most_common())}


def _selection(strategy: str, groups: GroupIndex, chosen: np.ndarray, budget: int, **settings: Any) -> Selection:
    return Selection(strategy=strategy, rows=groups.pair_rows(chosen), groups=len(chosen),
                     candidates=len(groups.group_of), candidate_groups=len(groups), budget=budget,
                     settings=settings)


# -- model-free strategies -----------------------------------------------------------------------
def select_random(pairs: Sequence[ImageText], size: float, seed: int = 0,
                  groups: GroupIndex | None = None) -> Selection:
    """Seeded uniform choice of identity groups (``data.max_pairs`` draws pairs; this keeps people whole)."""
    groups = groups or GroupIndex.of(pairs)
    budget = budget_pairs(size, len(pairs))
    order = np.random.default_rng(seed).permutation(len(groups))
    return _selection("random", groups, groups.take(order, budget), budget, seed=seed)


def _facets(pairs: Sequence[ImageText], groups: GroupIndex) -> tuple[list[list[int]], list[str]]:
    """Per group, the ids of its labels (``normal:<action>``, ``anomaly:<action>``, ``scene:<scene>``)."""
    names: dict[str, int] = {}
    per_group: list[list[int]] = []
    for g in range(len(groups)):
        labels = set()
        for i in groups.members(g):
            p = pairs[i]
            if p.action:
                labels.add(f"{p.behaviour.value}:{p.action}")
            if p.scene:
                labels.add(f"scene:{p.scene}")
        per_group.append([names.setdefault(name, len(names)) for name in sorted(labels)])
    return per_group, list(names)


def _availability(per_group: list[list[int]], n_labels: int) -> np.ndarray:
    """How many groups carry each label."""
    available = np.zeros(n_labels, dtype=np.int64)
    for labels in per_group:
        available[labels] += 1
    return available


def _quotas(available: np.ndarray, names: list[str], n_groups: int, total_groups: int) -> list[float]:
    """Per label, how many chosen groups may carry it: within each label kind (normal action, anomaly
    action, scene) the kind's share of ``n_groups`` is water-filled over its labels, so every label
    gets the same count unless it has fewer groups than that (then all of them)."""
    kinds = np.array([name.split(":", 1)[0] for name in names])
    quota = np.zeros(len(names), dtype=np.float64)
    for kind in np.unique(kinds):
        idx = np.flatnonzero(kinds == kind)
        want = n_groups * available[idx].sum() / max(1, total_groups)  # label slots of this kind to fill
        level = float(available[idx].max())
        for k, a in enumerate(np.sort(available[idx])):  # water level: the smallest labels fill up first
            rest = len(idx) - k
            if a * rest >= want:
                level = want / rest
                break
            want -= a
        quota[idx] = np.ceil(level)
    return quota.tolist()


_LEVELS = [k / 10 for k in range(1, 11)] + [1 + k / 20 for k in range(1, 31)]  # quota fill levels, pass by pass


def select_balanced(pairs: Sequence[ImageText], size: float, seed: int = 0,
                    groups: GroupIndex | None = None) -> Selection:
    """Equal shares per behaviour label (PAB's ``normal``/``anomaly`` action) and per scene.

    Each label gets a quota (:func:`_quotas`). The quotas fill in levels, 10% of each per pass,
    so all labels grow together; within a pass groups are visited rarest label first (seeded
    random order among equals), so a rare label is not crowded out by the common ones it
    co-occurs with, and taken while none of their labels has reached the level. Past 100% the
    levels rise by 5% while co-occurring labels leave budget unspent (the last pass takes
    anything). A pass is linear in the groups: a million pairs take seconds per pass.
    """
    groups = groups or GroupIndex.of(pairs)
    per_group, names = _facets(pairs, groups)
    if not names:
        raise TpasError("strategy 'balanced' needs behaviour or scene labels (PAB attr_*.json, mini-PAB); "
                        "these pairs have none: use 'random'")
    budget = budget_pairs(size, len(pairs))
    target = max(1, int(round(budget / groups.sizes.mean())))
    available = _availability(per_group, len(names))
    quota = _quotas(available, names, target, len(groups))
    width = max(map(len, per_group))
    padded = np.full((len(groups), width), len(names), dtype=np.int64)  # a dummy label with endless room
    for g, labels in enumerate(per_group):
        padded[g, :len(labels)] = labels
    tiebreak = np.random.default_rng(seed).random(len(groups))
    sizes = groups.sizes.tolist()
    counts = [0] * len(names)  # plain lists: this loop runs once per group and pass
    taken = [False] * len(groups)
    chosen: list[int] = []
    filled, passes = 0, 0
    while filled < budget:
        scale = _LEVELS[passes] if passes < len(_LEVELS) else float("inf")
        limit = [q * scale for q in quota]
        room = np.append((np.array(limit) - np.array(counts)) / np.maximum(quota, 1), np.inf)
        order = np.lexsort((tiebreak, -room[padded].min(axis=1))).tolist()  # most room in its fullest label first
        for g in order:
            labels = per_group[g]
            if taken[g] or any(counts[i] >= limit[i] for i in labels):
                continue
            taken[g] = True
            chosen.append(g)
            for i in labels:
                counts[i] += 1
            filled += sizes[g]
            if filled >= budget:
                break
        passes += 1
    return _selection("balanced", groups, np.array(chosen, dtype=np.int64), budget, seed=seed, passes=passes)


# -- id lists ------------------------------------------------------------------------------------
def write_selection(out: str | os.PathLike, pairs: Sequence[ImageText], selection: Selection,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``ids.txt`` and then ``selection.json`` (last: its presence means complete) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / IDS_FILE) as fh:
        fh.writelines(f"{pairs[i].image_id}\n" for i in selection.rows)
    write_json(out / SELECTION_FILE, {**selection.summary(pairs), **(extra or {})})
    return out


def read_ids(path: str | os.PathLike) -> list[str]:
    """The image ids of a selection: ``ids.txt`` or the folder that holds it."""
    path = Path(path)
    if path.is_dir():
        path = path / IDS_FILE
    if not path.is_file():
        raise TpasError(f"{path}: selection id list not found (write one with `tpas select`)")
    ids: list[str] = []
    first: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            image_id = line.strip()
            if not image_id:
                continue
            if image_id in first:
                raise DataError(f"image_id '{image_id}' listed twice (first on line {first[image_id]})", path, line_no)
            first[image_id] = line_no
            ids.append(image_id)
    if not ids:
        raise DataError("no image ids (one per line expected)", path)
    return ids


def apply_selection(pairs: Sequence[ImageText], ids: Sequence[str], source: str | os.PathLike) -> list[ImageText]:
    """The pairs whose identity group holds a listed image id, in training-set order.

    Whole groups are kept even if a hand-made list names one pair of a person. Listed ids that are
    not among ``pairs`` are dropped with a log line: they are usually validation identities carved
    out before selection (``data.val_identities``), which must never be trained on.
    """
    wanted = set(ids)
    groups = GroupIndex.of(pairs)
    hit = np.fromiter((p.image_id in wanted for p in pairs), dtype=bool, count=len(pairs))
    if not hit.any():
        raise TpasError(f"{source}: none of its {len(wanted)} image ids is among the {len(pairs)} training pairs "
                        "(a selection of another dataset?)")
    rows = groups.pair_rows(np.unique(groups.group_of[hit]))
    found = {pairs[i].image_id for i in np.flatnonzero(hit)}
    if len(found) < len(wanted):
        log.info("data.select: %d of %d listed pairs are not training candidates (validation identities or "
                 "absent) and are left out", len(wanted) - len(found), len(wanted))
    if len(rows) > hit.sum():
        log.info("data.select: %d pairs added to keep identity groups whole", len(rows) - int(hit.sum()))
    return [pairs[i] for i in rows]


def select_training_pairs(pairs: Sequence[ImageText], spec: str, seed: int) -> list[ImageText]:
    """``data.select`` at load time: ``random:F`` / ``balanced:F`` (F a fraction <= 1 or a pair count)
    applied to the training pairs left after the validation split, or the path of an id list
    (``ids.txt`` or its folder) written by ``tpas select``."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None:
        chosen = apply_selection(pairs, read_ids(spec), spec)
    else:
        strategy, size = match["strategy"], match["size"]
        if strategy not in MODEL_FREE:
            hint = (f"'{strategy}' needs a model: run `tpas select ROOT --strategy {strategy} --out DIR` and set "
                    "data.select=DIR" if strategy in STRATEGIES else f"strategies: {', '.join(STRATEGIES)}")
            raise TpasError(f"data.select={spec!r}: {hint}")
        try:
            number = float(size)
        except ValueError:
            raise TpasError(f"data.select={spec!r}: size {size!r} is not a number") from None
        select = select_random if strategy == "random" else select_balanced
        chosen = [pairs[i] for i in select(pairs, number, seed).rows]
    log.info("data.select=%s: training on %d of %d pairs", spec, len(chosen), len(pairs))
    return chosen


# -- the PAB-format subset folder ----------------------------------------------------------------
def _link(target: Path, link: Path) -> None:
    if link.is_symlink():
        link.unlink()
    os.symlink(target, link, target_is_directory=True)


def write_pab_subset(root: str | os.PathLike, out: str | os.PathLike, image_ids: Sequence[str]) -> int:
    """Write the training lines of ``image_ids`` (verbatim, same file names) under
    ``out/annotation/train`` and link ``out/train`` and ``out/annotation/test`` to ``root``'s, so
    ``out`` is a PAB root of its own. Returns the number of lines written."""
    root, out = Path(root).resolve(), Path(out).resolve()
    folder = out / "annotation" / "train"
    if out == root or out.is_relative_to(root / "annotation"):
        raise TpasError(f"{out}: the subset folder must not be the dataset root or inside its annotation folder")
    if any(folder.glob("*.json")) and not (out / SELECTION_FILE).is_file() or (
            (out / "train").exists() and not (out / "train").is_symlink()):
        raise TpasError(f"{out} holds a dataset, not an earlier selection; choose a new or empty --out folder")
    wanted = set(image_ids)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.json"):  # an earlier selection's files
        stale.unlink()
    written = 0
    for path in train_files(root):
        kept = []
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if line.strip() and get_id(json.loads(line), "image_id", Where(path, line_no)) in wanted:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if kept:
            with atomic_open(folder / path.name) as dst:
                dst.writelines(kept)
            written += len(kept)
    if (root / "annotation" / "test").is_dir():
        _link(root / "annotation" / "test", out / "annotation" / "test")
    _link(root / "train", out / "train")
    return written

