"""lite family: interface shapes, save/load round trip, package weights, freezing."""

from __future__ import annotations

import pytest
import torch

from model_helpers import run_interface

from tpas.models import create_model
from tpas.models.lite import LiteModel, minilm_dir, mobilenet_weights_path

TEXTS = ["a man in a red coat walks past the bench", "woman running", "a child"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("lite-tiny").eval()


@pytest.fixture(scope="module")
def lite():
    return create_model("lite").eval()


def test_tiny_interface_shapes(tiny):
    h, w = tiny.image_size
    assert (h, w) == (64, 32)
    pixels = torch.randn(3, 3, h, w)
    img, txt, logits = run_interface(tiny, pixels, TEXTS)
    # 64x32 through three stride-2 convs: 8x4 grid + 1 pooled CLS token, width 32
    assert img.tokens.shape == (3, 33, 32)
    assert img.embeds.shape == (3, tiny.config.embed_dim)
    assert torch.allclose(img.embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert txt.tokens.shape[:2] == txt.mask.shape and txt.tokens.shape[-1] == 32
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    # the real WordPiece tokenizer: [CLS] first, [SEP] last token of the unpadded text
    ids, mask = tiny.tokenize(["a child"])
    assert ids[0, 0].item() == 101 and ids[0, mask[0].sum() - 1].item() == 102


def test_text_padding_does_not_change_outputs(tiny):
    """Padding a text (key padding masks everywhere) must not change its encoding or ITM logit."""
    h, w = tiny.image_size
    pixels = torch.randn(1, 3, h, w)
    alone = run_interface(tiny, pixels, ["woman running"])
    ids, mask = tiny.tokenize(["woman running", TEXTS[0]])
    with torch.no_grad():
        img = tiny.encode_image(pixels)
        txt = tiny.encode_text(ids, mask)
        logits = tiny.itm_logits(img.tokens.expand(2, -1, -1), txt.tokens, txt.mask)
    assert torch.allclose(txt.embeds[0], alone[1].embeds[0], atol=1e-5)
    assert torch.allclose(logits[0], alone[2][0], atol=1e-5)


def test_temperature_is_clamped(tiny):
    with torch.no_grad():
        tiny.temp.fill_(10.0)
        assert tiny.temperature.item() == pytest.approx(tiny.config.temp_max)
        tiny.temp.fill_(tiny.config.temp_init)


@pytest.mark.parametrize("name", ["lite-tiny", "lite"])
def test_round_trip_bit_exact(name, tmp_path):
    torch.manual_seed(1)
    model = create_model(name).eval()
    with torch.no_grad():  # move the heads off their init so the test is not trivially passing
        for p in model.itm_head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    h, w = model.image_size
    pixels = torch.randn(2, 3, h, w)
    before = run_interface(model, pixels, TEXTS[:2])
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()
    loaded = create_model(tmp_path / "m").eval()
    assert isinstance(loaded, LiteModel) and loaded.config == model.config
    after = run_interface(loaded, pixels, TEXTS[:2])
    assert torch.equal(before[0].tokens, after[0].tokens)
    assert torch.equal(before[0].embeds, after[0].embeds)
    assert torch.equal(before[1].tokens, after[1].tokens)
    assert torch.equal(before[1].embeds, after[1].embeds)
    assert torch.equal(before[2], after[2])


def test_from_dir_does_not_read_package_weights(lite, tmp_path, monkeypatch):
    lite.save_pretrained(tmp_path / "m")

    def boom(self):
        raise AssertionError("package weights must not be read when loading a saved model")

    monkeypatch.setattr(LiteModel, "load_package_weights", boom)
    loaded = create_model(tmp_path / "m")
    assert loaded.config.pretrained is True  # the flag is kept; from_pretrained passes pretrained=False


def test_lite_loads_package_weights(lite):
    from safetensors.torch import load_file

    model = lite
    mobilenet = torch.load(mobilenet_weights_path(), map_location="cpu", weights_only=True)
    got = model.image_encoder.state_dict()
    for key, value in mobilenet.items():
        assert torch.equal(got[key.removeprefix("features.")], value), key
    minilm = load_file(str(minilm_dir() / "model.safetensors"))
    text = model.text_encoder.state_dict()
    for key, value in minilm.items():
        if key.startswith("pooler.") or key.endswith("position_ids"):
            continue
        assert torch.equal(text[key], value), key
    assert model.image_size == (192, 96) and model.config.image_mean == (0.485, 0.456, 0.406)


def test_lite_text_tower_is_a_working_sentence_encoder(lite):
    """Pretrained MiniLM: a paraphrase is closer than an unrelated sentence (mean-pooled states)."""
    model = lite
    ids, mask = model.tokenize(["a man wearing a red jacket", "a guy in a red coat", "the stock market fell today"])
    with torch.no_grad():
        states = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((states * m).sum(1) / m.sum(1), dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.2


def test_freezing_top_layers():
    model = create_model("lite-tiny", train_text_layers=1, train_image_blocks=1)
    text = model.text_encoder
    assert not any(p.requires_grad for p in text.embeddings.parameters())
    assert not any(p.requires_grad for p in text.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in text.encoder.layer[1].parameters())
    blocks = list(model.image_encoder.children())
    assert not any(p.requires_grad for b in blocks[:-1] for p in b.parameters())
    assert all(p.requires_grad for p in blocks[-1].parameters())
    assert all(p.requires_grad for p in model.fusion.parameters()) and model.temp.requires_grad
    model.train()
    assert not blocks[0].training and blocks[-1].training  # frozen BatchNorm keeps its statistics
    model.set_trainable(-1, -1)
    assert all(p.requires_grad for p in model.parameters())


def test_gradients_flow_through_all_heads():
    model = create_model("lite-tiny").train()
    h, w = model.image_size
    ids, mask = model.tokenize(TEXTS)
    img = model.encode_image(torch.randn(3, 3, h, w))
    txt = model.encode_text(ids, mask)
    sim = img.embeds @ txt.embeds.T / model.temperature
    loss = sim.logsumexp(1).mean() + model.itm_logits(img.tokens, txt.tokens, txt.mask).sum()
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("text_encoder.embeddings.token_type", "text_encoder.embeddings.position", "mlm_head")):
            continue
        if p.requires_grad and "word_embeddings" not in name:
            assert p.grad is not None, name


def test_bad_options_are_named():
    with pytest.raises(TypeError, match="no_such_option"):
        create_model("lite-tiny", no_such_option=1)
    with pytest.raises(ValueError, match="image_tower"):
        create_model("lite-tiny", image_tower="resnet")
    with pytest.raises(ValueError, match="pretrained=False"):
        create_model("lite-tiny", pretrained=True)  # 32-wide text tower vs MiniLM's 384


def test_mlm_logits_predict_over_the_vocab_and_train():
    model = create_model("lite-tiny").train()
    h, w = model.image_size
    ids, mask = model.tokenize(TEXTS)
    masked = ids.clone()
    masked[:, 1] = model.tokenizer.mask_id
    img = model.encode_image(torch.randn(3, 3, h, w))
    logits = model.mlm_logits(img.tokens, masked, mask)
    assert logits.shape == (*ids.shape, model.config.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits[:, 1], ids[:, 1])
    loss.backward()
    assert model.mlm_head.bias.grad is not None and model.fusion.layers[0].cross_attn.key.weight.grad is not None
    assert create_model("lite-tiny", mlm_head=False).mlm_head is None


def test_shared_layers():
    from tpas.models.layers import FusionStack, ITMHead, ProjectionHead

    torch.manual_seed(0)
    head = ITMHead(8)
    kinds = [type(m).__name__ for m in head.net]
    assert kinds == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert head.net[0].out_features == 16 and head.net[3].out_features == 2
    proj = ProjectionHead(12, 6, hidden=10)
    assert torch.allclose(proj(torch.randn(4, 12)).norm(dim=-1), torch.ones(4), atol=1e-5)
    stack = FusionStack(2, text_width=8, image_width=20, heads=2).eval()
    text, image = torch.randn(2, 5, 8), torch.randn(2, 7, 20)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = stack(text, mask, image)
    assert out.shape == (2, 5, 8)
    # post-norm: every layer ends in a LayerNorm, so states are normalised per position
    assert torch.allclose(out.mean(-1), torch.zeros(2, 5), atol=1e-5)
    # padded positions do not influence the real ones
    changed = text.clone()
    changed[0, 3:] = 100.0
    assert torch.allclose(stack(changed, mask, image)[0, :3], out[0, :3], atol=1e-5)
    # every image token does
    moved = image.clone()
    moved[:, -1] += 1.0
    assert not torch.allclose(stack(text, mask, moved), out)
