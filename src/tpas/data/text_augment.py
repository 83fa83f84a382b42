"""Caption augmentation for training: EDA-style word deletion and swaps (no synonym list).

It lives with the data because the training ``Dataset`` applies it per sample, seeded like the
image augmentations, so a resumed run sees the same captions.
"""

from __future__ import annotations

import random

__all__ = ["eda"]


def eda(text: str, rng: random.Random, p_delete: float = 0.1, n_swaps: int = 1) -> str:
    """Random word deletion (each word with ``p_delete``) and ``n_swaps`` swaps of two words.

    Deletion never empties the caption; behaviour words can be dropped too, which is the point:
    the model must not rely on one word.
    """
    words = text.split()
    if len(words) < 2:
        return text
    kept = [w for w in words if rng.random() >= p_delete] or [rng.choice(words)]
    for _ in range(n_swaps if len(kept) > 1 else 0):
        i, j = rng.randrange(len(kept)), rng.randrange(len(kept))
        kept[i], kept[j] = kept[j], kept[i]
    return " ".join(kept)
