import numpy as np
import pytest

from tpas.search.postprocess import dual_softmax, one_to_one, postprocess, sca


def top1(scores):
    return np.argsort(-scores, axis=1, kind="stable")[:, 0].tolist()


def ranking(scores):
    return np.argsort(-scores, axis=1, kind="stable").tolist()


# two look-alike queries both put image 0 first; query 1 holds it more weakly
LOOKALIKE = np.array([[0.9, 0.2, 0.1],
                      [0.8, 0.7, 0.1]], dtype=np.float32)
TEXTS_SIMILAR = np.array([[1.0, 0.0], [0.95, 0.31]], dtype=np.float32)
TEXTS_DIFFERENT = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)


def test_sca_lookalikes_weaker_query_moves():
    out = sca(LOOKALIKE)
    assert top1(out) == [0, 1]
    assert ranking(out)[1] == [1, 0, 2]  # the given-up image stays right behind
    assert ranking(out)[0] == ranking(LOOKALIKE)[0]


def test_sca_threshold_uses_text_similarity():
    assert top1(sca(LOOKALIKE, TEXTS_SIMILAR, threshold=0.9)) == [0, 1]
    assert top1(sca(LOOKALIKE, TEXTS_DIFFERENT, threshold=0.9)) == [0, 0]  # not look-alikes: no conflict


def test_sca_margin():
    assert top1(sca(LOOKALIKE, margin=0.05)) == [0, 1]
    assert top1(sca(LOOKALIKE, margin=0.2)) == [0, 0]  # 0.9 vs 0.8 is within the margin


def test_sca_chain_of_three():
    s = np.array([[0.9, 0.5, 0.1, 0.0],
                  [0.8, 0.6, 0.2, 0.0],
                  [0.7, 0.5, 0.4, 0.3]], dtype=np.float32)
    # round 1: queries 1, 2 lose image 0 -> 1 takes image 1 (0.6), 2 takes image 1 (0.5)
    # round 2: query 2 loses image 1 to query 1 -> takes image 2
    assert top1(sca(s)) == [0, 1, 2]


def test_sca_walks_below_current_not_back_to_top():
    s = np.array([[0.9, 0.0, 0.0],
                  [0.8, 0.1, 0.05],
                  [0.1, 0.95, 0.0]], dtype=np.float32)
    # query 1 moves to image 1, loses it to query 2 (0.95), then takes image 2
    assert top1(sca(s)) == [0, 2, 1]


def test_no_conflict_leaves_ranking_untouched():
    s = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.1], [0.3, 0.1, 0.7]], dtype=np.float32)
    for out in (sca(s), one_to_one(s, k=3)):
        assert ranking(out) == ranking(s)
    np.testing.assert_array_equal(sca(s), s)


def test_ties_are_left_alone():
    s = np.array([[0.9, 0.5, 0.1], [0.9, 0.4, 0.2]], dtype=np.float32)
    assert ranking(sca(s)) == ranking(s)
    # within a row, tied scores keep gallery order
    t = np.array([[0.5, 0.5, 0.5], [0.1, 0.5, 0.5]], dtype=np.float32)
    assert ranking(sca(t)) == [[0, 1, 2], [1, 2, 0]]


def test_sca_iteration_limit():
    s = np.array([[0.9, 0.5, 0.1], [0.8, 0.6, 0.2], [0.7, 0.55, 0.4]], dtype=np.float32)
    assert top1(sca(s, max_iter=1)) == [0, 1, 1]  # the second round never ran
    assert top1(sca(s)) == [0, 1, 2]


def test_one_to_one_maximises_total_score():
    # greedy would give image 0 to query 0 (0.9) and leave query 1 with 0.1; the optimum swaps
    s = np.array([[0.9, 0.8, 0.0],
                  [0.85, 0.1, 0.0]], dtype=np.float32)
    assert top1(one_to_one(s, k=2)) == [1, 0]
    assert top1(sca(s)) == [0, 1]  # SCA is the greedy relative


def test_one_to_one_more_queries_than_candidates():
    s = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.7, 0.3, 0.0]], dtype=np.float32)
    out = one_to_one(s, k=1)  # three queries, one candidate each, all image 0
    assert top1(out) == [0, 0, 0]
    # best total: query 0 -> image 0 (0.9) + query 2 -> image 1 (0.3); query 1 is left as it was
    assert top1(one_to_one(s, k=2)) == [0, 0, 1]


def test_one_to_one_greedy_fallback_matches_on_easy_case():
    s = np.array([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0]], dtype=np.float32)
    assert top1(one_to_one(s, k=2, max_cells=1)) == [0, 1]


def test_dual_softmax_discounts_shared_image():
    s = np.array([[0.9, 0.85], [0.9, 0.1]], dtype=np.float32)
    out = dual_softmax(s, temperature=0.1, chunk_size=1)
    assert top1(s) == [0, 0] and top1(out) == [1, 0]
    ref_col = np.log(np.exp(s / 0.1) / np.exp(s / 0.1).sum(0, keepdims=True))
    ref_row = np.log(np.exp(s / 0.1) / np.exp(s / 0.1).sum(1, keepdims=True))
    np.testing.assert_allclose(out, ref_col + ref_row, atol=1e-5)


def test_dispatch():
    np.testing.assert_array_equal(postprocess(LOOKALIKE, "none"), LOOKALIKE)
    assert top1(postprocess(LOOKALIKE, "sca")) == [0, 1]
    with pytest.raises(ValueError):
        postprocess(LOOKALIKE, "magic")
