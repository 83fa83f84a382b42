"""Batched encoding of gallery images and query texts (inference only).

Everything downstream (the index, validation during training, evaluation, the web server) gets
its features from here, so that preprocessing and dtype choices live in one place:

* image embeddings are float32 (they go into FAISS and score matrices);
* image tokens, kept only for ITM re-ranking, are float16 — they are by far the biggest thing a
  gallery produces, and the fusion layers tolerate the rounding;
* images are decoded and resized in ``DataLoader`` workers while the model runs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tpas.data.images import handle_late_problems
from tpas.data.transforms import EvalTransform, UnreadableImage, blank_image, load_image

log = logging.getLogger(__name__)


@dataclass
class EncodedImages:
    """``embeds`` float32 [N,E]; ``tokens`` float16 [N,T,D] when asked for, else None."""

    embeds: np.ndarray
    tokens: np.ndarray | None = None


@dataclass
class EncodedTexts:
    """``embeds`` float32 [N,E]; ``tokens`` float32 [N,L,D] and ``mask`` int64 [N,L] when asked for."""

    embeds: np.ndarray
    tokens: np.ndarray | None = None
    mask: np.ndarray | None = None


class ImageFiles(Dataset):
    """Decode + preprocess image files by position (runs inside DataLoader workers).

    An image that does not decode becomes a blank one plus a message (``""`` for a good image), so
    the main process applies the bad-image policy (:mod:`tpas.data.images`) instead of a worker
    raising a traceback.
    """

    def __init__(self, paths: Sequence[str | Path], transform: EvalTransform):
        self.paths = [str(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            return self.transform(load_image(self.paths[index])), ""
        except UnreadableImage as exc:
            return self.transform(blank_image(self.transform.size, self.transform.mean)), str(exc)


def eval_transform(model) -> EvalTransform:
    """The preprocessing a model expects at inference time."""
    return EvalTransform(model.image_size, model.config.image_mean, model.config.image_std)


@contextlib.contextmanager
def inference(model) -> Iterator[None]:
    """Eval mode + ``inference_mode`` for the block; the previous train/eval mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def iter_image_batches(model, paths: Sequence[str | Path], batch_size: int = 64, workers: int = 0,
                       keep_tokens: bool = False, progress: bool = True, desc: str = "encode images",
                       ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Yield ``(start, embeds, tokens)`` batch by batch, so callers can stream into memory maps.

    The caller must keep the model in inference mode while iterating (see :func:`inference`);
    :func:`encode_images` does it for you.
    """
    from tqdm.auto import tqdm

    loader = DataLoader(ImageFiles(paths, eval_transform(model)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=False, persistent_workers=False)
    device = model.device
    start = 0
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for pixels, problems in loader:
            handle_late_problems([p for p in problems if p])  # raise, or record the blank stand-ins
            out = model.encode_image(pixels.to(device, non_blocking=True))
            embeds = out.embeds.float().cpu().numpy()
            tokens = out.tokens.to(torch.float16).cpu().numpy() if keep_tokens else None
            yield start, embeds, tokens
            start += len(embeds)
            bar.update(len(embeds))


def encode_images(model, paths: Sequence[str | Path], batch_size: int = 64, workers: int = 0,
                  keep_tokens: bool = False, progress: bool = True) -> EncodedImages:
    """Encode image files into ITC embeddings (and optionally fp16 fusion tokens), in order."""
    n = len(paths)
    embeds: np.ndarray | None = None
    tokens: np.ndarray | None = None
    with inference(model):
        for start, emb, tok in iter_image_batches(model, paths, batch_size, workers, keep_tokens, progress):
            if embeds is None:  # allocate once we know the shapes
                embeds = np.empty((n, emb.shape[1]), dtype=np.float32)
                if tok is not None:
                    tokens = np.empty((n, *tok.shape[1:]), dtype=np.float16)
            embeds[start:start + len(emb)] = emb
            if tokens is not None:
                tokens[start:start + len(tok)] = tok
    if embeds is None:  # no paths
        embeds = np.zeros((0, model.config.embed_dim), dtype=np.float32)
    return EncodedImages(embeds=embeds, tokens=tokens)


def encode_texts(model, texts: Sequence[str], batch_size: int = 128, keep_tokens: bool = False,
                 progress: bool = True) -> EncodedTexts:
    """Encode query texts; tokens (float32) and masks are padded to the longest text of the set.

    Tokenising everything up front gives one padded width for the whole set, so token arrays of
    different batches stack without re-padding (a 64-token cap keeps that small).
    """
    from tqdm.auto import tqdm

    texts = list(texts)
    if not texts:
        return EncodedTexts(embeds=np.zeros((0, model.config.embed_dim), dtype=np.float32))
    ids, mask = model.tokenize(texts)
    device = model.device
    embeds: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    with inference(model):
        for start in tqdm(range(0, len(texts), batch_size), desc="encode texts", unit="batch",
                          disable=not progress or len(texts) <= batch_size, leave=False):
            b_ids = ids[start:start + batch_size].to(device)
            b_mask = mask[start:start + batch_size].to(device)
            out = model.encode_text(b_ids, b_mask)
            embeds.append(out.embeds.float().cpu().numpy())
            if keep_tokens:
                tokens.append(out.tokens.float().cpu().numpy())
    return EncodedTexts(
        embeds=np.concatenate(embeds),
        tokens=np.concatenate(tokens) if keep_tokens else None,
        mask=mask.numpy() if keep_tokens else None,
    )
