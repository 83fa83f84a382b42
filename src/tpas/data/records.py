"""The one in-memory form shared by every dataset (PAB, mini-PAB, CUHK-PEDES, ICFG-PEDES, RSTPReid).

Readers turn files into these records; everything downstream (loader, search, metrics) sees only
records, never file formats. Paths are kept relative to the dataset root so that a dataset can be
moved without rewriting anything.

Matching rule: a query's positives are the gallery images whose ``target`` equals the query's
``target``. For PAB that is the ``image_id`` (one positive per caption); for the TBPS datasets it
is the person id (several positives per query).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path


class Behaviour(str, Enum):
    """Whether an image/caption shows normal or anomalous behaviour (PAB); unknown elsewhere."""

    NORMAL = "normal"
    ANOMALY = "anomaly"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ImageText:
    """One training pair.

    ``person_id`` decides which pairs count as positives of each other in contrastive training.
    In PAB the normal and the anomalous image of one person are *different* targets (they must be
    told apart), so there it equals ``image_id``; in TBPS data it is the person id.
    The ``hard_*`` fields carry PAB's same-person, opposite-behaviour pair (paths relative to the
    dataset root, already prefixed with ``train/``).
    """

    image: str
    caption: str
    image_id: str
    person_id: str
    behaviour: Behaviour = Behaviour.UNKNOWN
    action: str | None = None
    scene: str | None = None
    hard_image: str | None = None
    hard_caption: str | None = None
    hard_image_id: str | None = None
    source_id: str | None = None
    source_caption: str | None = None


@dataclass(frozen=True, slots=True)
class Query:
    """One text query. ``target`` is None when the ground truth is hidden (masked challenge set)."""

    query_id: str
    caption: str
    target: str | None
    behaviour: Behaviour = Behaviour.UNKNOWN
    action: str | None = None


@dataclass(frozen=True, slots=True)
class GalleryImage:
    """One gallery image; ``image_id`` is unique in its gallery, ``target`` links it to queries."""

    image: str
    image_id: str
    target: str | None
    behaviour: Behaviour = Behaviour.UNKNOWN
    action: str | None = None
    scene: str | None = None


@dataclass(slots=True)
class TrainSet:
    """Training pairs of one dataset; ``root`` is what the relative image paths hang from."""

    name: str
    root: Path
    pairs: list[ImageText] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    def image_path(self, rel: str) -> Path:
        return self.root / rel


@dataclass(slots=True)
class EvalSet:
    """Queries and a gallery evaluated together (text-to-image)."""

    name: str
    root: Path
    queries: list[Query] = field(default_factory=list)
    gallery: list[GalleryImage] = field(default_factory=list)

    def image_path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def has_ground_truth(self) -> bool:
        return all(q.target is not None for q in self.queries)

    def query_targets(self) -> list[str | None]:
        return [q.target for q in self.queries]

    def gallery_targets(self) -> list[str | None]:
        return [g.target for g in self.gallery]

    def query_groups(self) -> list[str]:
        """Behaviour label of every query, for per-group metrics (normal vs anomaly)."""
        return [q.behaviour.value for q in self.queries]
