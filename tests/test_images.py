"""The bad-image policy: pre-flight verdicts on real files, readers that list or skip, late failures."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
from PIL import Image
from readers_fixtures import make_pab

from tpas.data.images import (
    BadImagesError,
    bad_image_policy,
    handle_late_problems,
    image_problem,
    quick_problem,
    skipped,
)
from tpas.data.pab import read_pab_test, read_pab_train
from tpas.data.transforms import UnreadableImage, load_image


def encoded(fmt: str, size=(40, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 40, 200)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def fresh_ledger():
    skipped.reset()
    yield
    skipped.reset()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
def test_good_images_pass_and_cut_ones_are_caught_without_decoding_the_good(tmp_path, fmt):
    data = encoded(fmt)
    good, cut = tmp_path / "good", tmp_path / "cut"
    good.write_bytes(data)
    cut.write_bytes(data[: len(data) // 2])
    assert quick_problem(good) is None and image_problem(good) is None
    assert quick_problem(cut) is not None
    assert image_problem(cut) is not None


def test_verdicts_name_the_problem(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_text("<html>404 not found</html>")
    jpeg = encoded("JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpeg[:-300])
    (tmp_path / "padded.jpg").write_bytes(jpeg + b"\0" * 64)  # bytes after the end marker: still a good image
    (tmp_path / "folder.jpg").mkdir()
    assert image_problem(tmp_path / "nope.jpg") == "image not found"
    assert image_problem(tmp_path / "empty.jpg") == "empty file (0 bytes)"
    assert image_problem(tmp_path / "page.jpg").startswith("not a known image format (starts with b'<html>40')")
    assert image_problem(tmp_path / "cut.jpg").startswith("truncated JPEG (no end-of-image marker")
    assert "cannot decode" in image_problem(tmp_path / "cut.jpg")
    assert quick_problem(tmp_path / "padded.jpg") is not None and image_problem(tmp_path / "padded.jpg") is None
    assert image_problem(tmp_path / "folder.jpg") == "a folder, not an image file"


def test_load_image_raises_one_line_naming_the_file(tmp_path):
    (tmp_path / "x.jpg").write_bytes(encoded("JPEG")[:200])
    with pytest.raises(UnreadableImage) as err:
        load_image(tmp_path / "x.jpg")
    assert str(err.value).startswith(f"{tmp_path / 'x.jpg'}: cannot decode") and "\n" not in str(err.value)
    with pytest.raises(UnreadableImage, match="y.jpg: image not found"):
        load_image(tmp_path / "y.jpg")


def test_preflight_lists_every_bad_image_with_its_annotation_line(tmp_path):
    root = make_pab(tmp_path)
    (root / "test/imgs/1.jpg").write_bytes((root / "test/imgs/1.jpg").read_bytes()[:100])
    (root / "test/imgs/3.jpg").write_text("<html>")
    with pytest.raises(BadImagesError) as err:
        read_pab_test(root)
    lines = str(err.value).splitlines()
    assert lines[0].endswith("attr.json: 2 image references point at missing or unreadable files "
                             "(--on-bad-image skip drops those gallery images):")
    assert "attr.json:2: test/imgs/1.jpg: truncated JPEG" in lines[1]
    assert "attr.json:4: test/imgs/3.jpg: not a known image format" in lines[2]


def test_skip_drops_the_records_and_reports_them_at_the_end(tmp_path, caplog):
    root = make_pab(tmp_path, files=1, persons=2)
    (root / "train/imgs_0/goal/0.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    with caplog.at_level(logging.WARNING):
        train = read_pab_train(root, check_images=True, on_bad_image="skip")
    # line 1 has the bad image; line 2 has it as its hard image: both pairs go
    assert [p.image_id for p in train.pairs] == ["0_2", "0_3"]
    assert skipped.count == 2 and "attr_0.json:1: train/imgs_0/goal/0.jpg" in skipped.summary()
    assert skipped.summary().startswith("skipped 2 missing or unreadable images (--on-bad-image skip)")


def test_duplicate_training_ids_are_a_warning_when_training(tmp_path, caplog):
    root = make_pab(tmp_path, files=1, persons=2)
    train_file = root / "annotation/train/attr_0.json"
    with open(train_file, "a") as fh:
        fh.write(train_file.read_text().splitlines()[2] + "\n")
    with caplog.at_level(logging.WARNING):
        assert len(read_pab_train(root)) == 5
    assert "1 duplicate image_id lines" in caplog.text and "attr_0.json:5: duplicate image_id '0_2'" in caplog.text


def test_late_failures_stop_with_one_line_or_are_recorded():
    problems = ["/data/x.jpg: cannot decode: broken data stream"]
    with pytest.raises(BadImagesError) as err:
        handle_late_problems(problems)
    assert str(err.value).startswith("/data/x.jpg: cannot decode") and "\n" not in str(err.value)
    with bad_image_policy("skip"):
        handle_late_problems(problems)
    assert skipped.count == 1 and "x.jpg" in skipped.summary()
    with pytest.raises(ValueError):
        bad_image_policy("ignore").__enter__()


def test_training_loader_substitutes_a_pair_whose_image_does_not_decode(tmp_path):
    from tpas.data.loader import Collator, PairDataset, ShardedBatchSampler, build_train_loader
    from tpas.data.transforms import EvalTransform

    root = make_pab(tmp_path, files=1, persons=4)
    train = read_pab_train(root, check_images=True)
    # damage inside the data after the pre-flight: header and end marker intact
    good = (root / train.pairs[2].image).read_bytes()
    (root / train.pairs[2].image).write_bytes(good[:20] + b"\0" * (len(good) - 22) + good[-2:])
    dataset = PairDataset(train.pairs, root, EvalTransform((16, 8), (0.5,) * 3, (0.5,) * 3))
    item = dataset[2]
    assert item["index"] == 3 and item["bad_images"] and train.pairs[2].image in item["bad_images"][0]

    def collate(items):
        return Collator(lambda texts: (torch.zeros(len(texts), 4, dtype=torch.long),) * 2)(items)

    sampler = ShardedBatchSampler(len(dataset), batch_size=8)
    with pytest.raises(BadImagesError, match="passed the pre-flight check but does not decode"):
        list(build_train_loader(dataset, sampler, collate))
    batches = list(build_train_loader(dataset, sampler, collate, on_bad_image="skip"))
    assert len(batches) == 1 and batches[0]["images"].shape[0] == 8 and "bad_images" not in batches[0]
    assert skipped.count == 1


# ---------------------------------------------------------------- the commands: one line, never a traceback
TRAIN_CONFIG = """\
model: {name: lite-tiny}
data: {format: pab, val_identities: 0, workers: 0}
train: {max_steps: 1, batch_size: 4, progress: false, threads: 1}
val: {every: -1, calibrate_rerank: 0}
"""


def _damage_inside(path) -> None:
    """Keep the JPEG header and end marker, zero the data between: passes the pre-flight, fails decoding."""
    data = path.read_bytes()
    path.write_bytes(data[:20] + b"\0" * (len(data) - 22) + data[-2:])


def test_eval_with_a_cut_jpeg_stops_in_one_line_or_skips_and_says_so(tmp_path, capsys):
    from tpas.cli import main

    root = make_pab(tmp_path / "data")
    good = (root / "test/imgs/2.jpg").read_bytes()
    (root / "test/imgs/2.jpg").write_bytes(good[: len(good) // 2])
    argv = ["eval", "--model", "lite-tiny", "--data", str(root), "--out", str(tmp_path / "ev"), "--workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tpas eval: error: ") and "attr.json: 1 image reference points at" in err
    assert "Traceback" not in err
    assert "attr.json:3: test/imgs/2.jpg: truncated JPEG" in err
    assert main([*argv, "--on-bad-image", "skip"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tpas eval: skipped 1 missing or unreadable image (--on-bad-image skip): ")
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["settings"]["gallery"] == 3


def test_train_stops_before_training_on_a_missing_image_anywhere(tmp_path, capsys):
    from tpas.cli import main

    root = make_pab(tmp_path / "data", files=3, persons=4)  # 24 pairs, 6 batches of 4
    (root / "train/imgs_2/goal/3.jpg").unlink()  # a pair of the last file: never in a 1-step run's batch
    config = tmp_path / "tiny.yaml"
    config.write_text(TRAIN_CONFIG)
    argv = ["train", "--config", str(config), f"data.root={root}", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tpas train: error: " in err and "annotation/train: 2 image references point at" in err
    assert "Traceback" not in err
    assert "attr_2.json:7: train/imgs_2/goal/3.jpg: image not found" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # it stopped before the first step
    assert main([*argv, "--on-bad-image", "skip"]) == 0
    assert "tpas train: skipped 2 missing or unreadable images" in capsys.readouterr().err


def test_index_of_a_folder_with_a_broken_file(tmp_path, capsys):
    from tpas.cli import main

    folder = tmp_path / "imgs"
    for k in range(3):
        folder.mkdir(exist_ok=True)
        (folder / f"{k}.jpg").write_bytes(encoded("JPEG"))
    (folder / "3.jpg").write_text("<html>error page</html>")
    argv = ["index", "--model", "lite-tiny", "--images", str(folder), "--out", str(tmp_path / "idx"), "--workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tpas index: error: {folder}: 1 image reference points at")
    assert "3.jpg: not a known image format" in err
    assert main([*argv, "--on-bad-image", "skip"]) == 0
    captured = capsys.readouterr()
    assert "indexed 3 images" in captured.out and "skipped 1 missing or unreadable image" in captured.err


def test_an_image_that_fails_only_when_decoded_stops_encoding_in_one_line(tmp_path):
    from tpas.models import create_model
    from tpas.search.encode import encode_images

    paths = []
    for k in range(3):
        paths.append(tmp_path / f"{k}.jpg")
        paths[-1].write_bytes(encoded("JPEG"))
    _damage_inside(paths[1])
    assert quick_problem(paths[1]) is None  # the cheap look cannot see it
    model = create_model("lite-tiny")
    with pytest.raises(BadImagesError, match=r"1\.jpg: cannot decode.*passed the pre-flight check"):
        encode_images(model, paths, progress=False)
    with bad_image_policy("skip"):
        encoded_images = encode_images(model, paths, progress=False)
    assert encoded_images.embeds.shape[0] == 3 and skipped.count == 1  # a blank stand-in, reported


def test_eval_with_an_image_damaged_inside(tmp_path, capsys):
    from tpas.cli import main

    root = make_pab(tmp_path / "data")
    _damage_inside(root / "test/imgs/1.jpg")
    argv = ["eval", "--model", "lite-tiny", "--data", str(root), "--out", str(tmp_path / "ev"), "--workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tpas eval: error: ") and "1.jpg: cannot decode" in err[-1]
    assert main([*argv, "--on-bad-image", "skip"]) == 0  # encoded as a blank image; the report draws a grey frame
    assert "tpas eval: skipped 1 missing or unreadable image" in capsys.readouterr().err
    assert (tmp_path / "ev" / "report.html").is_file()
