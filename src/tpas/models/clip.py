"""``clip``: a transformers ``CLIPModel`` backbone with the shared fusion + ITM head on top.

This runs CLIP-based methods (IRRA style) in the same pipeline as X-VLM and lite:

* ITC embeddings are CLIP's own: ``visual_projection`` of the post-LayerNorm CLS state and
  ``text_projection`` of the end-of-text state, L2-normalised (so ``embed_dim`` = CLIP's
  ``projection_dim``; the named value is replaced at build time);
* image tokens for fusion: the vision tower's last hidden states after ``post_layernorm``
  (``image_tokens="hidden"``, width = vision hidden size), or additionally projected by
  ``visual_projection`` (``"projected"``, as IRRA does); text tokens: the text tower's last hidden
  state (after ``final_layer_norm``), so fusion width = text hidden size;
* non-square person crops (e.g. 384x128) interpolate CLIP's position embeddings (bicubic, in
  transformers) whenever ``image_size`` differs from the checkpoint's square size;
* the temperature starts from CLIP's ``logit_scale`` (``1 / exp(logit_scale)``, clamped).

Weights: ``clip_name_or_path`` is a local directory or a hub name the user supplies (the hub is
only contacted if the user passes a hub name and the environment allows it; tests never do).
The resolved ``CLIPConfig`` is stored in ``clip_config`` so a saved model rebuilds without its
source. Tokenizer: CLIP's byte-level BPE (``CLIPTokenizer``) from ``tokenizer`` (a directory
with ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``), else from ``clip_name_or_path``;
``tokenizer="bytes"`` is a built-in merge-free byte-level CLIP BPE (514 tokens) used by the
random ``clip-tiny`` config. ``save_pretrained`` writes the tokenizer into ``<dir>/tokenizer/``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tpas.models.base import ImageEncoding, ModelConfig, RetrievalModel, TextEncoding
from tpas.models.layers import FusionStack, ITMHead, train_top_blocks
from tpas.models.registry import register_config, register_family

log = logging.getLogger(__name__)

TOKENIZER_SUBDIR = "tokenizer"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass
class ClipConfig(ModelConfig):
    image_size: tuple[int, int] = (0, 0)  # (0, 0) = the checkpoint's own square size
    max_text_len: int = 77  # CLIP's context length; capped by the text position table
    clip_name_or_path: str | None = None
    clip_config: dict[str, Any] | None = None  # CLIPConfig.to_dict(); filled in at build time
    tokenizer: str | None = None  # tokenizer dir, "bytes", or None = clip_name_or_path
    pretrained: bool = True  # load clip_name_or_path's weights (False = random init of its config)
    image_tokens: str = "hidden"  # "hidden" (vision width) or "projected" (projection_dim)
    fusion_layers: int = 2
    fusion_heads: int = 8
    fusion_mlp_ratio: float = 4.0
    dropout: float = 0.1
    train_text_layers: int = -1  # -1 = all, 0 = frozen, k = top k transformer layers
    train_image_blocks: int = -1  # top k vision transformer layers (same field name as lite)


# -- tokenizer ------------------------------------------------------------------------------------
def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2/CLIP convention)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, shift = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shift))
            shift += 1
    return symbols


def byte_level_vocab(merges: list[tuple[str, str]] = ()) -> dict[str, int]:
    """CLIP-layout vocab: 256 byte symbols, the same with ``</w>``, merged pairs, then BOS, EOS."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_bpe_files(directory: Path, merges: list[tuple[str, str]] = ()) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` for :func:`byte_level_vocab` (CLIP's on-disk format)."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(byte_level_vocab(merges)), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf-8")
    return directory


@lru_cache(maxsize=1)
def _builtin_bytes_tokenizer():
    """Loaded through files so every transformers version (slow or fast CLIPTokenizer) reads it."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tpas-clip-bytes-") as tmp:
        return CLIPTokenizer.from_pretrained(str(write_bpe_files(Path(tmp))), local_files_only=True)


@lru_cache(maxsize=8)
def _load_tokenizer(source: str):
    from transformers import CLIPTokenizer

    if source == "bytes":
        return _builtin_bytes_tokenizer()
    path = Path(source)
    if path.is_dir() and not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"no CLIP tokenizer files (tokenizer.json or vocab.json + merges.txt) in {path}")
    return CLIPTokenizer.from_pretrained(source, local_files_only=path.is_dir())


class ClipTokenizer:
    """Same call interface as :class:`WordPieceTokenizer`: ``tok(texts, max_length) -> (ids, mask)``.

    ``cls_id``/``sep_id`` are CLIP's BOS/EOS; padding uses EOS (CLIP pools the *first* EOS, so
    padding never moves the pooled position); there is no ``[MASK]`` token (``mask_id`` is None).
    """

    def __init__(self, source: str):
        self.source = source
        self.hf = _load_tokenizer(source)
        self.vocab_size = len(self.hf)
        self.cls_id = self.hf.bos_token_id
        self.sep_id = self.hf.eos_token_id
        self.pad_id = self.hf.pad_token_id
        self.mask_id = None

    def __call__(self, texts: list[str], max_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        enc = self.hf(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def save(self, directory: Path) -> None:
        self.hf.save_pretrained(str(directory))


# -- model ----------------------------------------------------------------------------------------
def _resolve_clip_config(config: ClipConfig):
    from transformers import CLIPConfig

    if config.clip_config is not None:
        return CLIPConfig.from_dict(config.clip_config)
    if config.clip_name_or_path is None:
        raise ValueError("clip: give clip_name_or_path (a local CLIP directory or a hub name) or clip_config")
    path = Path(config.clip_name_or_path)
    return CLIPConfig.from_pretrained(config.clip_name_or_path, local_files_only=path.is_dir())


@register_family("clip")
class ClipModel(RetrievalModel):
    config_class = ClipConfig

    def __init__(self, config: ClipConfig, pretrained: bool | None = None):
        from transformers import CLIPModel

        super().__init__(config)
        if config.image_tokens not in ("hidden", "projected"):
            raise ValueError(f"clip: image_tokens must be 'hidden' or 'projected', got {config.image_tokens!r}")
        load = (config.pretrained if pretrained is None else pretrained) and config.clip_name_or_path is not None
        if load:
            source = config.clip_name_or_path
            self.clip = CLIPModel.from_pretrained(source, local_files_only=Path(source).is_dir())
            log.info("clip: loaded CLIP weights from %s", source)
        else:
            self.clip = CLIPModel(_resolve_clip_config(config))
        clip_cfg = self.clip.config
        config.clip_config = clip_cfg.to_dict()
        config.embed_dim = clip_cfg.projection_dim
        side = clip_cfg.vision_config.image_size
        if tuple(config.image_size) == (0, 0):
            config.image_size = (side, side)
        config.max_text_len = min(config.max_text_len, clip_cfg.text_config.max_position_embeddings)
        if load:  # start from CLIP's learned temperature
            with torch.no_grad():
                t = 1.0 / math.exp(float(self.clip.logit_scale))
                self.temp.fill_(min(max(t, config.temp_min), config.temp_max))
        text_width = clip_cfg.text_config.hidden_size
        image_width = clip_cfg.projection_dim if config.image_tokens == "projected" else clip_cfg.vision_config.hidden_size
        self.fusion = FusionStack(config.fusion_layers, text_width, image_width, config.fusion_heads,
                                  mlp_ratio=config.fusion_mlp_ratio, dropout=config.dropout)
        self.itm_head = ITMHead(text_width)
        self._interpolate = tuple(config.image_size) != (side, side)
        self.set_trainable(config.train_text_layers, config.train_image_blocks)

    def set_trainable(self, text_layers: int = -1, image_blocks: int = -1) -> None:
        """Freeze the CLIP towers except their top layers (-1 = all); projections and heads train."""
        self.config.train_text_layers, self.config.train_image_blocks = text_layers, image_blocks
        text, vision = self.clip.text_model, self.clip.vision_model
        train_top_blocks(text, text.encoder.layers, text_layers)
        train_top_blocks(vision, vision.encoder.layers, image_blocks)
        if text_layers != 0:
            text.final_layer_norm.requires_grad_(True)
        if image_blocks != 0:
            vision.post_layernorm.requires_grad_(True)

    # -- tokenizer ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> ClipTokenizer:
        if self._tokenizer is None:
            source = self.config.tokenizer or self.config.clip_name_or_path
            if source is None:
                raise ValueError("clip: no tokenizer (set tokenizer= to a CLIP tokenizer directory or 'bytes')")
            self._tokenizer = ClipTokenizer(str(source))
        return self._tokenizer

    def save_extras(self, directory: Path) -> None:
        try:
            tokenizer = self.tokenizer
        except (ValueError, FileNotFoundError, OSError) as exc:
            log.warning("clip: saved without tokenizer files (%s)", exc)
            return
        tokenizer.save(directory / TOKENIZER_SUBDIR)

    def load_extras(self, directory: Path) -> None:
        if (directory / TOKENIZER_SUBDIR).is_dir():
            self._tokenizer = ClipTokenizer(str(directory / TOKENIZER_SUBDIR))

    # -- the interface --------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> ImageEncoding:
        vision = self.clip.vision_model
        out = vision(pixel_values=pixels, interpolate_pos_encoding=self._interpolate)
        tokens = vision.post_layernorm(out.last_hidden_state)
        embeds = nn.functional.normalize(self.clip.visual_projection(out.pooler_output), dim=-1)
        if self.config.image_tokens == "projected":
            tokens = self.clip.visual_projection(tokens)
        return ImageEncoding(tokens=tokens, embeds=embeds)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        embeds = nn.functional.normalize(self.clip.text_projection(out.pooler_output), dim=-1)
        return TextEncoding(tokens=out.last_hidden_state, mask=attention_mask, embeds=embeds)

    def itm_logits(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                   text_mask: torch.Tensor) -> torch.Tensor:
        fused = self.fusion(text_tokens, text_mask, image_tokens)
        return self.itm_head(fused[:, 0])


def tiny_clip_config(vocab_size: int = 514, eos_token_id: int = 513, bos_token_id: int = 512) -> dict[str, Any]:
    """A random 32-wide, 2-layer CLIP (32 px, patch 8) for tests; ids fit the ``bytes`` tokenizer."""
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, eos_token_id=eos_token_id,
                bos_token_id=bos_token_id, pad_token_id=eos_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32).to_dict()


register_config(
    "clip", "clip",
    description="CLIPModel backbone (pass clip_name_or_path=DIR or hub name) + 2-layer fusion + ITM head",
)


def _build_clip_tiny(options: dict[str, Any], checkpoint=None) -> ClipModel:
    """Named-config builder: the tiny CLIP config is made lazily (it needs transformers)."""
    if checkpoint is not None:
        raise TypeError("clip models take no checkpoint file")
    options = {"clip_config": tiny_clip_config(), **options}
    return ClipModel(ClipConfig.from_dict(options))


register_config(
    "clip-tiny", "clip",
    description="Random tiny CLIP (32-wide, 2+2 layers, 64x32 input, byte-level tokenizer) for tests",
    builder=_build_clip_tiny, pretrained=False, tokenizer="bytes", image_size=(64, 32), max_text_len=32,
    fusion_heads=2,
)
