"""X-VLM (Swin image tower + BERT text/fusion encoder + ITC/ITM heads), as upstream computes it.

The module tree and parameter names are X-VLM's retrieval model (``vision_encoder``,
``text_encoder``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``), so a fine-tuned
X-VLM checkpoint loads as is and a pretraining / CMP checkpoint after the documented mapping
(:func:`load_official_checkpoint`). ``itc_head="cmp"`` swaps the CLS projections for CMP's
pooled BatchNorm projections so CMP baseline checkpoints load too. See docs/models-xvlm.md.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tpas.errors import TpasError
from tpas.models.base import ImageEncoding, ModelConfig, RetrievalModel, TextEncoding
from tpas.models.registry import register_config, register_family
from tpas.models.swin import SwinTransformer
from tpas.models.xbert import XBert

log = logging.getLogger(__name__)


class CheckpointError(TpasError):
    """An official checkpoint that cannot be loaded into the model as configured."""


@dataclass
class XVLMConfig(ModelConfig):
    """Flat on purpose: it round-trips through config.json with ``ModelConfig.from_dict``."""

    image_size: tuple[int, int] = (224, 224)
    max_text_len: int = 40
    embed_dim: int = 256
    temp_init: float = 0.07
    # Swin
    patch_size: int = 4
    vision_embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 7
    mlp_ratio: float = 4.0
    vision_eps: float = 1e-5
    drop_path_rate: float = 0.1
    # BERT
    text_hidden: int = 768
    text_layers: int = 12
    fusion_layer: int = 6
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 30522
    max_position: int = 512
    type_vocab: int = 2
    text_eps: float = 1e-12
    text_dropout: float = 0.1
    text_attn_dropout: float = 0.1
    # heads: "linear" = X-VLM (Linear on the CLS); "cmp" = CMP (BN + Dropout + Linear on pooled tokens)
    itc_head: str = "linear"
    itc_dropout: float = 0.0
    itc_pool: int = 3

    def __post_init__(self) -> None:
        if self.itc_head not in ("linear", "cmp"):
            raise ValueError(f"itc_head must be 'linear' or 'cmp', got {self.itc_head!r}")
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)

    @property
    def vision_width(self) -> int:
        return self.vision_embed_dim * 2 ** (len(self.depths) - 1)


def build_mlp(width: int, out: int = 2) -> nn.Sequential:
    """X-VLM's ``build_mlp``: Linear(H,2H) -> LayerNorm(2H) -> GELU -> Linear(2H,out); keys 0/1/3."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, out))


def cmp_projection(in_dim: int, out: int, dropout: float) -> nn.Sequential:
    """CMP's ``feature_mapping``: BatchNorm1d -> Dropout -> Linear; keys 0 and 2."""
    return nn.Sequential(nn.BatchNorm1d(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, out))


@register_family("xvlm")
class XVLM(RetrievalModel):
    config_class = XVLMConfig

    def __init__(self, config: XVLMConfig):
        super().__init__(config)
        c = config
        self.vision_encoder = SwinTransformer(
            tuple(c.image_size), c.patch_size, c.vision_embed_dim, c.depths, c.num_heads, c.window_size,
            c.mlp_ratio, c.vision_eps, c.drop_path_rate)
        self.text_encoder = XBert(
            c.vocab_size, c.text_hidden, c.text_layers, c.fusion_layer, c.text_heads, c.text_intermediate,
            c.max_position, c.type_vocab, c.text_eps, c.vision_width, c.text_dropout, c.text_attn_dropout)
        if c.itc_head == "linear":
            self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
            self.text_proj = nn.Linear(c.text_hidden, c.embed_dim)
        else:
            self.vision_proj = cmp_projection(c.itc_pool * c.vision_width, c.embed_dim, c.itc_dropout)
            self.text_proj = cmp_projection((c.itc_pool + 1) * c.text_hidden, c.embed_dim, c.itc_dropout)
        self.itm_head = build_mlp(c.text_hidden)

    # -- interface -----------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> ImageEncoding:
        if tuple(pixels.shape[-2:]) != tuple(self.config.image_size):
            raise ValueError(f"X-VLM expects {tuple(self.config.image_size)} pixels, got {tuple(pixels.shape[-2:])}")
        tokens = self.vision_encoder(pixels)
        return ImageEncoding(tokens=tokens, embeds=F.normalize(self.vision_proj(self._image_itc_input(tokens)), dim=-1))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        tokens = self.text_encoder.text(input_ids, attention_mask)
        embeds = F.normalize(self.text_proj(self._text_itc_input(tokens)), dim=-1)
        return TextEncoding(tokens=tokens, mask=attention_mask, embeds=embeds)

    def fusion(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """[B,L,H] fusion-encoder output for B aligned pairs (the image mask is all ones, as upstream)."""
        return self.text_encoder.fusion(text_tokens, text_mask, image_tokens)

    def itm_logits(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.itm_head(self.fusion(image_tokens, text_tokens, text_mask)[:, 0])

    def tokenize(self, texts, device=None):
        """CMP pools text tokens 1..L-1 *including padding*, so its head needs max-length padding."""
        ids, mask = super().tokenize(texts, device)
        if self.config.itc_head == "cmp" and ids.shape[1] < self.config.max_text_len:
            pad = self.config.max_text_len - ids.shape[1]
            ids, mask = F.pad(ids, (0, pad), value=self.tokenizer.pad_id), F.pad(mask, (0, pad), value=0)
        return ids, mask

    # -- ITC inputs ----------------------------------------------------------------------------
    def _image_itc_input(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.itc_head == "linear":
            return tokens[:, 0]
        return F.adaptive_avg_pool1d(tokens[:, 1:].transpose(1, 2), self.config.itc_pool).transpose(1, 2).flatten(1)

    def _text_itc_input(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.itc_head == "linear":
            return tokens[:, 0]
        pooled = F.adaptive_avg_pool1d(tokens[:, 1:].transpose(1, 2), self.config.itc_pool).transpose(1, 2)
        return torch.cat([tokens[:, :1], pooled], dim=1).flatten(1)

    # -- checkpoints ---------------------------------------------------------------------------
    def load_checkpoint(self, path: str | Path, is_eval: bool | None = None, strict: bool = False) -> "LoadReport":
        """Load an official X-VLM / CMP ``.th``/``.pth`` file (see :func:`load_official_checkpoint`)."""
        return load_official_checkpoint(self, path, is_eval=is_eval, strict=strict)


# ----------------------------------------------------------------------------------------------
# official checkpoint loading
# ----------------------------------------------------------------------------------------------

# Keys dropped on purpose, with the reason logged. Constant buffers are rebuilt by the model;
# heads that the retrieval model does not have are the ones upstream also leaves unused.
IGNORED_KEYS: tuple[tuple[str, str], ...] = (
    (r"(^|\.)relative_position_index$", "constant buffer, rebuilt for the model's window"),
    (r"(^|\.)attn_mask$", "constant buffer, rebuilt for the model's grid"),
    (r"^text_encoder\.embeddings\.position_ids$", "constant buffer"),
    (r"^text_encoder\.cls\.", "MLM head of pretraining/CMP (not used for retrieval)"),
    (r"^bbox_head\.", "box-prediction head of X-VLM pretraining"),
    (r"^pose_block\.|^pose_conv\.",
     "CMP pose branch (not supported: tpas runs the RGB path only, image tokens skip the pose block)"),
)


@dataclass
class LoadReport:
    """What :func:`load_official_checkpoint` did: keys left at init, keys not used, keys dropped by rule."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``{'model': sd, ...}`` or a bare state dict, read with ``weights_only=True`` (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - surface any unpickling refusal as one clear line
        raise CheckpointError(f"{path}: cannot read as a weights-only torch checkpoint ({exc})") from exc
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (or {{'model': state_dict}}) of tensors")
    return dict(obj)


def interpolate_relative_position_bias(table: torch.Tensor, dst_rows: int) -> torch.Tensor:
    """Resize a Swin ``relative_position_bias_table`` [(2w-1)^2, heads] to ``dst_rows`` rows.

    The BEiT recipe X-VLM uses: source offsets are spread on a geometric progression whose
    half-span reaches the target half-span, then a bicubic spline (per head) is sampled at the
    integer target offsets. Same numbers as upstream's ``interp2d(kind='cubic')``.
    """
    from scipy.interpolate import RectBivariateSpline

    src_rows, heads = table.shape
    src, dst = int(round(src_rows ** 0.5)), int(round(dst_rows ** 0.5))
    if src * src != src_rows or dst * dst != dst_rows:
        raise CheckpointError(f"relative position table of {src_rows} -> {dst_rows} rows is not square")
    if src == dst:
        return table
    half = src // 2
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:  # upstream bisection; q is the last midpoint tried
        q = (lo + hi) / 2.0
        if (1.0 - q ** half) / (1.0 - q) > dst // 2:
            hi = q
        else:
            lo = q
    offsets = np.cumsum([q ** i for i in range(half)])  # 1, 1+q, 1+q+q^2, ...
    coords = np.concatenate([-offsets[::-1], [0.0], offsets])
    targets = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    values = table.detach().float().cpu().numpy()
    out = []
    for h in range(heads):
        spline = RectBivariateSpline(coords, coords, values[:, h].reshape(src, src), kx=3, ky=3, s=0)
        out.append(torch.tensor(spline(targets, targets), dtype=torch.float32).reshape(-1, 1))
    return torch.cat(out, dim=1).to(dtype=table.dtype)


def _ignore_reason(key: str) -> str | None:
    for pattern, reason in IGNORED_KEYS:
        if re.search(pattern, key):
            return reason
    return None


def convert_official_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, is_eval: bool | None = None
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map an official state dict onto ``model``'s names and shapes (no loading yet).

    ``text_encoder.bert.X`` (pretraining and CMP layout) becomes ``text_encoder.X``; fine-tuned
    retrieval checkpoints already use the model's names. Relative position bias tables are
    interpolated to the model's windows unless ``is_eval=True`` (upstream's fine-tuned path,
    which takes tensors as they are). Raises :class:`CheckpointError` on any shape that still
    does not fit.
    """
    own = model.state_dict()
    _check_itc_head(state, own)
    report = LoadReport()
    out: dict[str, torch.Tensor] = {}
    ignored_reasons: dict[str, int] = {}
    for key, value in state.items():
        new_key = "text_encoder." + key[len("text_encoder.bert."):] if key.startswith("text_encoder.bert.") else key
        reason = _ignore_reason(new_key)
        if reason is not None:
            report.ignored.append(key)
            ignored_reasons[reason] = ignored_reasons.get(reason, 0) + 1
            continue
        if (is_eval is not True and key.endswith("relative_position_bias_table") and new_key in own
                and own[new_key].shape != value.shape and value.ndim == 2 and own[new_key].ndim == 2
                and own[new_key].shape[1] == value.shape[1]):
            value = interpolate_relative_position_bias(value, own[new_key].shape[0])
            report.interpolated.append(new_key)
        out[new_key] = value
    mismatches = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in out.items() if k in own and own[k].shape != v.shape]
    if mismatches:
        raise CheckpointError(
            f"{len(mismatches)} checkpoint tensors do not fit the model config (wrong config or checkpoint?): "
            + "; ".join(mismatches[:8]) + (" ..." if len(mismatches) > 8 else ""))
    report.unexpected = sorted(k for k in out if k not in own)
    report.missing = sorted(k for k in own if k not in out)
    for reason, count in ignored_reasons.items():  # the pose branch changes what the model computes: say so
        log.log(logging.WARNING if "pose" in reason else logging.INFO, "ignored %d checkpoint keys: %s", count, reason)
    return out, report


def _check_itc_head(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> None:
    """A CMP head checkpoint into an X-VLM head (or back) is a config error, not a partial load."""
    ckpt_cmp = "vision_proj.2.weight" in state
    model_cmp = "vision_proj.2.weight" in own
    if ckpt_cmp and not model_cmp:
        raise CheckpointError("checkpoint has CMP projection heads (vision_proj.0/2); build the model with "
                              "itc_head='cmp' (e.g. create_model('xvlm-cmp', checkpoint=...))")


def load_official_checkpoint(
    model: XVLM, path: str | Path | Mapping[str, torch.Tensor], is_eval: bool | None = None, strict: bool = False
) -> LoadReport:
    """Load an official X-VLM (4M/16M pretraining or fine-tuned retrieval) or CMP checkpoint.

    ``path`` is a ``.th``/``.pth`` file or an already-read state dict. Missing and unexpected keys
    are logged (and raise with ``strict=True``); shape mismatches always raise.
    """
    where = path if isinstance(path, (str, Path)) else "<state dict>"
    state = read_official_state_dict(path) if isinstance(path, (str, Path)) else dict(path)
    mapped, report = convert_official_state_dict(state, model, is_eval=is_eval)
    if report.interpolated:
        log.info("interpolated %d relative position bias tables to the model's window", len(report.interpolated))
    if report.missing:
        log.warning("%s: %d model keys not in checkpoint (left at init): %s", where, len(report.missing), report.missing)
    if report.unexpected:
        log.warning("%s: %d checkpoint keys not used by the model: %s", where, len(report.unexpected), report.unexpected)
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"{where}: missing {report.missing[:5]}, unexpected {report.unexpected[:5]}")
    model.load_state_dict(mapped, strict=False)
    log.info("loaded %d tensors from %s", len(mapped) - len(report.unexpected), where)
    return report


# ----------------------------------------------------------------------------------------------
# configs: upstream JSON files and built-in names
# ----------------------------------------------------------------------------------------------


def config_from_upstream(upstream: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """XVLMConfig fields from ``{vision_config, text_config, model_config}`` as upstream writes them.

    ``vision_config`` is X-VLM's ``config_swin*.json`` (CMP's adds ``h``/``w``), ``text_config``
    its ``config_bert.json`` (+ ``fusion_layer``, ``encoder_width``), ``model_config`` the yaml
    keys (``embed_dim``, ``temp``, ``max_tokens``, ``image_res``...). Either may be a file path.
    """
    source = str(upstream) if isinstance(upstream, (str, Path)) else "<upstream_config>"
    data = _read_json(upstream) if isinstance(upstream, (str, Path)) else dict(upstream)
    try:
        vision = _maybe_file(data["vision_config"])
        text = _maybe_file(data["text_config"])
    except KeyError as exc:
        raise TpasError(f"{source}: missing field {exc.args[0]!r} (need vision_config, text_config, model_config)")
    model = _maybe_file(data.get("model_config", {}))
    if not model.get("use_swin", True) or model.get("use_clip_vit") or model.get("use_roberta"):
        raise TpasError(f"{source}: only the Swin + BERT X-VLM is supported (use_swin true, no CLIP ViT/RoBERTa)")
    if text.get("hidden_act", "gelu") != "gelu":
        raise TpasError(f"{source}: text_config.hidden_act {text['hidden_act']!r} unsupported (need 'gelu')")
    res = model.get("image_res", vision.get("image_res", 224))
    h, w = model.get("h", vision.get("h", res)), model.get("w", vision.get("w", res))
    try:
        cfg = dict(
            image_size=(int(h), int(w)),
            vision_embed_dim=int(vision["embed_dim"]),
            depths=tuple(vision["depths"]),
            num_heads=tuple(vision["num_heads"]),
            window_size=int(vision["window_size"]),
            drop_path_rate=float(vision.get("drop_path_rate", 0.1)),
            text_hidden=int(text["hidden_size"]),
            text_layers=int(text["num_hidden_layers"]),
            fusion_layer=int(text["fusion_layer"]),
            text_heads=int(text["num_attention_heads"]),
            text_intermediate=int(text["intermediate_size"]),
            vocab_size=int(text["vocab_size"]),
            max_position=int(text["max_position_embeddings"]),
            type_vocab=int(text["type_vocab_size"]),
            text_eps=float(text.get("layer_norm_eps", 1e-12)),
            text_dropout=float(text.get("hidden_dropout_prob", 0.1)),
            text_attn_dropout=float(text.get("attention_probs_dropout_prob", 0.1)),
        )
    except KeyError as exc:
        raise TpasError(f"{source}: missing upstream config field {exc.args[0]!r}") from None
    for src, dst in (("embed_dim", "embed_dim"), ("temp", "temp_init"), ("max_tokens", "max_text_len"),
                     ("itc_dp", "itc_dropout")):
        if src in model:
            cfg[dst] = model[src]
    width = cfg["vision_embed_dim"] * 2 ** (len(cfg["depths"]) - 1)
    for name, declared in (("vision_config.vision_width", vision.get("vision_width")),
                           ("text_config.encoder_width", text.get("encoder_width"))):
        if declared is not None and int(declared) != width:
            raise TpasError(f"{source}: {name} = {declared} but the Swin config gives width {width}")
    return cfg


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise TpasError(f"{path}: upstream config file not found") from None
    except json.JSONDecodeError as exc:
        raise TpasError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def _maybe_file(value: Any) -> dict[str, Any]:
    return _read_json(value) if isinstance(value, (str, Path)) else dict(value)


def build_xvlm(options: dict[str, Any], checkpoint: str | Path | None = None,
               defaults: Mapping[str, Any] | None = None) -> XVLM:
    """Build from ``defaults`` < ``upstream_config`` (file or dict) < explicit field ``options``.

    ``options`` may also hold ``image_res`` (upstream's square size) and ``is_eval`` (passed to
    the checkpoint loader).
    """
    options = dict(options)
    upstream = options.pop("upstream_config", None)
    is_eval = options.pop("is_eval", None)
    if "image_res" in options:
        res = options.pop("image_res")
        options["image_size"] = (res, res) if isinstance(res, int) else tuple(res)
    cfg = dict(defaults or {})
    if upstream is not None:
        cfg.update(config_from_upstream(upstream))
    cfg.update(options)
    unknown = sorted(set(cfg) - {f.name for f in fields(XVLMConfig)})
    if unknown:
        raise TypeError(f"xvlm: unknown options {unknown}")
    model = XVLM(XVLMConfig.from_dict(cfg))
    if checkpoint is not None:
        model.load_checkpoint(checkpoint, is_eval=is_eval)
    return model


def _named(defaults: dict[str, Any]):
    """A registry builder with these defaults (kept here so that user overrides stay distinguishable)."""
    return lambda options, checkpoint=None: build_xvlm(options, checkpoint, defaults)


_BASE: dict[str, Any] = dict(
    image_size=(224, 224), patch_size=4, vision_embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
    window_size=7, text_hidden=768, text_layers=12, fusion_layer=6, text_heads=12, text_intermediate=3072,
    vocab_size=30522, embed_dim=256, temp_init=0.07, max_text_len=40,
)
_SMALL: dict[str, Any] = dict(
    image_size=(224, 224), patch_size=4, vision_embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
    window_size=7, text_hidden=64, text_layers=4, fusion_layer=2, text_heads=4, text_intermediate=128,
    vocab_size=1000, embed_dim=32, temp_init=0.07, max_text_len=16,
)

_NAMED_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "xvlm": ("X-VLM from upstream config files (upstream_config=JSON); base defaults", _BASE),
    "xvlm-base": ("X-VLM base: Swin-B 224/window 7 + BERT-base (6 text + 6 fusion layers), ITC 256", _BASE),
    "xvlm-base-384": ("X-VLM base at 384 px, window 12 (X-VLM's retrieval fine-tuning size)",
                      {**_BASE, "image_size": (384, 384), "window_size": 12}),
    "xvlm-cmp": ("CMP baseline (PAB): X-VLM base with CMP's pooled BatchNorm ITC heads, ITC 2048",
                 {**_BASE, "itc_head": "cmp", "embed_dim": 2048, "itc_dropout": 0.5, "max_text_len": 56}),
    "xvlm-small": ("tiny X-VLM: the test fixture's config (vocab cut to 1000 ids)", _SMALL),
}
for _name, (_description, _defaults) in _NAMED_CONFIGS.items():  # all but the test config need a checkpoint
    register_config(_name, "xvlm", _description, builder=_named(_defaults), needs_checkpoint=_name != "xvlm-small")
