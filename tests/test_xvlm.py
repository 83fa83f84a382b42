"""X-VLM against the upstream fixture: outputs, checkpoint key lists, interpolation, round-trip."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tpas.models import create_model
from tpas.models.xvlm import (
    CheckpointError,
    XVLM,
    config_from_upstream,
    interpolate_relative_position_bias,
    load_official_checkpoint,
)

PRETRAIN = "pretrain_16m_keys"
RETRIEVAL = "retrieval_model_keys_224_window7"
SHAPES_384 = "retrieval_model_384_window12_shape_changes_[name,shape_224w7,shape_384w12]"
CMP = "cmp_search_model (Shuyu-XJTU/CMP models/model_search.py Search with configs/cmp.yaml)"
ENTRIES = "entries_[name,shape,dtype,kind]"
# the heads the retrieval model does not have (ignored by rule, never "unexpected")
PRETRAIN_HEADS = ("text_encoder.cls.", "bbox_head.")


@pytest.fixture(scope="module")
def golden(xvlm_fixture_dir):
    return torch.load(xvlm_fixture_dir / "golden_small.pt", weights_only=True)


@pytest.fixture(scope="module")
def small(xvlm_fixture_dir) -> XVLM:
    d = xvlm_fixture_dir
    return create_model("xvlm", checkpoint=d / "small_ckpt.th", upstream_config=d / "config_small.json").eval()


@pytest.fixture(scope="module")
def base_keys(xvlm_fixture_dir):
    return json.loads((xvlm_fixture_dir / "keys_base_16m.json").read_text())


def _all_pairs(model: XVLM, images, ids, mask):
    """Fusion output for every (image i, text j) pair, shaped [I, T, L, H]."""
    img, txt = model.encode_image(images), model.encode_text(ids, mask)
    n_i, n_t = img.tokens.shape[0], txt.tokens.shape[0]
    fused = model.fusion(img.tokens.repeat_interleave(n_t, 0), txt.tokens.repeat(n_i, 1, 1), txt.mask.repeat(n_i, 1))
    return img, txt, fused.view(n_i, n_t, *fused.shape[1:])


# -- (a) golden outputs ---------------------------------------------------------------------------
def test_golden_outputs_match_upstream(small, golden):
    inp, out = golden["inputs"], golden["outputs"]
    with torch.no_grad():
        img, txt, fused = _all_pairs(small, inp["images"], inp["text_ids"], inp["text_atts"])
        itm = small.itm_head(fused[:, :, 0])
        single = small.itm_logits(img.tokens[:2], txt.tokens[:2], txt.mask[:2])
    sims = img.embeds @ txt.embeds.T
    got = {
        "image_embeds": img.tokens, "image_feat": img.embeds, "text_embeds": txt.tokens, "text_feat": txt.embeds,
        "sims": sims, "sims_div_temp": sims / small.temperature, "itm_logits": itm,
        "fusion_cls": fused[:, :, 0], "fusion_last_hidden": fused,
    }
    for name, value in got.items():
        assert value.shape == out[name].shape, name
        torch.testing.assert_close(value, out[name], atol=1e-5, rtol=0, msg=name)
    for name in ("image_feat", "text_feat", "sims", "itm_logits"):
        torch.testing.assert_close(got[name], out[name], atol=5e-6, rtol=0, msg=name)
    torch.testing.assert_close(small.temperature, out["temp"])
    torch.testing.assert_close(itm[..., 1], out["itm_score_i2t_eval"], atol=5e-6, rtol=0)
    torch.testing.assert_close(itm[..., 1].T, out["itm_score_t2i_eval"], atol=5e-6, rtol=0)
    torch.testing.assert_close(single, itm[[0, 1], [0, 1]], atol=1e-6, rtol=0)  # the [B,2] interface


def test_golden_intermediates(small, golden):
    inp, mid = golden["inputs"], golden["intermediates"]
    seen: dict[str, torch.Tensor] = {}
    swin = small.vision_encoder
    hooks = [swin.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("swin_patch_embed", o))]
    for s, stage in enumerate(swin.layers):
        hooks.append(stage.register_forward_hook(lambda m, i, o, s=s: seen.__setitem__(f"swin_stage{s}_out", o)))
    try:
        with torch.no_grad():
            small.encode_image(inp["images"])
            states: list[torch.Tensor] = []
            small.text_encoder.text(inp["text_ids"], inp["text_atts"], hidden_states=states)
    finally:
        for h in hooks:
            h.remove()
    seen["text_embedding_out"] = states[0]
    seen["text_hidden_states"] = torch.stack(states)
    for name, ref in mid.items():
        torch.testing.assert_close(seen[name], ref, atol=1e-5, rtol=0, msg=name)


def test_float64_matches_upstream_float64(xvlm_fixture_dir, golden):
    d = xvlm_fixture_dir
    model = create_model("xvlm", checkpoint=d / "small_ckpt.th", upstream_config=d / "config_small.json").eval()
    model = model.double()
    inp, ref = golden["inputs"], golden["outputs_float64"]
    with torch.no_grad():
        img, txt, fused = _all_pairs(model, inp["images"].double(), inp["text_ids"], inp["text_atts"])
        got = {"image_embeds": img.tokens, "image_feat": img.embeds, "text_embeds": txt.tokens,
               "text_feat": txt.embeds, "sims": img.embeds @ txt.embeds.T,
               "sims_div_temp": img.embeds @ txt.embeds.T / model.temp,
               "itm_logits": model.itm_head(fused[:, :, 0]), "fusion_cls": fused[:, :, 0]}
    for name, value in got.items():
        torch.testing.assert_close(value, ref[name], atol=1e-10, rtol=0, msg=name)


def test_small_checkpoint_load_report(xvlm_fixture_dir):
    model = create_model("xvlm-small", vocab_size=1000)
    report = load_official_checkpoint(model, xvlm_fixture_dir / "small_ckpt.th")
    assert report.missing == [] and report.unexpected == []
    assert any(k.startswith("text_encoder.cls.") for k in report.ignored)
    assert any(k.startswith("bbox_head.") for k in report.ignored)
    assert "text_encoder.bert.embeddings.position_ids" in report.ignored


# -- (b) base key lists ----------------------------------------------------------------------------
def _state_from(entries, shapes: dict | None = None) -> dict[str, torch.Tensor]:
    """Meta tensors of the listed shapes (no memory); real values where interpolation reads them."""
    state = {}
    for name, shape, dtype, _kind in entries:
        shape = (shapes or {}).get(name, shape)
        if name.endswith("relative_position_bias_table"):
            state[name] = torch.randn(shape)
        else:
            state[name] = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
    return state


def _meta_model(name: str, **overrides) -> XVLM:
    with torch.device("meta"):
        return create_model(name, **overrides)


def _load(model, state, **kw):
    with warnings.catch_warnings():  # copying into meta parameters is a (wanted) no-op
        warnings.simplefilter("ignore", UserWarning)
        return load_official_checkpoint(model, state, **kw)


@pytest.fixture(scope="module")
def base_model() -> XVLM:
    return _meta_model("xvlm-base")


def test_base_parameter_count_matches_upstream(base_model, base_keys):
    assert sum(p.numel() for p in base_model.parameters()) == base_keys[RETRIEVAL]["n_parameters"]
    own = {k: tuple(v.shape) for k, v in base_model.state_dict().items()}
    upstream = {n: tuple(s) for n, s, _, kind in base_keys[RETRIEVAL][ENTRIES]
                if not n.endswith(("relative_position_index", "attn_mask", "position_ids"))}
    assert own == upstream


def test_pretraining_key_list_loads(base_model, base_keys):
    report = _load(base_model, _state_from(base_keys[PRETRAIN][ENTRIES]))
    assert report.missing == [] and report.unexpected == [] and report.interpolated == []
    assert {k for k in report.ignored if k.startswith(PRETRAIN_HEADS)} == {
        n for n, *_ in base_keys[PRETRAIN][ENTRIES] if n.startswith(PRETRAIN_HEADS)}


def test_retrieval_key_list_loads_as_is(base_model, base_keys):
    report = _load(base_model, _state_from(base_keys[RETRIEVAL][ENTRIES]), is_eval=True)
    assert report.missing == [] and report.unexpected == []
    assert all(k.endswith(("relative_position_index", "attn_mask", "position_ids")) for k in report.ignored)


def test_384_window12_interpolates_pretraining_tables(base_keys):
    model = _meta_model("xvlm-base-384")
    report = _load(model, _state_from(base_keys[PRETRAIN][ENTRIES]))
    assert report.missing == [] and report.unexpected == []
    assert len(report.interpolated) == 24  # one table per Swin block
    # a fine-tuned 384 checkpoint already has 23x23 tables and loads as is
    changes = {n: s384 for n, _, s384 in base_keys[SHAPES_384]}
    report = _load(model, _state_from(base_keys[RETRIEVAL][ENTRIES], changes), is_eval=True)
    assert report.missing == [] and report.unexpected == [] and report.interpolated == []


def test_cmp_search_key_list_loads_without_pose_branch(base_keys):
    model = _meta_model("xvlm-cmp")
    report = _load(model, _state_from(base_keys[CMP][ENTRIES]))
    assert report.missing == [] and report.unexpected == []
    pose = {n for n, *_ in base_keys[CMP][ENTRIES] if n.startswith(("pose_block.", "pose_conv."))}
    assert pose and pose <= set(report.ignored)
    # the 16M file into CMP: CMP's new projection heads stay at init, as upstream reports
    report = _load(model, _state_from(base_keys[PRETRAIN][ENTRIES]))
    assert set(report.missing) == set(base_keys[CMP]["missing_when_loading_16m"]) - pose
    assert report.unexpected == ["text_proj.bias", "text_proj.weight", "vision_proj.bias", "vision_proj.weight"]


def test_cmp_checkpoint_into_xvlm_head_is_a_clear_error(base_model, base_keys):
    with pytest.raises(CheckpointError, match="itc_head='cmp'"):
        _load(base_model, _state_from(base_keys[CMP][ENTRIES]))


# -- (c) shape mismatch ------------------------------------------------------------------------------
class _Opaque:
    pass


def test_shape_mismatch_fails_clearly(xvlm_fixture_dir, tmp_path):
    model = create_model("xvlm-small", text_hidden=96, text_heads=4)
    with pytest.raises(CheckpointError, match=r"do not fit.*text_encoder\.embeddings\.word_embeddings\.weight"):
        load_official_checkpoint(model, xvlm_fixture_dir / "small_ckpt.th")
    bad = tmp_path / "bad.th"
    torch.save({"weights": [1, 2]}, bad)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_official_checkpoint(model, bad)
    torch.save({"model": _Opaque()}, bad)  # arbitrary pickled objects are refused, never run
    with pytest.raises(CheckpointError, match="weights-only"):
        load_official_checkpoint(model, bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_official_checkpoint(model, tmp_path / "nope.th")


# -- (d) relative position bias interpolation ---------------------------------------------------------
def test_relpos_interpolation_matches_upstream(golden):
    ref = golden["relpos_interp"]
    out = interpolate_relative_position_bias(ref["src_table"], 23 ** 2)
    torch.testing.assert_close(out, ref["dst_table_xvlm_interp2d"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out, ref["dst_table_cmp_rectbivariatespline"], atol=1e-6, rtol=0)
    assert interpolate_relative_position_bias(ref["src_table"], 169) is ref["src_table"]


def test_person_crop_384x128_runs_on_interpolated_small_checkpoint(xvlm_fixture_dir):
    d = xvlm_fixture_dir
    model = create_model("xvlm", checkpoint=d / "small_ckpt.th", upstream_config=d / "config_small.json",
                         image_size=(384, 128), window_size=8).eval()
    assert model.vision_encoder.layers[0].blocks[0].attn.relative_position_bias_table.shape == (15 * 15, 1)
    assert model.vision_encoder.layers[3].blocks[0].attn.relative_position_bias_table.shape == (7 * 7, 8)
    with torch.no_grad():
        enc = model.encode_image(torch.randn(2, 3, 384, 128))
    assert enc.tokens.shape == (2, 1 + 12 * 4, 128) and torch.isfinite(enc.tokens).all()
    with pytest.raises(ValueError, match="not divisible by window 7"):
        create_model("xvlm-small", image_size=(384, 128))


# -- (e) save / load round trip -----------------------------------------------------------------------
def test_save_pretrained_round_trip(small, golden, tmp_path):
    inp = golden["inputs"]
    small.save_pretrained(tmp_path / "m")
    again = create_model(tmp_path / "m").eval()
    assert isinstance(again, XVLM) and again.config == small.config
    with torch.no_grad():
        for a, b in ((small, again),):
            ia, ib = a.encode_image(inp["images"][:2]), b.encode_image(inp["images"][:2])
            ta, tb = a.encode_text(inp["text_ids"], inp["text_atts"]), b.encode_text(inp["text_ids"], inp["text_atts"])
            assert torch.equal(ia.tokens, ib.tokens) and torch.equal(ta.embeds, tb.embeds)
            assert torch.equal(a.itm_logits(ia.tokens, ta.tokens[:2], ta.mask[:2]),
                               b.itm_logits(ib.tokens, tb.tokens[:2], tb.mask[:2]))


def test_cmp_head_round_trip_and_padding(tmp_path):
    model = create_model("xvlm-small", itc_head="cmp", embed_dim=24, vocab_size=30522).eval()
    ids, mask = model.tokenize(["a woman falls"])
    assert ids.shape == (1, 16) and mask.sum() == 5  # CMP pools over padding: pad to max_text_len
    with torch.no_grad():
        emb = model.encode_text(ids, mask).embeds
        model.save_pretrained(tmp_path / "c")
        again = create_model(tmp_path / "c").eval()
        assert torch.equal(emb, again.encode_text(ids, mask).embeds)
    assert emb.shape == (1, 24)


# -- upstream configs and tokenizer -------------------------------------------------------------------
def test_upstream_config_fields(xvlm_fixture_dir, base_keys):
    cfg = config_from_upstream(xvlm_fixture_dir / "config_small.json")
    assert cfg["depths"] == (2, 2, 2, 2) and cfg["fusion_layer"] == 2 and cfg["embed_dim"] == 32
    assert cfg["max_text_len"] == 16 and cfg["text_eps"] == 1e-12
    base = base_keys["base_config"]
    key = next(k for k in base if k.startswith("vision_config"))
    tkey = next(k for k in base if k.startswith("text_config"))
    upstream = {"vision_config": base[key], "text_config": base[tkey], "model_config": {"embed_dim": 256}}
    from_files = config_from_upstream(upstream)
    with torch.device("meta"):
        named = create_model("xvlm-base").config
    assert all(getattr(named, k) == v for k, v in from_files.items())  # the built-in base = the published files
    bad = dict(upstream, text_config={**base[tkey], "encoder_width": 768})
    with pytest.raises(Exception, match="encoder_width"):
        config_from_upstream(bad)


def test_tokenizer_ids(small):
    ids, mask = small.tokenize(["a woman falls", "A man is running."])
    assert ids[0, :5].tolist() == [101, 1037, 2450, 4212, 102]
    assert ids[1].tolist() == [101, 1037, 2158, 2003, 2770, 1012, 102]
    assert mask[0].tolist() == [1] * 5 + [0, 0]


def test_training_mode_dropout_drop_path_and_a_backward_step():
    """X-VLM trains: drop-path and dropout act in train mode only, and one TrainStep reaches every part."""
    from tpas.config import LossSection
    from tpas.models.swin import SwinBlock
    from tpas.train.loop import TrainStep

    torch.manual_seed(0)
    model = create_model("xvlm-small", device="cpu")
    assert max(b.drop_path for b in model.modules() if isinstance(b, SwinBlock)) > 0
    images = torch.randn(4, 3, 224, 224)
    ids = torch.randint(103, 1000, (4, 12))
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    mask[2:, 8:] = 0  # two shorter captions
    with torch.no_grad():
        assert torch.equal(model.encode_image(images).embeds, model.encode_image(images).embeds)  # eval: fixed
        model.train()
        a, b = model.encode_image(images).embeds, model.encode_image(images).embeds
        assert not torch.allclose(a, b)  # drop-path samples other residual branches each pass
        t1, t2 = (model.encode_text(ids, mask).embeds for _ in range(2))
        assert not torch.allclose(t1, t2)  # dropout in the text layers
    batch = {"images": images, "input_ids": ids, "attention_mask": mask, "labels": torch.arange(4)}
    step = TrainStep(model, LossSection(itc=1.0, itm=1.0))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    out = step(batch)
    out["loss"].backward()
    for part in ("vision_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.", "temp"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part)]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), part
    fusion = [p.grad for n, p in model.named_parameters() if "crossattention" in n]
    assert fusion and all(g is not None and g.abs().sum() > 0 for g in fusion)  # the fusion layers learn too
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
