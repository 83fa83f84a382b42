"""The challenge ``answer.txt``: writing one from rankings and checking one before it is submitted.

Format (DESIGN section 3): one line per query, in ``query.json`` order; each line holds the top-10
gallery IDs (image file names without extension), best first, separated by single spaces.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tpas.data.jsonl import Where, get_id, iter_jsonl
from tpas.data.pab import challenge_gallery
from tpas.errors import DataError
from tpas.utils.io import atomic_open

__all__ = ["TOP_K", "write_answer", "read_answer", "check_answer"]

TOP_K = 10


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


def read_answer(path: str | os.PathLike) -> list[list[str]]:
    """The rankings in an answer file (no validation; see :func:`check_answer`)."""
    text = Path(path).read_text(encoding="utf-8")
    return [line.split() for line in text.splitlines()]


def check_answer(answer_path: str | os.PathLike, query_path: str | os.PathLike,
                 gallery_dir: str | os.PathLike) -> list[str]:
    """Every problem that would get an answer file rejected, as ``"path:line: problem"`` strings.

    Checks: UTF-8, one line per query in ``query.json``, exactly 10 IDs a line, separated by single
    spaces with no leading/trailing whitespace, no repeats, every ID a gallery file stem.
    An empty list means the file is valid.
    """
    answer_path = Path(answer_path)
    n_queries = 0
    for line_no, obj in iter_jsonl(query_path):
        get_id(obj, "query_index", Where(query_path, line_no))
        n_queries += 1
    known = set(challenge_gallery(gallery_dir))
    try:
        raw = answer_path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", answer_path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return [f"{answer_path}:{line}: not valid UTF-8"]
    problems: list[str] = []
    if text and not text.endswith("\n"):
        text += "\n"  # a missing final newline is harmless
    lines = text.split("\n")[:-1] if text else []
    if len(lines) != n_queries:
        problems.append(f"{answer_path}: {len(lines)} lines, but {query_path} has {n_queries} queries")
    for line_no, line in enumerate(lines, 1):
        where = f"{answer_path}:{line_no}: "
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
