"""Query-set post-processing over a :class:`~tpas.search.ranking.Ranking`: SCA, global assignment,
one-to-one, dual-softmax.

All of them look at a whole set of queries at once and use the others to correct each one: when
two queries claim the same image, at most one of them can be right. That is only true when **one
gallery image answers at most one query** (PAB's test protocols: every caption has its own image;
distractor images answer none). On TBPS data (several captions per image or per person) or in
single-query search the premise is false; :func:`tpas.eval.run.check_one_to_one` refuses them
there, and they are off by default everywhere.

Which scores they compare. Two queries' claims on one image can only be weighed with scores that
mean the same thing for both queries. The fused value that orders a re-ranked head
(``minmax(ITM) + w * minmax(ITC)`` over each query's own top-k) does not: any query whose ITM and
ITC agree on its top-1 scores exactly ``1 + w`` there. So every method here reads the ranking's
*raw* per-pair scores (:func:`candidates`): the ITM score of the re-ranked head (a query's
candidates are then its head, in display order), or the raw ITC cosine of every listed row when
nothing was re-ranked (or the fused value of a multi-system fusion, which is global, not per query).

Each method decides a new order of every query's candidates; :func:`postprocess` returns a new
``Ranking`` with those rows first (their raw scores travel with them) and order-only ``score``
values for the queries that changed, so ``score_matrix()`` still gives the metrics a full [Q,G]
order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tpas.search.ranking import Ranking

log = logging.getLogger(__name__)

__all__ = [
    "CONFIDENCES",
    "DEFAULT_SCA_THRESHOLD",
    "POST_METHODS",
    "SCA_RULES",
    "Candidates",
    "assign",
    "candidates",
    "dual_softmax",
    "postprocess",
    "reorder",
    "resolve_post_options",
    "sca",
]

POST_METHODS = ("none", "sca", "assign", "one_to_one", "dual_softmax")
CONFIDENCES = ("auto", "itm", "itc", "fused")
SCA_RULES = ("score", "margin")
# SCA's text-similarity gate when neither the caller nor the model (config.sca_threshold, picked on
# validation by tpas.search.calibrate.calibrate_sca) gives one
DEFAULT_SCA_THRESHOLD = 0.9
NO_GATE = -1.0  # a cosine threshold every pair of texts passes: SCA without its similarity gate
UNMATCHED = 1e6  # one_to_one: the price of leaving a query unassigned (it then keeps its ranking)


@dataclass
class Candidates:
    """Each query's candidates in display order, with a score comparable across queries.

    ``rows`` [Q,C] int64 gallery rows (-1 = empty slot, only at the end of a row);
    ``conf`` [Q,C] float64 the raw per-pair score (-inf at empty slots); ``source`` names it.
    """

    rows: np.ndarray
    conf: np.ndarray
    source: str

    @property
    def count(self) -> np.ndarray:
        """[Q] how many candidates each query has."""
        return (self.rows >= 0).sum(axis=1)


def candidates(ranking: Ranking, confidence: str = "auto") -> Candidates:
    """The candidates post-processing may hand a query, with their raw confidences.

    ``confidence``: ``"itm"`` = the re-ranked head with its raw ITM scores; ``"itc"`` = every
    listed row with its first-stage score (raw ITC cosine, or a fusion's global value);
    ``"fused"`` = the re-ranked head scored like the ranking's own fusion but with one scale for
    every query: ``ITM / r_itm + weight * ITC / r_itc``, ``r`` the mean over queries of the head's
    range (max - min) of that score, where the ranking divides each query by its own range;
    ``"auto"`` = ``"itm"`` when the ranking was re-ranked, else ``"itc"``.
    """
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
    if confidence == "auto":
        confidence = "itm" if ranking.head > 0 else "itc"
    if confidence in ("itm", "fused"):
        if ranking.head == 0:
            raise ValueError(f"confidence={confidence!r} needs a re-ranked ranking (rerank > 0)")
        rows, conf = ranking.rows[:, :ranking.head], ranking.itm[:, :ranking.head]
        if confidence == "fused":
            itc = ranking.itc[:, :ranking.head].astype(np.float64)
            conf = conf / _mean_range(conf) + (ranking.weight or 0.0) * itc / _mean_range(itc)
        source = confidence
    else:
        rows, conf, source = ranking.rows, ranking.itc, ranking.scorer
    conf = np.where(rows >= 0, np.nan_to_num(conf.astype(np.float64), nan=-np.inf), -np.inf)
    return Candidates(rows=rows.copy(), conf=conf, source=source)


def _mean_range(scores: np.ndarray) -> float:
    """Mean over rows of (max - min) of the finite values: one scale for every query (1 if none)."""
    finite = np.isfinite(scores)
    hi = np.where(finite, scores, -np.inf).max(axis=1)
    lo = np.where(finite, scores, np.inf).min(axis=1)
    spans = (hi - lo)[finite.sum(axis=1) > 1]
    span = float(spans.mean()) if len(spans) else 0.0
    return span if span > 0 else 1.0


# -- SCA ------------------------------------------------------------------------------------------
def _unit(embeds: np.ndarray) -> np.ndarray:
    embeds = np.asarray(embeds, dtype=np.float32)
    return embeds / np.maximum(np.linalg.norm(embeds, axis=1, keepdims=True), 1e-12)


def _group_losers(holders: np.ndarray, key: np.ndarray, emb: np.ndarray | None, threshold: float,
                  tau: float) -> np.ndarray:
    """Holders of one image, strongest first: who gives it up.

    Resolution goes down the list: a holder loses when a holder above it that *kept* the image
    has a similar text and a key larger by more than ``tau``. A loser keeps nobody off, so when
    A~B and B~C but not A~C (A strongest), B yields to A and C stays beside A.

    The first undecided holder always keeps (every kept holder above it has spared it); it then
    decides, in one vectorised step, every holder below it that it beats. So the work is one pass
    over the group per kept holder, and memory stays linear in the group.
    """
    hk = key[holders]
    if emb is None:  # no gate: the strongest is compared with everyone and always keeps
        return holders[hk[0] > hk + tau]
    undecided = np.ones(len(holders), dtype=bool)
    lost = np.zeros(len(holders), dtype=bool)
    first = 0
    while True:
        undecided[first] = False  # keeps the image
        rest = np.flatnonzero(undecided)
        if not len(rest):
            break
        beaten = rest[(hk[first] > hk[rest] + tau) & (emb[holders[rest]] @ emb[holders[first]] >= threshold)]
        lost[beaten] = True
        undecided[beaten] = False
        if not undecided.any():
            break
        first = int(np.argmax(undecided))
    return holders[lost]


def sca(cands: Candidates, text_embeds: np.ndarray | None, threshold: float, rule: str = "score",
        tau: float = 0.0, max_passes: int = 10) -> np.ndarray:
    """Similarity Coverage Analysis: look-alike queries must not share their top-1 image.

    Each query holds a candidate (first its top-1). In each pass, the holders of every shared
    image are ordered by a key (strongest first, then query order) and resolved down that order
    (:func:`_group_losers`): a holder gives the image up when a stronger holder that kept it has a
    similar description (cosine of ``text_embeds`` >= ``threshold``; ``-1`` compares every pair)
    and a key larger by more than ``tau``. Losers take their next candidate; passes repeat until
    nobody moves or ``max_passes``. Equal keys (within ``tau``) are left alone: neither query is
    the weaker claimant.

    ``rule="score"`` (the seed method): the key is the raw confidence of the held pair.
    ``rule="margin"``: the key is what moving would cost, confidence of the held candidate minus
    that of the next one (a query with no next candidate cannot move and never yields).
    Returns [Q] the position of each query's held candidate in its list.
    """
    if rule not in SCA_RULES:
        raise ValueError(f"sca: rule must be one of {SCA_RULES}, got {rule!r}")
    if max_passes < 1:
        raise ValueError(f"sca: max_passes must be >= 1, got {max_passes}")
    rows, conf, count = cands.rows, cands.conf, cands.count
    q = len(rows)
    ptr = np.zeros(q, dtype=np.int64)
    if rows.shape[1] == 0:
        return ptr
    emb = None
    if threshold > NO_GATE:
        if text_embeds is None or np.asarray(text_embeds).ndim != 2 or np.asarray(text_embeds).shape[1] == 0:
            raise ValueError("sca: a text-similarity threshold needs the queries' text embeddings "
                             f"(pass threshold={NO_GATE} to compare every pair)")
        emb = _unit(text_embeds)
    queries = np.arange(q)
    passes = 0
    for passes in range(1, max_passes + 1):
        held = np.where(count > 0, rows[queries, np.minimum(ptr, rows.shape[1] - 1)], -1)
        key = conf[queries, np.minimum(ptr, rows.shape[1] - 1)]
        if rule == "margin":
            nxt = np.minimum(ptr + 1, rows.shape[1] - 1)
            key = np.where(ptr + 1 < count, key - conf[queries, nxt], np.inf)
        order = np.lexsort((queries, -key, held))  # by image, then strongest first, then query index
        order = order[held[order] >= 0]
        starts = np.flatnonzero(np.r_[True, np.diff(held[order]) != 0])
        sizes = np.diff(np.r_[starts, len(order)])
        losers = [_group_losers(order[s:s + n], key, emb, threshold, tau)
                  for s, n in zip(starts[sizes > 1], sizes[sizes > 1])]
        movers = np.concatenate(losers) if losers else np.zeros(0, dtype=np.int64)
        movers = movers[ptr[movers] + 1 < count[movers]]
        if not len(movers):
            break
        ptr[movers] += 1
    else:
        log.warning("sca: shared images may remain after %d passes", max_passes)
    log.info("sca (%s, threshold %g, tau %g): %d of %d queries changed their top-1 in %d passes",
             rule, threshold, tau, int((ptr > 0).sum()), q, passes)
    return ptr


# -- global assignment ------------------------------------------------------------------------------
def _max_gain_matching(left: np.ndarray, right: np.ndarray, gain: np.ndarray, n_left: int,
                       n_right: int) -> np.ndarray:
    """The matching of largest total gain (edges ``left[i] - right[i]`` with ``gain[i]``; a node is
    used at most once; edges without a positive gain never help) -> for each left node the index of
    its matched edge, or -1.

    Solved as a full matching of the smaller side, each of its nodes with a private "unmatched"
    column (gain 0), by ``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (LAPJVsp:
    memory linear in the edges). A full matching visits every row once, so shifting every weight
    by 1 (the solver needs them non-zero) leaves the optimum unchanged.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    useful = np.flatnonzero(gain > 0)
    rows, cols = (left, right) if n_left <= n_right else (right, left)
    n_rows, n_cols = min(n_left, n_right), max(n_left, n_right)
    r = np.r_[rows[useful], np.arange(n_rows)]
    c = np.r_[cols[useful], n_cols + np.arange(n_rows)]
    weight = np.r_[gain[useful], np.zeros(n_rows)] + 1.0
    shape = (n_rows, n_cols + n_rows)
    _, match = min_weight_full_bipartite_matching(csr_matrix((weight, (r, c)), shape=shape), maximize=True)
    matched = np.flatnonzero(match < n_cols)  # rows that took a real node, not their private column
    out = np.full(n_left, -1, dtype=np.int64)
    if not len(matched):  # nobody gains by moving (e.g. slack 0: every query keeps its top-1)
        return out
    edge_at = csr_matrix((useful + 1, (rows[useful], cols[useful])), shape=shape)  # 1-based edge index
    edges = np.asarray(edge_at[matched, match[matched]]).ravel() - 1
    out[left[edges]] = edges
    return out


def assign(cands: Candidates, k: int = 2, slack: float | None = 1.0) -> np.ndarray:
    """Resolve shared top-1 images by one assignment per collision component.

    Queries and the images among their top-``k`` candidates form a bipartite graph; its connected
    components that hold an image which is the top-1 of several queries are assigned (the others
    already give every query its own top-1). Every query picks one of its top-``k`` candidates,
    each image going to at most one query, maximising the summed raw confidence; with ``slack``
    each query also has a private option to keep its current (shared) top-1 at a utility of
    ``confidence(top-1) - slack`` (``slack`` in the confidence's units), so a query gives its
    top-1 up only when that costs it less than ``slack`` or gains the others more. ``slack=None``
    is the plain one-to-one assignment (a query left without an image keeps its ranking).

    The components share no image, so one sparse matching over their union
    (``scipy.sparse.csgraph.min_weight_full_bipartite_matching``: memory linear in the edges) is
    the same as solving each. Returns [Q] the position of each query's chosen candidate.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if k < 1:
        raise ValueError(f"assign: k must be >= 1, got {k}")
    if slack is not None and slack < 0:
        raise ValueError(f"assign: slack must be >= 0, got {slack}")
    rows, conf = cands.rows[:, :k], cands.conf[:, :k]
    q, k = rows.shape
    chosen = np.zeros(q, dtype=np.int64)
    if q == 0 or k == 0:
        return chosen
    top1 = rows[:, 0]
    images, shared_per_image = np.unique(top1[top1 >= 0], return_counts=True)
    shared = images[shared_per_image > 1]
    if not len(shared):
        return chosen
    valid = rows >= 0
    q_idx = np.broadcast_to(np.arange(q)[:, None], rows.shape)[valid]
    images, img_idx = np.unique(rows[valid], return_inverse=True)
    n_img = len(images)
    graph = coo_matrix((np.ones(len(q_idx), np.int8), (q_idx, q + img_idx)), shape=(q + n_img, q + n_img))
    _, label = connected_components(graph, directed=False)
    colliding = np.isin(top1, shared)
    members = np.flatnonzero(np.isin(label[:q], np.unique(label[:q][colliding])))

    # each member query either keeps its top-1 (utility: top-1 confidence - slack) or takes one of its
    # candidates for itself, gaining (confidence - that); every image goes to at most one query
    local_q = np.full(q, -1, dtype=np.int64)
    local_q[members] = np.arange(len(members))
    e_q, e_pos = np.nonzero(valid & (local_q[:, None] >= 0))
    member_images, e_img = np.unique(rows[e_q, e_pos], return_inverse=True)
    keep = conf[e_q, 0] - (slack if slack is not None else UNMATCHED)
    gain = conf[e_q, e_pos] - keep
    taken = _max_gain_matching(local_q[e_q], e_img, gain, len(members), len(member_images))  # edge index or -1
    took = np.flatnonzero(taken >= 0)
    chosen[members[took]] = e_pos[taken[took]]
    log.info("assign (k %d, slack %s): %d colliding queries in components of %d; %d changed their top-1",
             k, slack, int(colliding.sum()), len(members), int((chosen > 0).sum()))
    return chosen


# -- dual-softmax ---------------------------------------------------------------------------------
def dual_softmax(cands: Candidates, temperature: float = 0.05) -> np.ndarray:
    """Re-order each query's candidates by ``log softmax over queries + log softmax over images``
    of ``confidence / temperature`` (``temperature`` in the confidence's units).

    Both softmaxes run over the listed candidates only (an image's column holds the queries that
    list it): an image many queries like is discounted for each of them, a soft "one image, one
    query". Returns [Q,C] each query's new order of candidate positions.
    """
    if temperature <= 0:
        raise ValueError("dual_softmax: temperature must be > 0")
    rows, conf = cands.rows, cands.conf
    valid = rows >= 0
    z = np.where(valid, conf / temperature, -np.inf)  # [Q,C]
    row_max = np.max(z, axis=1, keepdims=True, initial=-np.inf)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    with np.errstate(divide="ignore"):  # a query without candidates: log(0), never used
        row_lse = row_max + np.log(np.exp(z - row_max).sum(axis=1, keepdims=True))
    _, col = np.unique(rows[valid], return_inverse=True)
    col_max = np.full(col.max() + 1 if len(col) else 0, -np.inf)
    np.maximum.at(col_max, col, z[valid])
    col_sum = np.zeros_like(col_max)
    np.add.at(col_sum, col, np.exp(z[valid] - col_max[col]))
    value = np.full(z.shape, -np.inf)
    value[valid] = 2 * z[valid] - (col_max + np.log(col_sum))[col] - np.broadcast_to(row_lse, z.shape)[valid]
    return np.argsort(-value, axis=1, kind="stable")  # empty slots (-inf) stay last


# -- applying an order to a ranking ---------------------------------------------------------------
def _promotion(chosen: np.ndarray, width: int) -> np.ndarray:
    """[Q,width] orders that move position ``chosen[i]`` to the front and keep the rest in order."""
    pos = np.broadcast_to(np.arange(width), (len(chosen), width))
    rest = np.where(pos - 1 < chosen[:, None], pos - 1, pos)  # slot j >= 1 holds j-1 up to the chosen one, then j
    return np.where(pos == 0, chosen[:, None], rest)


def reorder(ranking: Ranking, order: np.ndarray, method: str) -> Ranking:
    """A copy of ``ranking`` whose first ``C`` listed rows follow ``order`` [Q,C] (positions).

    Raw ``itc``/``itm`` travel with their rows; a query whose order changed gets order-only
    ``score`` values above everything in its row (they encode the new order, not a similarity).
    """
    width = order.shape[1]
    rows, itc, itm, score = (a.copy() for a in (ranking.rows, ranking.itc, ranking.itm, ranking.score))
    changed = np.flatnonzero((order != np.arange(width)).any(axis=1))
    if len(changed):
        for a in (rows, itc, itm):
            a[changed, :width] = np.take_along_axis(a[changed, :width], order[changed], axis=1)
        listed = np.where(ranking.rows[changed] >= 0, ranking.score[changed], -np.inf)
        top = listed.max(axis=1, keepdims=True)  # >= every value of the row in score_matrix()
        step = np.maximum(1.0, np.abs(top) * 1e-3)
        score[changed, :width] = (top + step * (width - np.arange(width))).astype(np.float32)
    post = method if ranking.post == "none" else f"{ranking.post}+{method}"
    return replace(ranking, rows=rows, itc=itc, itm=itm, score=score, post=post)


def resolve_post_options(model, method: str, options: dict[str, Any] | None,
                         ranking: Ranking | None = None) -> dict[str, Any]:
    """The options a method will run with: those given, then what validation picked for the model.

    SCA: ``threshold`` from ``options``, else the model's ``config.sca_threshold``, else
    :data:`DEFAULT_SCA_THRESHOLD` (with a warning); its rule, tau and compared score from
    ``config.sca_options``. Assignment: ``k``, ``slack`` and compared score from
    ``config.assign_options``. An option given here always wins over the stored one.

    Stored tau and slack are prices in the units of the score they were picked on, so they are
    used only on a ranking that has that score (``ranking``, when given): the model's own, and
    re-ranked when they compare ITM or the fusion, and not when ``options`` names another
    ``confidence``. Otherwise (a fusion of systems, an ITC-only run of a model calibrated
    re-ranked) they are left out with a warning; SCA's text threshold, a property of the query
    texts, always carries over.
    """
    options = dict(options or {})
    config = getattr(model, "config", None)
    if method == "sca" and options.get("threshold") is None:
        stored = getattr(config, "sca_threshold", None)
        if stored is None:
            log.warning("sca: no text-similarity threshold given and none stored with the model; using %g "
                        "(pick one on validation: tpas.search.calibrate.calibrate_sca)", DEFAULT_SCA_THRESHOLD)
        options["threshold"] = float(DEFAULT_SCA_THRESHOLD if stored is None else stored)
    field = {"sca": "sca_options", "assign": "assign_options"}.get(method)
    stored = dict(getattr(config, field, None) or {}) if field else {}
    if stored and ranking is not None:
        needs_head = stored.get("confidence") in ("itm", "fused")
        if ranking.scorer != "itc" or (needs_head and ranking.head == 0):
            log.warning("%s: the model's stored options %s were picked on its %s ranking; this one (%s%s) "
                        "has other score units, so they are not used", method, stored,
                        "re-ranked" if needs_head else "own", ranking.scorer,
                        ", not re-ranked" if ranking.head == 0 else "")
            stored = {}
    if "confidence" in options and stored.get("confidence", options["confidence"]) != options["confidence"]:
        stored = {k: v for k, v in stored.items() if k not in ("tau", "slack")}  # priced in the other score
    for key, value in stored.items():
        options.setdefault(key, value)
    return options


def postprocess(ranking: Ranking, method: str = "none", *, confidence: str = "auto", **options) -> Ranking:
    """Apply a query-set method (``none``, ``sca``, ``assign``, ``one_to_one``, ``dual_softmax``)
    to ``ranking``; ``options`` go to the method. Returns a new :class:`Ranking` (the input is
    left intact).

    ``sca`` needs ``threshold`` (see :func:`resolve_post_options`); ``one_to_one`` is ``assign``
    without slack over each query's top-``k`` (default 10).
    """
    if method not in POST_METHODS:
        raise ValueError(f"unknown post-processing {method!r}; choose from {POST_METHODS}")
    if method == "none" or len(ranking) == 0:
        return ranking
    cands = candidates(ranking, confidence)
    width = cands.rows.shape[1]
    if method == "sca":
        if options.get("threshold") is None:
            raise ValueError("sca needs a text-similarity threshold (threshold=...; -1 compares every pair)")
        order = _promotion(sca(cands, ranking.text_embeds, **options), width)
    elif method == "assign":
        order = _promotion(assign(cands, **options), width)
    elif method == "one_to_one":
        order = _promotion(assign(cands, **{"k": 10, **options, "slack": None}), width)
    else:
        order = dual_softmax(cands, **options)
    return reorder(ranking, order, method)
