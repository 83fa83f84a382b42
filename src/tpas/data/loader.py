"""Training data: a Dataset over ``TrainSet`` pairs, a collate that tokenises, and a sampler.

Resumability drives the design: every random choice a sample sees (crop, flip, jitter, EDA) comes
from a ``random.Random`` seeded by (seed, epoch, index), and the batch order of an epoch is a
permutation seeded by (seed, epoch). So the data of step *k* is a pure function of the config and
*k*: a resumed run skips the batches it already consumed and sees exactly what an uninterrupted run
would, whatever the number of DataLoader workers.

The sampler shards each *global* batch (``batch_size * world_size`` indices) into contiguous
per-rank slices, so the concatenation of the ranks' batches in rank order is the global batch.

Bad images (see :mod:`tpas.data.images`): the reader's pre-flight check drops or reports what it
can see cheaply; an image that still fails to decode in a worker is replaced by the next pair that
decodes (the batch keeps its size, which the sharded global batch needs) and travels to the main
process as a message, where :class:`TrainLoader` stops (``error``) or records it (``skip``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tpas.data.images import handle_late_problems
from tpas.data.records import EvalSet, GalleryImage, ImageText, Query, TrainSet
from tpas.data.text_augment import eda
from tpas.data.transforms import EvalTransform, TrainTransform, UnreadableImage, load_image

log = logging.getLogger(__name__)

SUBSTITUTE_TRIES = 64  # pairs tried in place of one whose image does not decode


def _mix(*values: int) -> int:
    """A stable 63-bit seed from integers (Python's hash of ints is stable, of tuples is not across versions)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def identity_group(pair: ImageText) -> str:
    """Key that keeps a person's pairs together: PAB's normal and anomaly images of one person
    have different ``person_id`` but point at each other through ``hard_image_id``."""
    if pair.hard_image_id is not None:
        return min(pair.person_id, pair.hard_image_id)
    return pair.person_id


def split_by_identity(pairs: Sequence[ImageText], val_identities: float, seed: int
                      ) -> tuple[list[ImageText], list[ImageText]]:
    """Carve a validation split from *training identities* (never the test set).

    ``val_identities`` < 1 is the fraction of identity groups, >= 1 their count; 0 = no split.
    """
    groups = sorted({identity_group(p) for p in pairs})
    if val_identities <= 0 or len(groups) < 2:
        return list(pairs), []
    n_val = int(round(val_identities * len(groups))) if val_identities < 1 else int(val_identities)
    n_val = max(1, min(n_val, len(groups) - 1))
    rng = random.Random(seed)
    val_groups = set(rng.sample(groups, n_val))
    train = [p for p in pairs if identity_group(p) not in val_groups]
    val = [p for p in pairs if identity_group(p) in val_groups]
    log.info("validation split: %d identities / %d pairs held out of %d identities", n_val, len(val), len(groups))
    return train, val


def validation_set(pairs: Sequence[ImageText], root: Path, max_queries: int = 0, name: str = "val") -> EvalSet:
    """Queries = the captions of held-out pairs (capped), gallery = all their images; targets = person_id."""
    gallery: dict[str, GalleryImage] = {}
    for p in pairs:
        if p.image not in gallery:
            gallery[p.image] = GalleryImage(image=p.image, image_id=p.image, target=p.person_id,
                                            behaviour=p.behaviour, action=p.action, scene=p.scene)
    chosen = list(pairs) if max_queries <= 0 else list(pairs)[:max_queries]
    queries = [Query(query_id=f"val{i}", caption=p.caption, target=p.person_id, behaviour=p.behaviour,
                     action=p.action) for i, p in enumerate(chosen)]
    return EvalSet(name=name, root=Path(root), queries=queries, gallery=list(gallery.values()))


def partner_index(pairs: Sequence[ImageText]) -> list[int]:
    """For each pair, the index of a pair showing its ``hard_image_id`` (PAB: the same person's
    opposite-behaviour image), or -1. The ITM hard-pair term uses it within a batch."""
    first: dict[str, int] = {}
    for i, p in enumerate(pairs):
        first.setdefault(p.image_id, i)
    return [first.get(p.hard_image_id, -1) if p.hard_image_id is not None else -1 for p in pairs]


def batch_partners(items: list[dict]) -> torch.Tensor:
    """[B] position in the batch of each item's partner (its ``partner_index``), -1 if not in the batch."""
    where: dict[int, int] = {}
    for pos, it in enumerate(items):
        where.setdefault(it["index"], pos)
    return torch.tensor([where.get(it.get("partner_index", -1), -1) for it in items], dtype=torch.long)


class PairDataset(Dataset):
    """One item per training pair: image tensor, caption, integer identity label, optional hard pair."""

    def __init__(self, pairs: Sequence[ImageText], root: str | Path, transform: EvalTransform,
                 labels: dict[str, int] | None = None, seed: int = 0, hard_pairs: bool = False,
                 eda: float = 0.0):
        self.pairs = list(pairs)
        self.root = Path(root)
        self.transform = transform
        self.labels = labels if labels is not None else {
            pid: i for i, pid in enumerate(sorted({p.person_id for p in self.pairs}))}
        self.seed = seed
        self.epoch = 0
        self.hard_pairs = hard_pairs
        self.eda = eda
        self.partners = partner_index(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def _image(self, rel: str, rng: random.Random) -> torch.Tensor:
        if isinstance(self.transform, TrainTransform):
            self.transform.rng = rng
        return self.transform(load_image(self.root / rel))

    def __getitem__(self, index: int) -> dict:
        """The pair at ``index``; if one of its images does not decode, the next pair that does, with
        the problems listed under ``"bad_images"`` (raising here would reach the user as a worker
        traceback)."""
        problems: list[str] = []
        for step in range(SUBSTITUTE_TRIES):
            try:
                item = self._item((index + step) % len(self.pairs))
            except UnreadableImage as exc:
                problems.append(str(exc))
                continue
            item["bad_images"] = problems
            return item
        raise UnreadableImage(f"{SUBSTITUTE_TRIES} pairs in a row from index {index} have images that do not "
                              f"decode, e.g. {problems[0]}")

    def _item(self, index: int) -> dict:
        pair = self.pairs[index]
        rng = random.Random(_mix(self.seed, self.epoch, index))
        caption = pair.caption
        if self.eda > 0 and rng.random() < self.eda:
            caption = eda(caption, rng)
        item = {"index": index, "image": self._image(pair.image, rng), "caption": caption,
                "label": self.labels[pair.person_id], "hard_image": None, "hard_caption": None,
                "partner_index": self.partners[index]}
        if self.hard_pairs and pair.hard_image is not None and pair.hard_caption is not None:
            item["hard_image"] = self._image(pair.hard_image, rng)
            item["hard_caption"] = pair.hard_caption
        return item


class Collator:
    """Stack images and tokenise captions (and hard captions) with the model's tokenizer.

    Holds the tokenizer, not the model, so DataLoader workers do not get a copy of the weights;
    ``Collator.for_model(model)`` tokenises exactly as ``model.tokenize`` does.
    """

    def __init__(self, tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]):
        self.tokenize = tokenize

    @classmethod
    def for_model(cls, model) -> "Collator":
        return cls(_Tokenize(model.tokenizer, model.config.max_text_len))

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """Tensors for the model, plus ``"bad_images"`` (a list of messages) for :class:`TrainLoader`."""
        ids, mask = self.tokenize([it["caption"] for it in items])
        batch = {
            "bad_images": [p for it in items for p in it.get("bad_images", ())],
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "images": torch.stack([it["image"] for it in items]),
            "input_ids": ids,
            "attention_mask": mask,
        }
        if all("partner_index" in it for it in items):
            batch["partner"] = batch_partners(items)
        hard = [i for i, it in enumerate(items) if it["hard_image"] is not None]
        batch["hard_rows"] = torch.tensor(hard, dtype=torch.long)
        if hard:
            h_ids, h_mask = self.tokenize([items[i]["hard_caption"] for i in hard])
            batch["hard_images"] = torch.stack([items[i]["hard_image"] for i in hard])
            batch["hard_input_ids"], batch["hard_attention_mask"] = h_ids, h_mask
        return batch


class _Tokenize:
    """Picklable ``texts -> (ids, mask)`` bound to a tokenizer and a max length."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(texts, max_length=self.max_length)


class ShardedBatchSampler(Sampler[list[int]]):
    """Deterministic, resumable batches: epoch permutations seeded by (seed, epoch), full global
    batches only (every rank gets the same batch size, which gathering needs), and ``start`` to
    skip the batches a resumed run has already consumed.

    With ``groups`` (lists of dataset indices, e.g. a PAB person's normal and anomaly pair) the
    permutation is over groups and each group's members stay adjacent, so they mostly land in the
    same batch: the opposite-behaviour partner becomes an in-batch ITC negative and a likely ITM
    hard negative, at no extra encoding cost.
    """

    def __init__(self, size: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 groups: Sequence[Sequence[int]] | None = None, similar: "torch.Tensor | None" = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.size, self.batch_size, self.world_size, self.rank, self.seed = size, batch_size, world_size, rank, seed
        self.groups = [list(g) for g in groups] if groups is not None else None
        if self.groups is not None and sorted(i for g in self.groups for i in g) != list(range(size)):
            raise ValueError("groups must partition range(size)")
        # similar [n_groups (or size), d]: description vectors; half of every batch is then drawn
        # from look-alikes (see order()), so contrastive negatives are hard ones, not just random people
        self.similar = similar
        n_units = len(self.groups) if self.groups is not None else size
        if similar is not None and len(similar) != n_units:
            raise ValueError(f"similar has {len(similar)} rows for {n_units} groups")
        self.epoch, self.start = 0, 0
        if len(self) == 0:
            raise ValueError(f"{size} training pairs cannot fill one global batch of "
                             f"{batch_size} x {world_size} processes; lower train.batch_size")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        """Batches per epoch (the full count; ``start`` does not change it)."""
        return self.size // (self.batch_size * self.world_size)

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        groups = self.groups if self.groups is not None else [[i] for i in range(self.size)]
        if self.similar is not None:
            return self._similar_order(groups, g)
        if self.groups is None:
            return torch.randperm(self.size, generator=g).tolist()
        return [i for k in torch.randperm(len(self.groups), generator=g).tolist() for i in self.groups[k]]

    def _similar_order(self, groups: list[list[int]], g: torch.Generator) -> list[int]:
        """An epoch order whose every batch is half look-alikes, half random groups.

        Groups are hashed by the signs of their description vectors on a few random directions
        (drawn per epoch: other look-alikes each time); one half of the groups, sorted by that hash,
        fills the first half of each batch with neighbours, the other half (random order) the rest.
        """
        n = len(groups)
        perm = torch.randperm(n, generator=g)
        hard, easy = perm[: n // 2], perm[n // 2:]
        vecs = self.similar[hard].float()
        vecs = vecs - vecs.mean(0, keepdim=True)
        per_batch = max(1, self.batch_size * self.world_size // (2 * max(1, round(self.size / n))))
        bits = max(1, min(16, int(np.ceil(np.log2(max(2, len(hard) / per_batch))))))
        planes = torch.randn(vecs.shape[1], bits, generator=g)
        codes = ((vecs @ planes) > 0).long() @ (2 ** torch.arange(bits))
        hard = hard[torch.argsort(codes * n + torch.randperm(len(hard), generator=g), stable=True)]
        half = max(1, self.batch_size * self.world_size // 2)
        hard_items = [i for k in hard.tolist() for i in groups[k]]
        easy_items = [i for k in easy.tolist() for i in groups[k]]
        chunks = []
        while hard_items or easy_items:
            take_h, take_e = hard_items[:half], easy_items[: 2 * half - min(half, len(hard_items))]
            hard_items, easy_items = hard_items[len(take_h):], easy_items[len(take_e):]
            chunks.append(take_h + take_e)
        order = [chunks[k] for k in torch.randperm(len(chunks), generator=g).tolist()]
        full = [c for c in order if len(c) == 2 * half] + [c for c in order if len(c) != 2 * half]
        return [i for c in full for i in c]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        glob = self.batch_size * self.world_size
        for b in range(self.start, len(self)):
            lo = b * glob + self.rank * self.batch_size
            yield order[lo:lo + self.batch_size]


def identity_groups(pairs: Sequence[ImageText]) -> list[list[int]]:
    """Indices of ``pairs`` grouped by :func:`identity_group`, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(identity_group(p), []).append(i)
    return list(groups.values())


class TrainLoader:
    """The training DataLoader seen from the main process: each batch's ``"bad_images"`` messages
    (images a worker could not decode) stop the run with one line (``error``) or are recorded in
    :data:`tpas.data.images.skipped` (``skip``) before the batch, tensors only, is handed on."""

    def __init__(self, loader: DataLoader, on_bad_image: str = "error"):
        self.loader, self.on_bad_image = loader, on_bad_image

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            handle_late_problems(batch.pop("bad_images", []), self.on_bad_image)  # cached batches decode nothing
            yield batch


def build_train_loader(dataset: PairDataset, sampler: ShardedBatchSampler, collate: Collator,
                       workers: int = 0, on_bad_image: str = "error") -> TrainLoader:
    """A DataLoader with its own generator, so creating an iterator never draws from the global
    torch RNG (that would make a resumed run diverge)."""
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                        generator=torch.Generator().manual_seed(0), persistent_workers=False,
                        pin_memory=torch.cuda.is_available())
    return TrainLoader(loader, on_bad_image)


def label_map(pairs: Sequence[ImageText]) -> dict[str, int]:
    return {pid: i for i, pid in enumerate(sorted({p.person_id for p in pairs}))}


def subsample(train: TrainSet, max_pairs: int, seed: int) -> TrainSet:
    if max_pairs <= 0 or len(train.pairs) <= max_pairs:
        return train
    rng = random.Random(seed)
    keep = sorted(rng.sample(range(len(train.pairs)), max_pairs))
    log.info("using %d of %d training pairs (data.max_pairs)", max_pairs, len(train.pairs))
    return TrainSet(name=train.name, root=train.root, pairs=[train.pairs[i] for i in keep])
