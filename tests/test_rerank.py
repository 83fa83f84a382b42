import numpy as np
import pytest
import torch

from tpas.models import create_model
from tpas.search.encode import EncodedImages, encode_texts
from tpas.search.ranking import Ranking, fuse, minmax, rank, top_k
from tpas.search.rerank import itm_scores

TEXTS = ["a man falls", "a woman in a long red coat walks a dog along the road", "child running"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("lite-tiny")
    enc = encode_texts(model, TEXTS, keep_tokens=True, progress=False)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        out = model.encode_image(torch.randn(6, 3, *model.image_size))
    tokens = out.tokens.numpy().astype(np.float16)
    gallery = EncodedImages(embeds=out.embeds.numpy(), tokens=tokens)
    return model, enc, tokens, rng, gallery


def pair_by_pair(model, enc, tokens, q_rows, g_rows, mode="logit"):
    model.eval()
    out = []
    with torch.no_grad():
        for q, g in zip(q_rows, g_rows):
            logits = model.itm_logits(torch.from_numpy(tokens[[g]].astype(np.float32)),
                                      torch.from_numpy(enc.tokens[[q]]), torch.from_numpy(enc.mask[[q]]))
            # "logit" ranks by the trained margin z1 - z0 (tpas.models.base.itm_margin), not z1
            out.append((logits[0, 1] - logits[0, 0]).item() if mode == "logit" else logits.softmax(-1)[0, 1].item())
    return np.array(out)


@pytest.mark.parametrize("mode", ["logit", "prob"])
def test_batched_equals_pair_by_pair(setup, mode):
    model, enc, tokens, rng, _ = setup
    q_rows = rng.integers(0, 3, 40)
    g_rows = rng.integers(0, 6, 40)
    model.train()
    batched = itm_scores(model, enc.tokens, enc.mask, tokens, q_rows, g_rows, batch_size=16, mode=mode)
    assert model.training
    ref = pair_by_pair(model, enc, tokens, q_rows, g_rows, mode)
    np.testing.assert_allclose(batched, ref, atol=1e-5, rtol=0)
    if mode == "prob":
        assert ((batched >= 0) & (batched <= 1)).all()


def test_top_k_is_exact_and_stable():
    s = np.array([[0.1, 0.5, 0.5, 0.9, 0.5], [3, 2, 1, 0, -1]], dtype=np.float32)
    cols, vals = top_k(s, 3)
    assert cols.tolist() == [[3, 1, 2], [0, 1, 2]]
    assert vals[0].tolist() == pytest.approx([0.9, 0.5, 0.5])
    assert top_k(s, 10)[0].shape == (2, 5)


def test_fuse_formula():
    itm = np.array([[2.0, 0.0, 1.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    itc = np.array([[0.1, 0.3, 0.2], [0.1, 0.3, 0.2]], dtype=np.float32)
    fused = fuse(itm, itc, weight=0.002)
    np.testing.assert_allclose(fused[0], [1.0, 0.002, 0.5 + 0.001], atol=1e-7)
    np.testing.assert_allclose(fused[1], [0.0, 0.002, 0.001], atol=1e-7)  # constant ITM: ITC decides
    assert minmax(np.ones((1, 4))).tolist() == [[0, 0, 0, 0]]


def test_rank_reranks_the_itc_head_and_keeps_raw_scores(setup):
    model, enc, tokens, _, gallery = setup
    itc = enc.embeds @ gallery.embeds.T
    ranking = rank(model, TEXTS, gallery, depth=6, rerank=3, weight=0.002, keep_scores=True)
    assert isinstance(ranking, Ranking) and ranking.head == 3 and ranking.weight == 0.002
    np.testing.assert_allclose(ranking.itc_scores, itc, atol=1e-6)
    final = ranking.score_matrix()
    cols, _ = top_k(itc, 3)
    for q in range(3):
        order = np.argsort(-final[q], kind="stable")
        assert order.tolist() == ranking.rows[q].tolist()  # the matrix sorts like the listed ranking
        assert set(order[:3]) == set(cols[q])  # head = the ITC top-3, re-ordered
        tail = [g for g in np.argsort(-itc[q], kind="stable") if g not in cols[q]]
        assert order[3:].tolist() == tail
        assert final[q, cols[q]].min() >= 0 > final[q, tail].max()
        # raw scores travel with each listed row: ITC cosine everywhere, ITM in the head only
        np.testing.assert_allclose(ranking.itc[q], itc[q, ranking.rows[q]], atol=1e-6)
        itm = pair_by_pair(model, enc, tokens, [q] * 3, ranking.rows[q, :3])
        np.testing.assert_allclose(ranking.itm[q, :3], itm, atol=1e-5)
        assert np.isnan(ranking.itm[q, 3:]).all()
        # the head is ordered by the fused score, fused over the head's raw scores
        np.testing.assert_allclose(ranking.score[q, :3], fuse(itm[None], ranking.itc[q, :3][None], 0.002)[0],
                                   atol=1e-3)  # min-max amplifies fp noise: loose tol
        assert (np.diff(ranking.score[q, :3]) <= 0).all()
    plain = rank(model, TEXTS, gallery, depth=6, keep_scores=True)
    assert plain.head == 0 and plain.weight is None and np.isnan(plain.itm).all()
    np.testing.assert_array_equal(plain.score_matrix(), plain.itc_scores)


def test_rank_from_a_search_structure_with_missing_slots(setup):
    model, enc, tokens, _, gallery = setup

    class SparseGallery:  # an index whose search finds only two candidates for the first query
        embeds, tokens = gallery.embeds, gallery.tokens

        def search(self, q, k):
            rows = np.array([[4, 1, -1], [0, 2, 3], [5, 4, 3]])[:len(q), :k]
            return (q @ self.embeds.T)[np.arange(len(q))[:, None], rows.clip(0)].astype(np.float32), rows

    ranking = rank(model, TEXTS, SparseGallery(), depth=3, rerank=3, exact=False)
    assert ranking.rows[0, 2] == -1 and np.isnan(ranking.itm[0, 2]) and ranking.score[0, 2] == -np.inf
    assert np.isfinite(ranking.score[1:]).all() and set(ranking.rows[1]) == {0, 2, 3}
    with pytest.raises(ValueError, match="keep_scores"):
        rank(model, TEXTS, SparseGallery(), exact=False, keep_scores=True)
    with pytest.raises(ValueError, match="image tokens"):
        rank(model, TEXTS, EncodedImages(embeds=gallery.embeds), rerank=2)


def test_top_k_chunked_equals_whole(monkeypatch):
    import tpas.search.ranking as rr

    s = np.random.default_rng(5).integers(0, 4, (37, 11)).astype(np.float32)  # many ties
    whole = top_k(s, 5)
    monkeypatch.setattr(rr, "TOP_K_CELLS", 30)  # 2 rows per chunk
    chunked = top_k(s, 5)
    np.testing.assert_array_equal(whole[0], chunked[0])
    ref = np.argsort(-s, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(whole[0], ref)


def test_calibrate_weight_picks_the_fusion_that_ranks_positives_first():
    from tpas.search.calibrate import calibrate_weight
    from tpas.search.ranking import DEFAULT_WEIGHT

    # candidates in ITC order; the positive is column 0 for every query
    itc = np.array([[0.9, 0.8, 0.1], [0.7, 0.6, 0.5], [0.9, 0.2, 0.1]], np.float32)
    positives = np.zeros_like(itc, dtype=bool)
    positives[:, 0] = True
    weak_itm = np.array([[0.0, 1.0, 0.5], [0.2, 0.9, 0.0], [1.0, 0.0, 0.0]], np.float32)  # right once in three
    weight, table = calibrate_weight(weak_itm, itc, positives, grid=(DEFAULT_WEIGHT, 1.0, 10.0))
    assert table[DEFAULT_WEIGHT] == pytest.approx(100 / 3) and table[10.0] == 100.0 and weight == 10.0
    good_itm = itc[:, ::-1] * 0 + np.array([1.0, 0.0, 0.0], np.float32)  # ITM always right
    weight, table = calibrate_weight(good_itm, itc, positives, grid=(DEFAULT_WEIGHT, 1.0, 10.0))
    assert all(v == 100.0 for v in table.values()) and weight == DEFAULT_WEIGHT  # ties: closest to upstream
    with pytest.raises(ValueError):
        calibrate_weight(good_itm, itc[:, :2], positives)


def test_a_weight_fitted_at_one_depth_warns_when_used_at_another(caplog):
    from types import SimpleNamespace

    from tpas.search.ranking import _WARNED_DEPTHS, resolve_weight

    model = SimpleNamespace(config=SimpleNamespace(rerank_weight=0.3, rerank_depth=16))
    _WARNED_DEPTHS.clear()
    with caplog.at_level("WARNING"):
        assert resolve_weight(model, None, 16) == 0.3
        assert not caplog.records
        assert resolve_weight(model, None, 64) == 0.3
        assert "top-64 with a fusion weight fitted at top-16" in caplog.text
        caplog.clear()
        resolve_weight(model, None, 64)  # once per depth
        resolve_weight(model, 1.0, 64)  # an explicit weight is the caller's choice
        assert not caplog.records
