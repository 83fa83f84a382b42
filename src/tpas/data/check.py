"""``check-data``: is a dataset on disk complete and readable before hours of training depend on it?

It parses every annotation file of the chosen splits through the normal readers (so it reports the
same ``path:line: reason`` errors they would raise), then opens every referenced image once, in
parallel threads: an image is *missing* if the file does not exist and *corrupt* if PIL cannot
verify and fully decode it (truncated JPEGs, HTML error pages saved as .jpg, ...).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tpas.data.datasets import EVAL_SPLITS, FORMATS, load_eval, load_train
from tpas.errors import TpasError
from tpas.utils.io import write_json

log = logging.getLogger(__name__)

__all__ = ["CheckReport", "check_dataset", "check_image", "default_splits"]

MISSING = "missing"
BATCH = 4096  # images submitted to the pool at a time, so a million paths do not become a million futures


@dataclass
class CheckReport:
    root: str
    format: str
    splits: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    annotation_errors: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    corrupt: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.annotation_errors or self.missing or self.corrupt)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def save(self, path: str | os.PathLike) -> Path:
        write_json(path, self.to_dict())
        return Path(path)

    def summary(self, show: int = 20) -> str:
        """Counts, then at most ``show`` missing and corrupt images (the report file has all)."""
        lines = [f"{self.format} dataset at {self.root} (splits: {', '.join(self.splits)})"]
        lines += [f"  {name}: {value}" for name, value in self.counts.items()]
        for err in self.annotation_errors:
            lines.append(f"  annotation error: {err}")
        for title, items in (("missing", self.missing), ("corrupt", [f"{c['path']}: {c['reason']}" for c in self.corrupt])):
            if items:
                lines.append(f"  {title} images: {len(items)}" + (f" (first {show} shown)" if len(items) > show else ""))
                lines += [f"    {item}" for item in items[:show]]
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


def check_image(path: str | os.PathLike) -> str | None:
    """None if the image decodes, ``"missing"``, or the reason it is corrupt."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums, without decoding pixels
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated files that verify() lets through
    except FileNotFoundError:
        return MISSING
    except Exception as exc:  # PIL raises many types for bad data
        return f"{type(exc).__name__}: {exc}"
    return None


def _split_images(root: Path, fmt: str, split: str, counts: dict[str, int]) -> list[str]:
    """Parse one split's annotations (images not looked up yet); return its image paths."""
    if split == "train":
        data = load_train(root, fmt, check_images=False)
        counts["train pairs"] = len(data)
        images = [p.image for p in data.pairs] + [p.hard_image for p in data.pairs if p.hard_image]
    else:
        evalset = load_eval(root, fmt, split, check_images=False)
        counts[f"{split} queries"] = len(evalset.queries)
        counts[f"{split} gallery images"] = len(evalset.gallery)
        images = [evalset.image_path(g.image).relative_to(root).as_posix() for g in evalset.gallery]
    return images


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
        try:
            for rel in _split_images(root, fmt, split, report.counts):
                images[rel] = None
        except TpasError as exc:
            report.annotation_errors.append(f"{split}: {exc}")
    report.counts["distinct images"] = len(images)

    paths = list(images)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="check images", unit="img")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), BATCH):
            batch = paths[start : start + BATCH]
            for rel, problem in zip(batch, pool.map(check_image, [root / p for p in batch])):
                if problem == MISSING:
                    report.missing.append(rel)
                elif problem is not None:
                    report.corrupt.append({"path": rel, "reason": problem})
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    report.counts["missing images"] = len(report.missing)
    report.counts["corrupt images"] = len(report.corrupt)
    log.info("checked %d images under %s: %d missing, %d corrupt", len(paths), root, len(report.missing),
             len(report.corrupt))
    return report
