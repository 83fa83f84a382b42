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

A cache is saved next to the run (``feature-cache-<key>.pt``, the key hashing everything it
depends on) so that ``--resume`` does not recompute it. What a cache cannot do: per-step random
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


def cache_key(model, pairs: Sequence[ImageText], views: int, seed: int, transform: TrainTransform) -> str:
    """Hash of everything the cached numbers depend on: frozen weights, cut points, data, views, augmentation."""
    h = hashlib.sha256()
    meta = {"family": model.family, "image_size": list(model.image_size), "views": views, "seed": seed,
            "image_cut": getattr(model, "_image_cut", None), "text_cut": getattr(model, "_text_cut", None),
            "fusion_from": getattr(model, "_fusion_from", None), "fine": getattr(model, "_fine_block", None),
            "fusion_depths": getattr(model, "_fusion_depths", None),
            "max_text_len": model.config.max_text_len, "transform": _describe(transform)}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for p in pairs:
        h.update(f"{p.image}\t{p.caption}\n".encode())
    for name, param in sorted(_frozen_state(model).items()):
        h.update(name.encode())
        h.update(f"{float(param.double().sum()):.10e}/{float(param.double().abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def _frozen_state(model) -> dict[str, torch.Tensor]:
    """Weights and buffers of the frozen bottoms (what the cached numbers are computed with)."""
    state = {}
    blocks = list(model.image_encoder.children())
    for i in range(model._image_cut):
        state.update({f"image.{i}.{k}": v for k, v in blocks[i].state_dict().items()})
    if model._text_cut > 0:
        state.update({f"text.emb.{k}": v for k, v in model.text_encoder.embeddings.state_dict().items()})
    for i in range(model._text_cut):
        state.update({f"text.{i}.{k}": v for k, v in model.text_encoder.encoder.layer[i].state_dict().items()})
    return state


def _describe(transform) -> dict:
    return {k: repr(v) for k, v in sorted(vars(transform).items()) if k != "rng"}


@torch.no_grad()
def build_feature_cache(model, pairs: Sequence[ImageText], root: str | Path, views: int, seed: int,
                        transform: TrainTransform, batch_size: int = 64, workers: int = 2,
                        cache_dir: str | Path | None = None, progress: bool = True) -> FeatureCache:
    """Compute (or load from ``cache_dir``) the frozen features of ``pairs``' images and captions."""
    from tqdm.auto import tqdm

    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    key = cache_key(model, pairs, views, seed, transform)
    path = Path(cache_dir) / f"feature-cache-{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            cache = FeatureCache(**saved)
            log.info("feature cache: loaded %s (%.0f MB)", path, cache.nbytes / 2**20)
            return cache
        except Exception as exc:  # a cache cut short by a crash: recompute
            log.warning("feature cache %s is unreadable (%s); recomputing", path, exc)
    images = sorted({p.image for p in pairs})
    texts = sorted({p.caption for p in pairs})
    was_training = model.training
    model.eval()
    try:
        loader = DataLoader(_Views(root, images, views, seed, transform), batch_size=batch_size, shuffle=False,
                            num_workers=workers, persistent_workers=False)
        image_parts: dict[str, list[torch.Tensor]] = {}
        device = model.device
        with tqdm(total=len(images) * views, desc="cache image features", unit="view", disable=not progress,
                  dynamic_ncols=True) as bar:
            for pixels in loader:
                for name, t in model.frozen_image_features(pixels.to(device)).items():
                    image_parts.setdefault(name, []).append(t.to(torch.float16).cpu())
                bar.update(len(pixels))
        image = {n: torch.cat(ts).view(len(images), views, *ts[0].shape[1:]) for n, ts in image_parts.items()}
        ids, mask = model.tokenize(texts)
        text_parts: dict[str, list[torch.Tensor]] = {}
        for s in tqdm(range(0, len(texts), 128), desc="cache text features", unit="batch", disable=not progress,
                      dynamic_ncols=True):
            feats = model.frozen_text_features(ids[s:s + 128].to(device), mask[s:s + 128].to(device))
            for name, t in feats.items():
                text_parts.setdefault(name, []).append(t.to(torch.float16 if t.is_floating_point() else t.dtype).cpu())
        text = {n: torch.cat(ts) for n, ts in text_parts.items()}
    finally:
        model.train(was_training)
    cache = FeatureCache(image=image, text=text, text_mask=mask, images=images, texts=texts, views=views, key=key)
    log.info("feature cache: %d images x %d views, %d captions, %.0f MB", len(images), views, len(texts),
             cache.nbytes / 2**20)
    if path is not None:
        from tpas.utils.io import atomic_save

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(path, lambda tmp: torch.save(vars(cache), tmp))
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
