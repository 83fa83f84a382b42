"""The one interface every backbone implements (DESIGN section 4).

Search, training and evaluation talk to models only through this class, so a new backbone is a
new subclass plus a config, never a branch in the pipeline.
"""

from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tpas.models.tokenizer import WordPieceTokenizer
from tpas.utils.io import atomic_save, write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ImageEncoding:
    """``tokens`` [B,N,Dv] feed the fusion layers; ``embeds`` [B,E] are L2-normalised ITC features."""

    tokens: torch.Tensor
    embeds: torch.Tensor


@dataclass
class TextEncoding:
    """``tokens`` [B,L,Dt] and ``mask`` [B,L] feed the fusion layers; ``embeds`` [B,E] are L2-normalised."""

    tokens: torch.Tensor
    mask: torch.Tensor
    embeds: torch.Tensor


@dataclass
class ModelConfig:
    """Fields every model config has; families subclass it and add their own (config as data)."""

    image_size: tuple[int, int] = (224, 224)  # (height, width) of the input pixels
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    max_text_len: int = 64
    embed_dim: int = 256
    temp_init: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    vocab: str | None = None  # vocab.txt path; None = the BERT-uncased vocab shipped with the package
    # ITC weight in the re-rank fusion minmax(ITM) + w * minmax(ITC), picked on the validation split
    # by training (tpas.search.calibrate.calibrate_weight); None = upstream's 0.002
    rerank_weight: float | None = None
    # the re-rank depth that weight was fitted at, and the validation R@1 points ITC -> ITM re-rank
    # gained there (the server turns re-ranking on by default only when the gain is positive)
    rerank_depth: int | None = None
    rerank_gain: float | None = None
    # SCA's text-similarity threshold (cosine of text embeddings), picked on the validation split
    # (tpas.search.calibrate.calibrate_sca_threshold); None = tpas.search.postprocess's default
    sca_threshold: float | None = None
    # SCA's other validation-picked options (rule, tau, confidence: tpas.search.calibrate.calibrate_sca)
    sca_options: dict[str, Any] | None = None
    # the global assignment's validation-picked options (k, slack, confidence:
    # tpas.search.calibrate.calibrate_assign); None = tpas.search.postprocess.assign's defaults
    assign_options: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config fields {unknown}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


class RetrievalModel(nn.Module, abc.ABC):
    """Image tower + text tower + cross-attention fusion with an ITM head.

    Subclasses set ``family`` and ``config_class`` and implement the three encoders. The learnable
    temperature is stored raw in ``temp`` and read through :attr:`temperature`, which clamps it.
    """

    family: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.temp = nn.Parameter(torch.tensor(float(config.temp_init)))
        self._tokenizer: WordPieceTokenizer | None = None

    # -- the interface -------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> ImageEncoding: ...

    @abc.abstractmethod
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding: ...

    @abc.abstractmethod
    def itm_logits(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """[B,2] match logits (index 1 = match) for B aligned (image, text) pairs."""

    def itm_margin(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                   text_mask: torch.Tensor) -> torch.Tensor:
        """[B] ITM match score z1 - z0 of aligned pairs: see :func:`itm_margin`."""
        return itm_margin(self.itm_logits(image_tokens, text_tokens, text_mask))

    # -- shared behaviour ----------------------------------------------------------------------
    @property
    def temperature(self) -> torch.Tensor:
        """The temperature, within [temp_min, temp_max], with the raw parameter's gradient.

        The value is clamped, but the clamp is not in the autograd graph (straight-through): a
        ``clamp`` there would give the parameter zero gradient for good once an update pushed it
        past a bound. The trainer clamps the parameter itself after every optimizer step
        (:meth:`clamp_temperature_`), as ALBEF and X-VLM do, so the two agree during training.
        """
        clamped = self.temp.detach().clamp(self.config.temp_min, self.config.temp_max)
        return self.temp + (clamped - self.temp.detach())

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamp the raw temperature parameter into [temp_min, temp_max] in place (after optimizer steps)."""
        self.temp.clamp_(self.config.temp_min, self.config.temp_max)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.config.image_size)  # type: ignore[return-value]

    @property
    def tokenizer(self) -> WordPieceTokenizer:
        if self._tokenizer is None:
            self._tokenizer = WordPieceTokenizer(self.config.vocab)
        return self._tokenizer

    def tokenize(self, texts: list[str], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) padded to the longest text, capped at ``max_text_len``."""
        ids, mask = self.tokenizer(texts, max_length=self.config.max_text_len)
        if device is not None:
            ids, mask = ids.to(device), mask.to(device)
        return ids, mask

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (atomically); ``create_model(dir)`` reads it back."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_save(directory / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        self.save_extras(directory)
        # config.json last: a directory that has it is complete
        write_json(directory / CONFIG_NAME, {"family": self.family, "config": self.config.to_dict()})
        return directory

    def save_extras(self, directory: Path) -> None:
        """Hook: write files a saved model needs besides config + weights (e.g. tokenizer files)."""

    def load_extras(self, directory: Path) -> None:
        """Hook: read what :meth:`save_extras` wrote; ``from_pretrained`` calls it after the weights."""


def itm_margin(logits: torch.Tensor) -> torch.Tensor:
    """The ITM score to rank with: the logit margin ``z1 - z0`` of [B,2] match logits.

    With a 2-way softmax cross-entropy only the difference of the two logits is trained: the
    gradient of the loss with respect to ``z0 + z1`` is zero, so the sum of the head's two output
    rows never moves from its (random, for a new head) init, and ``z1`` alone is half the trained
    margin plus that fixed random projection. The margin is the trained quantity;
    ``softmax(logits)[:, 1] = sigmoid(margin)`` is a monotone function of it.
    """
    return logits[..., 1] - logits[..., 0]


def read_config_file(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if "family" not in data or "config" not in data:
        raise ValueError(f"{path}: expected keys 'family' and 'config'")
    return data


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts per top-level submodule plus ``total`` and ``trainable`` (for tables, logs)."""
    counts: dict[str, int] = {}
    for name, child in model.named_children():
        counts[name] = sum(p.numel() for p in child.parameters())
    direct = sum(p.numel() for p in model.parameters(recurse=False))
    if direct:
        counts["(own)"] = direct
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts
