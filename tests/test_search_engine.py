import numpy as np
import pytest
import torch
from PIL import Image

from tpas.data.records import GalleryImage
from tpas.models import create_model
from tpas.search.encode import encode_texts
from tpas.search.engine import SearchEngine
from tpas.search.index import build_index, open_index
from tpas.search.ranking import rank


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("lite-tiny")
    root = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(2)
    images = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
        images.append(GalleryImage(image=f"{i}.jpg", image_id=f"img{i}", target=None))
    out = build_index(model, images, root, tmp_path_factory.mktemp("idx") / "index", progress=False)
    return SearchEngine(out, model)


TEXTS = ["a man in a red jacket falls", "woman walking a dog", "a boy on a bike"]


def test_itc_search_matches_brute_force(engine):
    hits = engine.search(TEXTS[0], k=5)
    q = encode_texts(engine.model, TEXTS[:1], progress=False).embeds
    brute = q @ engine.index.embeds.T
    order = np.argsort(-brute[0], kind="stable")[:5]
    assert [h.image_id for h in hits] == [f"img{i}" for i in order]
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([h.score for h in hits], brute[0, order], atol=1e-5)
    assert all(h.itm_score is None and h.score == h.itc_score for h in hits)
    assert hits[0].path == engine.image_path(hits[0].image_id) and hits[0].path.is_file()


def test_rerank_search_matches_the_exact_ranking(engine):
    k, head = 6, 4
    batch = engine.search_batch(TEXTS, k=k, rerank=head)
    exact = rank(engine.model, TEXTS, engine.index, depth=k, rerank=head, keep_scores=True)
    full = exact.score_matrix()
    for i, hits in enumerate(batch):
        expected = [f"img{j}" for j in np.argsort(-full[i], kind="stable")[:k]]
        assert [h.image_id for h in hits] == expected
        assert all(h.itm_score is not None for h in hits[:head]) and all(h.itm_score is None for h in hits[head:])
        assert [h.image_id for h in engine.search(TEXTS[i], k=k, rerank=head)] == expected
        np.testing.assert_allclose([h.itm_score for h in hits[:head]], exact.itm[i, :head], atol=1e-5)
        np.testing.assert_allclose([h.itc_score for h in hits], exact.itc[i], atol=1e-5)


def test_bad_requests(engine):
    with pytest.raises(KeyError):
        engine.image_path("nope")
    with pytest.raises(ValueError):
        engine.search("  ")
    with pytest.raises(ValueError):
        engine.search("x", k=0)
    assert len(engine.search("x", k=50)) == 12 and len(engine) == 12
