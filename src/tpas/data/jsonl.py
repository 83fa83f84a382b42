"""Low-level JSON readers with error messages that point at the offending file, line and field.

Two on-disk shapes occur: JSON Lines (PAB, mini-PAB: one object per line, read as a stream so a
million lines never sit in memory as raw dicts) and a single JSON list (the TBPS datasets, small
enough to load whole). Every problem becomes a :class:`~tpas.errors.DataError` whose message starts
with ``path:line:`` (JSONL) or ``path: entry N:`` (JSON list), so a user can open the file there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpas.errors import DataError

__all__ = [
    "Where",
    "iter_jsonl",
    "read_json_list",
    "get_str",
    "get_id",
    "get_caption",
    "get_captions",
    "optional_str",
    "optional_id",
]


@dataclass(frozen=True, slots=True)
class Where:
    """Location of one record: a JSONL line (``line``) or a JSON-list entry (``entry``, 0-based)."""

    path: str | os.PathLike
    line: int | None = None
    entry: int | None = None

    def error(self, message: str) -> DataError:
        if self.entry is not None:
            message = f"entry {self.entry}: {message}"
        return DataError(message, self.path, self.line)


def _decode(raw: bytes, where: Where) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 4]
        raise where.error(
            f"not valid UTF-8 (byte {bad!r} at column {exc.start + 1}); re-save the file as UTF-8"
        ) from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_no, object)`` for every non-blank line (1-based line numbers).

    Raises DataError for a missing file, a line that is not UTF-8, malformed JSON, or a line that
    holds something other than a JSON object.
    """
    path = Path(path)
    loads = json.loads
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    with fh:
        for line_no, raw in enumerate(fh, 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # tolerate a UTF-8 byte-order mark
            if raw.isspace() or not raw:
                continue
            try:
                obj = loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                _decode(raw, Where(path, line_no))  # raises with the offending byte
                raise
            except json.JSONDecodeError as exc:
                raise Where(path, line_no).error(f"malformed JSON at column {exc.colno}: {exc.msg}") from None
            if type(obj) is not dict:
                raise Where(path, line_no).error(f"expected a JSON object per line, got {type(obj).__name__}")
            yield line_no, obj


def read_json_list(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Load a file that holds one JSON list of objects (the TBPS annotation files)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"not valid UTF-8 (byte offset {exc.start}); re-save the file as UTF-8", path, line) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON at column {exc.colno}: {exc.msg}", path, exc.lineno) from None
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of objects, got {type(data).__name__}", path)
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise Where(path, entry=index).error(f"expected a JSON object, got {type(item).__name__}")
    return data


def _missing(obj: dict, name: str, where: Where) -> DataError:
    present = ", ".join(sorted(obj)) or "none"
    return where.error(f"missing required field '{name}' (fields present: {present})")


def get_str(obj: dict, name: str, where: Where) -> str:
    """A required string field."""
    if name not in obj:
        raise _missing(obj, name, where)
    value = obj[name]
    if not isinstance(value, str):
        raise where.error(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def get_id(obj: dict, name: str, where: Where) -> str:
    """A required identifier: a non-empty string or an integer, returned as a string."""
    if name not in obj:
        raise _missing(obj, name, where)
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise where.error(f"field '{name}' must be a string or an integer, got {type(value).__name__}")
    value = str(value)
    if not value.strip():
        raise where.error(f"field '{name}' is empty")
    return value


def get_caption(obj: dict, name: str, where: Where) -> str:
    """A required caption: a string with some non-blank text."""
    value = get_str(obj, name, where)
    if not value.strip():
        raise where.error(f"field '{name}' is an empty caption")
    return value


def get_captions(obj: dict, name: str, where: Where) -> list[str]:
    """A required non-empty list of captions (a single string is accepted as a list of one)."""
    if name not in obj:
        raise _missing(obj, name, where)
    value = obj[name]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise where.error(f"field '{name}' must be a list of strings, got {type(value).__name__}")
    if not value:
        raise where.error(f"field '{name}' is an empty list of captions")
    for k, caption in enumerate(value):
        if not isinstance(caption, str):
            raise where.error(f"field '{name}'[{k}] must be a string, got {type(caption).__name__}")
        if not caption.strip():
            raise where.error(f"field '{name}'[{k}] is an empty caption")
    return value


def optional_str(obj: dict, name: str, where: Where) -> str | None:
    """An optional string field (absent or null -> None)."""
    if obj.get(name) is None:
        return None
    return get_str(obj, name, where)


def optional_id(obj: dict, name: str, where: Where) -> str | None:
    if obj.get(name) is None:
        return None
    return get_id(obj, name, where)
