"""The challenge ``answer.txt``: writing one from rankings and checking one before it is submitted.

Format: one line per query; each line holds the top-10 gallery IDs (image file names without
extension), best first, separated by single spaces. The two masked protocols differ only in where
the query order comes from and in what is uploaded:

* WWW'25 PAB challenge: lines in ``query.json`` order; ``answer.txt`` is submitted;
* AICity'26 Track 4: lines in ``query_index.txt`` order; ``answer.zip`` (holding ``answer.txt``)
  is submitted.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tpas.data.jsonl import Where, get_id, iter_jsonl
from tpas.data.pab import challenge_gallery, read_query_names
from tpas.errors import DataError
from tpas.utils.io import atomic_open, atomic_path

__all__ = ["ANSWER_NAME", "TOP_K", "check_answer", "count_queries", "read_answer", "write_answer", "zip_answer"]

TOP_K = 10
ANSWER_NAME = "answer.txt"  # the one member of a Track 4 answer.zip


def write_answer(path: str | os.PathLike, rankings: Sequence[Sequence[str]]) -> Path:
    """Write the first 10 IDs of each ranking, one line per query (atomic: all or nothing).

    A ranking with fewer than 10 IDs, a repeated ID, or an ID containing whitespace is an error,
    since the file would be rejected anyway.
    """
    path = Path(path)
    lines = []
    for row, ranking in enumerate(rankings):
        top = [str(x) for x in list(ranking)[:TOP_K]]
        if len(top) < TOP_K:
            raise ValueError(f"ranking {row} has {len(top)} IDs; answer.txt needs {TOP_K} per query")
        if len(set(top)) < TOP_K:
            raise ValueError(f"ranking {row} repeats an ID in its top {TOP_K}: {top}")
        if any(not x or x != x.strip() or any(ch.isspace() for ch in x) for x in top):
            raise ValueError(f"ranking {row} has an empty ID or one with whitespace: {top}")
        lines.append(" ".join(top))
    with atomic_open(path) as fh:
        fh.write("".join(line + "\n" for line in lines))
    return path


def zip_answer(answer_path: str | os.PathLike, zip_path: str | os.PathLike) -> Path:
    """``answer.zip`` holding ``answer_path`` as ``answer.txt`` (Track 4's upload; atomic)."""
    zip_path = Path(zip_path)
    with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(answer_path, ANSWER_NAME)
    return zip_path


def _answer_bytes(path: Path) -> tuple[bytes, str]:
    """The answer text's bytes and the name problems are reported under (a zip must hold answer.txt only)."""
    try:
        if not zipfile.is_zipfile(path):
            return path.read_bytes(), str(path)
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            if names != [ANSWER_NAME]:
                raise DataError(f"a submission zip must hold exactly one file, {ANSWER_NAME}; it holds {names}", path)
            return zf.read(ANSWER_NAME), f"{path}:{ANSWER_NAME}"
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except zipfile.BadZipFile as exc:
        raise DataError(f"not a readable zip file: {exc}", path) from None


def read_answer(path: str | os.PathLike) -> list[list[str]]:
    """The rankings in an answer file, ``answer.txt`` or a Track 4 ``answer.zip`` (no validation;
    see :func:`check_answer`)."""
    raw, where = _answer_bytes(Path(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError("not valid UTF-8", where) from None
    return [line.split() for line in text.splitlines()]


def count_queries(query_path: str | os.PathLike) -> int:
    """How many lines an answer needs: the queries of ``query.json`` (WWW'25, JSON Lines with a
    ``query_index`` each) or of ``query_index.txt`` (Track 4, one name a line)."""
    query_path = Path(query_path)
    if query_path.suffix == ".txt":
        return len(read_query_names(query_path))
    n_queries = 0
    for line_no, obj in iter_jsonl(query_path):
        get_id(obj, "query_index", Where(query_path, line_no))
        n_queries += 1
    return n_queries


def check_answer(answer_path: str | os.PathLike, query_path: str | os.PathLike,
                 gallery_dir: str | os.PathLike) -> list[str]:
    """Every problem that would get an answer file rejected, as ``"path:line: problem"`` strings.

    ``answer_path``: ``answer.txt`` or a Track 4 ``answer.zip`` (exactly one member, ``answer.txt``);
    ``query_path``: ``query.json`` (WWW'25) or ``query_index.txt`` (Track 4). Checks: UTF-8, one
    line per query, exactly 10 IDs a line, separated by single spaces with no leading/trailing
    whitespace, no repeats, every ID a gallery file stem. An empty list means the file is valid.
    """
    n_queries = count_queries(query_path)
    known = set(challenge_gallery(gallery_dir))
    raw, answer_name = _answer_bytes(Path(answer_path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return [f"{answer_name}:{line}: not valid UTF-8"]
    problems: list[str] = []
    if text and not text.endswith("\n"):
        text += "\n"  # a missing final newline is harmless
    lines = text.split("\n")[:-1] if text else []
    if len(lines) != n_queries:
        problems.append(f"{answer_name}: {len(lines)} lines, but {query_path} has {n_queries} queries")
    for line_no, line in enumerate(lines, 1):
        where = f"{answer_name}:{line_no}: "
        if line.endswith("\r"):
            problems.append(where + "Windows line ending (\\r\\n); use \\n")
            line = line[:-1]
        if line != line.strip() or "  " in line or any(ch.isspace() and ch != " " for ch in line):
            problems.append(where + "IDs must be separated by single spaces, with no leading/trailing whitespace")
        ids = line.split()
        if len(ids) != TOP_K:
            problems.append(where + f"{len(ids)} IDs, expected {TOP_K}")
        repeated = sorted({x for x in ids if ids.count(x) > 1})
        if repeated:
            problems.append(where + f"repeated IDs: {' '.join(repeated)}")
        unknown = [x for x in ids if x not in known]
        if unknown:
            problems.append(where + f"IDs not in the gallery: {' '.join(unknown[:5])}"
                            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    return problems
