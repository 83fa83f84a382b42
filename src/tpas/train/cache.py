"""Feature caching: the frozen bottoms of both towers run once, not once per epoch.

With the bottom of each tower frozen (lite: MobileNetV2 up to its stride-16 blocks, MiniLM up to
its top layers), most of a train step's forward pass recomputes the same numbers every epoch, and
decoding JPEGs takes a core of its own. This module computes them once:

* every training image in ``views`` augmented versions (:class:`~tpas.data.transforms.TrainTransform`
  with its camera augmentation; view ``v`` of image ``i`` is seeded by (seed, i, v), so the cache
  is a pure function of the data, the frozen weights and the config), through
  ``model.frozen_image_features``;
* every distinct caption once, through ``model.frozen_text_features``;

stored as float16 in RAM (mini-PAB's 1,600 images x 4 views at 192x96 and 1,600 captions: some
0.2 GB). Training then reads a batch as a gather from these arrays (:class:`CachedPairDataset`,
:class:`CachedCollator`) and runs only the trainable tops, so both cores compute. Epoch ``e``
shows image ``i`` in view ``(e + offset_i) mod views``: every view once per ``views`` epochs.

A cache is saved next to the run (``feature-cache-img-<key>.pt`` and ``feature-cache-txt-<key>.pt``,
each key hashing everything that side depends on) so that ``--resume`` does not recompute it. What a cache cannot do: per-step random
augmentation beyond the fixed views, EDA (captions are fixed) and MLM (it masks the input ids);
the trainer refuses those combinations with a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from tpas.data.loader import _mix, batch_partners, partner_index
from tpas.data.records import ImageText
from tpas.data.transforms import TrainTransform, load_image

log = logging.getLogger(__name__)

IMAGE_PREFIX = "img."  # batch keys of cached image features (img.x, img.fine)
TEXT_PREFIX = "txt."  # batch keys of cached text features (txt.x, txt.fusion)


@dataclass
class FeatureCache:
    """``image`` name -> [n_images, views, ...] and ``text`` name -> [n_texts, L, D] float16 tensors."""

    image: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    text_mask: torch.Tensor  # [n_texts, L] int64
    images: list[str]  # relative paths, row order
    texts: list[str]  # captions, row order
    views: int
    key: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.image.values(), *self.text.values(), self.text_mask])


class _Views(Dataset):
    """(image row, view) -> augmented pixels; runs in DataLoader workers."""

    def __init__(self, root: Path, images: Sequence[str], views: int, seed: int, transform: TrainTransform):
        self.root, self.images, self.views, self.seed, self.transform = Path(root), list(images), views, seed, transform

    def __len__(self) -> int:
        return len(self.images) * self.views

    def __getitem__(self, k: int) -> torch.Tensor:
        row, view = divmod(k, self.views)
        self.transform.rng = random.Random(_mix(self.seed, 7, row, view))
        return self.transform(load_image(self.root / self.images[row]))


def _digest(meta: dict, lines: Sequence[str], state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for line in lines:
        h.update(line.encode() + b"\n")
    for name, param in sorted(state.items()):
        h.update(name.encode())
        h.update(f"{float(param.double().sum()):.10e}/{float(param.double().abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def image_cache_key(model, images: Sequence[str], views: int, seed: int, transform: TrainTransform) -> str:
    """Hash of what cached image features depend on: frozen blocks, cut, input size, images, views, augmentation."""
    fine = getattr(model, "_fine_block", None)
    meta = {"family": model.family, "image_size": list(model.image_size), "views": views, "seed": seed,
            "image_cut": model._image_cut, "fine_cached": fine is not None and fine < model._image_cut - 1,
            "transform": _describe(transform)}
    return _digest(meta, images, _frozen_state(model, "image"))


def text_cache_key(model, texts: Sequence[str]) -> str:
    """Hash of what cached text features depend on: frozen layers, cut, fusion depths, captions."""
    meta = {"family": model.family, "text_cut": model._text_cut, "fusion_depths": model._fusion_depths,
            "max_text_len": model.config.max_text_len}
    return _digest(meta, texts, _frozen_state(model, "text"))


def _frozen_state(model, tower: str) -> dict[str, torch.Tensor]:
    """Weights and buffers of a tower's frozen bottom (what its cached numbers are computed with)."""
    state = {}
    if tower == "image":
        blocks = list(model.image_encoder.children())
        for i in range(model._image_cut):
            state.update({f"{i}.{k}": v for k, v in blocks[i].state_dict().items()})
        return state
    if model._text_cut > 0:
        state.update({f"emb.{k}": v for k, v in model.text_encoder.embeddings.state_dict().items()})
    for i in range(model._text_cut):
        state.update({f"{i}.{k}": v for k, v in model.text_encoder.encoder.layer[i].state_dict().items()})
    return state


def _describe(transform) -> dict:
    return {k: repr(v) for k, v in sorted(vars(transform).items()) if k != "rng"}


def _load(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        log.info("feature cache: loaded %s", path)
        return saved
    except Exception as exc:  # a file cut short by a crash: recompute
        log.warning("feature cache %s is unreadable (%s); recomputing", path, exc)
        return None


def _save(path: Path | None, data: dict) -> None:
    if path is None:
        return
    from tpas.utils.io import atomic_save

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, lambda tmp: torch.save(data, tmp))


@torch.no_grad()
def build_feature_cache(model, pairs: Sequence[ImageText], root: str | Path, views: int, seed: int,
                        transform: TrainTransform, batch_size: int = 32, workers: int = 2,
                        cache_dir: str | Path | None = None, progress: bool = True) -> FeatureCache:
    """Compute (or load from ``cache_dir``) the frozen features of ``pairs``' images and captions.

    Images and captions are keyed and saved separately (``feature-cache-img-<key>.pt``,
    ``feature-cache-txt-<key>.pt``), so runs that differ only on one side share the other.
    """
    from tqdm.auto import tqdm

    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    images = sorted({p.image for p in pairs})
    texts = sorted({p.caption for p in pairs})
    img_key, txt_key = image_cache_key(model, images, views, seed, transform), text_cache_key(model, texts)
    folder = Path(cache_dir) if cache_dir is not None else None
    img_path = folder / f"feature-cache-img-{img_key}.pt" if folder is not None else None
    txt_path = folder / f"feature-cache-txt-{txt_key}.pt" if folder is not None else None
    device = model.device
    was_training = model.training
    model.eval()
    try:
        image = _load(img_path)
        if image is None:
            loader = DataLoader(_Views(root, images, views, seed, transform), batch_size=batch_size, shuffle=False,
                                num_workers=workers, persistent_workers=False)
            parts: dict[str, list[torch.Tensor]] = {}
            with tqdm(total=len(images) * views, desc="cache image features", unit="view", disable=not progress,
                      dynamic_ncols=True) as bar:
                for pixels in loader:
                    for name, t in model.frozen_image_features(pixels.to(device)).items():
                        parts.setdefault(name, []).append(t.to(torch.float16).cpu())
                    bar.update(len(pixels))
            image = {n: torch.cat(ts).contiguous().view(len(images), views, *ts[0].shape[1:])
                     for n, ts in parts.items()}
            _save(img_path, image)
        text = _load(txt_path)
        if text is None:
            ids, mask = model.tokenize(texts)
            parts = {}
            for s in tqdm(range(0, len(texts), 128), desc="cache text features", unit="batch",
                          disable=not progress, dynamic_ncols=True):
                feats = model.frozen_text_features(ids[s:s + 128].to(device), mask[s:s + 128].to(device))
                for name, t in feats.items():
                    parts.setdefault(name, []).append(t.to(torch.float16 if t.is_floating_point() else t.dtype).cpu())
            text = {n: torch.cat(ts) for n, ts in parts.items()}
            text["__mask__"] = mask
            _save(txt_path, text)
    finally:
        model.train(was_training)
    text = dict(text)
    mask = text.pop("__mask__")
    cache = FeatureCache(image=image, text=text, text_mask=mask, images=images, texts=texts, views=views,
                         key=f"{img_key}-{txt_key}")
    log.info("feature cache: %d images x %d views, %d captions, %.0f MB", len(images), views, len(texts),
             cache.nbytes / 2**20)
    return cache


class CachedPairDataset(Dataset):
    """Training pairs as rows of a :class:`FeatureCache`: the same items as
    :class:`~tpas.data.loader.PairDataset` (index, label, partner) with cache rows instead of pixels."""

    def __init__(self, pairs: Sequence[ImageText], cache: FeatureCache, labels: dict[str, int], seed: int = 0):
        self.pairs = list(pairs)
        self.cache, self.labels, self.seed = cache, labels, seed
        image_row = {p: i for i, p in enumerate(cache.images)}
        text_row = {c: i for i, c in enumerate(cache.texts)}
        missing = [p.image for p in self.pairs if p.image not in image_row][:3]
        if missing:
            raise ValueError(f"feature cache does not hold images {missing}")
        self.image_rows = [image_row[p.image] for p in self.pairs]
        self.text_rows = [text_row[p.caption] for p in self.pairs]
        self.partners = partner_index(self.pairs)
        self.offsets = [_mix(seed, 11, i) % cache.views for i in range(len(self.pairs))]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def group_vectors(self, groups: Sequence[Sequence[int]]) -> torch.Tensor:
        """[n_groups, D] description vector per group of pairs: the mean of its captions' cached
        (frozen) text states, for the look-alike batches of ``ShardedBatchSampler(similar=...)``."""
        x, mask = self.cache.text["x"].float(), self.cache.text_mask.float()
        if not x.is_floating_point() or x.dim() != 3:
            raise ValueError("look-alike batches need cached text states (a frozen text bottom)")
        per_text = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return torch.stack([per_text[[self.text_rows[i] for i in g]].mean(0) for g in groups])

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "label": self.labels[self.pairs[index].person_id],
                "image_row": self.image_rows[index], "view": (self.epoch + self.offsets[index]) % self.cache.views,
                "text_row": self.text_rows[index], "partner_index": self.partners[index]}


class CachedCollator:
    """Gather a batch's cached features (float32), trimming text padding to the batch's longest caption."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        rows = torch.tensor([it["image_row"] for it in items])
        views = torch.tensor([it["view"] for it in items])
        texts = torch.tensor([it["text_row"] for it in items])
        mask = self.cache.text_mask[texts]
        width = int(mask.sum(1).max())
        batch = {"index": torch.tensor([it["index"] for it in items]),
                 "labels": torch.tensor([it["label"] for it in items]),
                 "attention_mask": mask[:, :width].contiguous(),
                 "partner": batch_partners(items)}
        for name, t in self.cache.image.items():
            batch[IMAGE_PREFIX + name] = t[rows, views].float()
        for name, t in self.cache.text.items():
            batch[TEXT_PREFIX + name] = t[texts, :width].float()
        return batch


def split_batch(batch: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The cached features under ``prefix`` (``img.``/``txt.``), keys without it."""
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
