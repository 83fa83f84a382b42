"""The ONNX Runtime fast path computes what the torch model computes, for any token shape."""

import numpy as np
import pytest
import torch

from tpas.errors import TpasError
from tpas.models import create_model
from tpas.search.encode import encode_texts
from tpas.search.index import model_fingerprint
from tpas.search.runtime import OnnxModel, base_model, with_runtime


# the first lite layout, and the demo's (text-initialised [CLS]-query fusion over band tokens)
LAYOUTS = {"v1": {}, "fast": dict(fusion_init="text", fusion_query="cls", image_tokens="bands", itc_stripes=3,
                                  itc_fine=True, proj_hidden=64)}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def model(request):
    torch.manual_seed(0)
    return create_model("lite-tiny", **LAYOUTS[request.param])


@pytest.fixture(scope="module")
def fast(model, tmp_path_factory):
    return OnnxModel(model, "onnx", cache_dir=tmp_path_factory.mktemp("onnx"))


def test_same_numbers_as_torch(model, fast):
    texts = ["a man in a red jacket", "a woman with a blue bag falls down on the pavement near a parked car"]
    ids, mask = model.tokenize(texts)
    pixels = torch.randn(3, 3, *model.image_size)
    with torch.inference_mode():
        want_t, got_t = model.encode_text(ids, mask), fast.encode_text(ids, mask)
        want_i, got_i = model.encode_image(pixels), fast.encode_image(pixels)
        torch.testing.assert_close(got_t.embeds, want_t.embeds, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_t.tokens, want_t.tokens, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_i.tokens, want_i.tokens, atol=1e-5, rtol=1e-4)
        # ITM at token counts the export never saw (a finer image grid, one text)
        image_tokens = torch.randn(1, 45, want_i.tokens.shape[-1]).expand(2, -1, -1)
        torch.testing.assert_close(fast.itm_logits(image_tokens, want_t.tokens, mask),
                                   model.itm_logits(image_tokens, want_t.tokens, mask), atol=1e-5, rtol=1e-4)
    assert got_i.tokens.shape == want_i.tokens.shape


def test_wrapper_is_the_model_for_indexes_and_ranking(model, fast):
    assert model_fingerprint(fast) == model_fingerprint(model)  # an index opens with either
    assert base_model(fast) is model and fast.image_size == model.image_size
    np.testing.assert_allclose(encode_texts(fast, ["a person runs"], progress=False).embeds,
                               encode_texts(model, ["a person runs"], progress=False).embeds, atol=1e-5)
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()


def test_int8_runtime_is_close(model, tmp_path):
    int8 = OnnxModel(model, "onnx-int8", cache_dir=tmp_path)
    texts = ["a man in a red jacket is walking", "a woman falls down"]
    a = encode_texts(model, texts, progress=False).embeds
    b = encode_texts(int8, texts, progress=False).embeds
    assert (a * b).sum(1).min() > 0.95
    assert (tmp_path / "text-int8-opset17.onnx").is_file()


def test_choosing_a_runtime(model, tmp_path, monkeypatch):
    monkeypatch.setenv("TPAS_CACHE", str(tmp_path))
    assert with_runtime(model, "torch") is model
    auto = with_runtime(model, "auto")
    assert isinstance(auto, OnnxModel) and auto.runtime == "onnx"
    assert with_runtime(auto, "torch") is model  # unwraps
    with pytest.raises(TpasError, match="unknown runtime"):
        with_runtime(model, "tensorrt")
