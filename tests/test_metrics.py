"""Metrics against a brute-force reference: full stable argsort, one query at a time."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tpas.eval import Metrics, by_group, evaluate, evaluate_rankings, html_table, markdown_table, positive_ranks


def reference(scores: np.ndarray, qids, gids, ks=(1, 5, 10), groups=None, ap_ks=()) -> dict:
    gids = np.asarray(gids)

    def summarize(rows):
        r = {f"R@{k}": 0.0 for k in ks}
        ap_sum = inp_sum = 0.0
        ap_at = {k: 0.0 for k in ap_ks}
        for i in rows:
            order = np.argsort(-scores[i], kind="stable")
            hits = np.flatnonzero(gids[order] == qids[i]) + 1  # 1-based ranks of positives
            for k in ks:
                r[f"R@{k}"] += float(hits[0] <= k)
            ap_sum += sum((j + 1) / rank for j, rank in enumerate(hits)) / len(hits)
            inp_sum += len(hits) / hits[-1]
            for k in ap_ks:  # precision at each positive within the top k, over min(#positives, k)
                ap_at[k] += sum((j + 1) / rank for j, rank in enumerate(hits) if rank <= k) / min(len(hits), k)
        n = len(rows)
        out = {key: 100.0 * v / n for key, v in r.items()}
        out.update(mAP=100.0 * ap_sum / n, mINP=100.0 * inp_sum / n, num_queries=n)
        out.update({f"mAP@{k}": 100.0 * v / n for k, v in ap_at.items()})
        return out

    result = summarize(range(len(qids)))
    if groups is not None:
        result["groups"] = {
            g: summarize([i for i in range(len(qids)) if groups[i] == g]) for g in sorted(set(groups))
        }
    return result


def assert_close(got: Metrics | dict, want: dict) -> None:
    got = got.to_dict() if isinstance(got, Metrics) else got
    assert set(got) == set(want)
    for key, value in want.items():
        if key == "groups":
            assert set(got[key]) == set(value)
            for g in value:
                assert_close(got[key][g], value[g])
        elif key == "num_queries":
            assert got[key] == value
        else:
            assert got[key] == pytest.approx(value, abs=1e-9), key


def random_case(seed: int, n=60, g=80, levels=4, persons=12):
    """Integer scores in a tiny range (many ties) and several positives per query."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size=(n, g)).astype(np.float32)
    gids = rng.integers(0, persons, size=g).tolist()
    present = sorted(set(gids))
    qids = [present[i] for i in rng.integers(0, len(present), size=n)]
    groups = [("normal", "anomaly")[i % 2] for i in range(n)]
    return scores, qids, gids, groups


@pytest.mark.parametrize("seed", range(6))
def test_matches_bruteforce_with_ties_and_groups(seed):
    scores, qids, gids, groups = random_case(seed, levels=2 + seed)
    want = reference(scores, qids, gids, groups=groups)
    assert_close(evaluate(scores, qids, gids, query_groups=groups), want)
    # odd chunk sizes, including 1 and non-divisors of the row count
    for chunk in (1, 7, 1000):
        assert_close(evaluate(scores, qids, gids, query_groups=groups, chunk_size=chunk), want)


def test_single_positive_fast_path_matches_bruteforce():
    rng = np.random.default_rng(1)
    n = g = 50
    scores = rng.integers(0, 3, size=(n, g)).astype(np.int64)  # integer dtype too
    gids = [f"img{j}" for j in range(g)]
    qids = [f"img{j}" for j in rng.integers(0, g, size=n)]
    assert_close(evaluate(scores, qids, gids, chunk_size=8), reference(scores, qids, gids))


def test_mixed_single_and_multi_positive_rows():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 3, size=(40, 30)).astype(np.float64)
    gids = list(range(20)) + [99] * 10  # persons 0..19 have one image, person 99 has ten
    qids = [int(x) for x in rng.choice(gids, size=40)]
    assert_close(evaluate(scores, qids, gids, chunk_size=9), reference(scores, qids, gids))


def test_array_kinds_callable_iterable_memmap_torch(tmp_path):
    scores, qids, gids, groups = random_case(7)
    want = reference(scores, qids, gids, groups=groups)
    path = tmp_path / "s.npy"
    np.save(path, scores)
    sources = {
        "memmap": np.load(path, mmap_mode="r"),
        "torch": torch.from_numpy(scores),
        "torch-bf16-safe-ints": torch.from_numpy(scores).to(torch.bfloat16),  # small ints are exact
        "callable": lambda a, b: scores[a:b],
        "iterable": (scores[a : a + 11] for a in range(0, len(qids), 11)),
    }
    for name, source in sources.items():
        assert_close(evaluate(source, qids, gids, query_groups=groups, chunk_size=13), want)


def test_positive_ranks_equals_stable_argsort():
    rng = np.random.default_rng(3)
    for _ in range(50):
        row = rng.integers(0, 3, size=int(rng.integers(2, 400))).astype(np.float32)
        pos = np.sort(rng.choice(row.size, size=min(row.size, int(rng.integers(1, 40))), replace=False))
        order = np.argsort(-row, kind="stable")
        want = np.flatnonzero(np.isin(order, pos)) + 1
        for method in ("auto", "count", "sort"):
            np.testing.assert_array_equal(positive_ranks(row, pos, method), want)
        np.testing.assert_array_equal(positive_ranks(row.astype(np.uint8), pos, "sort"), want)


def test_ties_break_by_gallery_order():
    scores = np.zeros((1, 5))  # all tied: the ranking is gallery order
    result = evaluate(scores, ["c"], ["a", "b", "c", "d", "e"], ks=(1, 3))
    assert result["R@1"] == 0.0 and result["R@3"] == 100.0
    assert result["mAP"] == pytest.approx(100 / 3)


def test_known_values():
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    result = evaluate(scores, ["p", "q"], ["x", "p", "q", "p"], ks=(1, 2))
    # query 0: positives at ranks 2 and 4 -> AP=(1/2+2/4)/2=0.5, INP=2/4; query 1: rank 2 -> 0.5, 0.5
    assert result.to_dict() == {"R@1": 0.0, "R@2": 100.0, "mAP": 50.0, "mINP": 50.0, "num_queries": 2}
    assert Metrics.from_dict(result.to_dict()) == result


def test_no_positive_is_an_error_unless_allowed():
    scores = np.zeros((2, 2))
    with pytest.raises(ValueError, match="1 of 2 queries have no positive"):
        evaluate(scores, ["a", "zzz"], ["a", "b"])
    result = evaluate(scores, ["a", "zzz"], ["a", "b"], ks=(1,), allow_no_positive=True)
    assert result["R@1"] == 50.0 and result["mAP"] == 50.0 and result.num_no_positive == 1


def test_bad_shapes_and_nan():
    with pytest.raises(ValueError, match="shape"):
        evaluate(np.zeros((2, 3)), ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.array([[0.0, np.nan]]), ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="rows"):
        evaluate(iter([np.zeros((1, 2))]), ["a", "b"], ["a", "b"])


def test_evaluate_rankings_and_table():
    rankings = [["a", "b"], ["c", "a"], ["x", "y"]]
    result = evaluate_rankings(rankings, ["a", "a", "b"], ks=(1, 2), query_groups=["n", "n", "m"])
    assert result["R@1"] == pytest.approx(100 / 3) and result["R@2"] == pytest.approx(200 / 3)
    assert result.groups["n"]["R@2"] == 100.0 and result.groups["m"]["R@1"] == 0.0
    assert result.mAP is None and "mAP" not in result.to_dict()  # truncated rankings have no mAP
    mapped = evaluate_rankings([["g1"], ["g2"]], ["p1", "p1"], {"g1": "p1", "g2": "p2"}, ks=(1,))
    assert mapped["R@1"] == 50.0
    with pytest.raises(ValueError, match="cannot compute"):
        evaluate_rankings(rankings, ["a", "a", "b"], ks=(5,))
    scores, qids, gids, groups = random_case(0)
    metrics = evaluate(scores, qids, gids, query_groups=groups)
    lines = markdown_table(by_group(metrics), ("n", "R@1", "R@5", "R@10", "mAP", "mINP"), first="queries").splitlines()
    assert lines[0] == "| queries | n | R@1 | R@5 | R@10 | mAP | mINP |"
    assert lines[2] == f"| all | 60 | {metrics['R@1']:.2f} | {metrics['R@5']:.2f} | {metrics['R@10']:.2f} | " \
                       f"{metrics['mAP']:.2f} | {metrics['mINP']:.2f} |"
    assert lines[3].startswith("| anomaly | 30 |") and lines[4].startswith("| normal | 30 |")
    json.dumps(metrics.to_dict())  # plain floats/ints only


def test_tables_group_columns_and_missing_figures():
    a = Metrics(recall={1: 50.0, 5: 75.0}, num_queries=4, mAP=60.0,
                groups={"anomaly": Metrics(recall={1: 25.0, 5: 50.0}, num_queries=2, mAP=30.0)})
    b = Metrics(recall={1: 10.0, 5: 20.0}, num_queries=4)  # no mAP, no groups
    md = markdown_table([("A", a), ("B <b>", b)], ("R@1", "mAP", "anomaly R@1", "anomaly mAP", "normal R@1"))
    assert md.splitlines()[2] == "| A | 50.00 | 60.00 | 25.00 | 30.00 | – |"
    assert md.splitlines()[3] == "| B <b> | 10.00 | – | – | – | – |"
    page = html_table([("A", a), ("B <b>", b)], ("R@1", "anomaly R@1"), links=["a.html", None])
    assert "<th>B &lt;b&gt;</th>" in page and '<a href="a.html">examples</a>' in page
    assert page.count("<tr>") == 3 and "<td>25.00</td>" in page


@pytest.mark.parametrize("seed", range(3))
def test_map_at_k_matches_bruteforce(seed):
    scores, qids, gids, groups = random_case(seed)
    got = evaluate(scores, qids, gids, query_groups=groups, ap_ks=(3, 10))
    assert_close(got, reference(scores, qids, gids, groups=groups, ap_ks=(3, 10)))
    assert Metrics.from_dict(got.to_dict()) == got
    # truncated rankings give the same mAP@10 as the full matrix (the answer-file path)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    rankings = [[str(g) for g in row] for row in order]
    truncated = evaluate_rankings(rankings, qids, {str(g): gid for g, gid in enumerate(gids)}, ap_ks=(10,))
    assert truncated["mAP@10"] == pytest.approx(got["mAP@10"], abs=1e-9)
