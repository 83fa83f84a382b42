"""Text-to-image retrieval metrics: R@K, mAP, mINP, exactly as IRRA/CMP define them.

For each query the gallery is sorted by score, highest first; ties keep gallery order (a stable
sort). With the positives' ranks ``r_1 < ... < r_m`` (1-based):

* R@K  = 1 if ``r_1 <= K`` else 0
* AP   = mean over k of ``k / r_k`` (precision at each positive's rank)
* INP  = ``m / r_m`` (how deep one must look to find every positive)

and each figure is the mean over queries, in percent.

Nothing here sorts a whole gallery unless it has to: a positive's rank is the number of gallery
items scoring strictly higher plus the number of equal scores earlier in gallery order, plus one.
A query with one positive costs two vectorised comparisons over its row; a query with several
positives either counts the same way per positive or sorts only the items scoring at least as high
as its worst positive, whichever is cheaper. Rows arrive in
chunks (from an array, a memory-mapped ``.npy``, a torch tensor, a callable or an iterable of row
blocks), so a 100k x 1M evaluation runs in bounded memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["evaluate", "evaluate_rankings", "positive_ranks", "format_table"]

CHUNK_BYTES = 256 * 2**20  # working memory per chunk of rows when chunk_size is not given
MAX_CHUNK_ROWS = 1024

ScoreSource = Any  # np.ndarray | np.memmap | torch.Tensor | Callable[[int, int], rows] | Iterable[rows]


def _to_numpy(rows: Any) -> np.ndarray:
    if hasattr(rows, "detach") and hasattr(rows, "cpu"):  # torch tensor, without importing torch
        rows = rows.detach().cpu()
        if str(rows.dtype) == "torch.bfloat16":
            rows = rows.float()  # exact: every bfloat16 value is a float32 value
        rows = rows.numpy()
    rows = np.asarray(rows)
    if rows.ndim == 1:
        rows = rows[None, :]
    return rows


def _chunks(scores: ScoreSource, n: int, g: int, chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first row index, rows [c, g])`` covering exactly ``n`` rows."""
    if hasattr(scores, "shape") and hasattr(scores, "__getitem__"):
        if tuple(scores.shape) != (n, g):
            raise ValueError(f"scores have shape {tuple(scores.shape)}, expected ({n}, {g}) "
                             "(queries x gallery)")
        blocks: Iterable[Any] = (scores[a : min(a + chunk_size, n)] for a in range(0, n, chunk_size))
    elif callable(scores):
        blocks = (scores(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size))
    else:
        blocks = iter(scores)
    start = 0
    for block in blocks:
        rows = _to_numpy(block)
        if rows.ndim != 2 or rows.shape[1] != g:
            raise ValueError(f"score rows {start}.. have shape {rows.shape}, expected (rows, {g})")
        if start + rows.shape[0] > n:
            raise ValueError(f"scores have more rows than the {n} queries")
        if rows.dtype.kind == "f" and np.isnan(rows).any():
            bad = start + int(np.flatnonzero(np.isnan(rows).any(axis=1))[0])
            raise ValueError(f"scores contain NaN (query row {bad})")
        if rows.dtype.kind not in "fiu":
            raise ValueError(f"scores must be numeric, got dtype {rows.dtype}")
        yield start, rows
        start += rows.shape[0]
    if start != n:
        raise ValueError(f"scores have {start} rows, expected {n} (one per query)")


def positive_ranks(row: np.ndarray, positives: np.ndarray, method: str = "auto") -> np.ndarray:
    """1-based ranks (ascending) of the gallery items ``positives`` (sorted indices) in one row.

    Ranking: higher score first, ties by gallery index; equals a stable descending argsort.
    ``method="count"`` counts, per positive, the items scoring higher plus the equal ones earlier
    (two passes over the row per positive); ``"sort"`` sorts only the items scoring at least as high
    as the worst positive. ``"auto"`` sorts when few items are that high (a good model) or there
    are many positives, and counts otherwise.
    """
    if positives.size == 1:
        j = int(positives[0])
        v = row[j]
        return np.array([np.count_nonzero(row > v) + np.count_nonzero(row[:j] == v) + 1])
    values = row[positives]
    at_least = row >= values.min()  # only these items can rank above some positive
    if method == "auto":
        few = np.count_nonzero(at_least) <= row.size // 16
        method = "sort" if few or positives.size > 32 else "count"
    if method == "count":
        ranks = [np.count_nonzero(row > v) + np.count_nonzero(row[:j] == v) + 1 for j, v in zip(positives, values)]
        return np.sort(np.asarray(ranks, dtype=np.int64))
    cand = np.flatnonzero(at_least)
    cand_values = row[cand]
    if cand_values.dtype.kind == "u":
        cand_values = cand_values.astype(np.float64 if cand_values.dtype.itemsize >= 8 else np.int64)
    order = np.argsort(-cand_values, kind="stable")  # cand is ascending, so ties keep gallery order
    is_pos = np.zeros(cand.size, dtype=bool)
    is_pos[np.searchsorted(cand, positives)] = True
    return np.flatnonzero(is_pos[order]) + 1


def _single_positive_ranks(rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """:func:`positive_ranks` for rows that each have exactly one positive ``pos[i]``."""
    values = rows[np.arange(rows.shape[0]), pos]
    higher = np.count_nonzero(rows > values[:, None], axis=1)
    # ties only matter before the positive, so compare the prefix of each row
    ties = [np.count_nonzero(row[:j] == v) for row, j, v in zip(rows, pos, values)]
    return higher + np.asarray(ties, dtype=np.int64) + 1


def _summary(per_query: Mapping[str, np.ndarray], ks: Sequence[int]) -> dict[str, Any]:
    """Means in percent of per-query arrays: ``first`` (rank of the first positive), ``ap``, ``inp``."""
    first = per_query["first"]
    out: dict[str, Any] = {f"R@{k}": float(100.0 * np.mean(first <= k)) if first.size else 0.0 for k in ks}
    for name, key in (("mAP", "ap"), ("mINP", "inp")):
        if key in per_query:
            out[name] = float(100.0 * per_query[key].mean()) if first.size else 0.0
    out["num_queries"] = int(first.size)
    return out


def _with_groups(per_query: Mapping[str, np.ndarray], ks: Sequence[int], query_groups: Sequence[Any] | None,
                 n: int) -> dict[str, Any]:
    result = _summary(per_query, ks)
    if query_groups is not None:
        if len(query_groups) != n:
            raise ValueError(f"{len(query_groups)} query groups for {n} queries")
        labels = np.asarray([str(x) for x in query_groups])
        result["groups"] = {
            label: _summary({k: a[labels == label] for k, a in per_query.items()}, ks) for label in sorted(set(labels))
        }
    return result


def evaluate(
    scores: ScoreSource,
    query_ids: Sequence[Any],
    gallery_ids: Sequence[Any],
    ks: Sequence[int] = (1, 5, 10),
    query_groups: Sequence[Any] | None = None,
    chunk_size: int | None = None,
    allow_no_positive: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """R@K, mAP and mINP (percent) of a queries x gallery score matrix; higher score = better.

    ``query_ids[i]`` and ``gallery_ids[j]`` are match labels: gallery item j is a positive of query
    i when they are equal (PAB: the image id; TBPS: the person id). ``scores`` may be an array, a
    memory-mapped ``.npy``, a torch tensor, a callable ``(start, stop) -> rows``, or an iterable of
    row blocks in query order. ``chunk_size`` rows are processed at a time (default: what fits in
    256 MiB, at most 1024).

    A query without any positive in the gallery is an error (its AP is undefined) unless
    ``allow_no_positive``: then it counts as a miss (0 for every metric) and the result reports
    ``num_no_positive``. With ``query_groups`` (a label per query, e.g. normal/anomaly) the result
    has ``groups: {label: {same keys}}``.
    """
    n, g = len(query_ids), len(gallery_ids)
    if n == 0 or g == 0:
        raise ValueError(f"nothing to evaluate: {n} queries, {g} gallery items")
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {ks}")
    # positives of every label as one CSR structure: gallery indices grouped by label code, ascending
    code_of: dict[Any, int] = {}
    gallery_codes = np.fromiter((code_of.setdefault(t, len(code_of)) for t in gallery_ids), dtype=np.int64, count=g)
    by_label = np.argsort(gallery_codes, kind="stable")
    offsets = np.zeros(len(code_of) + 1, dtype=np.int64)
    np.cumsum(np.bincount(gallery_codes, minlength=len(code_of)), out=offsets[1:])
    query_codes = np.fromiter((code_of.get(q, -1) for q in query_ids), dtype=np.int64, count=n)
    no_pos = np.flatnonzero(query_codes < 0)
    if no_pos.size and not allow_no_positive:
        shown = ", ".join(f"#{i} ({query_ids[i]!r})" for i in no_pos[:5])
        raise ValueError(f"{no_pos.size} of {n} queries have no positive in the gallery, e.g. {shown}; "
                         "check that query and gallery ids use the same labels (or allow_no_positive=True)")
    safe = np.maximum(query_codes, 0)
    pos_start = offsets[safe]
    n_pos = np.where(query_codes >= 0, offsets[safe + 1] - pos_start, 0)

    if chunk_size is None:
        chunk_size = max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (8 * g)))
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    ap = np.zeros(n, dtype=np.float64)
    inp = np.zeros(n, dtype=np.float64)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="metrics", unit="query", leave=False)
    for start, rows in _chunks(scores, n, g, chunk_size):
        stop = start + rows.shape[0]
        counts = n_pos[start:stop]
        single = np.flatnonzero(counts == 1)
        if single.size:
            pos = by_label[pos_start[start + single]]
            sub = rows if single.size == rows.shape[0] else rows[single]
            r = _single_positive_ranks(sub, pos)
            first[start + single] = r
            ap[start + single] = 1.0 / r
            inp[start + single] = 1.0 / r
        for i in np.flatnonzero(counts > 1):
            q = start + i
            ranks = positive_ranks(rows[i], by_label[pos_start[q] : pos_start[q] + n_pos[q]])
            first[q] = ranks[0]
            ap[q] = np.mean(np.arange(1, ranks.size + 1) / ranks)
            inp[q] = ranks.size / ranks[-1]
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()

    result = _with_groups({"first": first, "ap": ap, "inp": inp}, ks, query_groups, n)
    if allow_no_positive:
        result["num_no_positive"] = int(no_pos.size)
    return result


def evaluate_rankings(
    rankings: Sequence[Sequence[str]],
    query_targets: Sequence[Any],
    gallery_targets: Mapping[str, Any] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    query_groups: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """R@K of truncated rankings (e.g. an ``answer.txt``: top-10 gallery IDs per query).

    An ID is a hit when ``gallery_targets[id]`` (or the ID itself, without a mapping) equals the
    query's target. Only R@K with K <= the ranking length is defined; mAP/mINP need full rankings.
    """
    if len(rankings) != len(query_targets):
        raise ValueError(f"{len(rankings)} rankings for {len(query_targets)} queries")
    ks = tuple(int(k) for k in ks)
    depth = min((len(r) for r in rankings), default=0)
    if any(k > depth for k in ks):
        raise ValueError(f"rankings hold {depth} IDs; cannot compute R@K for K in {ks}")
    first = np.full(len(rankings), np.iinfo(np.int64).max, dtype=np.int64)
    for i, (ranking, target) in enumerate(zip(rankings, query_targets)):
        for r, item in enumerate(ranking, 1):
            label = gallery_targets.get(item) if gallery_targets is not None else item
            if label == target:
                first[i] = r
                break
    return _with_groups({"first": first}, ks, query_groups, len(rankings))


def format_table(results: Mapping[str, Any], title: str = "all") -> str:
    """A markdown table: one row for all queries, one per group; columns R@K..., mAP, mINP."""
    metrics = [k for k in results if k.startswith("R@")] + [k for k in ("mAP", "mINP") if k in results]
    header = "| queries | n | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]

    def row(name: str, res: Mapping[str, Any]) -> str:
        return f"| {name} | {res.get('num_queries', '')} | " + " | ".join(f"{res[m]:.2f}" for m in metrics) + " |"

    lines.append(row(title, results))
    for name, res in results.get("groups", {}).items():
        lines.append(row(name, res))
    return "\n".join(lines)
