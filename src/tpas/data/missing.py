"""What readers do when an annotation points at an image that is not on disk.

``on_missing="error"`` stops at the first missing file and names it; ``"skip"`` drops the record and,
at the end, logs how many were skipped with the first few paths, so nothing is skipped silently.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tpas.data.jsonl import Where

log = logging.getLogger(__name__)

ON_MISSING = ("error", "skip")


def check_on_missing(on_missing: str) -> None:
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")


class MissingImages:
    """Checks image paths (relative to ``root``) and remembers the ones it skipped."""

    def __init__(self, root: Path, on_missing: str, what: str):
        check_on_missing(on_missing)
        self.root = Path(root)
        self.on_missing = on_missing
        self.what = what
        self.skipped: list[str] = []

    def ok(self, rel: str, where: Where) -> bool:
        """True if the image exists; False (skip) or DataError naming the record (error) otherwise."""
        if (self.root / rel).is_file():
            return True
        if self.on_missing == "error":
            raise where.error(f"image not found: {self.root / rel} (on_missing='skip' drops such {self.what})")
        self.skipped.append(rel)
        return False

    def log_summary(self, source: object) -> None:
        if not self.skipped:
            return
        first = ", ".join(self.skipped[:5])
        more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
        log.warning(
            "%s: skipped %d %s whose image is missing under %s: %s%s",
            source, len(self.skipped), self.what, self.root, first, more,
        )
