"""Query-set post-processing: SCA, one-to-one assignment, dual-softmax.

All three look at a whole set of queries at once and use the others to correct each one: when
two queries claim the same image, at most one of them can be right. That is only true when **one
gallery item answers at most one query** (PAB's test protocol: every caption has its own image).
On TBPS data (several captions per image or per person) or in single-query search the assumption
is false and these must stay off; they are off by default everywhere.

Each function takes a score matrix [Q,G] (higher = better) and returns a new float32 [Q,G]
matrix whose row order is the re-ordered ranking (sort descending, ties by column, as the
metrics do), so every metric can still be computed. The values of SCA and one-to-one outputs only
encode order: the item a query was given is lifted above the row maximum, everything else keeps
its score.
"""

from __future__ import annotations

import logging

import numpy as np

from tpas.search.ranking import top_k

log = logging.getLogger(__name__)

POST_METHODS = ("none", "sca", "one_to_one", "dual_softmax")


def _promote(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Copy of ``scores`` where ``cols[i]`` becomes the top-1 of row ``rows[i]``; the rest keeps its order."""
    out = np.array(scores, dtype=np.float32, copy=True)
    if len(rows):
        top = out[rows].max(axis=1)
        out[rows, cols] = top + np.maximum(1.0, np.abs(top) * 1e-3)
    return out


def sca(scores: np.ndarray, text_embeds: np.ndarray | None = None, threshold: float = 0.0, margin: float = 0.0,
        max_iter: int = 100, depth: int = 100) -> np.ndarray:
    """Similarity Coverage Analysis: look-alike queries must not share a top-1 image.

    Each query holds one candidate (initially its top-1). In each round, for every image held by
    several queries, a holder gives the image up if another holder whose text is similar (cosine
    of ``text_embeds`` >= ``threshold``; every pair counts when ``threshold`` <= 0) scores that
    image higher by more than ``margin``. A query that gives up moves to its next candidate: the
    best one scored below its current one. All losers of a round move together; rounds repeat
    until nobody moves or ``max_iter`` rounds. Exact ties (and differences within ``margin``) are
    left alone — neither query can be said to be the weaker claimant. A query walks at most
    ``depth`` candidates down its list.

    Output: the held candidate becomes each query's top-1; the rest of its ranking (including the
    images it gave up, now at ranks 2, 3, ...) keeps its order.
    """
    scores = np.asarray(scores)
    q = scores.shape[0]
    if q == 0:
        return np.array(scores, dtype=np.float32, copy=True)
    cand, cval = top_k(scores, max(1, depth))
    emb = None
    if threshold > 0:
        if text_embeds is None:
            raise ValueError("sca: a threshold > 0 needs text_embeds")
        emb = np.asarray(text_embeds, dtype=np.float32)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    ptr = np.zeros(q, dtype=np.int64)
    last = cand.shape[1] - 1
    rows = np.arange(q)
    rounds = 0
    for rounds in range(1, max_iter + 1):
        held, held_score = cand[rows, ptr], cval[rows, ptr]
        order = np.argsort(held, kind="stable")
        bounds = np.flatnonzero(np.diff(held[order])) + 1
        movers = []
        for group in np.split(order, bounds):
            if len(group) < 2:
                continue
            s = held_score[group].astype(np.float64)
            beats = s[None, :] > s[:, None] + margin  # beats[i, j]: holder j outscores holder i
            if emb is not None:
                beats &= (emb[group] @ emb[group].T) >= threshold
            losers = group[beats.any(axis=1)]
            movers.append(losers[ptr[losers] < last])
        movers = np.concatenate(movers) if movers else np.zeros(0, np.int64)
        if not len(movers):
            break
        ptr[movers] += 1
    else:
        log.warning("sca: conflicts remain after %d rounds", max_iter)
    moved = np.flatnonzero(ptr > 0)
    log.info("sca: %d of %d queries changed their top-1 in %d rounds", len(moved), q, rounds)
    return _promote(scores, moved, cand[moved, ptr[moved]])


def one_to_one(scores: np.ndarray, k: int = 10, max_cells: int = 20_000_000) -> np.ndarray:
    """One-to-one assignment: Hungarian matching of queries to images on each query's top-``k``.

    Maximises the summed score so that no image is the top-1 of two queries, using
    ``scipy.optimize.linear_sum_assignment`` on each connected group of queries that share
    candidates (a query may only receive one of its own top-k). Each query's assigned image
    becomes its top-1; the rest follows by score. Queries left without an image (more queries
    than candidates in their group) keep their ranking. A group whose cost matrix would exceed
    ``max_cells`` is assigned greedily (best remaining score first) instead, with a warning.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    scores = np.asarray(scores)
    q, g = scores.shape
    if q == 0 or k <= 0:
        return np.array(scores, dtype=np.float32, copy=True)
    cand, cval = top_k(scores, k)
    k = cand.shape[1]
    qi = np.repeat(np.arange(q), k)
    # bipartite graph: query nodes 0..q-1, image nodes q..q+g-1
    graph = coo_matrix((np.ones(q * k, dtype=np.int8), (qi, q + cand.ravel())), shape=(q + g, q + g))
    _, label = connected_components(graph, directed=False)
    assigned_rows, assigned_cols = [], []
    order = np.argsort(label[:q], kind="stable")
    bounds = np.flatnonzero(np.diff(label[:q][order])) + 1
    for qs in np.split(order, bounds):
        imgs, local = np.unique(cand[qs], return_inverse=True)
        local = local.reshape(len(qs), k)
        if len(qs) * len(imgs) > max_cells:
            log.warning("one_to_one: group of %d queries x %d images is too large for Hungarian; greedy instead",
                        len(qs), len(imgs))
            r, c = _greedy(cval[qs], local)
        else:
            weight = np.full((len(qs), len(imgs)), -1e9)
            weight[np.repeat(np.arange(len(qs)), k), local.ravel()] = cval[qs].ravel()
            r, c = linear_sum_assignment(weight, maximize=True)
            keep = weight[r, c] > -1e9  # never hand a query an image outside its own top-k
            r, c = r[keep], c[keep]
        assigned_rows.append(qs[r])
        assigned_cols.append(imgs[c])
    rows = np.concatenate(assigned_rows)
    cols = np.concatenate(assigned_cols)
    changed = cols != cand[rows, 0]
    log.info("one_to_one: %d of %d queries changed their top-1", int(changed.sum()), q)
    return _promote(scores, rows[changed], cols[changed])


def _greedy(values: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching: visit (query, image) edges by descending score, take an edge if both are free."""
    n, k = values.shape
    flat = np.argsort(-values.ravel(), kind="stable")
    q_free = np.ones(n, bool)
    i_free = np.ones(local.max() + 1, bool)
    rows, cols = [], []
    for e in flat:
        r, c = divmod(int(e), k)
        img = local[r, c]
        if q_free[r] and i_free[img]:
            q_free[r] = i_free[img] = False
            rows.append(r)
            cols.append(img)
    return np.array(rows, np.int64), np.array(cols, np.int64)


def dual_softmax(scores: np.ndarray, temperature: float = 0.05, chunk_size: int = 1024) -> np.ndarray:
    """Dual-softmax: the log of softmax over queries (per image) x softmax over images (per query).

    ``log softmax_queries(s/t) + log softmax_images(s/t)``: an image that many queries like is
    discounted for each of them — a soft version of "one image, one query". The column
    normaliser is accumulated over chunks of queries, so a large matrix is read twice and never
    copied as float64.
    """
    scores = np.asarray(scores)
    q, g = scores.shape
    if temperature <= 0:
        raise ValueError("dual_softmax: temperature must be > 0")
    col_max = np.full(g, -np.inf, dtype=np.float64)
    for s in range(0, q, chunk_size):
        col_max = np.maximum(col_max, scores[s:s + chunk_size].max(axis=0) / temperature)
    col_sum = np.zeros(g, dtype=np.float64)
    for s in range(0, q, chunk_size):
        col_sum += np.exp(scores[s:s + chunk_size] / temperature - col_max).sum(axis=0)
    col_lse = col_max + np.log(col_sum)
    out = np.empty((q, g), dtype=np.float32)
    for s in range(0, q, chunk_size):
        z = scores[s:s + chunk_size].astype(np.float64) / temperature
        row_max = z.max(axis=1, keepdims=True)
        row_lse = row_max + np.log(np.exp(z - row_max).sum(axis=1, keepdims=True))
        out[s:s + chunk_size] = 2 * z - col_lse - row_lse
    return out


def postprocess(scores: np.ndarray, method: str = "none", text_embeds: np.ndarray | None = None,
                **options) -> np.ndarray:
    """Dispatch by name (``none``, ``sca``, ``one_to_one``, ``dual_softmax``); options go to the method."""
    if method == "none":
        return np.asarray(scores)
    if method == "sca":
        return sca(scores, text_embeds, **options)
    if method == "one_to_one":
        return one_to_one(scores, **options)
    if method == "dual_softmax":
        return dual_softmax(scores, **options)
    raise ValueError(f"unknown post-processing {method!r}; choose from {POST_METHODS}")
