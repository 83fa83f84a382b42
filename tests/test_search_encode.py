import numpy as np
import pytest
import torch
from PIL import Image

from tpas.models import create_model
from tpas.search.encode import encode_images, encode_texts


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("lite-tiny")


def write_images(folder, n, size=(20, 40)):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_encode_images_matches_direct_forward(model, tmp_path):
    from tpas.search.encode import eval_transform
    from tpas.data.transforms import load_image

    paths = write_images(tmp_path, 5)
    model.train()
    out = encode_images(model, paths, batch_size=2, keep_tokens=True, progress=False)
    assert model.training, "training mode must be restored"
    assert out.embeds.dtype == np.float32 and out.embeds.shape == (5, model.config.embed_dim)
    assert out.tokens.dtype == np.float16 and out.tokens.shape[0] == 5
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([eval_transform(model)(load_image(p)) for p in paths])
        ref = model.encode_image(pixels)
    np.testing.assert_allclose(out.embeds, ref.embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(out.tokens.astype(np.float32), ref.tokens.numpy(), atol=2e-2, rtol=1e-2)
    assert encode_images(model, paths, batch_size=3, progress=False).tokens is None


def test_encode_images_with_workers(model, tmp_path):
    paths = write_images(tmp_path, 3)
    a = encode_images(model, paths, batch_size=2, workers=1, progress=False).embeds
    b = encode_images(model, paths, batch_size=4, progress=False).embeds
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_encode_texts_batches_agree(model):
    texts = ["a man in a red coat falls down", "woman walking", "a child runs across the street quickly"]
    whole = encode_texts(model, texts, batch_size=8, keep_tokens=True, progress=False)
    split = encode_texts(model, texts, batch_size=1, keep_tokens=True, progress=False)
    np.testing.assert_allclose(whole.embeds, split.embeds, atol=1e-5)
    assert whole.tokens.shape[:2] == whole.mask.shape and whole.mask.shape[0] == 3
    np.testing.assert_allclose(np.linalg.norm(whole.embeds, axis=1), 1.0, atol=1e-5)
    assert encode_texts(model, [], progress=False).embeds.shape == (0, model.config.embed_dim)
