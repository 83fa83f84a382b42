"""Low-level JSON readers with error messages that point at the offending file, line and field.

Two on-disk shapes occur: JSON Lines (PAB, mini-PAB: one object per line, read as a stream so a
million lines never sit in memory as raw dicts) and a single JSON list (the TBPS datasets, small
enough to load whole). Every problem becomes a :class:`~tpas.errors.DataError` whose message starts
with ``path:line:`` (JSONL) or ``path: entry N:`` (JSON list), so a user can open the file there.

Readers stop at the first problem, except when they are handed a :class:`Problems` collector
(``tpas check-data`` does): then a bad line is recorded and reading goes on with the next one, so
one run lists every problem of a file.
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
    "FirstSeen",
    "Problems",
    "Where",
    "collecting",
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

    def __str__(self) -> str:
        """``path:line`` or ``path: entry N``: where an editor should open the file."""
        if self.line is not None:
            return f"{self.path}:{self.line}"
        return f"{self.path}: entry {self.entry}" if self.entry is not None else str(self.path)


class Problems:
    """Problems found while reading, for reports that list every one of them.

    The first ``limit`` messages are kept (a file with a million bad lines would otherwise fill the
    memory and the screen); ``count`` is the total. As a context manager (see :func:`collecting`)
    it records a DataError raised in the block and lets the reader go on.
    """

    def __init__(self, limit: int = 1000):
        self.limit = limit
        self.messages: list[str] = []
        self.count = 0

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.messages) < self.limit:
            self.messages.append(message)

    def extend(self, other: "Problems") -> None:
        for message in other.messages:
            self.add(message)
        self.count += other.count - len(other.messages)

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def __enter__(self) -> "Problems":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None and issubclass(kind, DataError):
            self.add(str(exc))
            return True
        return False


class _Strict:
    """The context of a normal read: every error propagates."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        return False


_STRICT = _Strict()


def collecting(problems: Problems | None) -> Problems | _Strict:
    """Around the body of a reader's per-line loop: without ``problems`` a DataError stops the read
    (the normal case); with it the error is recorded and the loop goes on with the next line.
    A plain class, not ``@contextmanager``: it wraps every line of a million-line file."""
    return _STRICT if problems is None else problems


class FirstSeen:
    """Where each key (an id) was first seen, so a duplicate can name both places.

    Keys map to one integer (file number, line), not to a :class:`Where`, so that a million ids
    stay cheap.
    """

    def __init__(self) -> None:
        self._first: dict[str, int] = {}
        self._files: list[str | os.PathLike] = []

    def duplicate(self, key: str, where: Where) -> str | None:
        """None the first time ``key`` is seen (and remember ``where``); else the earlier place."""
        code = self._first.get(key)
        if code is None:
            if not self._files or self._files[-1] != where.path:
                self._files.append(where.path)
            position = where.line if where.line is not None else where.entry
            self._first[key] = (len(self._files) - 1) << 32 | int(position or 0)
            return None
        path, position = self._files[code >> 32], code & 0xFFFFFFFF
        same = path == where.path
        if where.line is not None:
            return f"line {position}" if same else f"{path}:{position}"
        return f"entry {position}" if same else f"{path}: entry {position}"


def _decode(raw: bytes, where: Where) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 4]
        raise where.error(
            f"not valid UTF-8 (byte {bad!r} at column {exc.start + 1}); re-save the file as UTF-8"
        ) from None


def _json_error(exc: json.JSONDecodeError, text: str) -> str:
    """The reason a line is not JSON, saying so when the line simply stops early (a cut file):
    then the column is where it stops, not where the decoder gave up looking."""
    end = len(text.rstrip()) + 1
    if exc.msg.startswith("Unterminated string"):
        return f"malformed JSON: the line ends at column {end} inside a string that starts at column {exc.colno}"
    if exc.pos >= end - 1:
        return f"malformed JSON: the line ends at column {end} before the object is complete ({exc.msg})"
    return f"malformed JSON at column {exc.colno}: {exc.msg}"


def iter_jsonl(path: str | os.PathLike, problems: Problems | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_no, object)`` for every non-blank line (1-based line numbers).

    Raises DataError for a missing file, a line that is not UTF-8, malformed JSON, or a line that
    holds something other than a JSON object; with ``problems`` such a line is recorded there and
    skipped instead (a missing file still raises: nothing of it can be read).
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
                obj = loads(raw.decode("utf-8"))  # the fast path: a good line costs nothing more
            except (UnicodeDecodeError, json.JSONDecodeError):
                obj = None
            if type(obj) is not dict:
                with collecting(problems):
                    _raise_line_error(raw.rstrip(b"\r\n"), Where(path, line_no))
                continue
            yield line_no, obj


def _raise_line_error(raw: bytes, where: Where) -> None:
    """Raise the DataError that says why ``raw`` (one line, end of line removed) is not a JSON object."""
    text = _decode(raw, where)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise where.error(_json_error(exc, text)) from None
    raise where.error(f"expected a JSON object per line, got {type(obj).__name__}")


def read_json_list(path: str | os.PathLike, problems: Problems | None = None) -> list[dict[str, Any] | None]:
    """Load a file that holds one JSON list of objects (the TBPS annotation files).

    An entry that is not an object raises; with ``problems`` it is recorded there and left as None
    in the list, so the entry numbers of the others stay true.
    """
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
            data[index] = None
            with collecting(problems):
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
