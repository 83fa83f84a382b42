"""A persisted gallery index: encode once, search many times.

Layout of an index directory::

    meta.json        written last: its presence means "complete" (model fingerprint, dims, ...)
    items.json       [{"id", "image", "target", "behaviour"}] in gallery order; "image" is relative
                     to meta["gallery_root"]
    embeds.npy       float32 [N,E] L2-normalised ITC embeddings (rows follow items.json)
    faiss.index      FAISS index over embeds (exact inner product by default; IVF or HNSW)
    shards/RRRRR-of-WWWWW/
        tokens.npy   float16 [n_r,T,D] image tokens of the rows [start, stop) for ITM re-ranking,
                     read through a memory map (they are the bulk of an index)
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
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
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

__all__ = ["FAISS_KINDS", "GalleryIndex", "TokenStore", "build_index", "gallery_from_folder", "index_evalset",
           "model_fingerprint", "open_index"]

INDEX_VERSION = 1
META = "meta.json"
ITEMS = "items.json"
EMBEDS = "embeds.npy"
FAISS_FILE = "faiss.index"
SHARDS = "shards"
PROGRESS = "progress.json"
TOKENS = "tokens.npy"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FAISS_KINDS = ("flat", "ivf", "hnsw")


# -- fingerprints ------------------------------------------------------------------------------
def model_fingerprint(model) -> str:
    """sha256 over the model family, its config and every tensor of its state dict (names + bytes).

    Hashing the live tensors (not a file) works for models built in memory and for saved ones
    alike; ~0.2 s for the lite model.
    """
    import torch

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


def _encode_shard(model, images: Sequence[GalleryImage], root: Path, shard_dir: Path, start: int, stop: int,
                  state: dict, batch_size: int, workers: int, chunk_size: int, keep_tokens: bool,
                  overwrite: bool, progress: bool) -> None:
    """Encode rows [start, stop) into ``shard_dir`` chunk by chunk, resuming from progress.json."""
    from tqdm.auto import tqdm

    from tpas.search.encode import inference, iter_image_batches

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
            raise TpasError(f"{shard_dir} holds a partial index built with another model, gallery or "
                            "number of processes; pass --overwrite to start again")
    if not resume and shard_dir.exists():
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)

    n = stop - start
    embed_dim, token_shape = state["embed_dim"], tuple(state["token_shape"])
    embeds = _open_memmap(shard_dir / EMBEDS, np.float32, (n, embed_dim), resume)
    tokens = _open_memmap(shard_dir / TOKENS, np.float16, (n, *token_shape), resume) if keep_tokens else None
    chunks = range((n + chunk_size - 1) // chunk_size)
    todo = [c for c in chunks if c not in done]
    if resume:
        log.info("resuming %s: %d of %d chunks already done", shard_dir, len(done), len(chunks))
    skipped = sum(min(chunk_size, n - c * chunk_size) for c in done)
    with inference(model), tqdm(total=n, initial=skipped, desc=f"index {shard_dir.name}", unit="img",
                                disable=not progress) as bar:
        for c in todo:
            lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
            paths = [root / g.image for g in images[start + lo:start + hi]]
            for b_start, emb, tok in iter_image_batches(model, paths, batch_size, workers, keep_tokens, progress=False):
                embeds[lo + b_start:lo + b_start + len(emb)] = emb
                if tokens is not None:
                    tokens[lo + b_start:lo + b_start + len(tok)] = tok
                bar.update(len(emb))
            embeds.flush()
            if tokens is not None:
                tokens.flush()
            done.add(c)
            write_json(progress_file, {**expected, "done": sorted(done), "complete": len(done) == len(chunks)})
    if not todo:  # nothing left: still record completion (e.g. an empty shard)
        write_json(progress_file, {**expected, "done": sorted(done), "complete": True})
    del embeds, tokens


def _build_faiss(embeds: np.ndarray, kind: str):
    import faiss

    n, d = embeds.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = embeds if n <= 256 * nlist else embeds[np.sort(rng.choice(n, 256 * nlist, replace=False))]
        index.train(np.ascontiguousarray(sample))
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        raise ValueError(f"unknown FAISS index kind {kind!r}; choose from {FAISS_KINDS}")
    index.add(np.ascontiguousarray(embeds, dtype=np.float32))
    return index


def _write_faiss(out: Path, embeds: np.ndarray, kind: str) -> None:
    import faiss

    index = _build_faiss(embeds, kind)
    with atomic_path(out / FAISS_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    log.info("wrote %s FAISS index over %d embeddings", kind, len(embeds))


def build_index(model, images: Sequence[GalleryImage], root: str | Path, out: str | Path, *,
                batch_size: int = 64, workers: int = 0, chunk_size: int = 2048, faiss_kind: str = "flat",
                keep_tokens: bool = True, overwrite: bool = False, progress: bool = True,
                rank: int | None = None, world_size: int | None = None) -> Path:
    """Encode ``images`` (paths relative to ``root``) with ``model`` into the index directory ``out``.

    Resumes an interrupted build automatically. An index already complete for the same model and
    gallery is left as it is; one built for something else is refused unless ``overwrite``.
    Under ``accelerate launch`` every process calls this; each encodes its shard and rank 0 merges.
    Returns ``out``.
    """
    if faiss_kind not in FAISS_KINDS:
        raise ValueError(f"unknown FAISS index kind {faiss_kind!r}; choose from {FAISS_KINDS}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    images = list(images)
    _check_gallery(images)
    root, out = Path(root).resolve(), Path(out)
    rank, world_size = _dist_info(rank, world_size)
    fingerprint = model_fingerprint(model)
    state = {"version": INDEX_VERSION, "model_sha256": fingerprint, "gallery_sha256": _gallery_digest(images),
             "count": len(images)}

    meta_path = out / META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        same = meta.get("model_sha256") == fingerprint and meta.get("gallery_sha256") == state["gallery_sha256"]
        if same and not overwrite:
            log.info("index %s is already complete for this model and gallery", out)
            if meta.get("faiss") != faiss_kind and rank == 0:  # only the search structure changes
                _write_faiss(out, np.load(out / EMBEDS), faiss_kind)
                write_json(meta_path, {**meta, "faiss": faiss_kind})
            return out
        if not overwrite:
            raise TpasError(f"{out} already holds an index for another "
                            f"{'model' if meta.get('model_sha256') != fingerprint else 'gallery'}; "
                            "pass --overwrite or choose another --out")
    _barrier(world_size)  # everybody has read the old meta before rank 0 removes it
    if overwrite and rank == 0:
        for name in (META, ITEMS, EMBEDS, FAISS_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    embed_dim, token_shape = _probe_shapes(model)
    state.update(embed_dim=embed_dim, token_shape=list(token_shape))
    start, stop = shard_range(len(images), rank, world_size)
    shard_dir = out / SHARDS / shard_name(rank, world_size)
    _encode_shard(model, images, root, shard_dir, start, stop, state, batch_size, workers, chunk_size,
                  keep_tokens, overwrite, progress)
    _barrier(world_size)
    if rank == 0:
        _merge(model, images, root, out, state, world_size, faiss_kind, keep_tokens)
    _barrier(world_size)
    return out


def _merge(model, images, root: Path, out: Path, state: dict, world_size: int, faiss_kind: str,
           keep_tokens: bool) -> None:
    shards = []
    parts = []
    for r in range(world_size):
        shard_dir = out / SHARDS / shard_name(r, world_size)
        recorded = json.loads((shard_dir / PROGRESS).read_text())
        if not recorded.get("complete"):
            raise TpasError(f"shard {shard_dir} is not complete; run the index command again to resume")
        start, stop = recorded["start"], recorded["stop"]
        parts.append(np.load(shard_dir / EMBEDS))
        if keep_tokens:
            shards.append({"path": (shard_dir / TOKENS).relative_to(out).as_posix(), "start": start, "stop": stop})
    embeds = np.concatenate(parts) if parts else np.zeros((0, state["embed_dim"]), np.float32)
    with atomic_path(out / EMBEDS) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, embeds)
    write_json(out / ITEMS, [{"id": g.image_id, "image": g.image, "target": g.target,
                              "behaviour": g.behaviour.value} for g in images], indent=None)
    _write_faiss(out, embeds, faiss_kind)
    meta = {
        **state,
        "model_family": getattr(model, "family", type(model).__name__),
        "model_name": getattr(model, "name_or_path", None) or getattr(model.config, "name", None),
        "image_size": list(model.image_size),
        "gallery_root": str(root),
        "faiss": faiss_kind,
        "token_shards": shards,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / META, meta)  # last: marks the index complete
    log.info("wrote index of %d images to %s", len(images), out)


# -- reading -----------------------------------------------------------------------------------
class TokenStore:
    """Row-gather over the memory-mapped token shards, as if they were one [N,T,D] array."""

    def __init__(self, directory: Path, shards: list[dict], count: int, token_shape: Sequence[int]):
        self.shape = (count, *token_shape)
        self._starts = np.array([s["start"] for s in shards], dtype=np.int64)
        self._stops = np.array([s["stop"] for s in shards], dtype=np.int64)
        self._arrays = [np.load(directory / s["path"], mmap_mode="r") for s in shards]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        """float16 [len(rows),T,D] for an integer array of gallery rows (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.float16)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"token rows out of range [0, {self.shape[0]})")
        shard_of = np.searchsorted(self._stops, rows, side="right")
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            local = rows[sel] - self._starts[s]
            order = np.argsort(local, kind="stable")  # read the file front to back
            out[sel[order]] = self._arrays[s][local[order]]
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
                                      self.meta["token_shape"])
        return self._tokens

    @property
    def faiss(self):
        if self._faiss is None:
            import faiss

            index = faiss.read_index(str(self.directory / FAISS_FILE))
            if self.meta.get("faiss") == "ivf":
                faiss.extract_index_ivf(index).nprobe = 16
            elif self.meta.get("faiss") == "hnsw":
                index.hnsw.efSearch = 128
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
    if meta.get("version") != INDEX_VERSION:
        raise TpasError(f"{meta_path}: index version {meta.get('version')} is not supported (expected {INDEX_VERSION})")
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
    embeds = np.load(directory / EMBEDS)
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
