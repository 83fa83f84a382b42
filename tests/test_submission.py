"""answer.txt: writing, reading back, and every problem check-answer must catch; metrics CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from readers_fixtures import make_challenge

from tpas.cli import main
from tpas.data.submission import check_answer, read_answer, write_answer
from tpas.eval import evaluate, evaluate_rankings


@pytest.fixture()
def challenge(tmp_path):
    return make_challenge(tmp_path / "challenge", queries=3, gallery=12)


def _rankings():
    return [[str((i + k) % 12) for k in range(12)] for i in range(3)]


def test_write_answer_round_trip(challenge, tmp_path):
    path = write_answer(tmp_path / "out" / "answer.txt", _rankings())
    text = path.read_text()
    assert text.splitlines()[0] == "0 1 2 3 4 5 6 7 8 9" and text.endswith("9 10 11\n")
    assert read_answer(path) == [r[:10] for r in _rankings()]
    assert check_answer(path, challenge / "query.json", challenge / "gallery") == []
    assert not list(path.parent.glob(".*tmp"))  # atomic write leaves no temp file


def test_write_answer_rejects_bad_rankings(tmp_path):
    with pytest.raises(ValueError, match="has 9 IDs"):
        write_answer(tmp_path / "a.txt", [[str(i) for i in range(9)]])
    with pytest.raises(ValueError, match="repeats an ID"):
        write_answer(tmp_path / "a.txt", [["1"] * 10])
    with pytest.raises(ValueError, match="whitespace"):
        write_answer(tmp_path / "a.txt", [["a b"] + [str(i) for i in range(9)]])
    assert not (tmp_path / "a.txt").exists()


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda lines: lines[:2], "2 lines, but"),
        (lambda lines: [lines[0] + " 11"] + lines[1:], ":1: 11 IDs, expected 10"),
        (lambda lines: [lines[0].replace(" 1 ", " 0 ")] + lines[1:], ":1: repeated IDs: 0"),
        (lambda lines: [lines[0].replace(" 5 ", " 99 ")] + lines[1:], ":1: IDs not in the gallery: 99"),
        (lambda lines: [lines[0].replace(" ", "  ", 1)] + lines[1:], ":1: IDs must be separated by single spaces"),
        (lambda lines: [lines[0], lines[1] + " "] + lines[2:], ":2: IDs must be separated by single spaces"),
        (lambda lines: [lines[0].replace(" ", "\t", 1)] + lines[1:], ":1: IDs must be separated by single spaces"),
        (lambda lines: [x + "\r" for x in lines], ":3: Windows line ending"),
    ],
)
def test_check_answer_problems(challenge, tmp_path, edit, problem):
    good = write_answer(tmp_path / "good.txt", _rankings()).read_text().splitlines()
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(edit(good)) + "\n", newline="")
    problems = check_answer(bad, challenge / "query.json", challenge / "gallery")
    assert any(problem in p for p in problems), problems
    # the CLI prints the problems and exits 1
    assert main(["check-answer", str(bad), "--queries", str(challenge / "query.json"),
                 "--gallery", str(challenge / "gallery")]) == 1


def test_check_answer_cli_ok_and_non_utf8(challenge, tmp_path, capsys):
    path = write_answer(tmp_path / "answer.txt", _rankings())
    args = ["--queries", str(challenge / "query.json"), "--gallery", str(challenge / "gallery")]
    assert main(["check-answer", str(path), *args]) == 0
    assert "OK" in capsys.readouterr().out
    path.write_bytes(b"\xff\xfe 1 2\n")
    assert main(["check-answer", str(path), *args]) == 1
    assert "not valid UTF-8" in capsys.readouterr().out
    assert main(["check-answer", str(tmp_path / "missing.txt"), *args]) == 2  # one-line error


def test_answer_scored_against_key(challenge, tmp_path):
    from tpas.data.datasets import load_eval

    evalset = load_eval(challenge, "pab", "challenge")  # key: query i -> gallery 11 - i
    rankings = [["11", *[str(k) for k in range(9)]], [str(k) for k in range(9)] + ["10"], [str(k) for k in range(9)] + ["11"]]
    result = evaluate_rankings(rankings, evalset.query_targets(), ks=(1, 10),
                               query_groups=evalset.query_groups())
    assert result["R@1"] == pytest.approx(100 / 3) and result["R@10"] == pytest.approx(200 / 3)
    assert result.groups["normal"]["R@1"] == 50.0


def test_metrics_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(6, 5)).astype(np.float32)
    qids, gids = ["a", "b", "c", "a", "b", "c"], ["a", "b", "c", "a", "x"]
    groups = ["normal", "anomaly"] * 3
    np.save(tmp_path / "s.npy", scores)
    for name, rows in (("q.txt", qids), ("g.txt", gids), ("qg.txt", groups)):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    out = tmp_path / "res" / "m.json"
    rc = main(["metrics", "--scores", str(tmp_path / "s.npy"), "--query-ids", str(tmp_path / "q.txt"),
               "--gallery-ids", str(tmp_path / "g.txt"), "--query-groups", str(tmp_path / "qg.txt"),
               "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| all | 6 |" in printed and "| anomaly | 3 |" in printed and str(out) in printed
    assert json.loads(out.read_text()) == evaluate(scores, qids, gids, query_groups=groups, ap_ks=(10,)).to_dict()
    assert "mAP@10" in printed
    # wrong row count -> one-line error, exit 2
    (tmp_path / "q.txt").write_text("a\nb\n")
    rc = main(["metrics", "--scores", str(tmp_path / "s.npy"), "--query-ids", str(tmp_path / "q.txt"),
               "--gallery-ids", str(tmp_path / "g.txt")])
    assert rc == 2 and "shape" in capsys.readouterr().err
    (tmp_path / "q.txt").write_text("a\n\nb\n")
    rc = main(["metrics", "--scores", str(tmp_path / "s.npy"), "--query-ids", str(tmp_path / "q.txt"),
               "--gallery-ids", str(tmp_path / "g.txt")])
    assert rc == 2 and "q.txt:2: empty line" in capsys.readouterr().err


def make_track4_set(root, queries=3, gallery=12, key=True):
    """A Track 4-shaped masked set: query_index.txt, query_text.json, gallery/, answer_key.json."""
    from readers_fixtures import tiny_jpeg, write_jsonl

    names = [f"Q{chr(ord('A') + i)}" for i in range(queries)]
    root.mkdir(parents=True)
    (root / "query_index.txt").write_text("".join(n + "\n" for n in names))
    (root / "query_text.json").write_text(json.dumps({n: f"caption {n}" for n in names}))
    for g in range(gallery):
        tiny_jpeg(root / "gallery" / f"G{g}.jpg", g)
    if key:  # query i -> image G<2i>
        write_jsonl(root / "answer_key.json", [{"query_id": n, "image_id": f"G{2 * i}", "behaviour": "normal"}
                                               for i, n in enumerate(names)])
    return root


def test_track4_answer_zip_checked_and_scored(tmp_path, capsys):
    import zipfile

    from tpas.data.submission import zip_answer

    data = make_track4_set(tmp_path / "t4")
    # query 0 finds G0 at rank 1, query 1 finds G2 at rank 4, query 2 misses G4
    rankings = [[f"G{g}" for g in order] for order in ([0, 1, 3, 5, 6, 7, 8, 9, 10, 11],
                                                       [1, 3, 5, 2, 6, 7, 8, 9, 10, 11],
                                                       [0, 1, 2, 3, 5, 6, 7, 8, 9, 10])]
    txt = write_answer(tmp_path / "answer.txt", rankings)
    archive = zip_answer(txt, tmp_path / "answer.zip")
    assert zipfile.ZipFile(archive).namelist() == ["answer.txt"] and read_answer(archive) == rankings
    assert check_answer(archive, data / "query_index.txt", data / "gallery") == []
    assert main(["check-answer", str(archive), "--data", str(data)]) == 0
    out = tmp_path / "m.json"
    assert main(["metrics", "--answer", str(archive), "--data", str(data), "--json", str(out)]) == 0
    scored = json.loads(out.read_text())
    assert scored["R@1"] == pytest.approx(100 / 3) and scored["R@5"] == pytest.approx(200 / 3)
    assert scored["mAP@10"] == pytest.approx(100 * (1 + 1 / 4 + 0) / 3)  # the Track 4 leaderboard figure
    assert "| all | 3 |" in capsys.readouterr().out
    # a zip with anything but answer.txt, or an answer with a line too few, is rejected
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.write(txt, "results/answer.txt")
    assert main(["check-answer", str(tmp_path / "bad.zip"), "--data", str(data)]) == 2
    assert "exactly one file, answer.txt" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("\n".join(" ".join(r) for r in rankings[:2]) + "\n")
    problems = check_answer(tmp_path / "short.txt", data / "query_index.txt", data / "gallery")
    assert any("2 lines, but" in p and "3 queries" in p for p in problems)
    assert main(["check-answer", str(txt)]) == 2  # neither --data nor --queries/--gallery
