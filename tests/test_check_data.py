"""check-data: missing and corrupt images are found, listed, and written to the report."""

from __future__ import annotations

import json

import pytest
from readers_fixtures import make_challenge, make_pab, make_tbps

from tpas.cli import main
from tpas.data.check import check_dataset, default_splits


def _damage(root):
    (root / "train/imgs_1/goal/0.jpg").unlink()  # missing
    good = (root / "test/imgs/1.jpg").read_bytes()
    (root / "test/imgs/1.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (root / "test/ucc/0.jpg").write_text("<html>not an image</html>")  # wrong content


def test_clean_pab(tmp_path):
    root = make_pab(tmp_path)
    report = check_dataset(root, "pab", workers=2, progress=False)
    assert report.ok and report.splits == ["train", "test", "ucc"]
    assert report.counts["train pairs"] == 8 and report.counts["test queries"] == 8
    assert report.counts["distinct images"] == 8 + 4 + 3


def test_missing_and_corrupt_are_listed(tmp_path, capsys):
    root = make_pab(tmp_path / "pab")
    _damage(root)
    out = tmp_path / "reports" / "check.json"
    rc = main(["check-data", str(root), "--format", "pab", "--workers", "2", "--report", str(out)])
    assert rc == 1
    printed = capsys.readouterr().out
    assert "missing images: 1" in printed and "train/imgs_1/goal/0.jpg" in printed
    assert "corrupt images: 2" in printed and "test/imgs/1.jpg" in printed and "test/ucc/0.jpg" in printed
    assert "PROBLEMS FOUND" in printed and str(out) in printed
    report = json.loads(out.read_text())
    assert report["ok"] is False and report["missing"] == ["train/imgs_1/goal/0.jpg"]
    assert sorted(c["path"] for c in report["corrupt"]) == ["test/imgs/1.jpg", "test/ucc/0.jpg"]
    assert all(c["reason"] for c in report["corrupt"])


def test_summary_shows_first_20_report_has_all(tmp_path):
    root = make_pab(tmp_path, files=15, persons=1)
    for f in range(15):
        (root / f"train/imgs_{f}/goal/0.jpg").unlink()
        (root / f"train/imgs_{f}/full/0.jpg").unlink()
    report = check_dataset(root, "pab", splits=["train"], workers=2, progress=False)
    assert len(report.missing) == 30
    text = report.summary()
    assert "missing images: 30 (first 20 shown)" in text
    assert sum(line.startswith("    train/") for line in text.splitlines()) == 20
    path = report.save(tmp_path / "r.json")
    assert len(json.loads(path.read_text())["missing"]) == 30


def test_annotation_errors_are_reported_not_raised(tmp_path):
    root = make_pab(tmp_path)
    with open(root / "annotation/test/attr.json", "a") as fh:
        fh.write('{"image": "x.jpg"\n')
    report = check_dataset(root, "pab", workers=1, progress=False)
    assert not report.ok and len(report.annotation_errors) == 1
    assert "attr.json:5: malformed JSON" in report.annotation_errors[0]
    assert report.counts["train pairs"] == 8  # the other splits were still checked


def test_every_annotation_problem_of_a_split_is_listed_and_its_images_still_checked(tmp_path):
    root = make_pab(tmp_path)
    test = root / "annotation/test/attr.json"
    lines = test.read_text().splitlines()
    lines[0] = lines[0][: len(lines[0]) // 2]  # a line cut short
    lines[2] = lines[2].replace('"caption"', '"captions"')  # a missing field
    test.write_text("\n".join(lines) + "\n")
    (root / "test/imgs/3.jpg").unlink()  # an image of a line that still parses
    report = check_dataset(root, "pab", splits=["test"], workers=1, progress=False)
    assert report.annotation_error_count == 2
    assert "attr.json:1: malformed JSON: the line ends at column" in report.annotation_errors[0]
    assert "attr.json:3: missing required field 'caption'" in report.annotation_errors[1]
    assert report.missing == ["test/imgs/3.jpg"] and report.counts["test gallery images"] == 2
    assert not report.ok and "missing images: 1" in report.summary()


def test_duplicate_ids_in_training_and_test_files_are_problems(tmp_path):
    root = make_pab(tmp_path)
    train = root / "annotation/train/attr_1.json"
    first = train.read_text().splitlines()[0]
    with open(train, "a") as fh:
        fh.write(first + "\n")  # the same training line twice
    test = root / "annotation/test/ucc.json"
    with open(test, "a") as fh:
        fh.write(test.read_text().splitlines()[1] + "\n")
    report = check_dataset(root, "pab", workers=1, progress=False)
    assert report.annotation_error_count == 2, report.annotation_errors
    assert "attr_1.json:5: duplicate image_id '1_0' (first seen at line 1)" in report.annotation_errors[0]
    assert "ucc.json:4: duplicate image_id 'u_1' (first seen on line 2)" in report.annotation_errors[1]
    assert not report.ok


def test_a_split_whose_file_cannot_be_read_says_its_images_were_not_checked(tmp_path, capsys):
    root = make_pab(tmp_path)
    (root / "annotation/test/ucc.json").unlink()
    report = check_dataset(root, "pab", splits=["test", "ucc"], workers=1, progress=False)
    assert report.unchecked_splits == ["ucc"] and "ucc.json" in report.annotation_errors[0]
    text = report.summary()
    assert "images of split 'ucc' NOT checked" in text and "PROBLEMS FOUND" in text
    assert "missing images: 0 (split ucc NOT checked)" in text  # never a bare "0" for images nobody looked at


def test_problems_are_capped_on_screen_with_a_count(tmp_path):
    root = make_pab(tmp_path)
    with open(root / "annotation/test/attr.json", "a") as fh:
        fh.write("{broken\n" * 30)
    report = check_dataset(root, "pab", splits=["test"], workers=1, progress=False)
    text = report.summary(show=20)
    assert report.annotation_error_count == 30 and "annotation problems: 30 (first 20 shown)" in text
    assert sum("malformed JSON" in line for line in text.splitlines()) == 20


@pytest.mark.parametrize("fmt", ["cuhk", "icfg", "rstp"])
def test_tbps_check(tmp_path, fmt):
    root = make_tbps(tmp_path, fmt)
    report = check_dataset(root, fmt, workers=2, progress=False)
    assert report.ok, report.summary()
    assert report.counts["distinct images"] == len(default_splits(root, fmt)) * 4


def test_challenge_split_and_cli_ok(tmp_path, capsys, monkeypatch):
    root = make_challenge(tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    assert main(["check-data", str(root), "--format", "pab", "--split", "challenge"]) == 0
    assert "result: OK" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing written where it was run, unasked
    assert main(["check-data", str(root), "--format", "pab", "--report", "r.json"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["challenge gallery images"] == 12
    assert main(["check-data", str(tmp_path / "nowhere"), "--format", "pab"]) == 2


def test_challenge_subfolder_of_a_pab_root(tmp_path):
    root = make_pab(tmp_path)
    make_challenge(root / "challenge", gallery=5)
    (root / "challenge/gallery/2.jpg").write_bytes(b"GIF89a broken")
    report = check_dataset(root, "pab", workers=2, progress=False)
    assert report.splits == ["train", "test", "ucc", "challenge"]
    assert report.counts["challenge queries"] == 3
    assert [c["path"] for c in report.corrupt] == ["challenge/gallery/2.jpg"]
