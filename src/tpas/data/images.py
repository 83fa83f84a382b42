"""One policy for image files that are missing or unreadable, in ``tpas train``, ``eval`` and ``index``.

**Pre-flight.** Before long work starts, a reader given ``check_images=True`` looks at every image
an annotation refers to (:class:`ImageCheck`). The look is cheap enough for PAB's million training
images: one ``open`` and two small reads per file (it exists, is not empty, starts like an image,
and a JPEG, PNG, GIF, WebP or BMP ends where its format says it ends). Only a file that fails that
look is decoded in full to confirm it, so a JPEG with a few bytes after its end marker is not a
false alarm. Every problem is collected with the annotation line that refers to it; at the end,
``on_bad_image="error"`` raises one error that lists them (one line each) and ``"skip"`` drops the
records that use them, logs the count and the first names and adds them to :data:`skipped`.

**Later.** A file that passes the pre-flight but does not decode (damage inside the compressed
data) shows up when it is first loaded, in a DataLoader worker. Datasets never raise there (the
worker would wrap the error in a traceback); they hand the problem to the main process, where
:func:`handle_late_problems` stops with one line naming the file (``error``) or records it in
:data:`skipped` (``skip``: training substitutes another pair, encoding a blank image).

The command line prints :data:`skipped` when a command ends, so nothing is skipped silently.
``tpas check-data`` decodes every image in full (:func:`decode_problem`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from tpas.data.records import GalleryImage
from tpas.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["BadImagesError", "ImageCheck", "MISSING", "ON_BAD_IMAGE", "SkippedImages", "bad_image_policy",
           "check_gallery", "check_on_bad_image", "current_bad_image_policy", "decode_problem", "handle_late_problems",
           "image_problem", "quick_problem", "skipped"]

ON_BAD_IMAGE = ("error", "skip")
MISSING = "image not found"
SHOW = 20  # problems listed in an error message; the rest are counted

# header -> the name shown to the user; the end of the file is checked per format in _end_problem
SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"RIFF", "WebP"),
)
PNG_END = b"IEND\xaeB`\x82"


def check_on_bad_image(value: str) -> None:
    if value not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {value!r}")


# -- looking at one file -------------------------------------------------------------------------
def quick_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` looks like a complete image; else why not (:data:`MISSING`, empty, ...).

    Reads the first 16 and the last 8 bytes; never decodes.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return MISSING
    except IsADirectoryError:
        return "a folder, not an image file"
    except PermissionError:
        return "not readable (permission denied)"
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return "empty file (0 bytes)"
        head = os.pread(fd, 16, 0)
        tail = os.pread(fd, 8, max(0, size - 8))
    except IsADirectoryError:
        return "a folder, not an image file"
    finally:
        os.close(fd)
    kind = next((name for magic, name in SIGNATURES if head.startswith(magic)), None)
    if kind is None:
        return f"not a known image format (starts with {head[:8]!r})"
    return _end_problem(kind, head, tail, size)


def _end_problem(kind: str, head: bytes, tail: bytes, size: int) -> str | None:
    """Whether a file of a known format ends where the format says it does (a cut download does not)."""
    if kind == "JPEG" and not tail.endswith(b"\xff\xd9"):
        return f"truncated JPEG (no end-of-image marker; {size:,} bytes)"
    if kind == "PNG" and not tail.endswith(PNG_END):
        return f"truncated PNG (no IEND chunk; {size:,} bytes)"
    if kind == "GIF" and not tail.endswith(b";"):
        return f"truncated GIF (no trailer; {size:,} bytes)"
    if kind == "WebP" and (head[8:12] != b"WEBP" or int.from_bytes(head[4:8], "little") + 8 > size):
        return f"truncated or not a WebP file ({size:,} bytes)"
    if kind == "BMP" and int.from_bytes(head[2:6], "little") > size:
        return f"truncated BMP ({size:,} bytes)"
    return None


def decode_problem(path: str | os.PathLike) -> str | None:
    """None if PIL verifies and fully decodes the image; :data:`MISSING`; or the decoder's reason."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums, without decoding pixels
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated files that verify() lets through
    except FileNotFoundError:
        return MISSING
    except Exception as exc:  # PIL raises many types for bad data
        return f"cannot decode: {exc}" if str(exc) else f"cannot decode: {type(exc).__name__}"
    return None


def image_problem(path: str | os.PathLike) -> str | None:
    """The pre-flight verdict: :func:`quick_problem`, confirmed by a full decode when the file
    exists but looks wrong (so only files that really do not decode are reported)."""
    problem = quick_problem(path)
    if problem is None or problem == MISSING or problem.startswith(("empty file", "a folder", "not readable")):
        return problem
    confirmed = decode_problem(path)
    return None if confirmed is None else f"{problem}; {confirmed}"


# -- what a command skipped ----------------------------------------------------------------------
class SkippedImages:
    """Images a command skipped under ``--on-bad-image skip``: a count and the first few names.

    One per process (:data:`skipped`); the command line prints it when the command ends.
    """

    def __init__(self, keep: int = 5):
        self.keep = keep
        self.count = 0
        self.first: list[str] = []

    def add(self, description: str) -> None:
        self.add_many([description])

    def add_many(self, descriptions: Sequence[str], total: int | None = None) -> None:
        """Record ``descriptions``; ``total`` counts more than were described (a capped list)."""
        self.count += len(descriptions) if total is None else total
        self.first.extend(descriptions[: max(0, self.keep - len(self.first))])

    def summary(self) -> str:
        """``"skipped 3 unreadable images (--on-bad-image skip): a.jpg (...), ..."``; "" when none."""
        if not self.count:
            return ""
        more = f" and {self.count - len(self.first)} more" if self.count > len(self.first) else ""
        plural = "s" if self.count != 1 else ""
        return (f"skipped {self.count} missing or unreadable image{plural} (--on-bad-image skip): "
                f"{'; '.join(self.first)}{more}")

    def reset(self) -> None:
        self.count, self.first = 0, []


skipped = SkippedImages()

_policy: ContextVar[str] = ContextVar("tpas_on_bad_image", default="error")


@contextmanager
def bad_image_policy(on_bad_image: str) -> Iterator[None]:
    """What image decoding deep inside encoding does with an image that fails late (see above),
    for the block: the commands set it from ``--on-bad-image``; library callers get ``error``."""
    check_on_bad_image(on_bad_image)
    token = _policy.set(on_bad_image)
    try:
        yield
    finally:
        _policy.reset(token)


def current_bad_image_policy() -> str:
    return _policy.get()


class BadImagesError(DataError):
    """Images that are missing or do not decode; the message lists them one per line."""


def handle_late_problems(problems: Sequence[str], on_bad_image: str | None = None) -> None:
    """Called in the main process with the problems a DataLoader worker met (``"path: reason"``).

    ``error`` raises one line naming the first file; ``skip`` records them in :data:`skipped`.
    """
    if not problems:
        return
    on_bad_image = on_bad_image or current_bad_image_policy()
    if on_bad_image == "error":
        more = f" (and {len(problems) - 1} more in the same batch)" if len(problems) > 1 else ""
        raise BadImagesError(f"{problems[0]}{more}; the file passed the pre-flight check but does not decode: "
                             "replace or remove it, or pass --on-bad-image skip")
    for problem in problems:
        log.warning("skipping an image that does not decode: %s", problem)
    skipped.add_many(problems)


# -- the pre-flight check of a reader --------------------------------------------------------------
class ImageCheck:
    """Checks the images a reader's records refer to (paths relative to ``root``).

    ``ok(rel, where)`` is False for a bad image, and remembers it with the annotation place that
    refers to it; ``finish(source)`` then raises (``error``) or reports what was dropped (``skip``).
    Each path is looked at once, however many records refer to it (PAB's hard pairs do).
    """

    def __init__(self, root: str | os.PathLike, on_bad_image: str, what: str):
        check_on_bad_image(on_bad_image)
        self.root = Path(root)
        self._root = os.fspath(self.root)
        self.on_bad_image = on_bad_image
        self.what = what  # the records dropped under "skip": "pairs", "gallery images", ...
        self.problems: list[str] = []  # "annotation:line: image: reason", the first 1000
        self.count = 0
        self._seen: dict[str, str | None] = {}

    def ok(self, rel: str, where: object | None = None) -> bool:
        """Whether the image is fine; ``where`` is the annotation place that refers to it (None
        for a gallery that is a folder of files: the file is its own place)."""
        problem = self._seen[rel] if rel in self._seen else self._look(rel)
        if problem is None:
            return True
        self.count += 1
        if len(self.problems) < 1000:
            self.problems.append(f"{where}: {rel}: {problem}" if where is not None else f"{self.root / rel}: {problem}")
        return False

    def _look(self, rel: str) -> str | None:
        path = os.path.join(self._root, rel)  # not pathlib: this runs once per image of a million
        problem = image_problem(path)
        if problem == MISSING:
            problem = f"{MISSING} (looked for {path})"
        self._seen[rel] = problem
        return problem

    def finish(self, source: object) -> None:
        """Raise one error listing every problem (``error``), or log and record them (``skip``)."""
        if not self.count:
            return
        if self.on_bad_image == "error":
            listed = self.problems[:SHOW]
            more = [f"  ... and {self.count - len(listed)} more"] if self.count > len(listed) else []
            references = "1 image reference points" if self.count == 1 else f"{self.count} image references point"
            raise BadImagesError("\n".join([
                f"{source}: {references} at missing or unreadable files "
                f"(--on-bad-image skip drops those {self.what}):", *(f"  {p}" for p in listed), *more]))
        log.warning("%s: skipped %d %s whose image is missing or unreadable: %s%s", source, self.count, self.what,
                    "; ".join(self.problems[:5]), f" and {self.count - 5} more" if self.count > 5 else "")
        skipped.add_many(self.problems, total=self.count)


def check_gallery(root: str | os.PathLike, gallery: Sequence[GalleryImage], on_bad_image: str,
                  source: object) -> list[GalleryImage]:
    """The pre-flight check of a gallery that is a folder of files (a challenge set, ``tpas index
    --images``): the good images, in order; bad ones raise or are skipped as ``on_bad_image`` says."""
    images = ImageCheck(root, on_bad_image, "gallery images")
    kept = [g for g in gallery if images.ok(g.image)]
    images.finish(source)
    return kept
