"""The fast lite layout, ITM margin scores, the in-place temperature clamp, camera augmentation and
training from cached frozen features."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tpas.models import create_model
from tpas.models.base import itm_margin
from tpas.models.lite import FAST_LAYOUT, bert_layer

TEXTS = ["a man in a red coat walks past the bench", "woman running", "a child in a yellow hat falls down"]


# the [CLS]-query fusion over grid tokens (image_tokens="s16"), which most tests here exercise; the
# shipped layout swaps the grid for band tokens (test_shipped_layout_fuses_over_band_tokens)
GRID_LAYOUT = {**FAST_LAYOUT, "image_tokens": "s16", "itc_fine": False, "proj_hidden": 0}


def tiny_fast(**kw):
    torch.manual_seed(0)
    return create_model("lite-tiny", **{**GRID_LAYOUT, **kw})


def test_shipped_layout_fuses_over_band_tokens():
    torch.manual_seed(0)
    model = create_model("lite-tiny", **FAST_LAYOUT).eval()
    model.set_trainable(0, 0)  # both towers frozen, as the demo trains: the stride-16 map is a cached feature
    h, w = model.image_size
    pixels = torch.randn(2, 3, h, w)
    with torch.no_grad():
        img = model.encode_image(pixels)
        feats = model.frozen_image_features(pixels)
        final = model.image_encoder(pixels)
    # global + 3 bands of the final map, then of the map one stride below: 8 tokens of text width
    assert img.tokens.shape == (2, 8, 32)
    fine = feats["fine"]
    assert model.vision_proj.net[0].in_features == 4 * final.shape[1] + 4 * fine.shape[1]
    # a band is the mean of its rows of the map: adaptive average pooling's bands
    bands = torch.nn.functional.adaptive_avg_pool2d(final, (3, 1)).flatten(2).unbind(-1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(model._stripes(final), bands))


# -- ITM: rank by the trained margin -----------------------------------------------------------------
def test_cross_entropy_never_trains_the_sum_of_the_itm_output_rows():
    """Why logits[:, 1] is partly untrained: d CE / d(z0 + z1) = 0, so the rows' sum keeps its init."""
    model = tiny_fast().train()
    head = model.itm_head.net[-1]
    img = torch.randn(6, 5, 32)
    txt, mask = torch.randn(6, 4, 64), torch.ones(6, 4, dtype=torch.long)  # "cls": 2 layers' states
    logits = model.itm_logits(img, txt, mask)
    F.cross_entropy(logits, torch.tensor([1, 0, 1, 0, 0, 1])).backward()
    assert head.weight.grad.abs().sum() > 0
    assert torch.allclose(head.weight.grad[0] + head.weight.grad[1], torch.zeros(64), atol=1e-7)
    assert torch.allclose(head.bias.grad.sum(), torch.zeros(()), atol=1e-7)


def test_rerank_scores_do_not_move_when_the_untrained_component_changes():
    """Adding the same vector to both output rows (the part CE never trains) changes z1 but not the
    ITM score that ranks (search.rerank.itm_scores) nor the model's itm_margin."""
    from tpas.search.rerank import itm_scores

    model = tiny_fast().eval()
    txt, mask = torch.randn(3, 6, 64), torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    images = torch.randn(4, model.token_pos.shape[1], 32).numpy()
    q, g = [0, 0, 1, 2, 2], [0, 3, 1, 2, 0]
    with torch.no_grad():
        before_scores = itm_scores(model, txt, mask, images, q, g)
        before_z1 = model.itm_logits(torch.from_numpy(images[g]), txt[q], mask[q])[:, 1].clone()
        before_margin = model.itm_margin(torch.from_numpy(images[g]), txt[q], mask[q])
        head = model.itm_head.net[-1]
        shift = torch.randn(head.weight.shape[1])
        head.weight += shift  # both rows
        head.bias += 0.7
        after_scores = itm_scores(model, txt, mask, images, q, g)
        after_z1 = model.itm_logits(torch.from_numpy(images[g]), txt[q], mask[q])[:, 1]
        after_margin = model.itm_margin(torch.from_numpy(images[g]), txt[q], mask[q])
    assert not torch.allclose(before_z1, after_z1, atol=1e-3)  # z1 alone would have moved
    np.testing.assert_allclose(after_scores, before_scores, atol=1e-5)
    assert torch.allclose(after_margin, before_margin, atol=1e-5)
    assert torch.allclose(itm_margin(torch.tensor([[0.5, 2.0]])), torch.tensor([1.5]))


# -- temperature ---------------------------------------------------------------------------------------
def test_temperature_keeps_its_gradient_at_a_bound_and_is_clamped_in_place():
    model = tiny_fast()
    with torch.no_grad():
        model.temp.fill_(model.config.temp_max + 0.2)
    t = model.temperature
    assert t.item() == pytest.approx(model.config.temp_max)
    (1.0 / t).backward()  # a loss that wants a smaller temperature
    assert model.temp.grad is not None and model.temp.grad.item() < 0  # not zero: it can come back
    model.clamp_temperature_()
    assert model.temp.item() == pytest.approx(model.config.temp_max)


def test_trainer_clamps_the_temperature_after_each_step(tmp_path):
    from test_train import make_tiny_pab, write_config

    from tpas.config import load_config
    from tpas.train.loop import Trainer

    root = make_tiny_pab(tmp_path / "pab", persons=6)
    cfg = load_config(write_config(tmp_path / "c.yaml", root, tmp_path / "run", max_steps=3, lr=1e-3,
                                   lr_mult={"temp": 2000.0}, warmup=0, checkpoint_every=0),
                      ["val.every=-1", "val.calibrate_rerank=0"])
    trainer = Trainer(cfg)
    seen = []
    step = trainer._after_optimizer_step
    trainer._after_optimizer_step = lambda: (seen.append(trainer.unwrapped.temp.item()), step())
    trainer.fit()
    lo, hi = trainer.unwrapped.config.temp_min, trainer.unwrapped.config.temp_max
    assert any(not lo <= t <= hi for t in seen)  # Adam's first step at lr 2 leaves the range ...
    assert lo <= trainer.unwrapped.temp.item() <= hi  # ... and the parameter is put back


# -- the fast layout -------------------------------------------------------------------------------------
def test_fast_layout_shapes_and_text_init_is_exactly_the_copied_layers():
    model = tiny_fast().eval()
    h, w = model.image_size
    ids, mask = model.tokenize(TEXTS)
    with torch.no_grad():
        img = model.encode_image(torch.randn(3, 3, h, w))
        txt = model.encode_text(ids, mask)
        # 64x32 tiny CNN: final 8x4 grid (+ pooled) and the 16x8 grid one stride below, text width
        assert img.tokens.shape == (3, 1 + 32 + 128, 32)
        # ITC: global + 3 stripes of the final map
        assert model.vision_proj.net.in_features == 4 * 32
        # fusion = copies of the text tower's top 2 layers (all of lite-tiny's); "cls" reads the states
        # entering each of them side by side: the embeddings, then the first layer's output
        emb = model.text_encoder.embeddings(input_ids=ids)
        assert txt.tokens.shape == (3, ids.shape[1], 2 * 32)
        assert torch.allclose(txt.tokens[..., :32], emb, atol=1e-6)
        first = bert_layer(model.text_encoder.encoder.layer[0], emb, mask, heads=2)
        assert torch.allclose(txt.tokens[..., 32:], first, atol=1e-6)
    fresh = create_model("lite-tiny", **GRID_LAYOUT)  # pretrained=False: no copy without weights
    model2 = tiny_fast()
    for mine, theirs in zip(model2.fusion.layers, model2.text_encoder.encoder.layer):
        mine.load_bert_layer(theirs)
    model2.eval()
    with torch.no_grad():
        states = model2.text_encoder.embeddings(input_ids=ids)
        for layer in model2.text_encoder.encoder.layer:
            states = bert_layer(layer, states, mask, heads=2)
        tokens = model2.encode_text(ids, mask).tokens
        fused = model2.fusion(tokens[..., :32], mask, img.tokens)
        cls_logits = model2.itm_logits(img.tokens, tokens, mask)
    # zero-gated cross-attention: at init the fused states are the text tower's own, in the
    # classic full fusion and in the [CLS]-query one
    assert torch.allclose(fused, states, atol=1e-5)
    assert torch.allclose(cls_logits, model2.itm_head(states[:, 0]), atol=1e-5)
    assert fresh.fusion.layers[0].cross_attn.out.weight.abs().sum() > 0  # random init keeps its own weights


def test_indexed_pairs_and_cls_only_equal_the_plain_fusion():
    model = tiny_fast(fusion_query="all").eval()
    cls_only = tiny_fast(fusion_query="last_cls").eval()
    cls_only.load_state_dict(model.state_dict())
    h, w = model.image_size
    ids, mask = model.tokenize(TEXTS)
    with torch.no_grad():
        img = model.encode_image(torch.randn(2, 3, h, w))
        txt = model.encode_text(ids, mask)
        ii, ti = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 0, 2, 2, 1])
        plain = model.itm_head(model.fusion(txt.tokens[ti], mask[ti], img.tokens[ii])[:, 0])
        indexed = model.itm_logits_indexed(img.tokens, txt.tokens, mask, ii, ti)
        fast = cls_only.itm_logits_indexed(img.tokens, txt.tokens, mask, ii, ti)
        gathered = cls_only.itm_logits(img.tokens[ii], txt.tokens[ti], mask[ti])
    assert torch.allclose(indexed, plain, atol=1e-5)
    assert torch.allclose(fast, plain, atol=1e-5)
    assert torch.allclose(gathered, plain, atol=1e-5)


def test_cls_query_fusion_indexed_equals_gathered_and_sees_only_its_image():
    model = tiny_fast().eval()
    with torch.no_grad():  # open the zero gates so the image matters
        for layer in model.fusion.layers:
            layer.cross_attn.out.weight.normal_(0, 0.2)
    h, w = model.image_size
    ids, mask = model.tokenize(TEXTS)
    with torch.no_grad():
        img = model.encode_image(torch.randn(3, 3, h, w))
        txt = model.encode_text(ids, mask)
        ii, ti = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 0, 2, 2, 1])
        indexed = model.itm_logits_indexed(img.tokens, txt.tokens, mask, ii, ti)
        gathered = model.itm_logits(img.tokens[ii], txt.tokens[ti], mask[ti])
        assert torch.allclose(indexed, gathered, atol=1e-5)
        other = img.tokens.clone()
        other[2] += 1.0  # image 2 is only in pair 2
        moved = model.itm_logits_indexed(other, txt.tokens, mask, ii, ti)
    assert not torch.allclose(moved[2], indexed[2])
    assert torch.allclose(moved[[0, 1, 3, 4]], indexed[[0, 1, 3, 4]], atol=1e-6)


@pytest.mark.parametrize("text_layers,image_blocks", [(-1, -1), (1, 1), (0, 2), (2, 0), (0, 0)])
def test_frozen_bottom_plus_top_equals_the_whole_tower(text_layers, image_blocks):
    model = tiny_fast()
    model.set_trainable(text_layers, image_blocks)
    model.eval()
    h, w = model.image_size
    pixels = torch.randn(2, 3, h, w)
    ids, mask = model.tokenize(TEXTS[:2])
    with torch.no_grad():
        whole = model.encode_image(pixels)
        split = model.encode_image_from({k: v.clone() for k, v in model.frozen_image_features(pixels).items()})
        t_whole = model.encode_text(ids, mask)
        t_split = model.encode_text_from(model.frozen_text_features(ids, mask), mask)
    assert torch.equal(whole.tokens, split.tokens) and torch.equal(whole.embeds, split.embeds)
    assert torch.equal(t_whole.tokens, t_split.tokens) and torch.equal(t_whole.embeds, t_split.embeds)
    # the frozen part holds no graph: gradients reach only what trains
    model.train()
    enc = model.encode_image_from(model.frozen_image_features(pixels))
    enc.embeds.sum().backward()
    blocks = list(model.image_encoder.children())
    for i, block in enumerate(blocks):
        grads = [p.grad for p in block.parameters()]
        assert all(g is None for g in grads) == (i < model._image_cut)


def test_lite_text_layers_equal_transformers_bert():
    model = create_model("lite").eval()
    ids, mask = model.tokenize(TEXTS)
    with torch.no_grad():
        ref = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        x = model.text_encoder.embeddings(input_ids=ids)
        for layer in model.text_encoder.encoder.layer:
            x = bert_layer(layer, x, mask, heads=model.config.text_heads)
    assert torch.allclose(x[mask.bool()], ref[mask.bool()], atol=1e-5)
    assert model._fine_block == 13 and model._coarse_grid == (6, 3)  # stride 16 and 32 at 192x96
    assert model.encode_image(torch.randn(1, 3, 192, 96)).tokens.shape == (1, 8, 384)  # 2 maps x (global + 3 bands)


def test_old_layout_saved_models_still_load(tmp_path):
    """The dataclass defaults are the original layout: a saved lite-v1 (no new fields) loads as it was."""
    import json

    old = create_model("lite-tiny").eval()
    old.save_pretrained(tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    data = json.loads(cfg_file.read_text())
    for key in ("fusion_init", "fusion_query", "image_tokens", "itc_stripes", "train_cache_views"):
        data["config"].pop(key)  # a config.json written before these fields existed
    cfg_file.write_text(json.dumps(data))
    loaded = create_model(tmp_path / "m").eval()
    assert loaded.config.fusion_init == "random" and loaded.config.image_tokens == "s32"
    pixels = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(old.encode_image(pixels).tokens, loaded.encode_image(pixels).tokens)


def test_bad_layout_options_are_one_line_errors():
    with pytest.raises(ValueError, match="image_tokens"):
        create_model("lite-tiny", image_tokens="s8")
    with pytest.raises(ValueError, match="fusion_init"):
        create_model("lite-tiny", fusion_init="bert")
    with pytest.raises(ValueError, match="fusion_layers"):
        create_model("lite-tiny", fusion_init="text", fusion_layers=3)
    with pytest.raises(ValueError, match="fusion_query"):
        create_model("lite-tiny", fusion_query="cls")  # needs the text-initialised fusion


# -- ITM loss with partner pairs ---------------------------------------------------------------------------
class _DotITM:
    def itm_logits(self, image_tokens, text_tokens, text_mask):
        match = (image_tokens.mean(1) * text_tokens[:, 0]).sum(-1)
        return torch.stack([torch.zeros_like(match), match], dim=1)


def test_itm_partner_pairs_are_negatives_and_never_sampled_again():
    from tpas.train.losses import itm_loss

    b = 6
    img = torch.randn(b, 2, 4)
    txt = torch.randn(b, 3, 4)
    mask = torch.ones(b, 3, dtype=torch.long)
    ids = torch.arange(b)
    partner = torch.tensor([1, 0, 3, 2, -1, -1])
    sim = torch.zeros(b, b)
    sim[0, 1] = sim[1, 0] = sim[2, 3] = sim[3, 2] = 50.0  # the sampler would pick the partner
    calls = []

    class Spy(_DotITM):
        def itm_logits(self, i, t, m):
            calls.append((i, t))
            return super().itm_logits(i, t, m)

    for _ in range(20):
        calls.clear()
        loss, stats = itm_loss(Spy(), img, txt, mask, sim, ids, torch.tensor(0.07), partner=partner)
        i, t = calls[0]
        assert stats["itm_pairs"] == 6 + 6 + 6 + 4
        # sampled negatives (rows 6..17) never pair a row with its partner
        for k in range(6, 18):
            a = int((img == i[k]).all(-1).all(-1).nonzero()[0])
            c = int((txt == t[k]).all(-1).all(-1).nonzero()[0])
            assert a != c and partner[a] != c
        # the partner pairs: image r with the partner's caption
        for k, r in zip(range(18, 22), (0, 1, 2, 3)):
            assert torch.equal(i[k], img[r]) and torch.equal(t[k], txt[partner[r]])
        assert 0.0 <= stats["itm_hard_acc"] <= 1.0


def test_itm_loss_indexed_path_equals_gathered_path():
    from tpas.train.losses import itm_loss

    model = tiny_fast().eval()
    b = 4
    img = torch.randn(b, model.token_pos.shape[1], 32)
    txt, mask = torch.randn(b, 5, 64), torch.ones(b, 5, dtype=torch.long)
    ids, sim = torch.arange(b), torch.randn(b, b)
    partner = torch.tensor([1, 0, -1, -1])
    extra = [(img[:1], torch.randn(1, 7, 64), torch.ones(1, 7, dtype=torch.long))]

    class Gathered:
        itm_logits = staticmethod(model.itm_logits)

    torch.manual_seed(3)
    a, _ = itm_loss(model, img, txt, mask, sim, ids, torch.tensor(0.1), extra, partner=partner)
    torch.manual_seed(3)
    g, _ = itm_loss(Gathered(), img, txt, mask, sim, ids, torch.tensor(0.1), extra, partner=partner)
    assert a.item() == pytest.approx(g.item(), rel=1e-5)


# -- camera augmentation -------------------------------------------------------------------------------------
def test_camera_augment_is_seeded_changes_pixels_and_keeps_colour_names():
    from tpas.data.transforms import CameraAugment

    image = Image.new("RGB", (64, 128), (200, 34, 40))  # the generator's "red"
    aug = CameraAugment(p=1.0)
    a = np.asarray(aug(image, random.Random(5)), dtype=np.float32)
    b = np.asarray(aug(image, random.Random(5)), dtype=np.float32)
    c = np.asarray(aug(image, random.Random(6)), dtype=np.float32)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.std() > 0.5  # noise / JPEG left their mark
    for seed in range(30):
        mean = np.asarray(aug(image, random.Random(seed)), dtype=np.float32).reshape(-1, 3).mean(0)
        assert mean[0] > 2.5 * mean[1] and mean[0] > 2.5 * mean[2], mean  # still red


def test_train_transform_with_camera_is_deterministic_per_rng():
    from tpas.data.transforms import TrainTransform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 64, 3), dtype=np.uint8))
    t = TrainTransform((64, 32), (0.5,) * 3, (0.5,) * 3)
    t.rng = random.Random(1)
    x = t(image)
    t.rng = random.Random(1)
    assert torch.equal(x, t(image)) and x.shape == (3, 64, 32)


# -- feature cache -------------------------------------------------------------------------------------------
def _cache_fixture(tmp_path, views=2):
    from test_train import make_tiny_pab

    from tpas.data.datasets import load_train
    from tpas.data.transforms import TrainTransform

    root = make_tiny_pab(tmp_path / "pab", persons=4)
    pairs = load_train(root, "pab").pairs
    model = tiny_fast(train_cache_views=views)
    model.set_trainable(1, 1)
    transform = TrainTransform(model.image_size, model.config.image_mean, model.config.image_std)
    return root, pairs, model, transform


def test_feature_cache_is_deterministic_saved_and_matches_fresh_features(tmp_path):
    from tpas.data.transforms import TrainTransform, load_image
    from tpas.train.cache import CachedCollator, CachedPairDataset, build_feature_cache
    from tpas.data.loader import label_map

    root, pairs, model, transform = _cache_fixture(tmp_path)
    one = build_feature_cache(model, pairs, root, 2, seed=3, transform=transform, workers=0,
                              cache_dir=tmp_path / "c", progress=False)
    files = sorted(p.name[:18] for p in (tmp_path / "c").glob("feature-cache-*.pt"))
    assert files == ["feature-cache-img-", "feature-cache-txt-"]
    two = build_feature_cache(model, pairs, root, 2, seed=3, transform=transform, workers=0, progress=False)
    for name in one.image:
        assert torch.equal(one.image[name], two.image[name])
    assert not torch.equal(one.image["x"][:, 0], one.image["x"][:, 1])  # two different views
    loaded = build_feature_cache(model, pairs, root, 2, seed=3, transform=transform, workers=0,
                                 cache_dir=tmp_path / "c", progress=False)
    assert loaded.key == one.key and torch.equal(loaded.image["x"], one.image["x"])
    # a cached view is the frozen bottom of that augmented image (up to float16)
    import random as _random

    from tpas.data.loader import _mix

    row = 1
    transform.rng = _random.Random(_mix(3, 7, row, 1))
    pixels = transform(load_image(root / one.images[row]))[None]
    with torch.no_grad():
        fresh = model.frozen_image_features(pixels)["x"][0]
    assert torch.allclose(one.image["x"][row, 1].float(), fresh, atol=2e-2, rtol=1e-2)
    # the dataset cycles through every view once per `views` epochs; the collate gathers a batch
    ds = CachedPairDataset(pairs, one, label_map(pairs), seed=0)
    seen = set()
    for epoch in range(2):
        ds.set_epoch(epoch)
        seen.add(ds[0]["view"])
    assert seen == {0, 1}
    batch = CachedCollator(one)([ds[i] for i in range(4)])
    assert batch["img.x"].dtype == torch.float32 and batch["txt.x"].shape[0] == 4
    assert batch["attention_mask"].shape[1] == int(batch["attention_mask"].sum(1).max())
    assert batch["partner"].tolist() == [1, 0, 3, 2]  # PAB normal/anomaly pairs are adjacent here


def test_trainer_trains_from_the_cache_and_resume_reuses_it(tmp_path):
    import json

    from test_train import make_tiny_pab

    from tpas.config import load_config
    from tpas.train.loop import Trainer

    root = make_tiny_pab(tmp_path / "pab", persons=8)
    lines = ["model:", "  name: lite-tiny", "  train_text_layers: 1", "  train_image_blocks: 2",
             "  options: {fusion_init: text, fusion_query: cls, image_tokens: s16, itc_stripes: 2, "
             "train_cache_views: 2}",
             "data:", f"  root: {root}", "  val_identities: 2", "  group_batches: true", "  hard_pairs: false",
             "loss:", "  itm_hard_pairs: true", "train:", f"  out: {tmp_path / 'run'}", "  batch_size: 4",
             "  max_steps: 6", "  checkpoint_every: 3", "  threads: 1", "  progress: false", "  log_every: 1",
             "  lr: 1.0e-3", "val:", "  every: 3", "  batch_size: 8", "  calibrate_rerank: 4"]
    (tmp_path / "c.yaml").write_text("\n".join(lines) + "\n")
    cfg = load_config(tmp_path / "c.yaml")
    out = Trainer(cfg).fit()
    assert (out / "best" / "config.json").is_file()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "itm" in r]
    assert len(steps) == 6 and all(np.isfinite(r["loss"]) for r in steps)
    assert any("itm_hard_acc" in r for r in steps)  # partners met in grouped batches
    assert len(list(out.glob("feature-cache-*.pt"))) == 2  # images, captions
    # resume: the cache is read back, not recomputed
    import tpas.train.cache as cache_mod

    calls = []
    real = cache_mod._Views.__getitem__
    cache_mod._Views.__getitem__ = lambda self, k: calls.append(k) or real(self, k)
    try:
        cfg2 = load_config(tmp_path / "c.yaml", ["train.max_steps=8"])
        Trainer(cfg2, resume=True).fit()
    finally:
        cache_mod._Views.__getitem__ = real
    assert calls == []


def test_cache_refuses_what_it_cannot_do(tmp_path):
    from test_train import make_tiny_pab

    from tpas.config import load_config
    from tpas.errors import TpasError
    from tpas.train.loop import Trainer

    root = make_tiny_pab(tmp_path / "pab", persons=4)
    base = ["model:", "  name: lite-tiny", "  options: {train_cache_views: 1}", "data:", f"  root: {root}",
            "  val_identities: 0", "train:", f"  out: {tmp_path / 'run'}", "  batch_size: 4", "  max_steps: 1",
            "  progress: false"]
    (tmp_path / "c.yaml").write_text("\n".join(base + ["  threads: 1"]) + "\n")
    with pytest.raises(TpasError, match="eda"):
        Trainer(load_config(tmp_path / "c.yaml", ["data.eda=0.3"]))
    with pytest.raises(TpasError, match="mlm"):
        Trainer(load_config(tmp_path / "c.yaml", ["loss.mlm=0.5"]))
