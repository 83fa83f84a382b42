"""Readers: every format loads into records; every bad input fails naming file, line and field."""

from __future__ import annotations

import json
import logging
import re

import pytest
from readers_fixtures import make_challenge, make_pab, make_tbps, tbps_entries, tiny_jpeg, write_jsonl

from tpas.data.datasets import FORMATS, load_eval, load_train
from tpas.data.jsonl import iter_jsonl, read_json_list
from tpas.data.pab import (
    attach_challenge_key,
    read_challenge_key,
    read_pab_challenge,
    read_pab_test,
    read_pab_train,
    train_files,
)
from tpas.data.records import Behaviour
from tpas.errors import DataError


# ---------------------------------------------------------------- PAB train
def test_pab_train_fields(tmp_path):
    root = make_pab(tmp_path, files=2, persons=2)
    train = read_pab_train(root)
    assert len(train) == 8 and train.root == root
    first = train.pairs[0]
    assert first.image == "train/imgs_0/goal/0.jpg" and first.image_id == "0_0"
    assert first.person_id == "0_0"  # normal and anomalous image are different targets
    assert first.behaviour is Behaviour.NORMAL and first.action == "Walking" and first.scene == "street"
    assert first.hard_image == "train/imgs_0/full/0.jpg" and first.hard_image_id == "0_1"
    assert first.hard_caption == train.pairs[1].caption
    assert first.source_id == "0_0" and first.source_caption == "someone on a street 0"
    assert train.pairs[1].behaviour is Behaviour.ANOMALY and train.pairs[1].action == "Falling"
    assert (root / first.image).is_file() and (root / first.hard_image).is_file()


def test_pab_train_numeric_file_order_and_kinds(tmp_path):
    root = make_pab(tmp_path, files=12, persons=1, images=False)
    names = [p.name for p in train_files(root)]
    assert names == [f"attr_{i}.json" for i in range(12)]  # attr_2 before attr_10
    assert [p.image_id for p in read_pab_train(root).pairs][::2] == [f"{i}_0" for i in range(12)]
    with pytest.raises(DataError, match=r"pair_<n>\.json"):
        read_pab_train(root, files="pair")


def test_pab_pair_files_have_unknown_behaviour(tmp_path):
    root = make_pab(tmp_path, files=1, kind="pair", images=False)
    train = read_pab_train(root, files="auto")
    assert {p.behaviour for p in train.pairs} == {Behaviour.UNKNOWN} and train.pairs[0].scene is None


def test_pab_train_missing_images(tmp_path, caplog):
    root = make_pab(tmp_path, files=1, persons=2)
    (root / "train/imgs_0/full/1.jpg").unlink()  # anomaly image of person 1 = hard image of its partner
    assert len(read_pab_train(root)) == 4  # images are not looked up by default
    with pytest.raises(DataError) as err:
        read_pab_train(root, check_images=True)
    lines = str(err.value).splitlines()  # every reference is listed, one line each, with its annotation line
    assert "annotation/train: 2 image references point at" in lines[0] and "--on-bad-image skip" in lines[0]
    assert re.search(r"attr_0\.json:3: train/imgs_0/full/1\.jpg: image not found \(looked for .*full/1\.jpg\)", lines[1])
    assert re.search(r"attr_0\.json:4: train/imgs_0/full/1\.jpg: image not found", lines[2])
    with caplog.at_level(logging.WARNING):
        train = read_pab_train(root, check_images=True, on_bad_image="skip")
    assert [p.image_id for p in train.pairs] == ["0_0", "0_1"]
    assert "skipped 2 pairs" in caplog.text and "full/1.jpg" in caplog.text


# ---------------------------------------------------------------- PAB test / UCC
def test_pab_test_and_ucc(tmp_path):
    root = make_pab(tmp_path)
    test = read_pab_test(root)
    assert [g.image_id for g in test.gallery] == ["t_0", "t_1", "t_2", "t_3"]
    assert len(test.queries) == 8 and test.queries[1].query_id == "t_0#1"
    assert test.queries[2].target == "t_1" and test.queries[2].behaviour is Behaviour.ANOMALY
    assert test.gallery[0].behaviour is Behaviour.NORMAL and test.gallery[0].action == "Standing"
    assert test.query_groups()[:4] == ["normal", "normal", "anomaly", "anomaly"]
    ucc = load_eval(root, "pab", "ucc")
    assert len(ucc.gallery) == 3 and ucc.queries[0].behaviour is Behaviour.UNKNOWN


def test_pab_test_falls_back_to_pair_json(tmp_path):
    root = make_pab(tmp_path)
    (root / "annotation/test/attr.json").rename(root / "annotation/test/pair.json")
    assert len(read_pab_test(root).gallery) == 4


def test_pab_test_missing_image_skip_drops_its_queries(tmp_path, caplog):
    root = make_pab(tmp_path)
    (root / "test/imgs/2.jpg").unlink()
    with pytest.raises(DataError, match=r"attr\.json:3: test/imgs/2\.jpg: image not found"):
        read_pab_test(root)
    with caplog.at_level(logging.WARNING):
        test = read_pab_test(root, on_bad_image="skip")
    assert "t_2" not in {g.image_id for g in test.gallery} and "t_2" not in {q.target for q in test.queries}
    assert "skipped 1 gallery images" in caplog.text


# ---------------------------------------------------------------- challenge
def test_challenge_and_answer_key(tmp_path):
    root = make_challenge(tmp_path, queries=3, gallery=12)
    masked = read_pab_challenge(root)
    assert [q.query_id for q in masked.queries] == ["0", "1", "2"] and not masked.has_ground_truth
    assert [g.image_id for g in masked.gallery][:3] == ["0", "1", "2"]  # numeric order, not 0, 1, 10
    assert masked.gallery[10].image == "gallery/10.jpg"
    assert read_challenge_key(root / "answer_key.json") == {0: "11", 1: "10", 2: "9"}
    keyed = load_eval(root, "pab", "challenge")  # attaches answer_key.json when present
    assert keyed.has_ground_truth and keyed.queries[1].target == "10"
    assert keyed.queries[1].behaviour is Behaviour.ANOMALY
    assert all(g.target == g.image_id for g in keyed.gallery)


def test_challenge_key_problems(tmp_path):
    root = make_challenge(tmp_path, key=False)
    masked = read_pab_challenge(root)
    write_jsonl(root / "k1.json", [{"query_index": 0, "image_id": "5"}])
    with pytest.raises(DataError, match="query_index 1 of query.json has no answer"):
        attach_challenge_key(masked, root / "k1.json")
    write_jsonl(root / "k2.json", [{"query_index": i, "image_id": "nope"} for i in range(3)])
    with pytest.raises(DataError, match="'nope' is not in the gallery"):
        attach_challenge_key(masked, root / "k2.json")
    write_jsonl(root / "k3.json", [{"query_index": 0, "image_id": "1", "behaviour": "weird"}])
    with pytest.raises(DataError, match=r"k3\.json:1: field 'behaviour'"):
        read_challenge_key(root / "k3.json")


def test_challenge_duplicate_ids(tmp_path):
    root = make_challenge(tmp_path, key=False)
    (root / "gallery/3.jpg").rename(root / "gallery/3.png")
    (root / "gallery/3.jpeg").write_bytes((root / "gallery/4.jpg").read_bytes())
    with pytest.raises(DataError, match="duplicate gallery id '3'"):
        read_pab_challenge(root)
    root2 = make_challenge(tmp_path / "b", key=False)
    write_jsonl(root2 / "query.json", [{"query_index": 0, "caption": "a"}, {"query_index": 0, "caption": "b"}])
    with pytest.raises(DataError, match=r"query\.json:2: duplicate query_index 0 \(first seen on line 1\)"):
        read_pab_challenge(root2)


# ---------------------------------------------------------------- TBPS
@pytest.mark.parametrize("fmt", ["cuhk", "icfg", "rstp"])
def test_tbps_formats(tmp_path, fmt):
    root = make_tbps(tmp_path, fmt)
    train = load_train(root, fmt)
    assert len(train) == 8  # 4 images x 2 captions
    assert train.pairs[0].image == "imgs/train/" + ("1_0.jpg" if fmt == "cuhk" else "0_0.jpg")
    assert train.pairs[0].person_id == ("1" if fmt == "cuhk" else "0")
    assert train.pairs[0].person_id == train.pairs[2].person_id  # same person, other view
    test = load_eval(root, fmt, "test")
    assert len(test.gallery) == 4 and len(test.queries) == 8
    q = test.queries[0]
    assert sum(g.target == q.target for g in test.gallery) == 2  # several positives per query
    assert q.query_id == test.gallery[0].image_id + "#0"
    if fmt != "icfg":
        assert len(load_eval(root, fmt, "val").gallery) == 4
    else:
        with pytest.raises(ValueError, match="splits are test"):
            load_eval(root, fmt, "val")


def test_tbps_bad_entries(tmp_path):
    entries = tbps_entries("rstp")
    del entries[3]["img_path"]
    (tmp_path / "data_captions.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"data_captions\.json: entry 3: missing required field 'img_path'"):
        load_train(tmp_path, "rstp")
    entries = tbps_entries("cuhk")
    entries[9]["captions"] = ["ok", "  "]
    (tmp_path / "reid_raw.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry 9: field 'captions'\[1\] is an empty caption"):
        load_eval(tmp_path, "cuhk", "test", check_images=False)
    entries = tbps_entries("cuhk")
    entries[9]["file_path"] = entries[8]["file_path"]
    (tmp_path / "reid_raw.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry 9: duplicate image 'imgs/test/.*' \(first seen at entry 8\)"):
        load_eval(tmp_path, "cuhk", "test", check_images=False)
    (tmp_path / "reid_raw.json").write_text('[{"split": "train",}]')
    with pytest.raises(DataError, match=r"reid_raw\.json:1: malformed JSON"):
        load_train(tmp_path, "cuhk")


def test_tbps_missing_image(tmp_path):
    root = make_tbps(tmp_path, "icfg")
    (root / "imgs/test/3_1.jpg").unlink()
    with pytest.raises(DataError, match=r"ICFG-PEDES\.json: entry 7: imgs/test/3_1\.jpg: image not found"):
        load_eval(root, "icfg")
    assert len(load_eval(root, "icfg", on_bad_image="skip").gallery) == 3


def test_unknown_format_and_split(tmp_path):
    assert FORMATS == ("pab", "cuhk", "icfg", "rstp")
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_train(tmp_path, "coco")
    with pytest.raises(ValueError, match="evaluation splits"):
        load_eval(tmp_path, "pab", "train")


# ---------------------------------------------------------------- bad JSON lines
def _bad_line(tmp_path, line: bytes):
    root = make_pab(tmp_path, files=1, persons=1, images=False)
    path = root / "annotation/train/attr_0.json"
    path.write_bytes(path.read_bytes() + line + b"\n")
    return root


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"image": "train/x.jpg", "caption": "a"', r"attr_0\.json:3: malformed JSON: the line ends at column 40 "),
        (b'{"image": "train/x.jpg", "caption": "a man wal', r"attr_0\.json:3: malformed JSON: the line ends at column "
                                                           r"47 inside a string that starts at column 37"),
        (b'{"image": "train/x.jpg",, "caption": "a"}', r"attr_0\.json:3: malformed JSON at column 25: Expecting"),
        (b'{"caption": "a", "image_id": "1"}', r"attr_0\.json:3: missing required field 'image'"),
        (b'{"image": "x.jpg", "caption": "a"}', r"attr_0\.json:3: missing required field 'image_id'"),
        (b'{"image": "x.jpg", "caption": "   ", "image_id": "1"}', r"attr_0\.json:3: field 'caption' is an empty caption"),
        (b'{"image": "x.jpg", "caption": 5, "image_id": "1"}', r"attr_0\.json:3: field 'caption' must be a string"),
        (b'{"image": "x.jpg", "caption": "caf\xe9", "image_id": "1"}', r"attr_0\.json:3: not valid UTF-8"),
        (b'[1, 2]', r"attr_0\.json:3: expected a JSON object"),
        (b'{"image": "x.jpg", "caption": "a", "image_id": "1", "normal": "a", "anomaly": "b"}', "both 'normal' and 'anomaly'"),
    ],
)
def test_bad_train_lines(tmp_path, line, message):
    root = _bad_line(tmp_path, line)
    with pytest.raises(DataError, match=message):
        read_pab_train(root)


def test_bad_test_lines(tmp_path):
    root = make_pab(tmp_path, images=False)
    path = root / "annotation/test/attr.json"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    write_jsonl(path, rows + [dict(rows[1])])
    with pytest.raises(DataError, match=r"attr\.json:5: duplicate image_id 't_1' \(first seen on line 2\)"):
        read_pab_test(root, check_images=False)
    write_jsonl(path, rows[:1] + [dict(rows[1], caption=[])])
    with pytest.raises(DataError, match=r"attr\.json:2: field 'caption' is an empty list"):
        read_pab_test(root, check_images=False)


def test_blank_lines_and_bom_are_fine(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n  \n{"a": 2}\n')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]
    with pytest.raises(DataError, match="file not found"):
        list(iter_jsonl(tmp_path / "nope.json"))
    (tmp_path / "l.json").write_bytes(b'[{"a": 1}, 3]')
    with pytest.raises(DataError, match="entry 1: expected a JSON object"):
        read_json_list(tmp_path / "l.json")


def test_tbps_non_utf8_and_missing_file(tmp_path):
    (tmp_path / "data_captions.json").write_bytes(b'[\n{"split": "train", "captions": ["caf\xe9"]}]')
    with pytest.raises(DataError, match=r"data_captions\.json:2: not valid UTF-8"):
        load_train(tmp_path, "rstp")
    with pytest.raises(DataError, match=r"no reid_raw\.json \(is this a cuhk dataset root\?\)"):
        load_train(tmp_path, "cuhk")


# ---------------------------------------------------------------- AICity'26 Track 4
def make_track4(root, names=("QB", "QA", "QC"), gallery=6):
    (root / "query_index.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "query_index.txt").write_text("".join(n + "\n" for n in names))
    (root / "query_text.json").write_text(json.dumps({n: f"caption of {n}" for n in names}))
    for g in range(gallery):
        tiny_jpeg(root / "gallery" / f"G{g}.jpg", g)
    return root


def test_track4_reader_keeps_query_index_order(tmp_path):
    from tpas.data.pab import read_track4

    root = make_track4(tmp_path / "track4")
    masked = read_track4(root)
    assert [q.query_id for q in masked.queries] == ["QB", "QA", "QC"] and not masked.has_ground_truth
    assert masked.queries[1].caption == "caption of QA" and masked.name.startswith("pab-track4")
    assert [g.image_id for g in masked.gallery] == [f"G{g}" for g in range(6)]
    write_jsonl(root / "answer_key.json", [{"query_id": n, "image_id": f"G{i}", "behaviour": "anomaly"}
                                           for i, n in enumerate(("QA", "QB", "QC"))])
    keyed = load_eval(tmp_path, "pab", "track4")  # a dataset root holding track4/ will do
    assert [q.target for q in keyed.queries] == ["G1", "G0", "G2"] and keyed.queries[0].behaviour is Behaviour.ANOMALY


@pytest.mark.parametrize("edit, problem", [
    (lambda r: (r / "query_index.txt").write_text("QA\n\nQB\n"), r"query_index\.txt:2: expected one query name"),
    (lambda r: (r / "query_index.txt").write_text("QA\nQB\nQA\n"), r"query_index\.txt:3: duplicate query name 'QA'"),
    (lambda r: (r / "query_index.txt").write_text("QA\nQ Z\n"), r"query_index\.txt:2: expected one query name"),
    (lambda r: (r / "query_text.json").write_text('{"QB": "x", "QA": "y"}'), r"query_text\.json: 1 query names"),
    (lambda r: (r / "query_text.json").write_text('{"QB": "x",\n "QA": }'), r"query_text\.json:2: not valid JSON"),
    (lambda r: (r / "query_text.json").write_text('["x"]'), r"query_text\.json: expected one JSON object"),
    (lambda r: (r / "query_text.json").write_text('{"QB": "", "QA": "y", "QC": "z"}'), r"query 'QB': the caption"),
])
def test_track4_reader_problems(tmp_path, edit, problem):
    from tpas.data.pab import read_track4

    root = make_track4(tmp_path / "t4")
    edit(root)
    with pytest.raises(DataError, match=problem):
        read_track4(root)
