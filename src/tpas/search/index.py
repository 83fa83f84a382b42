"""A persisted gallery index: encode once, search many times.

Layout of an index directory::

    meta.json        written last: its presence means "complete" (model fingerprint, dims, ...)
    items.json       [{"id", "image", "target", "behaviour"}] in gallery order; "image" is relative
                     to meta["gallery_root"]
    embeds.npy       float32 [N,E] L2-normalised ITC embeddings (rows follow items.json)
    faiss.index      FAISS index over embeds: exact inner product for small galleries, IVF (or HNSW)
                     for large ones, its search depth tuned at build time to a target recall@10
    shards/RRRRR-of-WWWWW/
        tokens.npy   image tokens of the rows [start, stop) for ITM re-ranking, in the index's token
                     codec (fp16 [n_r,T,D], int8 [n_r,T,D] or packed int4; :mod:`tpas.search.quantize`),
                     read through a memory map (they are the bulk of an index)
        token_scales.npy  the codec's scales (int8, int4)
        embeds.npy   float32 [n_r,E] this shard's embeddings (merged into the top-level file)
        progress.json  which chunks are finished (rewritten atomically after each chunk)

Building is split into contiguous shards, one per process (``accelerate launch`` sets ``RANK`` and
``WORLD_SIZE``); each process writes its own shard and rank 0 merges the small parts (embeddings,
items, FAISS) once every shard is complete. Token shards stay where they are and are listed in
``meta.json``. Within a shard the work is done in chunks: after each chunk the memory maps are
flushed and the chunk is recorded in ``progress.json``, so a killed run continues where it stopped
when started again with the same model, gallery and number of processes.

An index remembers a fingerprint of the weights it was built with; opening it with another model
is refused, since embeddings of two different models are not comparable.

Which FAISS structure (``faiss_kind="auto"``): exact search costs one pass over all N embeddings
per query (~44 ms per million on one core, memory-bound), so galleries up to ``EXACT_MAX`` are
searched exactly and larger ones through an inverted file (IVF) whose probe count is the smallest
that reaches ``target_recall`` of exact recall@10 on generated caption queries; the measured curve
is stored in ``meta.json`` (``search``) and printed by ``tpas index``.

Format versions: 2 adds the token codec and the tuned search; version-1 indexes (fp16 tokens,
fixed search depths) still open.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpas.data.records import Behaviour, EvalSet, GalleryImage
from tpas.errors import DataError, TpasError
from tpas.utils.io import atomic_path, write_json

log = logging.getLogger(__name__)
# faiss's loader logs at INFO which CPU build it tried ("could not load library with AVX2 support"):
# noise on every command that opens an index; its warnings and errors still show.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

__all__ = ["EXACT_MAX", "FAISS_KINDS", "GalleryIndex", "TokenStore", "build_index", "gallery_from_folder",
           "faiss_knn", "index_evalset", "measure_recall", "model_fingerprint", "open_index", "resolve_kind", "caption_queries"]

INDEX_VERSION = 2
READABLE_VERSIONS = (1, 2)
META = "meta.json"
ITEMS = "items.json"
EMBEDS = "embeds.npy"
FAISS_FILE = "faiss.index"
SHARDS = "shards"
PROGRESS = "progress.json"
TOKENS = "tokens.npy"
TOKEN_SCALES = "token_scales.npy"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FAISS_KINDS = ("auto", "flat", "ivf", "hnsw")
EXACT_MAX = 100_000  # "auto": exact search up to this many images (~4 ms a query on one core), IVF above
RECALL_K = 10
# search depths tried at build time, shallow to deep, until the target recall is reached
IVF_PROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
HNSW_EFS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


# -- fingerprints ------------------------------------------------------------------------------
def model_fingerprint(model) -> str:
    """sha256 over the model family, its config and every tensor of its state dict (names + bytes).

    Hashing the live tensors (not a file) works for models built in memory and for saved ones
    alike; ~0.2 s for the lite model.
    """
    import torch

    model = getattr(model, "torch_model", model)  # a runtime wrapper hashes as the model it runs
    h = hashlib.sha256()
    h.update(str(getattr(model, "family", type(model).__name__)).encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gallery_digest(images: Sequence[GalleryImage]) -> str:
    h = hashlib.sha256()
    for g in images:
        h.update(f"{g.image_id}\t{g.image}\n".encode())
    return h.hexdigest()


# -- galleries -----------------------------------------------------------------------------------
def gallery_from_folder(folder: str | Path) -> list[GalleryImage]:
    """Every image under ``folder`` (recursive, sorted); id = relative path without extension."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    images: list[GalleryImage] = []
    seen: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        rel = path.relative_to(folder).as_posix()
        image_id = rel.rsplit(".", 1)[0]
        if image_id in seen:
            raise DataError(f"two images share the id {image_id!r}: {seen[image_id]} and {rel}", folder)
        seen[image_id] = rel
        images.append(GalleryImage(image=rel, image_id=image_id, target=None))
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found", folder)
    return images


def _check_gallery(images: Sequence[GalleryImage]) -> None:
    if not images:
        raise TpasError("cannot index an empty gallery")
    seen: set[str] = set()
    for g in images:
        if g.image_id in seen:
            raise TpasError(f"gallery image id {g.image_id!r} appears twice (image {g.image})")
        seen.add(g.image_id)


# -- building ----------------------------------------------------------------------------------
def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


def _barrier(world_size: int) -> None:
    """Wait for every process. Uses the launcher's process group (accelerate/torchrun) when there is
    one, else joins a gloo group from the env:// variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    if world_size <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    dist.barrier()


def shard_name(rank: int, world_size: int) -> str:
    return f"{rank:05d}-of-{world_size:05d}"


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice of rows [start, stop) that ``rank`` encodes."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _probe_shapes(model) -> tuple[int, tuple[int, ...]]:
    """(embedding dim, token shape [T,D]) from one blank image."""
    import torch

    from tpas.search.encode import inference

    with inference(model):
        out = model.encode_image(torch.zeros(1, 3, *model.image_size, device=model.device))
    return int(out.embeds.shape[-1]), tuple(int(s) for s in out.tokens.shape[1:])


def _open_memmap(path: Path, dtype, shape: tuple[int, ...], resume: bool) -> np.ndarray:
    if resume:
        arr = np.lib.format.open_memmap(path, mode="r+")
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
            raise TpasError(f"{path}: has shape {arr.shape} {arr.dtype}, expected {shape} {np.dtype(dtype)}; "
                            "rebuild with --overwrite")
        return arr
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _encode_shard(source: "Source", shard_dir: Path, start: int, stop: int, state: dict, chunk_size: int,
                  keep_tokens: bool, overwrite: bool, progress: bool) -> None:
    """Write rows [start, stop) from ``source`` into ``shard_dir`` chunk by chunk, resuming from progress.json."""
    from tqdm.auto import tqdm

    from tpas.search.quantize import encode_tokens

    progress_file = shard_dir / PROGRESS
    expected = {**state, "start": start, "stop": stop, "chunk_size": chunk_size, "keep_tokens": keep_tokens}
    done: set[int] = set()
    resume = False
    if progress_file.is_file():
        recorded = json.loads(progress_file.read_text())
        if {k: recorded.get(k) for k in expected} == expected:
            done = set(recorded.get("done", []))
            resume = True
        elif not overwrite:
            raise TpasError(f"{shard_dir} holds a partial index built with another model, gallery, token codec "
                            "or number of processes; pass --overwrite to start again")
    if not resume and shard_dir.exists():
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)

    n = stop - start
    codec, token_shape = state["token_codec"], tuple(state["token_shape"])
    embeds = _open_memmap(shard_dir / EMBEDS, np.float32, (n, state["embed_dim"]), resume)
    tokens = scales = None
    if keep_tokens:  # stored shapes and dtypes of the codec, from one blank token set
        codes, sc = encode_tokens(np.zeros((1, *token_shape), np.float32), codec)
        tokens = _open_memmap(shard_dir / TOKENS, codes.dtype, (n, *codes.shape[1:]), resume)
        if sc is not None:
            scales = _open_memmap(shard_dir / TOKEN_SCALES, sc.dtype, (n, *sc.shape[1:]), resume)
    chunks = range((n + chunk_size - 1) // chunk_size)
    todo = [c for c in chunks if c not in done]
    if resume:
        log.info("resuming %s: %d of %d chunks already done", shard_dir, len(done), len(chunks))
    skipped = sum(min(chunk_size, n - c * chunk_size) for c in done)
    with tqdm(total=n, initial=skipped, desc=f"index {shard_dir.name}", unit="img", disable=not progress) as bar:
        for c in todo:
            lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
            for b_start, emb, tok in source(start + lo, start + hi):
                at = lo + b_start
                embeds[at:at + len(emb)] = emb
                if tokens is not None:
                    codes, sc = encode_tokens(tok, codec)
                    tokens[at:at + len(emb)] = codes
                    if scales is not None:
                        scales[at:at + len(emb)] = sc
                bar.update(len(emb))
            for arr in (embeds, tokens, scales):
                if arr is not None:
                    arr.flush()
            done.add(c)
            write_json(progress_file, {**expected, "done": sorted(done), "complete": len(done) == len(chunks)})
    if not todo:  # nothing left: still record completion (e.g. an empty shard)
        write_json(progress_file, {**expected, "done": sorted(done), "complete": True})
    del embeds, tokens, scales


# -- the search structure ------------------------------------------------------------------------
def resolve_kind(kind: str, count: int) -> str:
    """The FAISS structure for ``kind`` and a gallery of ``count`` images ("auto" decides by size)."""
    if kind not in FAISS_KINDS:
        raise TpasError(f"unknown FAISS index kind {kind!r}; choose from {', '.join(FAISS_KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if count <= EXACT_MAX else "ivf"


def _build_faiss(embeds: np.ndarray, kind: str):
    import faiss

    n, d = embeds.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(int(2 * np.sqrt(n)), n // 39 or 1))  # FAISS wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.referenced_objects = [quantizer]  # keep the coarse quantizer alive with the index
        index.cp.max_points_per_centroid = 64  # k-means on <= 64 points per list: minutes -> seconds at 1M
        rng = np.random.default_rng(0)
        sample = embeds if n <= 64 * nlist else embeds[np.sort(rng.choice(n, 64 * nlist, replace=False))]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        raise ValueError(f"unknown FAISS index kind {kind!r}")
    for lo in range(0, n, 1 << 18):  # add in slices: one float32 copy of a slice at a time
        index.add(np.ascontiguousarray(embeds[lo:lo + (1 << 18)], dtype=np.float32))
    return index


def _set_depth(index, kind: str, depth: int | None) -> None:
    """Apply a search depth (IVF probes, HNSW efSearch) to a FAISS index."""
    import faiss

    if depth is None:
        return
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(depth)
    elif kind == "hnsw":
        index.hnsw.efSearch = int(depth)


def caption_queries(model, count: int = 500, seed: int = 0) -> np.ndarray:
    """ITC embeddings [count,E] of generated PAB-style captions: text queries like real ones, no data needed.

    Approximate search is tuned on text queries (not on gallery images) because text and image
    embeddings sit apart in the shared space, so image neighbours would mislead the tuning.
    """
    from tpas.data.synth.appearance import sample_appearance
    from tpas.data.synth.captions import ACTION_WORDS, SCENE_WORDS, make_caption
    from tpas.search.encode import encode_texts

    rng = np.random.default_rng(seed)
    actions, scenes = sorted(ACTION_WORDS), sorted(SCENE_WORDS)
    texts = [make_caption(sample_appearance(rng), actions[rng.integers(len(actions))],
                          scenes[rng.integers(len(scenes))], rng) for _ in range(count)]
    return encode_texts(model, texts, progress=False).embeds


def faiss_knn(queries: np.ndarray, embeds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product without building an index (scores [Q,k], rows [Q,k])."""
    import faiss

    return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), np.ascontiguousarray(embeds, dtype=np.float32),
                     k, metric=faiss.METRIC_INNER_PRODUCT)


def measure_recall(index, kind: str, embeds: np.ndarray, queries: np.ndarray, depths: Sequence[int | None],
                   target: float, k: int = RECALL_K) -> dict:
    """Recall@k of ``index`` against exact search, depth by depth until ``target`` is reached.

    Returns ``{"depth", "recall_at_10", "curve": {depth: recall}}`` with the first depth that
    reaches ``target`` (the deepest tried when none does).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(embeds))
    _, exact = faiss_knn(queries, embeds, k)
    curve: dict[str, float] = {}
    chosen, recall = None, 0.0
    for depth in depths:
        _set_depth(index, kind, depth)
        _, found = index.search(queries, k)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), exact.tolist())]))
        curve[str(depth)] = round(recall, 4)
        chosen = depth
        if recall >= target:
            break
    if recall < target:
        log.warning("%s search reached recall@%d %.3f < target %.3f at its deepest setting", kind, k, recall, target)
    _set_depth(index, kind, chosen)
    return {"depth": chosen, "recall_at_10": round(recall, 4), "curve": curve}


def _write_search(model, out: Path, embeds: np.ndarray, kind: str, target_recall: float,
                  tuning: int) -> dict:
    """Build, tune and save the FAISS structure; returns the ``search`` entry of meta.json."""
    import faiss

    index = _build_faiss(embeds, kind)
    info: dict = {"kind": kind, "count": int(len(embeds)), "target_recall": target_recall}
    if kind == "flat":
        info.update(depth=None, recall_at_10=1.0, curve={})
    else:
        depths = IVF_PROBES if kind == "ivf" else HNSW_EFS
        if kind == "ivf":
            info["nlist"] = int(faiss.extract_index_ivf(index).nlist)
            depths = [p for p in depths if p < info["nlist"]] + [info["nlist"]]
        queries = caption_queries(model, tuning)
        info.update(measure_recall(index, kind, embeds, queries, depths, target_recall),
                    recall_queries=f"{len(queries)} generated captions")
    info["param"] = {"flat": None, "ivf": "nprobe", "hnsw": "efSearch"}[kind]
    with atomic_path(out / FAISS_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    log.info("wrote %s FAISS index over %d embeddings (recall@10 %.4f)", kind, len(embeds), info["recall_at_10"])
    return info


# -- the writer ------------------------------------------------------------------------------------
Source = Callable[[int, int], Iterable[tuple[int, np.ndarray, "np.ndarray | None"]]]


def image_source(model, images: Sequence[GalleryImage], root: Path, batch_size: int = 64, workers: int = 0,
                 keep_tokens: bool = True) -> Source:
    """The default source: rows [lo, hi) of ``images`` decoded and encoded by ``model``."""

    def source(lo: int, hi: int):
        from tpas.search.encode import inference, iter_image_batches

        paths = [root / g.image for g in images[lo:hi]]
        with inference(model):
            yield from iter_image_batches(model, paths, batch_size, workers, keep_tokens, progress=False)

    return source


def build_index(model, images: Sequence[GalleryImage], root: str | Path, out: str | Path, *,
                batch_size: int = 64, workers: int = 0, chunk_size: int = 2048, faiss_kind: str = "auto",
                keep_tokens: bool = True, token_codec: str = "fp16", target_recall: float = 0.99,
                tuning_queries: int = 500, overwrite: bool = False, progress: bool = True,
                rank: int | None = None, world_size: int | None = None, source: Source | None = None) -> Path:
    """Encode ``images`` (paths relative to ``root``) with ``model`` into the index directory ``out``.

    Resumes an interrupted build automatically. An index already complete for the same model and
    gallery is left as it is (its FAISS structure is rebuilt when another ``faiss_kind`` is asked
    for); one built for something else is refused unless ``overwrite``. Under ``accelerate
    launch`` every process calls this; each encodes its shard and rank 0 merges. ``source``
    replaces the image encoder (``source(lo, hi)`` yields ``(offset, embeds, tokens)`` for rows
    [lo, hi); the scale benchmark writes synthetic rows through it). Returns ``out``.
    """
    from tpas.search.quantize import TOKEN_CODECS, token_bytes

    resolve_kind(faiss_kind, 0)  # validates the name
    if token_codec not in TOKEN_CODECS:
        raise TpasError(f"unknown token codec {token_codec!r}; choose from {', '.join(TOKEN_CODECS)}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    images = list(images)
    _check_gallery(images)
    root, out = Path(root).resolve(), Path(out)
    rank, world_size = _dist_info(rank, world_size)
    fingerprint = model_fingerprint(model)
    state = {"version": INDEX_VERSION, "model_sha256": fingerprint, "gallery_sha256": _gallery_digest(images),
             "count": len(images), "token_codec": token_codec}
    search_args = (resolve_kind(faiss_kind, len(images)), target_recall, tuning_queries)

    meta_path = out / META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        same = meta.get("model_sha256") == fingerprint and meta.get("gallery_sha256") == state["gallery_sha256"]
        same_tokens = meta.get("token_codec", "fp16") == token_codec or not keep_tokens
        if same and same_tokens and not overwrite:
            log.info("index %s is already complete for this model and gallery", out)
            if meta.get("faiss") != search_args[0] and rank == 0:  # only the search structure changes
                search = _write_search(model, out, np.load(out / EMBEDS, mmap_mode="r"), *search_args)
                write_json(meta_path, {**meta, "faiss": search_args[0], "search": search})
            return out
        if not overwrite:
            what = "model" if meta.get("model_sha256") != fingerprint else "gallery" if not same else "token codec"
            raise TpasError(f"{out} already holds an index for another {what}; pass --overwrite or choose another --out")
    _barrier(world_size)  # everybody has read the old meta before rank 0 removes it
    if overwrite and rank == 0:
        for name in (META, ITEMS, EMBEDS, FAISS_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    embed_dim, token_shape = _probe_shapes(model)
    state.update(embed_dim=embed_dim, token_shape=list(token_shape))
    if source is None:
        source = image_source(model, images, root, batch_size, workers, keep_tokens)
    start, stop = shard_range(len(images), rank, world_size)
    shard_dir = out / SHARDS / shard_name(rank, world_size)
    _encode_shard(source, shard_dir, start, stop, state, chunk_size, keep_tokens, overwrite, progress)
    _barrier(world_size)
    if rank == 0:
        state["token_bytes"] = token_bytes(token_shape, token_codec) if keep_tokens else 0
        _merge(model, images, root, out, state, world_size, search_args, keep_tokens)
    _barrier(world_size)
    return out


def _merge(model, images, root: Path, out: Path, state: dict, world_size: int, search_args: tuple,
           keep_tokens: bool) -> None:
    shards = []
    with atomic_path(out / EMBEDS) as tmp:  # shard embeddings streamed into one file
        embeds = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(images), state["embed_dim"]))
        for r in range(world_size):
            shard_dir = out / SHARDS / shard_name(r, world_size)
            recorded = json.loads((shard_dir / PROGRESS).read_text())
            if not recorded.get("complete"):
                raise TpasError(f"shard {shard_dir} is not complete; run the index command again to resume")
            start, stop = recorded["start"], recorded["stop"]
            embeds[start:stop] = np.load(shard_dir / EMBEDS, mmap_mode="r")
            if keep_tokens:
                entry = {"path": (shard_dir / TOKENS).relative_to(out).as_posix(), "start": start, "stop": stop}
                if (shard_dir / TOKEN_SCALES).is_file():
                    entry["scales"] = (shard_dir / TOKEN_SCALES).relative_to(out).as_posix()
                shards.append(entry)
        embeds.flush()
        del embeds
    write_json(out / ITEMS, [{"id": g.image_id, "image": g.image, "target": g.target,
                              "behaviour": g.behaviour.value} for g in images], indent=None)
    search = _write_search(model, out, np.load(out / EMBEDS, mmap_mode="r"), *search_args)
    meta = {
        **state,
        "model_family": getattr(model, "family", type(model).__name__),
        "model_name": getattr(model, "name_or_path", None) or getattr(model.config, "name", None),
        "image_size": list(model.image_size),
        "gallery_root": str(root),
        "faiss": search["kind"],
        "search": search,
        "token_shards": shards,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / META, meta)  # last: marks the index complete
    log.info("wrote index of %d images to %s", len(images), out)


# -- reading -----------------------------------------------------------------------------------
class TokenStore:
    """Row-gather over the memory-mapped token shards, as if they were one [N,T,D] array.

    Codes are decoded on the way out (:func:`tpas.search.quantize.decode_tokens`), so callers see
    tokens whatever the codec: float16 for an fp16 store, float32 for int8 / int4.
    """

    def __init__(self, directory: Path, shards: list[dict], count: int, token_shape: Sequence[int],
                 codec: str = "fp16"):
        self.shape = (count, *token_shape)
        self.codec = codec
        self._starts = np.array([s["start"] for s in shards], dtype=np.int64)
        self._stops = np.array([s["stop"] for s in shards], dtype=np.int64)
        self._codes = [np.load(directory / s["path"], mmap_mode="r") for s in shards]
        self._scales = [np.load(directory / s["scales"], mmap_mode="r") if "scales" in s else None for s in shards]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        """Tokens [len(rows),T,D] for an integer array of gallery rows (any order, repeats allowed)."""
        from tpas.search.quantize import decode_tokens

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"token rows out of range [0, {self.shape[0]})")
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.float16 if self.codec == "fp16" else np.float32)
        shard_of = np.searchsorted(self._stops, rows, side="right")
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            local = rows[sel] - self._starts[s]
            order = np.argsort(local, kind="stable")  # read the file front to back
            scales = None if self._scales[s] is None else self._scales[s][local[order]]
            out[sel[order]] = decode_tokens(self._codes[s][local[order]], scales, self.codec, self.shape[-1])
        return out


@dataclass
class GalleryIndex:
    """An opened index: items, embeddings, memory-mapped tokens, FAISS (loaded on first use)."""

    directory: Path
    meta: dict
    items: list[GalleryImage]
    embeds: np.ndarray
    root: Path

    def __post_init__(self) -> None:
        self._position = {g.image_id: i for i, g in enumerate(self.items)}
        self._tokens: TokenStore | None = None
        self._faiss = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> list[str]:
        return [g.image_id for g in self.items]

    def position(self, image_id: str) -> int:
        """Row of ``image_id``; KeyError when the index has no such image."""
        return self._position[image_id]

    def image_path(self, image_id: str) -> Path:
        """File of a gallery image, looked up by id (ids are never joined into paths)."""
        return self.root / self.items[self._position[image_id]].image

    @property
    def has_tokens(self) -> bool:
        return bool(self.meta.get("token_shards"))

    @property
    def tokens(self) -> TokenStore:
        if not self.has_tokens:
            raise TpasError(f"index {self.directory} was built without image tokens; ITM re-ranking needs them "
                            "(rebuild without --no-tokens)")
        if self._tokens is None:
            self._tokens = TokenStore(self.directory, self.meta["token_shards"], len(self.items),
                                      self.meta["token_shape"], self.meta.get("token_codec", "fp16"))
        return self._tokens

    @property
    def faiss(self):
        if self._faiss is None:
            import faiss

            index = faiss.read_index(str(self.directory / FAISS_FILE))
            kind = self.meta.get("faiss", "flat")
            version_1_depth = {"ivf": 16, "hnsw": 128}.get(kind)  # what version-1 indexes searched with
            _set_depth(index, kind, self.meta.get("search", {}).get("depth", version_1_depth))
            self._faiss = index
        return self._faiss

    def search(self, query_embeds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top-``k``: (scores [Q,k] float32, rows [Q,k] int64; -1 where fewer than k found)."""
        k = min(k, len(self.items))
        q = np.ascontiguousarray(query_embeds, dtype=np.float32)
        return self.faiss.search(q, k)


def open_index(directory: str | Path, model=None, root: str | Path | None = None) -> GalleryIndex:
    """Open an index; with ``model`` given, refuse it unless it was built with these very weights.

    ``root`` overrides the gallery root recorded at build time (for an index moved with its images).
    """
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.is_file():
        if (directory / SHARDS).is_dir():
            raise TpasError(f"index {directory} is incomplete (interrupted build?); run `tpas index` again to resume")
        raise FileNotFoundError(f"no index at {directory} (missing {META})")
    meta = json.loads(meta_path.read_text())
    if meta.get("version") not in READABLE_VERSIONS:
        raise TpasError(f"{meta_path}: index version {meta.get('version')} is not supported by this tpas (it reads "
                        f"versions {', '.join(map(str, READABLE_VERSIONS))}); rebuild it with `tpas index --overwrite`")
    if model is not None:
        fingerprint = model_fingerprint(model)
        if fingerprint != meta["model_sha256"]:
            raise TpasError(
                f"index {directory} was built with a different model (weights sha256 {meta['model_sha256'][:12]}, "
                f"{meta.get('model_family')}) than the one given (sha256 {fingerprint[:12]}); "
                "rebuild it with `tpas index` for this model")
    raw = json.loads((directory / ITEMS).read_text())
    items = [GalleryImage(image=r["image"], image_id=r["id"], target=r.get("target"),
                          behaviour=Behaviour(r.get("behaviour", "unknown"))) for r in raw]
    embeds = np.load(directory / EMBEDS, mmap_mode="r")  # paged in only by exact search
    if len(items) != len(embeds) or len(items) != meta["count"]:
        raise TpasError(f"index {directory} is inconsistent: {len(items)} items, {len(embeds)} embeddings")
    return GalleryIndex(directory=directory, meta=meta, items=items, embeds=embeds,
                        root=Path(root) if root is not None else Path(meta["gallery_root"]))


def index_evalset(model, evalset: EvalSet, index_dir: str | Path, keep_tokens: bool, batch_size: int = 64,
                  workers: int = 0, progress: bool = True) -> GalleryIndex:
    """Build (or reuse, or resume) the index of ``evalset``'s gallery in ``index_dir`` and open it."""
    index_dir = Path(index_dir)
    build_index(model, evalset.gallery, evalset.root, index_dir, batch_size=batch_size, workers=workers,
                keep_tokens=keep_tokens, progress=progress)
    index = open_index(index_dir, model, root=evalset.root)
    if keep_tokens and not index.has_tokens:  # an earlier ITC-only run left an index without tokens
        build_index(model, evalset.gallery, evalset.root, index_dir, batch_size=batch_size, workers=workers,
                    keep_tokens=True, overwrite=True, progress=progress)
        index = open_index(index_dir, model, root=evalset.root)
    if index.ids != [g.image_id for g in evalset.gallery]:
        raise TpasError(f"index {index_dir} does not hold this gallery")
    return index
