"""Text-to-image retrieval metrics: R@K, mAP, mINP, exactly as IRRA/CMP define them.

For each query the gallery is sorted by score, highest first; ties keep gallery order (a stable
sort). With the positives' ranks ``r_1 < ... < r_m`` (1-based):

* R@K  = 1 if ``r_1 <= K`` else 0
* AP   = mean over k of ``k / r_k`` (precision at each positive's rank)
* INP  = ``m / r_m`` (how deep one must look to find every positive)
* AP@K = sum over the positives with ``r_k <= K`` of ``k / r_k``, divided by ``min(m, K)``
  (mAP@10 is the AICity'26 Track 4 leaderboard figure: with one positive, ``1 / r`` when ``r <= 10``)

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["Metrics", "evaluate", "evaluate_rankings", "positive_ranks"]

CHUNK_BYTES = 256 * 2**20  # working memory per chunk of rows when chunk_size is not given
MAX_CHUNK_ROWS = 1024

ScoreSource = Any  # np.ndarray | np.memmap | torch.Tensor | Callable[[int, int], rows] | Iterable[rows]


@dataclass(frozen=True)
class Metrics:
    """Retrieval figures of a query set, in percent; ``groups`` holds the same per query group.

    ``m["R@1"]``, ``m["mAP"]``, ``m["mINP"]`` and ``m["num_queries"]`` read a figure by the name the
    tables use; :meth:`to_dict` is the JSON form (``metrics.json``), :mod:`tpas.eval.tables` renders
    markdown and HTML. ``mAP``/``mINP`` are None for truncated rankings (an ``answer.txt``).
    """

    recall: dict[int, float]  # K -> R@K
    num_queries: int
    mAP: float | None = None
    mINP: float | None = None
    groups: dict[str, "Metrics"] = field(default_factory=dict)  # e.g. normal / anomaly
    num_no_positive: int | None = None  # queries counted as misses (allow_no_positive)
    map_at: dict[int, float] = field(default_factory=dict)  # K -> mAP@K (truncated at rank K)

    def __getitem__(self, name: str) -> float:
        if name.startswith("R@"):
            return self.recall[int(name[2:])]
        if name.startswith("mAP@"):
            return self.map_at[int(name[4:])]
        value = {"mAP": self.mAP, "mINP": self.mINP, "num_queries": self.num_queries}.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"R@{k}": v for k, v in self.recall.items()}
        out.update({k: v for k, v in (("mAP", self.mAP), ("mINP", self.mINP)) if v is not None})
        out.update({f"mAP@{k}": v for k, v in self.map_at.items()})
        out["num_queries"] = self.num_queries
        if self.num_no_positive is not None:
            out["num_no_positive"] = self.num_no_positive
        if self.groups:
            out["groups"] = {name: g.to_dict() for name, g in self.groups.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Metrics":
        """Inverse of :meth:`to_dict` (reads a saved ``metrics.json``)."""
        return cls(recall={int(k[2:]): float(v) for k, v in data.items() if k.startswith("R@")},
                   num_queries=int(data.get("num_queries", 0)), mAP=data.get("mAP"), mINP=data.get("mINP"),
                   groups={n: cls.from_dict(g) for n, g in (data.get("groups") or {}).items()},
                   num_no_positive=data.get("num_no_positive"),
                   map_at={int(k[4:]): float(v) for k, v in data.items() if k.startswith("mAP@")})


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


def _mean(values: np.ndarray | None) -> float | None:
    if values is None:
        return None
    return float(100.0 * values.mean()) if values.size else 0.0


def _ap_at(ranks: np.ndarray, k: int) -> float:
    """AP@k of one query from the sorted 1-based ranks of all its positives."""
    hit = ranks <= k
    return float((np.arange(1, ranks.size + 1)[hit] / ranks[hit]).sum() / min(ranks.size, k))


def _summary(per_query: Mapping[str, np.ndarray], ks: Sequence[int], query_groups: Sequence[Any] | None = None,
             num_no_positive: int | None = None) -> Metrics:
    """Means in percent of per-query arrays ``first`` (rank of the first positive), ``ap``, ``inp``
    and ``ap@K``, over all queries and over each query group."""
    first = per_query["first"]
    groups: dict[str, Metrics] = {}
    if query_groups is not None:
        if len(query_groups) != first.size:
            raise ValueError(f"{len(query_groups)} query groups for {first.size} queries")
        labels = np.asarray([str(x) for x in query_groups])
        groups = {label: _summary({k: a[labels == label] for k, a in per_query.items()}, ks)
                  for label in sorted(set(labels))}
    map_at = {int(name[3:]): _mean(values) for name, values in per_query.items() if name.startswith("ap@")}
    return Metrics(recall={k: _mean(first <= k) for k in ks}, num_queries=int(first.size),
                   mAP=_mean(per_query.get("ap")), mINP=_mean(per_query.get("inp")), groups=groups,
                   num_no_positive=num_no_positive, map_at=map_at)


def evaluate(
    scores: ScoreSource,
    query_ids: Sequence[Any],
    gallery_ids: Sequence[Any],
    ks: Sequence[int] = (1, 5, 10),
    query_groups: Sequence[Any] | None = None,
    chunk_size: int | None = None,
    allow_no_positive: bool = False,
    progress: bool = False,
    ap_ks: Sequence[int] = (),
) -> Metrics:
    """R@K, mAP, mINP and mAP@K for K in ``ap_ks`` (percent) of a queries x gallery score matrix;
    higher score = better.

    ``query_ids[i]`` and ``gallery_ids[j]`` are match labels: gallery item j is a positive of query
    i when they are equal (PAB: the image id; TBPS: the person id). ``scores`` may be an array, a
    memory-mapped ``.npy``, a torch tensor, a callable ``(start, stop) -> rows``, or an iterable of
    row blocks in query order. ``chunk_size`` rows are processed at a time (default: what fits in
    256 MiB, at most 1024).

    A query without any positive in the gallery is an error (its AP is undefined) unless
    ``allow_no_positive``: then it counts as a miss (0 for every metric) and the result reports
    ``num_no_positive``. With ``query_groups`` (a label per query, e.g. normal/anomaly) the result
    has ``groups``: the same figures per label.
    """
    n, g = len(query_ids), len(gallery_ids)
    if n == 0 or g == 0:
        raise ValueError(f"nothing to evaluate: {n} queries, {g} gallery items")
    ks, ap_ks = tuple(int(k) for k in ks), tuple(int(k) for k in ap_ks)
    if any(k < 1 for k in ks + ap_ks):
        raise ValueError(f"ks and ap_ks must be positive, got {ks} and {ap_ks}")
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
    ap_at = {k: np.zeros(n, dtype=np.float64) for k in ap_ks}

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
            for k, values in ap_at.items():
                values[start + single] = np.where(r <= k, 1.0 / r, 0.0)
        for i in np.flatnonzero(counts > 1):
            q = start + i
            ranks = positive_ranks(rows[i], by_label[pos_start[q] : pos_start[q] + n_pos[q]])
            first[q] = ranks[0]
            ap[q] = np.mean(np.arange(1, ranks.size + 1) / ranks)
            inp[q] = ranks.size / ranks[-1]
            for k, values in ap_at.items():
                values[q] = _ap_at(ranks, k)
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()

    per_query = {"first": first, "ap": ap, "inp": inp, **{f"ap@{k}": v for k, v in ap_at.items()}}
    return _summary(per_query, ks, query_groups, num_no_positive=int(no_pos.size) if allow_no_positive else None)


def evaluate_rankings(
    rankings: Sequence[Sequence[str]],
    query_targets: Sequence[Any],
    gallery_targets: Mapping[str, Any] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    query_groups: Sequence[Any] | None = None,
    ap_ks: Sequence[int] = (),
) -> Metrics:
    """R@K and mAP@K of truncated rankings (e.g. an ``answer.txt``: top-10 gallery IDs per query).

    An ID is a hit when ``gallery_targets[id]`` (or the ID itself, without a mapping) equals the
    query's target; a query's number of positives is how many gallery IDs carry its target (one
    without a mapping). Only K <= the ranking length is defined; mAP/mINP need full rankings.
    mAP@10 of a top-10 answer file is the AICity'26 Track 4 leaderboard figure.
    """
    if len(rankings) != len(query_targets):
        raise ValueError(f"{len(rankings)} rankings for {len(query_targets)} queries")
    ks, ap_ks = tuple(int(k) for k in ks), tuple(int(k) for k in ap_ks)
    depth = min((len(r) for r in rankings), default=0)
    if any(k > depth for k in ks + ap_ks):
        raise ValueError(f"rankings hold {depth} IDs; cannot compute R@K / mAP@K for K in {ks + ap_ks}")
    positives: dict[Any, int] = {}
    if gallery_targets is not None:
        for label in gallery_targets.values():
            positives[label] = positives.get(label, 0) + 1
    first = np.full(len(rankings), np.iinfo(np.int64).max, dtype=np.int64)
    ap_at = {k: np.zeros(len(rankings), dtype=np.float64) for k in ap_ks}
    for i, (ranking, target) in enumerate(zip(rankings, query_targets)):
        labels = [gallery_targets.get(item) if gallery_targets is not None else item for item in ranking]
        ranks = np.array([r for r, label in enumerate(labels, 1) if label == target], dtype=np.int64)
        if ranks.size:
            first[i] = ranks[0]
        m = positives.get(target, 0) if gallery_targets is not None else 1
        for k, values in ap_at.items():
            hit = ranks[ranks <= k]
            values[i] = (np.arange(1, hit.size + 1) / hit).sum() / min(max(m, hit.size, 1), k)
    return _summary({"first": first, **{f"ap@{k}": v for k, v in ap_at.items()}}, ks, query_groups)
