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
        assert result[key] == pytest.approx(ref[key], abs=1e-6)
    assert set(result["groups"]) == {"normal", "anomaly"} and result["groups"]["anomaly"]["num_queries"] == 4
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["R@1"] == pytest.approx(result["R@1"]) and saved["settings"]["post"] == "none"
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count('class="c hit"') + page.count('class="c miss"') == 10 * 12
    assert page.count('class="c hit"') >= 1 and "data:image/jpeg;base64," in page
    assert not (tmp_path / "out" / "answer.txt").exists()


def test_rerank_and_post_run(model, tmp_path):
    evalset = make_evalset(tmp_path / "data")
    index_dir = tmp_path / "index"
    base = run_eval(model, evalset, rerank=4, out_dir=tmp_path / "a", index_dir=index_dir, progress=False)
    assert base["settings"]["rerank"] == 4 and 0 <= base["R@1"] <= 100
    for post, options in (("sca", {}), ("one_to_one", {"k": 5}), ("dual_softmax", {"temperature": 0.1})):
        res = run_eval(model, evalset, rerank=4, post=post, post_options=options, out_dir=tmp_path / post,
                       index_dir=index_dir, progress=False)
        assert res["num_queries"] == 12 and res["settings"]["post"] == post


def test_score_cache_scores_once_and_stays_intact(model, tmp_path, monkeypatch):
    import tpas.eval.run as eval_run

    evalset = make_evalset(tmp_path / "data")
    calls = []
    original = eval_run.score_queries
    monkeypatch.setattr(eval_run, "score_queries", lambda *a, **kw: calls.append(kw["rerank"]) or original(*a, **kw))
    cache: dict = {}
    index_dir = tmp_path / "index"
    plain = run_eval(model, evalset, rerank=4, index_dir=index_dir, score_cache=cache, progress=False)
    post = run_eval(model, evalset, rerank=4, post="dual_softmax", index_dir=index_dir, score_cache=cache,
                    progress=False)
    again = run_eval(model, evalset, rerank=4, index_dir=index_dir, score_cache=cache, progress=False)
    assert calls == [4]  # scored once; the post-processed run did not alter the cached matrix
    assert post["settings"]["post"] == "dual_softmax"
    assert {k: again[k] for k in ("R@1", "mAP")} == {k: plain[k] for k in ("R@1", "mAP")}


def test_model_carried_fusion_weight_is_used(model, tmp_path):
    from tpas.search.rerank import DEFAULT_WEIGHT, resolve_weight

    evalset = make_evalset(tmp_path / "data")
    assert resolve_weight(model, None) == DEFAULT_WEIGHT and resolve_weight(model, 0.5) == 0.5
    model.config.rerank_weight = 7.0
    try:
        res = run_eval(model, evalset, rerank=4, index_dir=tmp_path / "index", progress=False)
    finally:
        model.config.rerank_weight = None
    assert res["settings"]["fusion_weight"] == 7.0


def test_challenge_writes_answer(model, tmp_path):
    masked = make_evalset(tmp_path / "data", name="pab-challenge:tiny")
    masked.queries = [Query(q.query_id, q.caption, None) for q in masked.queries]
    result = run_eval(model, masked, out_dir=tmp_path / "out", progress=False)
    lines = (tmp_path / "out" / "answer.txt").read_text().splitlines()
    assert len(lines) == 12 and all(len(line.split(" ")) == 10 for line in lines)
    assert "R@1" not in result and "answer" in result["outputs"]
    keyed = make_evalset(tmp_path / "data2", name="pab-challenge:tiny")
    result = run_eval(model, keyed, out_dir=tmp_path / "out2", progress=False)
    assert result["answer_scores"]["R@1"] == pytest.approx(result["R@1"])
    assert result["answer_scores"]["R@10"] == pytest.approx(result["R@10"])


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
    other = create_model("lite-tiny")
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
