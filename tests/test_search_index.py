import json

import numpy as np
import pytest
import torch
from PIL import Image

import tpas.search.encode as encode_mod
from tpas.data.records import GalleryImage
from tpas.errors import TpasError
from tpas.models import create_model
from tpas.search.encode import encode_images
from tpas.commands.search import describe_search
from tpas.search.index import build_index, gallery_from_folder, open_index


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("lite-tiny")


@pytest.fixture()
def gallery(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    images = []
    for i in range(7):
        rel = f"sub/{i}.png" if i % 2 else f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)).save(root / rel)
        images.append(GalleryImage(image=rel, image_id=f"g{i}", target=str(i)))
    return root, images


def test_build_open_and_tokens(model, gallery, tmp_path):
    root, images = gallery
    out = build_index(model, images, root, tmp_path / "idx", batch_size=2, chunk_size=3, progress=False)
    index = open_index(out, model)
    assert len(index) == 7 and index.ids == [g.image_id for g in images]
    direct = encode_images(model, [root / g.image for g in images], keep_tokens=True, progress=False)
    np.testing.assert_allclose(index.embeds, direct.embeds, atol=1e-5)
    rows = np.array([6, 0, 3, 3])
    np.testing.assert_allclose(index.tokens[rows].astype(np.float32), direct.tokens[rows].astype(np.float32),
                               atol=2e-3)
    scores, found = index.search(direct.embeds[[4]], k=3)
    assert found[0, 0] == 4 and scores.shape == (1, 3)
    assert index.image_path("g1") == root.resolve() / "sub/1.png"
    with pytest.raises(KeyError):
        index.image_path("../etc/passwd")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 7 and meta["embed_dim"] == model.config.embed_dim and len(meta["model_sha256"]) == 64


def test_other_model_is_refused(model, gallery, tmp_path):
    root, images = gallery
    out = build_index(model, images, root, tmp_path / "idx", progress=False)
    other = create_model("lite-tiny", seed=1)  # same name, another seed: other weights
    with pytest.raises(TpasError, match="different model"):
        open_index(out, other)
    with pytest.raises(TpasError, match="another model"):
        build_index(other, images, root, out, progress=False)


def test_interrupted_build_resumes(model, gallery, tmp_path, monkeypatch):
    root, images = gallery
    real = encode_mod.iter_image_batches
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        yield from real(*args, **kwargs)

    monkeypatch.setattr(encode_mod, "iter_image_batches", flaky)
    out = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        build_index(model, images, root, out, chunk_size=3, progress=False)
    progress = json.loads(next((out / "shards").iterdir()).joinpath("progress.json").read_text())
    assert progress["done"] == [0] and not progress["complete"]
    with pytest.raises(TpasError, match="incomplete"):
        open_index(out)
    calls.clear()
    monkeypatch.setattr(encode_mod, "iter_image_batches", lambda *a, **k: (calls.append(1), (yield from real(*a, **k)))[1])
    build_index(model, images, root, out, chunk_size=3, progress=False)
    assert len(calls) == 2  # only chunks 1 and 2 were encoded again
    fresh = build_index(model, images, root, tmp_path / "fresh", chunk_size=3, progress=False)
    np.testing.assert_allclose(open_index(out).embeds, open_index(fresh).embeds, atol=1e-6)


def test_sharded_build_merges(model, gallery, tmp_path, monkeypatch):
    import tpas.search.index as index_mod

    root, images = gallery
    out = tmp_path / "idx"
    # two "processes" one after the other: rank 1 only writes its shard, rank 0 writes its own and merges
    monkeypatch.setattr(index_mod, "_barrier", lambda world_size: None)
    build_index(model, images, root, out, rank=1, world_size=2, chunk_size=2, progress=False)
    assert not (out / "meta.json").exists()
    build_index(model, images, root, out, rank=0, world_size=2, chunk_size=2, progress=False)
    index = open_index(out, model)
    assert [s["start"] for s in index.meta["token_shards"]] == [0, 3]
    single = open_index(build_index(model, images, root, tmp_path / "one", progress=False))
    np.testing.assert_allclose(index.embeds, single.embeds, atol=1e-5)
    np.testing.assert_allclose(index.tokens[np.arange(7)].astype(np.float32),
                               single.tokens[np.arange(7)].astype(np.float32), atol=2e-3)


def test_gallery_from_folder(gallery):
    root, images = gallery
    found = gallery_from_folder(root)
    assert sorted(g.image_id for g in found) == sorted(["0", "2", "4", "6", "sub/1", "sub/3", "sub/5"])


@pytest.mark.slow
def test_two_processes_under_a_process_group(model, gallery, tmp_path):
    """Two real processes (RANK/WORLD_SIZE as `accelerate launch` sets them) write one index."""
    import os
    import socket
    import subprocess
    import sys

    root, images = gallery
    model_dir = model.save_pretrained(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from tpas.models import create_model\n"
        "from tpas.search.index import build_index, gallery_from_folder\n"
        "root, model_dir, out = sys.argv[1:4]\n"
        "build_index(create_model(model_dir), gallery_from_folder(root), root, out, chunk_size=2, token_codec='int4',\n"
        "            progress=False)\n"
    )
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(root), str(model_dir), str(tmp_path / "idx")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    index = open_index(tmp_path / "idx", model)
    assert [s["path"].split("/")[1] for s in index.meta["token_shards"]] == ["00000-of-00002", "00001-of-00002"]
    single = open_index(build_index(model, gallery_from_folder(root), root, tmp_path / "one", token_codec="int4",
                                    progress=False))
    assert index.ids == single.ids
    np.testing.assert_allclose(index.embeds, single.embeds, atol=1e-5)
    assert index.meta["search"] == single.meta["search"] and index.meta["token_bytes"] == single.meta["token_bytes"]
    rows = np.arange(len(index))  # the int4 codes of both builds decode alike (a code may flip at a rounding edge)
    np.testing.assert_allclose(index.tokens[rows], single.tokens[rows], atol=0.05)
    assert (index.search(index.embeds, 3)[1] == single.search(single.embeds, 3)[1]).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_faiss_kinds(model, gallery, tmp_path, kind):
    root, images = gallery
    out = build_index(model, images, root, tmp_path / "idx", progress=False)
    build_index(model, images, root, out, faiss_kind=kind, progress=False)  # same encodings, new FAISS only
    index = open_index(out, model)
    assert index.meta["faiss"] == kind
    scores, rows = index.search(index.embeds[[2, 5]], k=3)
    assert rows[:, 0].tolist() == [2, 5]


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_compact_token_store(model, gallery, tmp_path, codec):
    from tpas.search.quantize import decode_tokens, encode_tokens, token_bytes

    root, images = gallery
    out = build_index(model, images, root, tmp_path / "idx", token_codec=codec, chunk_size=3, progress=False)
    index = open_index(out, model)
    direct = encode_images(model, [root / g.image for g in images], keep_tokens=True, progress=False)
    rows = np.array([6, 0, 3, 3])
    codes, scales = encode_tokens(direct.tokens[rows], codec)  # the store holds exactly these codes
    np.testing.assert_allclose(index.tokens[rows], decode_tokens(codes, scales, codec, direct.tokens.shape[-1]),
                               atol=1e-6)
    shard = out / index.meta["token_shards"][0]["path"]
    on_disk = shard.stat().st_size + shard.with_name("token_scales.npy").stat().st_size
    per_image = token_bytes(index.meta["token_shape"], codec)
    assert index.meta["token_codec"] == codec and index.meta["token_bytes"] == per_image
    assert per_image * 7 <= on_disk <= per_image * 7 + 512  # + two .npy headers
    with pytest.raises(TpasError, match="token codec"):
        build_index(model, images, root, out, token_codec="fp16", progress=False)


def test_auto_kind_tunes_and_records_recall(model, tmp_path, monkeypatch):
    import tpas.search.index as index_mod

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    root.mkdir()
    images = []
    for i in range(120):
        Image.fromarray(rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
        images.append(GalleryImage(image=f"{i}.png", image_id=f"g{i}", target=None))
    assert index_mod.resolve_kind("auto", index_mod.EXACT_MAX) == "flat"
    assert index_mod.resolve_kind("auto", index_mod.EXACT_MAX + 1) == "ivf"
    monkeypatch.setattr(index_mod, "EXACT_MAX", 100)  # 120 images count as "large"
    out = build_index(model, images, root, tmp_path / "idx", keep_tokens=False, target_recall=0.9,
                      tuning_queries=50, progress=False)
    index = open_index(out, model)
    search = index.meta["search"]
    assert index.meta["faiss"] == search["kind"] == "ivf" and search["param"] == "nprobe"
    assert search["recall_at_10"] >= 0.9 and str(search["depth"]) in search["curve"]
    # the stored recall is what the opened index really gives on the same queries
    queries = index_mod.caption_queries(model, 50)
    _, exact = index_mod.faiss_knn(queries, index.embeds, 10)
    _, found = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), exact.tolist())])
    assert recall == pytest.approx(search["recall_at_10"], abs=1e-4)
    assert "nprobe=" in describe_search(index.meta) and "recall@10" in describe_search(index.meta)


def test_version_1_index_still_opens(model, gallery, tmp_path):
    root, images = gallery
    out = build_index(model, images, root, tmp_path / "idx", progress=False)
    meta = json.loads((out / "meta.json").read_text())
    for key in ("search", "token_codec", "token_bytes"):
        meta.pop(key)
    (out / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    index = open_index(out, model)
    assert index.tokens[np.array([1])].dtype == np.float16
    assert index.search(index.embeds[[3]], k=2)[1][0, 0] == 3
    (out / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(TpasError, match="rebuild"):
        open_index(out, model)


def test_cli_choices_match_the_library():
    import tpas.commands.search as cli
    import tpas.search.index as index_mod
    from tpas.search.quantize import TOKEN_CODECS

    assert cli.FAISS_KINDS == index_mod.FAISS_KINDS and cli.EXACT_MAX == index_mod.EXACT_MAX
    assert cli.TOKEN_CODECS == TOKEN_CODECS
