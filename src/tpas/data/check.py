"""``check-data``: is a dataset on disk complete and readable before hours of training depend on it?

It parses every annotation file of the chosen splits through the normal readers, in their
collecting mode: every bad line is listed with the same ``path:line: reason`` the readers would
raise, duplicate ids are problems in every split (training included, where the readers only warn),
and the images of the lines that did parse are still checked. Then it opens every referenced image
once, in parallel threads: an image is *missing* if the file does not exist and *corrupt* if PIL
cannot verify and fully decode it (truncated JPEGs, HTML error pages saved as .jpg, ...).

Nothing is written unless asked: :meth:`CheckReport.save` writes the full report as JSON.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tpas.data.datasets import EVAL_SPLITS, FORMATS, load_eval, load_train
from tpas.data.images import MISSING, decode_problem
from tpas.data.jsonl import Problems
from tpas.errors import TpasError
from tpas.utils.io import write_json

log = logging.getLogger(__name__)

__all__ = ["CheckReport", "check_dataset", "default_splits"]

BATCH = 4096  # images submitted to the pool at a time, so a million paths do not become a million futures
KEEP = 10_000  # annotation problems kept per split (the rest are counted)
IMAGE_COUNTS = ("distinct images", "missing images", "corrupt images")  # say so when a split was not read


@dataclass
class CheckReport:
    root: str
    format: str
    splits: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    annotation_errors: list[str] = field(default_factory=list)  # the first KEEP of each split
    annotation_error_count: int = 0
    unchecked_splits: list[str] = field(default_factory=list)  # annotations unreadable: images not known
    missing: list[str] = field(default_factory=list)
    corrupt: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.annotation_error_count or self.unchecked_splits or self.missing or self.corrupt)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def save(self, path: str | os.PathLike) -> Path:
        write_json(path, self.to_dict())
        return Path(path)

    def summary(self, show: int = 20) -> str:
        """Counts, then at most ``show`` problems of each kind with how many there are in all."""
        lines = [f"{self.format} dataset at {self.root} (splits: {', '.join(self.splits)})"]
        unchecked = f" (split {', '.join(self.unchecked_splits)} NOT checked)" if self.unchecked_splits else ""
        lines += [f"  {name}: {value}{unchecked if name in IMAGE_COUNTS else ''}" for name, value in self.counts.items()]
        corrupt = [f"{c['path']}: {c['reason']}" for c in self.corrupt]
        for title, items, total in (("annotation problems", self.annotation_errors, self.annotation_error_count),
                                    ("missing images", self.missing, len(self.missing)),
                                    ("corrupt images", corrupt, len(corrupt))):
            if total:
                lines.append(f"  {title}: {total}" + (f" (first {show} shown)" if total > show else ""))
                lines += [f"    {item}" for item in items[:show]]
        for split in self.unchecked_splits:
            lines.append(f"  images of split '{split}' NOT checked: its annotations could not be read")
        lines.append("  result: OK" if self.ok else "  result: PROBLEMS FOUND")
        return "\n".join(lines)


def default_splits(root: str | os.PathLike, fmt: str) -> list[str]:
    """The splits whose annotation files exist under ``root``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    root = Path(root)
    if fmt != "pab":
        return ["train", *EVAL_SPLITS[fmt]]
    found = []
    if (root / "annotation" / "train").is_dir():
        found.append("train")
    test = root / "annotation" / "test"
    if (test / "attr.json").is_file() or (test / "pair.json").is_file():
        found.append("test")
    if (test / "ucc.json").is_file():
        found.append("ucc")
    if (root / "query.json").is_file() or (root / "challenge" / "query.json").is_file():
        found.append("challenge")
    if not found:
        raise TpasError(f"{root}: no PAB annotation found (annotation/train, annotation/test or query.json)")
    return found


def _split_images(root: Path, fmt: str, split: str, counts: dict[str, int], problems: Problems) -> list[str]:
    """Parse one split's annotations, collecting every problem (images not looked at yet); return
    the image paths of the records that parsed."""
    if split == "train":
        data = load_train(root, fmt, check_images=False, problems=problems)
        counts["train pairs"] = len(data)
        return [p.image for p in data.pairs] + [p.hard_image for p in data.pairs if p.hard_image]
    evalset = load_eval(root, fmt, split, check_images=False, problems=problems)
    counts[f"{split} queries"] = len(evalset.queries)
    counts[f"{split} gallery images"] = len(evalset.gallery)
    return [evalset.image_path(g.image).relative_to(root).as_posix() for g in evalset.gallery]


def check_dataset(
    root: str | os.PathLike,
    fmt: str,
    splits: list[str] | None = None,
    workers: int = 8,
    progress: bool = True,
) -> CheckReport:
    """Check annotations and images of ``splits`` (default: all present) of a dataset root."""
    root = Path(root)
    if not root.is_dir():
        raise TpasError(f"{root}: dataset root not found")
    splits = list(splits) if splits else default_splits(root, fmt)
    report = CheckReport(root=str(root), format=fmt, splits=splits)
    images: dict[str, None] = {}  # ordered set
    for split in splits:
        problems = Problems(limit=KEEP)
        try:
            for rel in _split_images(root, fmt, split, report.counts, problems):
                images[rel] = None
        except TpasError as exc:  # a whole file is unreadable (missing, not JSON): its images are unknown
            problems.add(str(exc))
            report.unchecked_splits.append(split)
        report.annotation_errors += [f"{split}: {message}" for message in problems.messages]
        report.annotation_error_count += problems.count
    report.counts["distinct images"] = len(images)
    _check_images(root, list(images), report, workers, progress)
    report.counts["missing images"] = len(report.missing)
    report.counts["corrupt images"] = len(report.corrupt)
    log.info("checked %d images under %s: %d missing, %d corrupt", len(images), root, len(report.missing),
             len(report.corrupt))
    return report


def _check_images(root: Path, paths: list[str], report: CheckReport, workers: int, progress: bool) -> None:
    """Decode every image in ``paths`` (relative to ``root``) in threads; file problems in ``report``."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="check images", unit="img")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), BATCH):
            batch = paths[start : start + BATCH]
            for rel, problem in zip(batch, pool.map(decode_problem, [root / p for p in batch])):
                if problem == MISSING:
                    report.missing.append(rel)
                elif problem is not None:
                    report.corrupt.append({"path": rel, "reason": problem})
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
