"""Fusion of several systems: the two formulas, id alignment of external scores, and `tpas fuse`."""

import json

import numpy as np
import pytest
import torch
from test_eval_run import make_evalset, make_pab

from tpas.cli import main
from tpas.errors import DataError, TpasError
from tpas.eval.fusion import System, external_system, fuse_systems, run_fusion
from tpas.search.fusion import fuse_scores


def test_minmax_is_global_not_per_query():
    a = np.array([[0.2, 0.4], [0.6, 1.0]], np.float32)  # min 0.2, max 1.0
    b = np.array([[4.0, 0.0], [0.0, 10.0]], np.float32)  # min 0, max 10
    got = fuse_scores([a, b], "minmax", weights=[1.0, 2.0])
    want = (a - 0.2) / 0.8 + 2 * b / 10
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0].max() != got[1].max()  # each query keeps its own level of confidence


def test_rrf_ranks_with_ties_by_gallery_order_and_depth():
    a = np.array([[0.9, 0.1, 0.5, 0.5]], np.float32)  # ranks 1, 4, 2, 3 (the tie keeps gallery order)
    b = np.array([[0.0, 0.3, 0.2, 0.1]], np.float32)  # ranks 4, 1, 2, 3
    got = fuse_scores([a, b], "rrf", k=60)
    want = np.array([[1 / 61 + 1 / 64, 1 / 64 + 1 / 61, 1 / 62 + 1 / 62, 1 / 63 + 1 / 63]])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    shallow = fuse_scores([a, b], "rrf", k=60, depth=2)
    np.testing.assert_allclose(shallow, [[1 / 61, 1 / 61, 2 / 62, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        fuse_scores([a, b[:, :3]], "rrf")


def test_external_scores_are_aligned_by_id(tmp_path):
    evalset = make_evalset(tmp_path / "data", n=4)
    q_ids = [q.query_id for q in evalset.queries][::-1] + ["unused"]
    g_ids = [g.image_id for g in evalset.gallery][::-1]
    scores = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    np.save(tmp_path / "s.npy", scores)
    (tmp_path / "q.txt").write_text("\n".join(q_ids) + "\n")
    (tmp_path / "g.txt").write_text("\n".join(g_ids) + "\n")
    system = external_system(tmp_path / "s.npy", tmp_path / "q.txt", tmp_path / "g.txt", evalset)
    np.testing.assert_array_equal(system.scores, scores[:4][::-1, ::-1])  # back in the split's order
    (tmp_path / "g.txt").write_text("\n".join(g_ids[:3] + ["zzz"]) + "\n")
    with pytest.raises(DataError, match="g.txt: 1 of the split's 4 gallery ids are not in this file"):
        external_system(tmp_path / "s.npy", tmp_path / "q.txt", tmp_path / "g.txt", evalset)


def test_minmax_refuses_per_query_normalised_systems():
    s = np.eye(3, dtype=np.float32)
    with pytest.raises(TpasError, match="min-max fusion needs scores comparable"):
        fuse_systems([System("a", s), System("b", s, comparable=False)], "minmax")
    ranking = fuse_systems([System("a", s, text_embeds=np.ones((3, 2), np.float32)), System("b", s)], "rrf")
    assert ranking.scorer == "rrf" and ranking.text_embeds.shape == (3, 2)


def test_run_fusion_post_processes_the_fused_scores(tmp_path):
    evalset = make_evalset(tmp_path / "data", n=6)
    # queries 0 and 1 both put image 0 first: query 0 (whose image it is) is sure, query 1 is not
    # and has its own image close behind, so the assignment moves query 1 there
    a = np.full((6, 6), 0.0, np.float32)
    np.fill_diagonal(a, 0.5)
    a[0, :2] = [0.9, 0.1]
    a[1, :2] = [0.6, 0.55]
    plain = run_fusion([System("a", a), System("b", a.copy())], evalset, method="minmax")
    fixed = run_fusion([System("a", a), System("b", a.copy())], evalset, method="minmax", post="assign",
                       post_options={"k": 2, "slack": 1.0}, out_dir=tmp_path / "out")
    assert plain.metrics["R@1"] == pytest.approx(100 * 5 / 6) and fixed.metrics["R@1"] == 100.0
    assert fixed.settings["scorer"] == "minmax" and fixed.settings["model_family"] is None
    assert json.loads((tmp_path / "out" / "fusion.json").read_text())["systems"][1]["name"] == "b"


def test_cli_fuses_a_model_and_an_external_system(tmp_path, capsys):
    from tpas.models import create_model

    data = make_pab(tmp_path / "data", n=8)
    torch.manual_seed(0)
    model_dir = create_model("lite-tiny").save_pretrained(tmp_path / "model")
    q_ids = [f"{i}_0#0" for i in range(8)]
    g_ids = [f"{i}_0" for i in range(8)]
    np.save(tmp_path / "oracle.npy", np.eye(8, dtype=np.float32))  # an external system that is always right
    (tmp_path / "q.txt").write_text("\n".join(q_ids) + "\n")
    (tmp_path / "g.txt").write_text("\n".join(g_ids) + "\n")
    oracle = f"{tmp_path / 'oracle.npy'},{tmp_path / 'q.txt'},{tmp_path / 'g.txt'}"
    assert main(["fuse", "--data", str(data), "--system", str(model_dir), "--system", f"{oracle}@10",
                 "--out", str(tmp_path / "f"), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| fused 2 (rrf, post=none) | 8 | 100.00 |" in printed  # the heavier oracle decides every top-1
    saved = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert saved["settings"]["scorer"] == "rrf" and saved["R@1"] == 100.0
    assert main(["fuse", "--data", str(data), "--system", "a.npy,b.txt", "--out", str(tmp_path / "g")]) == 2
    assert "expected a model, or SCORES.npy" in capsys.readouterr().err
