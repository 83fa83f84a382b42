"""Query-set post-processing over a Ranking's raw scores: SCA (seed and margin rules, the text gate,
chains, pass limits), the assignment with and without slack, dual-softmax, and the Ranking they return."""

import tracemalloc

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from tpas.search.calibrate import (beats_doing_nothing, calibrate_assign, calibrate_post, calibrate_sca_threshold,
                                   post_hits)
from tpas.search.postprocess import candidates, postprocess, resolve_post_options
from tpas.search.ranking import Ranking, fuse, ranking_from_scores


def top1(ranking):
    return ranking.rows[:, 0].tolist()


def order(ranking):
    """The full order the metrics see."""
    return np.argsort(-ranking.score_matrix(), axis=1, kind="stable").tolist()


def reranked(rows, itc, itm, weight=0.002, gallery=None):
    """A re-ranked ranking whose whole listed depth is its head, fused the way rank() fuses."""
    rows, itc, itm = (np.asarray(a) for a in (rows, itc, itm))
    fused = fuse(itm.astype(np.float32), itc.astype(np.float32), weight)
    by = np.argsort(-fused, axis=1, kind="stable")
    take = lambda a: np.take_along_axis(a, by, axis=1)  # noqa: E731
    g = gallery or int(rows.max()) + 1
    full = np.full((len(rows), g), -1.0, np.float32)
    np.put_along_axis(full, rows, itc.astype(np.float32), axis=1)
    return Ranking(rows=take(rows).astype(np.int64), itc=take(itc).astype(np.float32),
                   itm=take(itm).astype(np.float32), score=take(fused),
                   text_embeds=np.eye(len(rows), 4, dtype=np.float32), rerank=rows.shape[1], weight=weight,
                   itc_scores=full)


# two look-alike queries both put image 0 first; query 1 holds it more weakly
LOOKALIKE = np.array([[0.9, 0.2, 0.1],
                      [0.8, 0.7, 0.1]], dtype=np.float32)
TEXTS_SIMILAR = np.array([[1.0, 0.0], [0.95, 0.31]], dtype=np.float32)
TEXTS_DIFFERENT = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)


def test_sca_seed_rule_weaker_lookalike_moves_and_keeps_the_image_next():
    r = ranking_from_scores(LOOKALIKE, depth=3, text_embeds=TEXTS_SIMILAR)
    out = postprocess(r, "sca", threshold=0.9)
    assert top1(out) == [0, 1] and out.post == "sca"
    assert order(out) == [[0, 1, 2], [1, 0, 2]]  # the given-up image stays right behind
    assert out.itc[1].tolist() == pytest.approx([0.7, 0.8, 0.1])  # raw scores travel with their rows
    assert top1(r) == [0, 0] and r.post == "none"  # the input ranking is left intact


def test_sca_gate_needs_similar_descriptions():
    different = ranking_from_scores(LOOKALIKE, depth=3, text_embeds=TEXTS_DIFFERENT)
    assert top1(postprocess(different, "sca", threshold=0.9)) == [0, 0]  # not look-alikes: no conflict
    assert top1(postprocess(different, "sca", threshold=-1.0)) == [0, 1]  # -1: every pair is compared
    with pytest.raises(ValueError, match="needs a text-similarity threshold"):
        postprocess(different, "sca")
    with pytest.raises(ValueError, match="text embeddings"):
        postprocess(ranking_from_scores(LOOKALIKE, depth=3), "sca", threshold=0.5)


def test_sca_tau_leaves_close_claims_alone():
    r = ranking_from_scores(LOOKALIKE, depth=3)
    assert top1(postprocess(r, "sca", threshold=-1, tau=0.05)) == [0, 1]
    assert top1(postprocess(r, "sca", threshold=-1, tau=0.2)) == [0, 0]  # 0.9 vs 0.8 is within tau


def test_queries_tied_at_fused_1002_are_told_apart_by_raw_itm():
    # both queries' ITM and ITC agree on image 0: both fuse to exactly 1 + 0.002 there
    r = reranked(rows=[[0, 1, 2], [0, 2, 1]], itc=[[0.6, 0.5, 0.1], [0.5, 0.4, 0.3]],
                 itm=[[4.0, 1.0, -2.0], [2.5, 2.0, -1.0]])
    fused = r.score_matrix()
    assert fused[0, 0] == fused[1, 0] == np.float32(1.002)  # the old matrix API saw a tie and moved nobody
    out = postprocess(r, "sca", threshold=-1)
    assert top1(out) == [0, 2]  # query 1's ITM for image 0 (2.5) is below query 0's (4.0)
    assert out.itm[1, 0] == 2.0 and order(out)[1][:3] == [2, 0, 1]


def test_sca_chain_a_b_c_resolves_in_order():
    # A~B and B~C but not A~C, all on image 0, A strongest: B yields to A; C, not like A, stays
    scores = np.array([[0.9, 0.1, 0.0, 0.0], [0.8, 0.5, 0.0, 0.0], [0.7, 0.0, 0.4, 0.0]], np.float32)
    a, c = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    b = (a + c) / np.linalg.norm(a + c)  # cos(A,B) = cos(B,C) = 0.71, cos(A,C) = 0
    r = ranking_from_scores(scores, depth=4, text_embeds=np.stack([a, b, c]))
    assert top1(postprocess(r, "sca", threshold=0.7)) == [0, 1, 0]
    assert top1(postprocess(r, "sca", threshold=-1)) == [0, 1, 2]  # without the gate C yields too


def test_sca_walks_down_and_is_bumped_again():
    s = np.array([[0.9, 0.0, 0.0], [0.8, 0.1, 0.05], [0.1, 0.95, 0.0]], dtype=np.float32)
    # query 1 moves to image 1, loses it to query 2 (0.95), then takes image 2
    assert top1(postprocess(ranking_from_scores(s, depth=3), "sca", threshold=-1)) == [0, 2, 1]


def test_sca_pass_limit_and_deterministic_ties():
    s = np.array([[0.9, 0.5, 0.1], [0.8, 0.6, 0.2], [0.7, 0.55, 0.4]], dtype=np.float32)
    r = ranking_from_scores(s, depth=3)
    assert top1(postprocess(r, "sca", threshold=-1, max_passes=1)) == [0, 1, 1]  # the second pass never ran
    assert top1(postprocess(r, "sca", threshold=-1)) == [0, 1, 2]
    tied = ranking_from_scores(np.array([[0.9, 0.5, 0.1], [0.9, 0.4, 0.2]], np.float32), depth=3)
    assert order(postprocess(tied, "sca", threshold=-1)) == order(tied)  # equal claims: nobody is weaker


def test_sca_margin_rule_moves_the_query_that_loses_least():
    # query 0 holds image 0 more strongly (0.9 > 0.85) but its runner-up is almost as good (0.88);
    # query 1 would fall from 0.85 to 0.1: the margin rule moves query 0, the seed rule query 1
    s = np.array([[0.9, 0.88, 0.0], [0.85, 0.0, 0.1]], np.float32)
    r = ranking_from_scores(s, depth=3)
    assert top1(postprocess(r, "sca", threshold=-1)) == [0, 2]
    assert top1(postprocess(r, "sca", threshold=-1, rule="margin")) == [1, 0]
    assert top1(postprocess(r, "sca", threshold=-1, rule="margin", tau=0.8)) == [0, 0]  # 0.75 - 0.02 < tau


def test_more_queries_than_gallery_images_in_linear_memory():
    q, g = 30_000, 3  # a Q x Q similarity matrix would be 3.6 GB
    rng = np.random.default_rng(0)
    scores = (rng.random((q, g)) * 0.1 + np.array([0.8, 0.5, 0.2])).astype(np.float32)
    texts = np.ones((q, 8), np.float32) + rng.normal(0, 0.01, (q, 8)).astype(np.float32)  # all look-alikes
    r = ranking_from_scores(scores, depth=g, text_embeds=texts)
    tracemalloc.start()
    out = postprocess(r, "sca", threshold=0.9)
    assigned = postprocess(r, "assign", k=2, slack=1.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 150 * 2**20
    # one query keeps each image; everyone else has walked to the last one and stays there
    assert np.bincount(top1(out), minlength=g).tolist() == [1, 1, q - 2]
    assert np.bincount(top1(assigned), minlength=g).tolist() == [q - 1, 1, 0]  # the rest pay to keep image 0


def hungarian_optimum(scores, k):
    """Reference: dense Hungarian on each query's top-k (other pairs forbidden) -> best total score."""
    cand = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    weight = np.full(scores.shape, -1e9)
    np.put_along_axis(weight, cand, np.take_along_axis(scores, cand, axis=1), axis=1)
    r, c = linear_sum_assignment(weight, maximize=True)
    return weight[r, c].sum()


@pytest.mark.parametrize("seed", range(4))
def test_one_to_one_reaches_the_hungarian_optimum(seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((30, 40)).astype(np.float32)
    scores[:, :5] += 0.6  # crowd everyone onto a few images: many collisions
    out = postprocess(ranking_from_scores(scores, depth=6), "one_to_one", k=6)
    chosen = np.asarray(top1(out))
    assert len(set(chosen.tolist())) == 30  # every query has its own image
    assert scores[np.arange(30), chosen].sum() == pytest.approx(hungarian_optimum(scores, 6), abs=1e-4)


def test_one_to_one_leaves_extra_queries_on_their_ranking():
    s = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.7, 0.3, 0.0]], dtype=np.float32)
    r = ranking_from_scores(s, depth=3)
    assert top1(postprocess(r, "one_to_one", k=1)) == [0, 0, 0]  # one candidate each: nothing to do
    # best total: query 0 -> image 0 (0.9) + query 2 -> image 1 (0.3); query 1 keeps its ranking
    assert top1(postprocess(r, "one_to_one", k=2)) == [0, 0, 1]


def test_assign_slack_prices_keeping_a_shared_image():
    # greedy SCA gives image 0 to query 0 and sends query 1 to 0.1; the assignment swaps (0.8 + 0.85)
    s = np.array([[0.9, 0.8, 0.0], [0.85, 0.1, 0.0]], dtype=np.float32)
    r = ranking_from_scores(s, depth=3)
    assert top1(postprocess(r, "sca", threshold=-1)) == [0, 1]
    assert top1(postprocess(r, "assign", k=2, slack=1.0)) == [1, 0]
    # keeping the shared top-1 costs each 0.05 only: cheaper than any move, so both keep it
    assert top1(postprocess(r, "assign", k=2, slack=0.05)) == [0, 0]


def test_assign_only_touches_collision_components():
    s = np.array([[0.9, 0.8, 0.0, 0.0],   # queries 0 and 1 collide on image 0
                  [0.85, 0.0, 0.1, 0.0],
                  [0.0, 0.0, 0.0, 0.9],   # query 2 is alone on image 3 ...
                  [0.0, 0.0, 0.2, 0.5]],  # ... and query 3 follows it there, a collision of its own
                 np.float32)
    out = postprocess(ranking_from_scores(s, depth=2), "assign", k=2, slack=1.0)
    assert top1(out) == [1, 0, 3, 2]
    lone = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    r = ranking_from_scores(lone, depth=2)
    np.testing.assert_array_equal(postprocess(r, "assign").score_matrix(), r.score_matrix())


def test_dual_softmax_over_candidates():
    s = np.array([[0.9, 0.85], [0.9, 0.1]], dtype=np.float32)
    r = ranking_from_scores(s, depth=2)
    out = postprocess(r, "dual_softmax", temperature=0.1)
    assert top1(r) == [0, 0] and top1(out) == [1, 0]
    z = s / 0.1
    value = 2 * z - np.log(np.exp(z).sum(0, keepdims=True)) - np.log(np.exp(z).sum(1, keepdims=True))
    assert order(out) == np.argsort(-value, axis=1, kind="stable").tolist()


def test_itm_confidence_reads_the_head_only():
    r = reranked(rows=[[0, 1], [0, 1]], itc=[[0.6, 0.5], [0.5, 0.45]], itm=[[3.0, 1.0], [2.0, 1.5]], gallery=4)
    cands = candidates(r)
    assert cands.source == "itm" and cands.conf.tolist() == [[3.0, 1.0], [2.0, 1.5]]
    np.testing.assert_allclose(candidates(r, "itc").conf, [[0.6, 0.5], [0.5, 0.45]], rtol=1e-6)
    # "fused": the ranking's own fusion with one scale for all queries (mean head ranges 1.25 and 0.075)
    np.testing.assert_allclose(candidates(r, "fused").conf, [[3.0 / 1.25 + 0.002 * 0.6 / 0.075,
                                                              1.0 / 1.25 + 0.002 * 0.5 / 0.075],
                                                             [2.0 / 1.25 + 0.002 * 0.5 / 0.075,
                                                              1.5 / 1.25 + 0.002 * 0.45 / 0.075]], rtol=1e-5)
    with pytest.raises(ValueError, match="re-ranked"):
        candidates(ranking_from_scores(LOOKALIKE), "itm")


def test_no_conflict_leaves_every_score_untouched():
    s = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.1], [0.3, 0.1, 0.7]], dtype=np.float32)
    r = ranking_from_scores(s, depth=3, text_embeds=np.ones((3, 2), np.float32))
    for method, options in (("sca", {"threshold": 0.5}), ("assign", {}), ("one_to_one", {"k": 3})):
        np.testing.assert_array_equal(postprocess(r, method, **options).score_matrix(), s)
    assert postprocess(r, "none") is r
    with pytest.raises(ValueError, match="unknown post-processing"):
        postprocess(r, "magic")


def test_calibration_picks_on_validation_and_prefers_conservative_ties():
    # queries 0/1 look alike and collide (moving 1 is right); queries 2/3 collide but are different
    # people whose texts are only loosely similar (cos 0.6), and moving 3 would be wrong
    scores = np.array([[0.9, 0.2, 0.0, 0.0], [0.8, 0.7, 0.0, 0.0],
                       [0.0, 0.0, 0.9, 0.1], [0.0, 0.0, 0.8, 0.3]], np.float32)
    texts = np.array([[1, 0, 0], [0.99, 0.14, 0], [0, 0, 1], [0, 0.8, 0.6]], np.float32)
    r = ranking_from_scores(scores, depth=4, text_embeds=texts)
    query_targets, gallery_targets = ["a", "b", "c", "c"], ["a", "b", "c", "d"]
    threshold, table = calibrate_sca_threshold(r, query_targets, gallery_targets, grid=(-1.0, 0.5, 0.9, 0.995),
                                               min_z=0)  # one query fixed: no noise guard on 4 queries
    assert table == {-1.0: 75.0, 0.5: 75.0, 0.9: 100.0, 0.995: 75.0} and threshold == 0.9
    # nothing to gain anywhere: the most conservative value wins
    value, _ = calibrate_post(r, ["a", "a", "c", "c"], gallery_targets, "assign", "slack", (0.01, 0.1, 1.0), "min")
    assert value == 0.01


def slack_objective(scores, cand, chosen_pos, slack):
    """Total utility of an assignment read off its result: per image, a query that moved there holds it
    alone; of the queries still on their top-1 at most one holds it alone, the rest pay the slack."""
    total = 0.0
    images = cand[np.arange(len(cand)), chosen_pos]
    for img in np.unique(images):
        on = np.flatnonzero(images == img)
        moved = on[chosen_pos[on] > 0]
        assert len(moved) <= 1  # an image taken by a move is nobody else's, except queries keeping their top-1
        kept = on[chosen_pos[on] == 0]
        total += scores[on, img].sum() - slack * (len(kept) - (0 if len(moved) else min(1, len(kept))))
    return total


@pytest.mark.parametrize("seed", range(6))
def test_assign_with_slack_reaches_the_brute_force_optimum(seed):
    import itertools

    rng = np.random.default_rng(seed)
    scores = (rng.random((6, 5)) + np.array([0.8, 0.6, 0.0, 0.0, 0.0])).astype(np.float32)  # crowded images
    slack = float(rng.choice([0.05, 0.2, 0.5]))
    cand = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    best = -np.inf
    for choice in itertools.product(range(3), repeat=6):  # 0, 1: a candidate for itself; 2: keep top-1 for slack
        taken = [cand[q, c] for q, c in enumerate(choice) if c < 2]
        if len(taken) != len(set(taken)):
            continue
        total = sum(scores[q, cand[q, c]] if c < 2 else scores[q, cand[q, 0]] - slack for q, c in enumerate(choice))
        best = max(best, total)
    out = postprocess(ranking_from_scores(scores, depth=5), "assign", k=2, slack=slack)
    chosen_pos = np.array([list(cand[q]).index(out.rows[q, 0]) for q in range(6)])
    assert slack_objective(scores, cand, chosen_pos, slack) == pytest.approx(best, abs=1e-5)


# three queries crowd onto image 0; query 2's own image (3) sits third in its list, behind image 4,
# which query 3 holds firmly: out of reach of the published top-2
CROWDED = np.array([[0.90, 0.80, 0.00, 0.00, 0.00],
                    [0.88, 0.00, 0.80, 0.00, 0.00],
                    [0.86, 0.00, 0.00, 0.80, 0.84],
                    [0.10, 0.00, 0.00, 0.00, 0.95]], np.float32)
CROWDED_TARGETS = (["a", "b", "c", "e"], ["a", "d", "b", "c", "e"])


def test_calibrate_assign_reaches_past_the_top_2_when_validation_says_so():
    r = ranking_from_scores(CROWDED, depth=5)
    # at top-2 nobody can hand query 2 its image, whatever the slack
    assert all(3 not in top1(postprocess(r, "assign", k=2, slack=s)) for s in (0.05, 0.2, 1.0, 5.0))
    options, record = calibrate_assign(r, *CROWDED_TARGETS, k_grid=(2, 3, 5), min_z=0)
    assert options["k"] == 3 and options["confidence"] == "itc"  # the smallest depth that reaches 100
    assert record["r1"] == 100.0 and record["before"] == 50.0
    assert max(record["tables"][2]["itc"].values()) == 75.0
    assert top1(postprocess(r, "assign", **options)) == [0, 2, 3, 4]


def test_calibrate_assign_picks_no_move_when_moving_only_hurts():
    # both collisions are right where they stand (the gallery has two images per target)
    r = ranking_from_scores(CROWDED, depth=5)
    options, record = calibrate_assign(r, ["a", "a", "a", "e"], ["a", "x", "y", "z", "e"])
    assert options["k"] == 1 and record["r1"] == record["before"] == 100.0  # k = 1: every query keeps its top-1
    assert top1(postprocess(r, "assign", **options)) == top1(r)


class _Config:
    sca_threshold = 0.8
    sca_options = {"rule": "margin", "tau": 0.3, "confidence": "fused"}
    assign_options = {"k": 5, "slack": 2.0, "confidence": "itc"}


class _Model:
    config = _Config()


def test_stored_options_fill_in_only_on_rankings_with_their_score_units(caplog):
    own = ranking_from_scores(CROWDED, depth=5)  # a model's ITC ranking, not re-ranked
    assert resolve_post_options(_Model(), "assign", {}, own) == {"k": 5, "slack": 2.0, "confidence": "itc"}
    assert resolve_post_options(_Model(), "assign", {"k": 2}, own)["k"] == 2  # given beats stored
    # another compared score: the stored slack is priced in the stored one's units and is left out
    assert resolve_post_options(_Model(), "assign", {"confidence": "fused"}, own) == {"confidence": "fused", "k": 5}
    # SCA's options were picked on the re-ranked fusion: on an ITC-only ranking only the text gate carries over
    with caplog.at_level("WARNING"):
        assert resolve_post_options(_Model(), "sca", {}, own) == {"threshold": 0.8}
    assert "not used" in caplog.text
    fused = ranking_from_scores(CROWDED, depth=5, scorer="rrf")  # a fusion of systems: other units
    assert resolve_post_options(_Model(), "assign", {}, fused) == {}
    assert resolve_post_options(_Model(), "sca", {}, None)["tau"] == 0.3  # no ranking to check: stored as is


def test_a_setting_must_beat_doing_nothing_by_more_than_noise():
    before = np.array([True] * 50 + [False] * 50)
    after = before.copy()
    after[50:53] = True  # 3 fixed ...
    after[0] = False  # ... 1 broken: +2 on 100 queries, well inside a coin flip's spread (2 * sqrt(4))
    assert not beats_doing_nothing(before, after) and beats_doing_nothing(before, after, min_z=0)
    after[53:60] = True  # 10 fixed, 1 broken: 9 > 2 * sqrt(11)
    assert beats_doing_nothing(before, after)
    # calibration: the crowded queries gain two of four, too few to count, so the no-move slack wins
    r = ranking_from_scores(CROWDED, depth=5)
    options, record = calibrate_assign(r, *CROWDED_TARGETS, k_grid=(2, 3, 5))
    assert options["k"] == 1 and record["r1"] == record["before"] == 50.0
    assert top1(postprocess(r, "assign", **options)) == top1(r)
    # twelve independent copies of the same crowd (48 queries): now the gain is real
    many = np.kron(np.eye(12, dtype=np.float32), CROWDED)
    queries = [f"{t}{i}" for i in range(12) for t in CROWDED_TARGETS[0]]
    gallery = [f"{t}{i}" for i in range(12) for t in CROWDED_TARGETS[1]]
    options, record = calibrate_assign(ranking_from_scores(many, depth=5), queries, gallery, k_grid=(2, 3, 5))
    assert options["k"] == 3 and record["r1"] == 100.0


def test_folds_post_process_each_part_as_its_own_query_set():
    r = ranking_from_scores(CROWDED, depth=5)
    together = post_hits(r, *CROWDED_TARGETS, "assign", k=3, slack=1.0)
    assert together.tolist() == [True, True, True, True]
    # apart, queries 1 and 2 meet nobody on image 0 and keep it; hits come in fold order (0, 3), (1), (2)
    folds = [np.array([0, 3]), np.array([1]), np.array([2])]
    apart = post_hits(r, *CROWDED_TARGETS, "assign", folds=folds, k=3, slack=1.0)
    assert apart.tolist() == [True, True, False, False]
    part = r.take(np.array([2, 0]))
    assert part.rows.tolist() == r.rows[[2, 0]].tolist() and part.text_embeds.shape[0] == 2
    np.testing.assert_array_equal(part.score_matrix(), r.score_matrix()[[2, 0]])


def test_itc_only_view_of_a_reranked_ranking():
    r = reranked(rows=[[0, 1], [1, 0]], itc=[[0.6, 0.5], [0.5, 0.45]], itm=[[1.0, 3.0], [2.0, 1.5]], gallery=3)
    assert top1(r) == [1, 1]  # ITM (weight 0.002) decides the head
    itc = r.itc_only()
    assert itc.head == 0 and top1(itc) == [0, 1] and itc.scorer == "itc"
    np.testing.assert_array_equal(itc.score_matrix(), r.itc_scores)
