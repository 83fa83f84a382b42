"""Model-based choice of training pairs: ``diverse`` (k-center coverage) and ``hard`` (worst-ranked).

Both look at the training pairs through a model (zero-shot or trained):

1. **embed** (:func:`pair_embeddings`): every training image goes through the gallery index
   (:func:`tpas.search.index.build_index`: sharded over processes under ``accelerate launch``,
   chunked and resumable), every caption through a chunked, resumable text cache;
2. **diverse** (:func:`kcenter_greedy`): greedy farthest-point (k-center) coverage of the joint
   image+text space, ``[image; text] / sqrt 2`` reduced by PCA. Rounds keep it exact and cheap:
   at the start of a round every pair knows its distance to the nearest chosen pair; the round
   takes the farthest pair, then the next farthest among a candidate pool (updated in memory)
   while that stays at least the largest distance outside the pool, i.e. while the choice is
   provably the one plain greedy would make; then FAISS finds every pair's nearest new center.
   Choosing a pair takes its whole identity group, and every pair of it becomes a center;
3. **hard** (:func:`true_image_ranks`): the rank of each pair's own image when its caption
   queries a sampled gallery (plus the same person's opposite-behaviour image); the groups with
   the worst rank come first, optionally topped up with ``diverse`` (``mix``).

:func:`select_to_folder` is ``tpas select``: read, carve validation identities out, embed if the
strategy needs it, select, write (:mod:`tpas.data.select` has the files and the model-free
strategies).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpas.data.records import GalleryImage, ImageText
from tpas.data.select import (MODEL_FREE, STRATEGIES, GroupIndex, Selection, budget_pairs, select_balanced,
                              select_random, write_pab_subset, write_selection)
from tpas.errors import TpasError
from tpas.search.encode import encode_texts
from tpas.search.index import build_index, model_fingerprint, open_index
from tpas.utils.io import write_json

log = logging.getLogger(__name__)

__all__ = ["PairEmbeddings", "joint_points", "kcenter_greedy", "pair_embeddings", "select_diverse", "select_hard",
           "select_pairs", "select_to_folder", "true_image_ranks"]

PROGRESS = "progress.json"
EMBEDS = "embeds.npy"


# -- embeddings ------------------------------------------------------------------------------------
@dataclass
class PairEmbeddings:
    """ITC embeddings of training pairs: ``image`` [M,E] (one row per distinct image),
    ``image_row`` [N] (pair -> its image), ``text`` [N,E] (its caption), ``partner_row`` [N] (the
    image of the same person's opposite behaviour, -1 when absent or not a candidate)."""

    image: np.ndarray
    image_row: np.ndarray
    text: np.ndarray
    partner_row: np.ndarray

    def __len__(self) -> int:
        return len(self.text)


def _image_rows(pairs: Sequence[ImageText]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Distinct image paths (first-seen order), each pair's image row and its partner's row."""
    position: dict[str, int] = {}
    rows = np.fromiter((position.setdefault(p.image, len(position)) for p in pairs), dtype=np.int64,
                       count=len(pairs))
    partner = np.fromiter((position.get(p.hard_image, -1) if p.hard_image else -1 for p in pairs),
                          dtype=np.int64, count=len(pairs))
    return list(position), rows, partner


def _caption_embeddings(model, texts: Sequence[str], out: Path, chunk_size: int, batch_size: int,
                        progress: bool) -> np.ndarray:
    """Caption embeddings [N,E] through a memory map, chunk by chunk; a killed run resumes.

    One process does this (captions cost a small fraction of what images cost); a cache made
    with another model or other captions is started again.
    """
    from tqdm.auto import tqdm

    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    state = {"model_sha256": model_fingerprint(model), "texts_sha256": digest, "count": len(texts),
             "chunk_size": chunk_size, "dim": int(model.config.embed_dim)}
    done: set[int] = set()
    recorded = json.loads((out / PROGRESS).read_text()) if (out / PROGRESS).is_file() else {}
    if {k: recorded.get(k) for k in state} == state and (out / EMBEDS).is_file():
        done = set(recorded["done"])
        embeds = np.lib.format.open_memmap(out / EMBEDS, mode="r+")
    else:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        embeds = np.lib.format.open_memmap(out / EMBEDS, mode="w+", dtype=np.float32, shape=(len(texts), state["dim"]))
    chunks = range((len(texts) + chunk_size - 1) // chunk_size)
    with tqdm(total=len(texts), initial=sum(min(chunk_size, len(texts) - c * chunk_size) for c in done),
              desc="encode captions", unit="text", disable=not progress) as bar:
        for c in (c for c in chunks if c not in done):
            lo, hi = c * chunk_size, min(len(texts), (c + 1) * chunk_size)
            embeds[lo:hi] = encode_texts(model, texts[lo:hi], batch_size=batch_size, progress=False).embeds
            embeds.flush()
            done.add(c)
            write_json(out / PROGRESS, {**state, "done": sorted(done)}, indent=None)
            bar.update(hi - lo)
    return np.asarray(embeds)


def pair_embeddings(model, pairs: Sequence[ImageText], root: str | Path, cache: str | Path, *,
                    batch_size: int = 64, workers: int = 0, text_chunk: int = 8192,
                    progress: bool = True) -> PairEmbeddings | None:
    """Embed ``pairs`` with ``model``, caching under ``cache`` (``images/``: a gallery index without
    tokens; ``texts/``: caption embeddings). Under ``accelerate launch`` every process encodes its
    shard of the images; only the main process (RANK 0) continues and gets the result, the others
    get None."""
    cache = Path(cache)
    paths, image_row, partner_row = _image_rows(pairs)
    gallery = [GalleryImage(image=path, image_id=path, target=None) for path in paths]
    build_index(model, gallery, root, cache / "images", batch_size=batch_size, workers=workers, keep_tokens=False,
                progress=progress)
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    image = open_index(cache / "images", model).embeds
    text = _caption_embeddings(model, [p.caption for p in pairs], cache / "texts", text_chunk, max(batch_size, 128),
                               progress)
    return PairEmbeddings(image=image, image_row=image_row, text=text, partner_row=partner_row)


def joint_points(emb: PairEmbeddings, dims: int = 64, seed: int = 0, chunk: int = 65536) -> np.ndarray:
    """``[image; text] / sqrt 2`` per pair, projected on its top ``dims`` principal axes (0 = keep all).

    PCA keeps the Euclidean geometry of the main directions and makes k-center's distance work
    (pairs x centers x dims) several times cheaper at PAB scale; the axes come from up to 100,000
    sampled pairs.
    """
    def block(rows: np.ndarray) -> np.ndarray:
        joint = np.hstack([emb.image[emb.image_row[rows]], emb.text[rows]]).astype(np.float32)
        return joint / np.float32(np.sqrt(2))

    n, full = len(emb), emb.image.shape[1] + emb.text.shape[1]
    if dims <= 0 or dims >= full:
        return block(np.arange(n))
    sample = block(np.sort(np.random.default_rng(seed).choice(n, min(n, 100_000), replace=False))).astype(np.float64)
    mean = sample.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov(sample - mean, rowvar=False))
    axes = vectors[:, ::-1][:, :dims].astype(np.float32)  # eigh sorts ascending
    out = np.empty((n, dims), dtype=np.float32)
    for lo in range(0, n, chunk):
        rows = np.arange(lo, min(n, lo + chunk))
        out[rows] = (block(rows) - mean.astype(np.float32)) @ axes
    return out


# -- diverse: greedy k-center --------------------------------------------------------------------
def _nearest_center(points: np.ndarray, centers: np.ndarray, d_min: np.ndarray, chunk: int = 262144) -> None:
    """``d_min = min(d_min, squared distance to the nearest of centers)``, through FAISS."""
    import faiss

    index = faiss.IndexFlatL2(points.shape[1])
    index.add(np.ascontiguousarray(centers))
    for lo in range(0, len(points), chunk):
        dist, _ = index.search(points[lo:lo + chunk], 1)
        np.minimum(d_min[lo:lo + chunk], dist[:, 0], out=d_min[lo:lo + chunk])


def kcenter_greedy(points: np.ndarray, groups: GroupIndex, budget: int, seed: int = 0,
                   initial: np.ndarray | None = None, pool: int = 4096, round_limit: int = 1024,
                   progress: bool = True) -> tuple[np.ndarray, dict]:
    """Greedy farthest-point choice of identity groups until they hold ``budget`` pairs.

    ``initial`` groups (e.g. the hard ones) count as chosen and as centers from the start; without
    them a seeded random group starts. Every pick is the one textbook greedy makes (see the module
    docstring). Returns (groups in the order chosen, statistics: rounds, picks, covering radius
    before and after, dimensions).
    """
    from tqdm.auto import tqdm

    points = np.ascontiguousarray(points, dtype=np.float32)
    n = len(points)
    d_min = np.full(n, np.inf, dtype=np.float32)
    taken = np.zeros(len(groups), dtype=bool)
    if initial is None or len(initial) == 0:
        initial = np.array([np.random.default_rng(seed).integers(len(groups))], dtype=np.int64)
    chosen = list(np.asarray(initial, dtype=np.int64))
    taken[chosen] = True
    first_rows = groups.pair_rows(np.asarray(chosen))
    filled = len(first_rows)
    _nearest_center(points, points[first_rows], d_min)
    start_radius = float(np.sqrt(d_min.max()))
    rounds = picks = 0
    bar = tqdm(total=budget, initial=min(filled, budget), desc="k-center", unit="pair", disable=not progress)
    while filled < budget:
        m = min(pool, n - 1)
        part = np.argpartition(-d_min, m)
        cand, threshold = part[:m], float(d_min[part[m]])  # the pool, and the best distance outside it
        fresh, near = d_min[cand].copy(), points[cand]
        near_sq = np.einsum("md,md->m", near, near)
        new_rows: list[np.ndarray] = []
        for turn in range(round_limit):
            j = int(np.argmax(fresh))
            if fresh[j] <= 0 or (turn and fresh[j] < threshold):
                break  # everything covered, or the pool no longer holds the provably farthest pair
            g = int(groups.group_of[cand[j]])
            rows = groups.members(g)
            taken[g] = True
            chosen.append(g)
            new_rows.append(rows)
            filled += len(rows)
            picks += 1
            for center in points[rows]:  # a matrix-vector product per center: cheap for the 1-2 of a person
                np.minimum(fresh, near_sq - 2 * (near @ center) + float(center @ center), out=fresh)
            if filled >= budget:
                break
        rounds += 1
        if not new_rows:  # duplicates only are left: fill the rest at random
            rest = np.random.default_rng(seed + rounds).permutation(np.flatnonzero(~taken))
            extra = groups.take(rest, budget - filled)
            chosen.extend(extra.tolist())
            filled += int(groups.sizes[extra].sum())
            break
        rows = np.concatenate(new_rows)
        _nearest_center(points, points[rows], d_min)
        bar.update(min(len(rows), budget - bar.n))
    bar.close()
    stats = {"rounds": rounds, "picks": picks, "radius_start": round(start_radius, 6),
             "radius_end": round(float(np.sqrt(d_min.max())), 6), "dims": int(points.shape[1])}
    return np.array(chosen, dtype=np.int64), stats


def select_diverse(emb: PairEmbeddings, groups: GroupIndex, size: float, seed: int = 0, dims: int = 64,
                   progress: bool = True) -> Selection:
    """``diverse``: k-center coverage of the joint embedding space."""
    budget = budget_pairs(size, len(emb))
    chosen, stats = kcenter_greedy(joint_points(emb, dims, seed), groups, budget, seed, progress=progress)
    return _as_selection("diverse", groups, chosen, budget, seed=seed, **stats)


# -- hard: worst-ranked pairs --------------------------------------------------------------------
def true_image_ranks(emb: PairEmbeddings, gallery: int = 1024, seed: int = 0, chunk: int = 4096) -> np.ndarray:
    """Rank (1 = first) of each pair's own image when its caption queries a gallery of ``gallery``
    images sampled once for all pairs, plus the pair's partner (the same person's other behaviour,
    PAB's hard negative). ITC cosine; the sampled gallery keeps this linear in the pairs."""
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(emb.image), min(gallery, len(emb.image)), replace=False))
    sampled = np.ascontiguousarray(emb.image[sample])
    ranks = np.empty(len(emb), dtype=np.int64)
    for lo in range(0, len(emb), chunk):
        rows = np.arange(lo, min(len(emb), lo + chunk))
        text, own_row, partner = emb.text[rows], emb.image_row[rows], emb.partner_row[rows]
        own = np.einsum("qe,qe->q", text, emb.image[own_row])
        beats = (text @ sampled.T) > own[:, None]
        beats &= (sample[None, :] != own_row[:, None]) & (sample[None, :] != partner[:, None])
        partner_beats = (partner >= 0) & (np.einsum("qe,qe->q", text, emb.image[np.maximum(partner, 0)]) > own)
        ranks[rows] = 1 + beats.sum(axis=1) + partner_beats
    return ranks


def select_hard(emb: PairEmbeddings, groups: GroupIndex, size: float, seed: int = 0, gallery: int = 1024,
                mix: float = 0.0, dims: int = 64, progress: bool = True) -> Selection:
    """``hard``: identity groups by their worst pair's rank, worst first (seeded order among equals);
    ``mix`` > 0 leaves that share of the budget to ``diverse``, started from the hard groups."""
    if not 0 <= mix < 1:
        raise TpasError(f"mix must be in [0, 1), got {mix}")
    budget = budget_pairs(size, len(emb))
    ranks = true_image_ranks(emb, gallery, seed)
    worst = np.maximum.reduceat(ranks[groups.rows], groups.offsets[:-1])
    order = np.lexsort((np.random.default_rng(seed).random(len(groups)), -worst))
    hard_budget = int(round(budget * (1 - mix)))
    chosen = groups.take(order, hard_budget) if hard_budget > 0 else np.zeros(0, dtype=np.int64)
    stats: dict = {}
    if mix > 0:
        chosen, stats = kcenter_greedy(joint_points(emb, dims, seed), groups, budget, seed, initial=chosen,
                                       progress=progress)
    picked = np.isin(np.arange(len(groups)), chosen)
    return _as_selection("hard", groups, chosen, budget, seed=seed, gallery=gallery, mix=mix,
                         median_rank_chosen=float(np.median(worst[picked])), median_rank_all=float(np.median(worst)),
                         **stats)


def _as_selection(strategy: str, groups: GroupIndex, chosen: np.ndarray, budget: int, **settings) -> Selection:
    return Selection(strategy=strategy, rows=groups.pair_rows(chosen), groups=len(chosen),
                     candidates=len(groups.group_of), candidate_groups=len(groups), budget=budget, settings=settings)


# -- one entry point -------------------------------------------------------------------------------
def select_pairs(pairs: Sequence[ImageText], strategy: str, size: float, *, seed: int = 0,
                 embeddings: PairEmbeddings | None = None, dims: int = 64, gallery: int = 1024, mix: float = 0.0,
                 progress: bool = True) -> Selection:
    """Choose ``size`` (a fraction <= 1 or a pair count) of ``pairs`` by ``strategy``; identity
    groups stay whole. ``diverse`` and ``hard`` need ``embeddings`` (:func:`pair_embeddings`)."""
    if strategy not in STRATEGIES:
        raise TpasError(f"unknown selection strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    start = time.perf_counter()
    groups = GroupIndex.of(pairs)
    if strategy == "random":
        selection = select_random(pairs, size, seed, groups)
    elif strategy == "balanced":
        selection = select_balanced(pairs, size, seed, groups)
    elif embeddings is None or len(embeddings) != len(pairs):
        raise TpasError(f"strategy {strategy!r} needs the pairs' embeddings from a model (pair_embeddings)")
    elif strategy == "diverse":
        selection = select_diverse(embeddings, groups, size, seed, dims, progress)
    else:
        selection = select_hard(embeddings, groups, size, seed, gallery, mix, dims, progress)
    selection.seconds["select"] = time.perf_counter() - start
    return selection


def select_to_folder(root: str | Path, out: str | Path, strategy: str, size: float, *, fmt: str = "pab",
                     seed: int = 0, val_identities: float = 0.0, val_seed: int = 42, model: str = "lite",
                     checkpoint: str | None = None, device: str | None = None, cache: str | Path | None = None,
                     dims: int = 64, gallery: int = 1024, mix: float = 0.0, batch_size: int = 64, workers: int = 0,
                     annotation: bool = True, progress: bool = True) -> Path | None:
    """``tpas select``: write a selection of ``root``'s training pairs into ``out`` (see
    :mod:`tpas.data.select` for the files). Validation identities (``val_identities``,
    ``val_seed``: pass the training config's ``data.val_identities`` and ``train.seed``) are carved
    out first, exactly as the trainer carves them, so the budget is spent on pairs that train.
    Returns ``out`` (None on the non-main processes of a sharded run)."""
    from tpas.data.datasets import load_train
    from tpas.data.loader import split_by_identity

    if strategy not in STRATEGIES:
        raise TpasError(f"unknown selection strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    out = Path(out)
    seconds: dict[str, float] = {}
    tick = time.perf_counter()
    trainset = load_train(root, fmt)
    pairs, held_out = split_by_identity(trainset.pairs, val_identities, val_seed)
    seconds["read"] = time.perf_counter() - tick
    embeddings, model_info = None, {}
    if strategy not in MODEL_FREE:
        import torch

        from tpas.models import create_model

        tick = time.perf_counter()
        torch.manual_seed(seed)  # a zero-shot model's new heads are random: the seed makes them repeatable
        net = create_model(model, checkpoint=checkpoint, device=device)
        fingerprint = model_fingerprint(net)
        embeddings = pair_embeddings(net, pairs, trainset.root, Path(cache or out / "embeddings") / fingerprint[:16],
                                     batch_size=batch_size, workers=workers, progress=progress)
        if embeddings is None:
            return None
        model_info = {"model": str(model), "checkpoint": checkpoint, "model_sha256": fingerprint}
        seconds["embed"] = time.perf_counter() - tick
    selection = select_pairs(pairs, strategy, size, seed=seed, embeddings=embeddings, dims=dims, gallery=gallery,
                             mix=mix, progress=progress)
    selection.seconds.update(seconds)
    tick = time.perf_counter()
    if annotation and fmt == "pab":
        write_pab_subset(trainset.root, out, [pairs[i].image_id for i in selection.rows])
    selection.seconds["write"] = time.perf_counter() - tick
    write_selection(out, pairs, selection, {
        "source": str(Path(trainset.root).resolve()), "format": fmt, "size": size,
        "validation": {"identities": val_identities, "seed": val_seed, "held_out_pairs": len(held_out)},
        **model_info})
    return out
