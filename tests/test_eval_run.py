import json

import numpy as np
import pytest
import torch
from PIL import Image

from tpas.cli import main
from tpas.data.records import Behaviour, EvalSet, GalleryImage, Query
from tpas.eval.metrics import evaluate
from tpas.eval.run import run_eval
from tpas.models import create_model
from tpas.search.encode import encode_images, encode_texts

CAPTIONS = ["a man in a red coat falls on the road", "a woman walks her dog", "a boy runs across the street",
            "a person climbs over the fence", "an old man sits on a bench", "a girl rides a bicycle",
            "a man fights with another man", "a woman waits at the bus stop"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("lite-tiny")


def make_pab(root, n=12):
    """A tiny PAB-format test split written by hand: annotation/test/attr.json + test/imgs."""
    rng = np.random.default_rng(3)
    (root / "test" / "imgs").mkdir(parents=True)
    (root / "annotation" / "test").mkdir(parents=True)
    lines = []
    for i in range(n):
        rel = f"test/imgs/{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (48, 24, 3), dtype=np.uint8)).save(root / rel)
        kind = "anomaly" if i % 3 == 0 else "normal"
        lines.append(json.dumps({"image": rel, "caption": [CAPTIONS[i % len(CAPTIONS)]], "image_id": f"{i}_0",
                                 kind: "falling" if kind == "anomaly" else "walking"}))
    (root / "annotation" / "test" / "attr.json").write_text("\n".join(lines) + "\n")
    return root


def make_evalset(root, n=12, name="tiny"):
    make_pab(root, n)
    queries = [Query(f"q{i}", CAPTIONS[i % len(CAPTIONS)], f"{i}_0",
                     Behaviour.ANOMALY if i % 3 == 0 else Behaviour.NORMAL) for i in range(n)]
    gallery = [GalleryImage(f"test/imgs/{i}.jpg", f"{i}_0", f"{i}_0") for i in range(n)]
    return EvalSet(name=name, root=root, queries=queries, gallery=gallery)


def test_itc_eval_matches_direct_metrics(model, tmp_path):
    evalset = make_evalset(tmp_path / "data")
    result = run_eval(model, evalset, out_dir=tmp_path / "out", progress=False)
    img = encode_images(model, [evalset.image_path(g.image) for g in evalset.gallery], progress=False).embeds
    txt = encode_texts(model, [q.caption for q in evalset.queries], progress=False).embeds
    ref = evaluate(txt @ img.T, evalset.query_targets(), evalset.gallery_targets(), query_groups=evalset.query_groups())
    for key in ("R@1", "R@5", "R@10", "mAP", "mINP"):
        assert result.metrics[key] == pytest.approx(ref[key], abs=1e-6)
    assert set(result.metrics.groups) == {"normal", "anomaly"} and result.metrics.groups["anomaly"].num_queries == 4
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["R@1"] == pytest.approx(result.metrics["R@1"]) and saved["settings"]["post"] == "none"
    page = (tmp_path / "out" / "report.html").read_text()
    deep = page.count(" true match</div>")  # true matches below the top 10, shown after it
    assert page.count('class="c hit"') + page.count('class="c miss"') - deep == 10 * 12
    assert page.count('class="c hit"') >= 1 and "data:image/jpeg;base64," in page
    assert not (tmp_path / "out" / "answer.txt").exists()


def reference_rerank(model, evalset, k: int, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """The re-ranked score matrix computed independently: ITC, then each query's top-k scored pair
    by pair with ITM and fused per query (minmax(ITM) + w * minmax(ITC)); the rest below in ITC order.
    Also returns the raw ITM scores [Q,G] (NaN outside each query's top-k)."""
    img = encode_images(model, [evalset.image_path(g.image) for g in evalset.gallery], keep_tokens=True,
                        progress=False)
    txt = encode_texts(model, [q.caption for q in evalset.queries], keep_tokens=True, progress=False)
    itc = txt.embeds @ img.embeds.T
    out = itc - itc.max(axis=1, keepdims=True) - 1
    raw = np.full(itc.shape, np.nan)
    with torch.no_grad():
        for q in range(len(itc)):
            head = np.argsort(-itc[q], kind="stable")[:k]
            itm = np.array([model.itm_margin(torch.from_numpy(img.tokens[[g]].astype(np.float32)),
                                             torch.from_numpy(txt.tokens[[q]]), torch.from_numpy(txt.mask[[q]]))[0]
                            for g in head])  # the trained margin z1 - z0
            span = lambda x: (x - x.min()) / (x.max() - x.min())  # noqa: E731
            out[q, head] = span(itm) + weight * span(itc[q, head])
            raw[q, head] = itm
    return out, raw


def test_rerank_and_post_processing_change_the_ranking_as_specified(model, tmp_path):
    from tpas.search.postprocess import postprocess
    from tpas.search.ranking import rank_evalset

    evalset = make_evalset(tmp_path / "data")
    targets = (evalset.query_targets(), evalset.gallery_targets())
    itc_only = run_eval(model, evalset, index_dir=tmp_path / "index", progress=False).metrics
    expected, raw_itm = reference_rerank(model.eval(), evalset, k=4, weight=0.002)
    want = evaluate(expected, *targets)
    assert want["mAP"] != pytest.approx(itc_only["mAP"])  # re-ranking moves something: the check has power
    got = run_eval(model, evalset, rerank=4, index_dir=tmp_path / "index", progress=False)
    assert got.settings["rerank"] == 4 and got.settings["fusion_weight"] == 0.002
    for key in ("R@1", "R@5", "R@10", "mAP", "mINP"):
        assert got.metrics[key] == pytest.approx(want[key], abs=1e-4), key
    # one-to-one reads the raw ITM of each query's re-ranked head: run_eval's result is the assignment
    # made on the reference's pair-by-pair raw ITM scores (its optimality: tests/test_postprocess.py)
    ranking = rank_evalset(model, evalset, rerank=4, index_dir=tmp_path / "index", progress=False)
    np.testing.assert_allclose(ranking.itm[:, :4], np.take_along_axis(raw_itm, ranking.rows[:, :4], axis=1),
                               atol=1e-4)
    # (the assignment compares raw margins across queries, where a random model's near-ties make
    # 1e-5 of float noise matter: it is checked on the ranking whose raw ITM was just matched)
    want_post = evaluate(postprocess(ranking, "one_to_one", k=5).score_matrix(), *targets,
                         query_groups=evalset.query_groups(), ap_ks=(10,))
    post = run_eval(model, evalset, rerank=4, post="one_to_one", post_options={"k": 5},
                    index_dir=tmp_path / "index", progress=False)
    assert post.metrics == want_post
    assert post.metrics["mAP"] != pytest.approx(want["mAP"])  # the assignment moves something
    assert post.settings["post"] == "one_to_one" and post.settings["post_options"] == {"k": 5}


def test_a_ranking_is_reused_and_left_intact(model, tmp_path):
    from tpas.search.ranking import rank_evalset

    evalset = make_evalset(tmp_path / "data")
    ranking = rank_evalset(model, evalset, rerank=4, index_dir=tmp_path / "index", progress=False)
    before = ranking.score_matrix()
    post = run_eval(model, evalset, post="dual_softmax", ranking=ranking, progress=False)
    np.testing.assert_array_equal(ranking.score_matrix(), before)  # post-processing worked on a copy
    plain = run_eval(model, evalset, ranking=ranking, progress=False)
    fresh = run_eval(model, evalset, rerank=4, index_dir=tmp_path / "index", progress=False)
    assert plain.metrics == fresh.metrics and post.settings["rerank"] == 4
    from tpas.search.postprocess import postprocess

    assert post.settings["post"] == "dual_softmax"
    assert not np.array_equal(postprocess(ranking, "dual_softmax").score_matrix(), before)  # it did change scores


def test_model_carried_fusion_weight_is_used(model, tmp_path):
    from tpas.search.ranking import DEFAULT_WEIGHT, resolve_weight

    evalset = make_evalset(tmp_path / "data")
    assert resolve_weight(model, None) == DEFAULT_WEIGHT and resolve_weight(model, 0.5) == 0.5
    model.config.rerank_weight = 7.0
    try:
        res = run_eval(model, evalset, rerank=4, index_dir=tmp_path / "index", progress=False)
    finally:
        model.config.rerank_weight = None
    assert res.settings["fusion_weight"] == 7.0


def test_challenge_writes_answer(model, tmp_path):
    masked = make_evalset(tmp_path / "data", name="pab-challenge:tiny")
    masked.queries = [Query(q.query_id, q.caption, None) for q in masked.queries]
    result = run_eval(model, masked, out_dir=tmp_path / "out", progress=False)
    lines = (tmp_path / "out" / "answer.txt").read_text().splitlines()
    assert len(lines) == 12 and all(len(line.split(" ")) == 10 for line in lines)
    assert result.metrics is None and "answer" in result.outputs
    assert "R@1" not in json.loads((tmp_path / "out" / "metrics.json").read_text())
    keyed = make_evalset(tmp_path / "data2", name="pab-challenge:tiny")
    result = run_eval(model, keyed, out_dir=tmp_path / "out2", progress=False)
    assert result.answer_metrics["R@1"] == pytest.approx(result.metrics["R@1"])
    assert result.answer_metrics["R@10"] == pytest.approx(result.metrics["R@10"])


def test_cli_index_search_eval(model, tmp_path, capsys):
    data = make_pab(tmp_path / "data")
    model_dir = model.save_pretrained(tmp_path / "model")
    assert main(["index", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "idx"),
                 "--workers", "0"]) == 0
    assert main(["search", "--index", str(tmp_path / "idx"), "--model", str(model_dir), "a man falls",
                 "--k", "3", "--rerank", "5"]) == 0
    out = capsys.readouterr().out
    assert "indexed 12 images" in out and out.count("test/imgs/") == 3
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--rerank", "4", "--post", "sca",
                 "--out", str(tmp_path / "ev"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "R@1" in out and "anomaly" in out and (tmp_path / "ev" / "report.html").is_file()
    other = create_model("lite-tiny", seed=1)  # another seed: other weights
    other_dir = other.save_pretrained(tmp_path / "other")
    assert main(["search", "--index", str(tmp_path / "idx"), "--model", str(other_dir), "x"]) == 2
    assert "different model" in capsys.readouterr().err


def test_cli_eval_on_generated_minipab_challenge(model, tmp_path, capsys):
    from tpas.data.synth.writer import generate

    root = tmp_path / "minipab"
    generate(root, identities=30, seed=1, size=(64, 32))
    model_dir = model.save_pretrained(tmp_path / "model")
    assert main(["eval", "--model", str(model_dir), "--data", str(root), "--split", "challenge",
                 "--out", str(tmp_path / "ch"), "--workers", "0", "--rerank", "5"]) == 0
    out = capsys.readouterr().out
    n_queries = len((root / "challenge" / "query.json").read_text().splitlines())
    answer = (tmp_path / "ch" / "answer.txt").read_text().splitlines()
    assert len(answer) == n_queries and "answer.txt" in out
    saved = json.loads((tmp_path / "ch" / "metrics.json").read_text())
    assert saved["answer_scores"]["R@1"] == pytest.approx(saved["R@1"])


def test_sca_report_reads_in_rank_order_and_shows_a_true_match_below_the_top_10(model, tmp_path):
    import re

    evalset = make_evalset(tmp_path / "data", n=16)
    run_eval(model, evalset, post="sca", out_dir=tmp_path / "out", progress=False)
    page = (tmp_path / "out" / "report.html").read_text()
    blocks = page.split('<div class="q">')[1:]
    assert len(blocks) == 16
    picks = deep = 0
    for block in blocks:
        cells = re.findall(r"<div>#(\d+) ([^<]+)</div>", block)
        top = [(int(rank), shown) for rank, shown in cells if shown != "true match"]
        assert [rank for rank, _ in top] == list(range(1, 11))
        numbers = [float(shown) for _, shown in top if shown != "SCA pick"]
        assert numbers == sorted(numbers, reverse=True), block  # the printed scores follow the ranks
        picks += sum(shown == "SCA pick" for _, shown in top)
        stated = int(re.search(r"true match at rank (\d+)", block).group(1))
        if stated > 10:  # shown after the top 10, with its rank
            assert (str(stated), "true match") in cells
            deep += 1
    assert picks > 0 and deep > 0  # the untrained model gives SCA work and ranks some matches low


def test_post_processing_refused_where_images_answer_several_queries(model, tmp_path, caplog):
    from tpas.errors import TpasError

    evalset = make_evalset(tmp_path / "data")
    twice = EvalSet(evalset.name, evalset.root, [*evalset.queries, Query("extra", "a second caption", "3_0")],
                    evalset.gallery)
    with pytest.raises(TpasError, match="1 targets are shared by several queries"):
        run_eval(model, twice, post="sca", progress=False)
    assert run_eval(model, twice, progress=False).metrics is not None  # without post-processing: fine
    # a larger gallery (distractors): a warning, unless the protocol is declared one-to-one
    few = EvalSet(evalset.name, evalset.root, evalset.queries[:4], evalset.gallery)
    with caplog.at_level("WARNING"):
        run_eval(model, few, post="assign", index_dir=tmp_path / "index", progress=False)
    assert "12 gallery images for 4 queries" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        run_eval(model, few, post="assign", assume_one_to_one=True, index_dir=tmp_path / "index", progress=False)
    assert "gallery images for" not in caplog.text


def test_sca_threshold_comes_from_the_model_unless_given(model, tmp_path, caplog):
    from tpas.search.postprocess import DEFAULT_SCA_THRESHOLD

    from tpas.search.ranking import rank_evalset

    evalset = make_evalset(tmp_path / "data")
    ranking = rank_evalset(model, evalset, progress=False)
    with caplog.at_level("WARNING"):
        res = run_eval(model, evalset, post="sca", ranking=ranking, progress=False)
    assert res.settings["post_options"] == {"threshold": DEFAULT_SCA_THRESHOLD} and "none stored" in caplog.text
    model.config.sca_threshold = 0.42
    try:
        stored = run_eval(model, evalset, post="sca", ranking=ranking, progress=False)
        given = run_eval(model, evalset, post="sca", post_options={"threshold": -1.0}, ranking=ranking, progress=False)
    finally:
        model.config.sca_threshold = None
    assert stored.settings["post_options"]["threshold"] == 0.42
    assert given.settings["post_options"]["threshold"] == -1.0


def test_track4_eval_writes_a_zipped_answer(model, tmp_path, capsys):
    import zipfile

    from tpas.data.synth.writer import generate

    root = tmp_path / "minipab"
    generate(root, identities=12, seed=2, size=(64, 32), distractors=4)
    model_dir = model.save_pretrained(tmp_path / "model")
    assert main(["eval", "--model", str(model_dir), "--data", str(root), "--split", "track4", "--post", "assign",
                 "--assume-one-to-one", "--out", str(tmp_path / "t4"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "mAP@10" in out and "answer_zip" in out
    names = (root / "track4" / "query_index.txt").read_text().splitlines()
    with zipfile.ZipFile(tmp_path / "t4" / "answer.zip") as zf:
        assert zf.namelist() == ["answer.txt"]
        lines = zf.read("answer.txt").decode().splitlines()
    assert len(lines) == len(names) and all(len(line.split(" ")) == 10 for line in lines)
    saved = json.loads((tmp_path / "t4" / "metrics.json").read_text())
    assert saved["answer_scores"]["mAP@10"] == pytest.approx(saved["mAP@10"])
    assert main(["check-answer", str(tmp_path / "t4" / "answer.zip"), "--data", str(root)]) == 0


def test_sca_threshold_calibrated_on_a_validation_split(model, tmp_path):
    from tpas.search.calibrate import THRESHOLD_GRID, calibrate_sca_on_evalset, calibrate_sca_threshold
    from tpas.search.ranking import rank_evalset

    valset = make_evalset(tmp_path / "val")
    threshold, table = calibrate_sca_on_evalset(model, valset, rerank=4)
    assert set(table) == set(THRESHOLD_GRID) and threshold in table
    assert table[threshold] == max(table.values())
    ranking = rank_evalset(model, valset, rerank=4, progress=False)
    assert calibrate_sca_threshold(ranking, valset.query_targets(), valset.gallery_targets()) == (threshold, table)
