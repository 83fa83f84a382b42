"""clip family: tiny random CLIPs from a local directory; nothing downloads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model_helpers import run_interface

from tpas.models import create_model
from tpas.models.clip import ClipModel, byte_level_vocab, tiny_clip_config, write_bpe_files

TEXTS = ["a man and a dog", "woman running and jumping"]
MERGES = [("a", "n"), ("an", "d</w>")]  # enough to see real BPE merges: "and" -> one token


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A local CLIP directory as users have them: HF CLIPModel weights + vocab.json/merges.txt."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vocab = byte_level_vocab(MERGES)
    cfg = CLIPConfig.from_dict(tiny_clip_config(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                                                eos_token_id=vocab["<|endoftext|>"]))
    cfg.logit_scale_init_value = math.log(1 / 0.05)
    directory = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(directory)
    write_bpe_files(directory, MERGES)
    return directory


def test_clip_tiny_builds_and_encodes():
    model = create_model("clip-tiny").eval()
    assert model.image_size == (64, 32) and model.config.embed_dim == 32
    img, txt, logits = run_interface(model, torch.randn(2, 3, 64, 32), TEXTS)
    assert img.tokens.shape == (2, 1 + 8 * 4, 32)  # CLS + 8x4 patches (position table interpolated)
    assert torch.allclose(img.embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(txt.embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    ids, mask = model.tokenize(["hi"])
    assert ids.tolist() == [[512, ord("h"), 256 + ord("i"), 513]]  # BOS h i</w> EOS (byte order)


def test_clip_tiny_round_trip_bit_exact(tmp_path):
    torch.manual_seed(3)
    model = create_model("clip-tiny").eval()
    pixels = torch.randn(2, 3, 64, 32)
    before = run_interface(model, pixels, TEXTS)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer" / "tokenizer.json").is_file()
    loaded = create_model(tmp_path / "m").eval()
    assert isinstance(loaded, ClipModel) and loaded.config == model.config
    after = run_interface(loaded, pixels, TEXTS)
    for a, b in zip((before[0].tokens, before[0].embeds, before[1].tokens, before[1].embeds, before[2]),
                    (after[0].tokens, after[0].embeds, after[1].tokens, after[1].embeds, after[2])):
        assert torch.equal(a, b)


def test_clip_from_local_dir_uses_its_weights_tokenizer_and_projections(clip_dir, tmp_path):
    from transformers import CLIPModel

    reference = CLIPModel.from_pretrained(clip_dir).eval()
    model = create_model("clip", clip_name_or_path=str(clip_dir)).eval()
    assert model.image_size == (32, 32)  # the checkpoint's own size when none is given
    assert model.temperature.item() == pytest.approx(0.05, rel=1e-4)  # from logit_scale
    for key, value in reference.state_dict().items():
        assert torch.equal(model.clip.state_dict()[key], value), key
    ids, mask = model.tokenize(TEXTS)
    vocab = json.loads((clip_dir / "vocab.json").read_text())
    assert vocab["and</w>"] in ids[0].tolist()  # the directory's merges were applied
    pixels = torch.randn(2, 3, 32, 32)
    img, txt, _ = run_interface(model, pixels, TEXTS)
    with torch.no_grad():
        vis = reference.vision_model(pixel_values=pixels)
        ref_img = torch.nn.functional.normalize(reference.visual_projection(vis.pooler_output), dim=-1)
        ref_txt = reference.text_model(input_ids=ids, attention_mask=mask)
        ref_txt = torch.nn.functional.normalize(reference.text_projection(ref_txt.pooler_output), dim=-1)
    assert torch.allclose(img.embeds, ref_img, atol=1e-6)
    assert torch.allclose(txt.embeds, ref_txt, atol=1e-6)
    # a saved model carries the tokenizer and rebuilds without the source directory's config
    model.save_pretrained(tmp_path / "saved")
    loaded = create_model(tmp_path / "saved")
    assert loaded.tokenize(TEXTS)[0].tolist() == ids.tolist()


def test_projected_image_tokens_and_person_size(clip_dir):
    model = create_model("clip", clip_name_or_path=str(clip_dir), image_tokens="projected",
                         image_size=(48, 16)).eval()
    img, _, logits = run_interface(model, torch.randn(1, 3, 48, 16), TEXTS[:1])
    assert img.tokens.shape == (1, 1 + 6 * 2, model.clip.config.projection_dim)
    assert torch.isfinite(logits).all()


def test_clip_freezing(clip_dir):
    model = create_model("clip", clip_name_or_path=str(clip_dir), train_text_layers=0, train_image_blocks=1)
    text, vision = model.clip.text_model, model.clip.vision_model
    assert not any(p.requires_grad for p in text.parameters())
    assert not any(p.requires_grad for p in vision.encoder.layers[0].parameters())
    assert all(p.requires_grad for p in vision.encoder.layers[-1].parameters())
    assert all(p.requires_grad for p in model.fusion.parameters())


def test_clip_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="clip_name_or_path"):
        create_model("clip")
    (tmp_path / "empty").mkdir()
    model = create_model("clip", clip_config=tiny_clip_config(), pretrained=False, tokenizer=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        model.tokenize(["x"])
    with pytest.raises(ValueError, match="image_tokens"):
        create_model("clip-tiny", image_tokens="pooled")
