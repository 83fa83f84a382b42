"""Search server: API shape, input limits, image serving and path tricks, non-blocking inference."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from fastapi.testclient import TestClient

from tpas.search.engine import Hit
from tpas.serve.app import Limits, create_app


class FakeEngine:
    """Same two methods as SearchEngine: deterministic scores, a dict from id to file."""

    def __init__(self, paths: dict[str, Path], delay: float = 0.0):
        self.paths = paths
        self.delay = delay
        self.calls: list[tuple[str, int, int]] = []
        self.active = 0
        self.max_active = 0
        self._count_lock = threading.Lock()

    def search(self, text: str, k: int = 10, rerank: int = 0) -> list[Hit]:
        with self._count_lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            self.calls.append((text, k, rerank))
            ids = sorted(self.paths, key=lambda i: (hash((text, i)) % 1000, i))[:k]
            hits = []
            for rank, image_id in enumerate(ids, 1):
                itc = 1.0 / rank
                itm = 0.9 / rank if rerank and rank <= rerank else None
                hits.append(Hit(rank, image_id, itm if itm is not None else itc, itc, itm, self.paths[image_id]))
            return hits
        finally:
            with self._count_lock:
                self.active -= 1

    def image_path(self, image_id: str) -> Path:
        return self.paths[image_id]  # KeyError for unknown ids, like the real engine


def build_tiny_engine(folder: Path):
    """A real SearchEngine over 12 generated images indexed with the random ``lite-tiny`` model."""
    import numpy as np
    import torch

    from tpas.models import create_model
    from tpas.search.engine import SearchEngine
    from tpas.search.index import build_index, gallery_from_folder

    images = folder / "images"
    rng = np.random.default_rng(0)
    for i in range(12):
        sub = images / ("cam_a" if i % 2 else "cam_b")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = np.full((128, 64, 3), rng.integers(30, 220, size=3), dtype=np.uint8)
        pixels[20:110, 16:48] = rng.integers(0, 255, size=3)
        Image.fromarray(pixels).save(sub / f"{i:03d}.jpg")
    torch.manual_seed(0)
    model = create_model("lite-tiny").eval()
    build_index(model, gallery_from_folder(images), images, folder / "index", progress=False)
    return SearchEngine(folder / "index", model)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("tiny_index"))


@pytest.fixture()
def gallery(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "gallery"
    root.mkdir()
    paths = {}
    for i, colour in enumerate(["red", "green", "blue", "yellow", "purple", "orange"]):
        p = root / f"{i:04d}.jpg"
        Image.new("RGB", (32, 64), colour).save(p)
        paths[f"{i:04d}"] = p
    # an id with a slash and a space: must still round-trip through the URL
    odd = root / "cam 1"
    odd.mkdir()
    Image.new("RGB", (32, 64), "white").save(odd / "x.png")
    paths["cam 1/x"] = odd / "x.png"
    # files the server must never hand out
    (tmp_path / "secret.txt").write_text("top secret")
    (root / "notes.txt").write_text("not an image")
    return paths


@pytest.fixture()
def client(gallery) -> TestClient:
    return TestClient(create_app(FakeEngine(gallery), examples=["a man in red", "  ", "a woman falls"]))


def test_search_returns_results(client, gallery):
    r = client.get("/api/search", params={"q": "  a man   in red ", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "a man in red" and body["k"] == 3 and body["rerank"] == 0
    assert body["latency_ms"] >= 0
    assert [h["rank"] for h in body["results"]] == [1, 2, 3]
    for hit in body["results"]:
        assert set(hit) == {"rank", "id", "score", "itc_score", "itm_score", "url"}
        assert hit["itm_score"] is None
        img = client.get(hit["url"])
        assert img.status_code == 200 and img.headers["content-type"].startswith("image/")
        assert img.content == gallery[hit["id"]].read_bytes()


def test_search_with_rerank_reports_itm(client):
    body = client.get("/api/search", params={"q": "a woman falls", "k": 5, "rerank": 2}).json()
    assert body["rerank"] == 2
    itm = [h["itm_score"] for h in body["results"]]
    assert itm[0] is not None and itm[1] is not None and itm[2] is None


def test_odd_id_round_trips(client, gallery):
    from urllib.parse import quote

    r = client.get("/images/" + quote("cam 1/x", safe=""))
    assert r.status_code == 200 and r.content == gallery["cam 1/x"].read_bytes()


@pytest.mark.parametrize(
    "params, field",
    [
        ({}, "q"),
        ({"q": ""}, "q"),
        ({"q": "   "}, "q"),
        ({"q": "x" * 301}, "q"),
        ({"q": "man", "k": 0}, "k"),
        ({"q": "man", "k": 101}, "k"),
        ({"q": "man", "k": "ten"}, "k"),
        ({"q": "man", "rerank": -1}, "rerank"),
        ({"q": "man", "rerank": 101}, "rerank"),
    ],
)
def test_bad_parameters_are_422_with_reason(client, params, field):
    r = client.get("/api/search", params=params)
    assert r.status_code == 422
    body = r.json()
    assert body["error"].startswith(field + ":"), body


def test_limits_are_configurable(gallery):
    c = TestClient(create_app(FakeEngine(gallery), limits=Limits(max_query_chars=10, max_k=3, max_rerank=0)))
    assert c.get("/api/search", params={"q": "x" * 11}).status_code == 422
    assert c.get("/api/search", params={"q": "man", "k": 4}).status_code == 422
    assert c.get("/api/search", params={"q": "man", "rerank": 1}).status_code == 422
    assert c.get("/api/search", params={"q": "man", "k": 3}).status_code == 200
    assert c.get("/api/examples").json()["limits"] == {"max_query_chars": 10, "max_k": 3, "max_rerank": 0}


@pytest.mark.parametrize(
    "raw",
    [
        "/images/9999",
        "/images/secret.txt",
        "/images/notes",
        "/images/..%2Fsecret.txt",
        "/images/..%2F..%2Fsecret.txt",
        "/images/%2E%2E%2Fsecret.txt",
        "/images/%2e%2e/%2e%2e/secret.txt",
        "/images/..%5Csecret.txt",
        "/images/%252E%252E%252Fsecret.txt",
        "/images/0000%00.jpg",
        "/images/%2Fetc%2Fpasswd",
        "/images//etc/passwd",
        "/images/0000.jpg",
        "/images/" + "a" * 300,
    ],
)
def test_unknown_ids_and_path_tricks_are_refused(client, raw):
    r = client.get(raw)
    assert r.status_code in (404, 422), (raw, r.status_code)
    assert b"top secret" not in r.content and b"root:" not in r.content
    assert r.headers["content-type"].startswith("application/json")


def test_raw_dot_segments_never_escape(gallery):
    """Send the path bytes unnormalised (httpx would collapse ``..``) straight to the ASGI app."""
    app = create_app(FakeEngine(gallery))

    async def raw_get(path: str) -> tuple[int, bytes]:
        sent: list[dict] = []
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 1),
                 "server": ("testserver", 80)}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return status, body

    for path in ["/images/../secret.txt", "/images/../../secret.txt", "/images/./0000/../../secret.txt",
                 "/images/" + str(gallery["0000"]), "/images/" + str(gallery["0000"].parent / ".." / "secret.txt")]:
        status, body = asyncio.run(raw_get(path))
        assert status == 404 and b"top secret" not in body, path


def test_missing_file_and_non_image_are_404(gallery, tmp_path):
    paths = dict(gallery)
    paths["gone"] = tmp_path / "gone.jpg"
    paths["text"] = tmp_path / "secret.txt"  # even a listed id must be an image file
    c = TestClient(create_app(FakeEngine(paths)))
    assert c.get("/images/gone").status_code == 404
    r = c.get("/images/text")
    assert r.status_code == 404 and b"top secret" not in r.content


def test_page_examples_and_health(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="query"' in page.text and "/static/app.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200 and "https://" not in r.text
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/api/examples").json()["examples"] == ["a man in red", "a woman falls"]
    assert client.get("/healthz").json()["status"] == "ok"


def test_inference_does_not_block_the_event_loop(gallery):
    """A slow search runs in the threadpool: /healthz answers meanwhile; searches run one at a time."""
    import httpx

    engine = FakeEngine(gallery, delay=1.0)
    app = create_app(engine)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            t0 = time.perf_counter()
            searches = [asyncio.create_task(c.get("/api/search", params={"q": f"man {i}"})) for i in range(2)]
            await asyncio.sleep(0.05)
            health = await c.get("/healthz")
            health_s = time.perf_counter() - t0
            results = await asyncio.gather(*searches)
            return health.status_code, health_s, [r.status_code for r in results], time.perf_counter() - t0

    status, health_s, codes, total_s = asyncio.run(scenario())
    assert status == 200 and health_s < 0.8, health_s  # a blocked loop would answer after >= 1 s
    assert codes == [200, 200]
    assert engine.max_active == 1 and total_s >= 2.0  # the model lock serialises inference


def test_serve_command_registered():
    from tpas.cli import build_parser

    args = build_parser().parse_args(["serve", "--index", "i", "--model", "m"])
    assert args.host == "127.0.0.1" and args.port == 8000


def test_real_engine_end_to_end(tiny_engine):
    """The app over a real SearchEngine + index: ITC and ITM re-ranked results, images by id."""
    c = TestClient(create_app(tiny_engine, info={"gallery_size": len(tiny_engine)}))
    body = c.get("/api/search", params={"q": "a man in a red jacket", "k": 5}).json()
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    assert all(h["itm_score"] is None and h["id"].startswith("cam_") for h in body["results"])
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    reranked = c.get("/api/search", params={"q": "a man in a red jacket", "k": 5, "rerank": 3}).json()["results"]
    assert [h["itm_score"] is not None for h in reranked] == [True] * 3 + [False] * 2
    everything = c.get("/api/search", params={"q": "person", "k": 100}).json()["results"]
    assert len(everything) == 12  # k larger than the gallery: all of it, no padding
    url = body["results"][0]["url"]
    assert "%2F" in url  # ids with "/" are quoted into one path segment
    img = c.get(url)
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert img.content == tiny_engine.image_path(body["results"][0]["id"]).read_bytes()
    assert c.get("/images/cam_a").status_code == 404
    assert c.get("/images/cam_a%2F001.jpg").status_code == 404  # the file name is not the id
    assert c.get("/images/..%2Findex%2Fmeta.json").status_code == 404
    assert c.get("/healthz").json()["gallery_size"] == 12


class FailingEngine(FakeEngine):
    def search(self, text, k=10, rerank=0):
        if text == "boom":
            raise RuntimeError("model crashed")
        raise ValueError("no usable words in the query")


def test_engine_errors_become_json(gallery):
    c = TestClient(create_app(FailingEngine(gallery)), raise_server_exceptions=False)
    r = c.get("/api/search", params={"q": "zzz"})
    assert r.status_code == 422 and "no usable words" in r.json()["error"]
    r = c.get("/api/search", params={"q": "boom"})
    assert r.status_code == 500 and r.json() == {"error": "search failed; see the server log"}


def test_index_without_tokens_turns_rerank_off(gallery):
    engine = FakeEngine(gallery)
    engine.index = type("NoTokens", (), {"has_tokens": False})()
    c = TestClient(create_app(engine))
    assert c.get("/api/examples").json()["limits"]["max_rerank"] == 0
    assert c.get("/api/search", params={"q": "man", "rerank": 4}).status_code == 422
    assert c.get("/api/search", params={"q": "man"}).status_code == 200


def test_busy_port_is_a_clear_error():
    from tpas.errors import TpasError
    from tpas.serve.run import bind_socket

    first = bind_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(TpasError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
    finally:
        first.close()


class BatchingEngine(FakeEngine):
    """FakeEngine with ``search_batch``: records each call's (number of texts, rerank)."""

    def __init__(self, paths, delay=0.0):
        super().__init__(paths, delay)
        self.batches: list[tuple[int, int]] = []

    def search_batch(self, texts, k=10, rerank=0):
        self.batches.append((len(texts), rerank))
        if self.delay:
            time.sleep(self.delay)
        return [FakeEngine.search(self, t, k=k, rerank=rerank) for t in texts]


def test_concurrent_queries_share_model_calls(gallery):
    import httpx

    engine = BatchingEngine(gallery, delay=0.3)
    reference = FakeEngine(gallery)
    app = create_app(engine, max_batch=4)
    requests = [(f"person {i}", 1 + i % 5, (i % 2) * 3) for i in range(10)]

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.get("/api/search", params={"q": q, "k": k, "rerank": r})
                                          for q, k, r in requests))

    responses = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in responses)
    for (q, k, rerank), r in zip(requests, responses):
        body = r.json()
        expected = reference.search(q, k=k, rerank=rerank)
        assert [h["id"] for h in body["results"]] == [h.image_id for h in expected]
        assert [h["itm_score"] for h in body["results"]] == [h.itm_score for h in expected]
        assert body["k"] == k and body["rerank"] == rerank and 1 <= body["batch"] <= 4
    assert sum(n for n, _ in engine.batches) == 10 and len(engine.batches) < 10
    assert max(n for n, _ in engine.batches) <= 4


def test_batched_real_engine_matches_single_search(tiny_engine):
    from tpas.serve.batching import SearchBatcher

    texts = ["a man in a red jacket", "a woman is running", "someone falls off a bicycle", "a man in a red jacket"]

    async def scenario():
        batcher = SearchBatcher(tiny_engine, max_batch=8)
        return await asyncio.gather(*(batcher.search(t, 3 + i, 5) for i, t in enumerate(texts))), batcher.calls

    results, calls = asyncio.run(scenario())
    assert calls < len(texts)
    for i, (text, (hits, _, batch)) in enumerate(zip(texts, results)):
        single = tiny_engine.search(text, k=3 + i, rerank=5)
        assert [h.image_id for h in hits] == [h.image_id for h in single]
        assert [h.score for h in hits] == pytest.approx([h.score for h in single], abs=1e-4)


def test_tpas_serve_command_end_to_end(tiny_engine, tmp_path):
    """``tpas serve`` in its own process: announces a 127.0.0.1 address, answers, stops on SIGINT."""
    import re
    import signal
    import subprocess
    import sys

    import httpx

    model_dir = tiny_engine.model.save_pretrained(tmp_path / "model")
    examples = tmp_path / "examples.txt"
    examples.write_text("# comment\na man in a red jacket\n\na woman is running\n")
    proc = subprocess.Popen([sys.executable, "-m", "tpas.cli", "serve", "--index", str(tiny_engine.index.directory),
                             "--model", str(model_dir), "--port", "0", "--examples", str(examples)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, before = None, []
        for line in proc.stdout:
            before.append(line)
            match = re.search(r"search page at (http://\S+/)", line)
            if match:
                url = match.group(1)
                break
        assert url and url.startswith("http://127.0.0.1:"), url
        assert not any("faiss" in line for line in before), before  # no "could not load AVX2" noise
        assert any("warmed up with one query" in line for line in before), before
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(url + "healthz", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server never answered"
                time.sleep(0.2)
        assert health["gallery_size"] == 12
        assert httpx.get(url + "api/examples").json()["examples"] == ["a man in a red jacket", "a woman is running"]
        body = httpx.get(url + "api/search", params={"q": "a man", "k": 2, "rerank": 2}).json()
        assert len(body["results"]) == 2 and body["results"][0]["itm_score"] is not None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


def test_whitespace_is_collapsed_before_the_length_limit(client):
    padded = "man" + " " * 400 + "running"
    r = client.get("/api/search", params={"q": padded})
    assert r.status_code == 200 and r.json()["query"] == "man running"
    r = client.get("/api/search", params={"q": "x" * 301})
    assert r.status_code == 422 and r.json()["error"] == "q: at most 300 characters (this one has 301)"


def test_queries_the_model_cannot_read_say_so(tiny_engine, client):
    real = TestClient(create_app(tiny_engine))
    for c in (real, client):  # the real WordPiece tokenizer, and a fake engine without one
        for q in ("😀🏃‍♀️", "一个穿红衣服的男人在跑步", "%%%"):
            body = c.get("/api/search", params={"q": q}).json()
            assert body["understood"] is False and "arbitrary" in body["notice"], q
            assert len(body["results"]) > 0  # still answered, with the notice
        body = c.get("/api/search", params={"q": "a man in red running 😀"}).json()
        assert body["understood"] is True and body["notice"] is None
    body = real.get("/api/search?q=%FF%FE%FD").json()  # bytes that are not UTF-8
    assert body["understood"] is False and "not UTF-8" in body["notice"]


TOKEN = "tok-0123456789abcdef-XYZ"


def test_a_token_guards_every_api_and_image_request_but_not_the_page(gallery):
    c = TestClient(create_app(FakeEngine(gallery), token=TOKEN))
    good, wrong = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer nope-nope-nope-nope"}
    for url in ("/", "/static/app.js", "/static/style.css"):
        assert c.get(url).status_code == 200, url
    for url in ("/api/search?q=man", "/api/examples", "/images/0000", "/healthz"):
        for headers in ({}, wrong, {"Authorization": TOKEN}):
            r = c.get(url, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (url, headers)
            assert "Authorization: Bearer" in r.json()["error"]
        assert c.get(url, headers=good).status_code == 200, url


def test_the_token_comes_from_the_environment_or_a_file_never_the_command_line(tmp_path, monkeypatch):
    from tpas.cli import build_parser
    from tpas.errors import TpasError
    from tpas.serve.run import read_token

    monkeypatch.delenv("TPAS_SERVE_TOKEN", raising=False)
    assert read_token() is None
    monkeypatch.setenv("TPAS_SERVE_TOKEN", TOKEN)
    assert read_token() == TOKEN
    (tmp_path / "t").write_text("file-token-0123456789\n")
    assert read_token(tmp_path / "t") == "file-token-0123456789"
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(TpasError, match="at least 16"):
        read_token(tmp_path / "short")
    with pytest.raises(TpasError, match="cannot read the token file"):
        read_token(tmp_path / "missing")
    with pytest.raises(SystemExit):  # there is no option that would put it in `ps` output
        build_parser().parse_args(["serve", "--index", "i", "--model", "m", "--token", TOKEN])


def test_listening_beyond_this_machine_needs_an_explicit_flag(capsys, caplog):
    from tpas.cli import main
    from tpas.errors import TpasError
    from tpas.serve.run import check_bind

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_bind(host, allow_remote=False, token=None)
    with pytest.raises(TpasError, match="--allow-remote"):
        check_bind("0.0.0.0", allow_remote=False, token=TOKEN)
    check_bind("0.0.0.0", allow_remote=True, token=TOKEN)
    with caplog.at_level("WARNING"):
        check_bind("192.168.1.5", allow_remote=True, token=None)
    assert "without a token" in caplog.text
    # refused before the index or the model is even looked at
    assert main(["serve", "--index", "/nowhere", "--model", "/nowhere", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allow-remote" in err


def test_the_page_default_follows_the_models_validation(gallery):
    from types import SimpleNamespace

    from tpas.serve.run import validated_rerank

    def model(**fields):
        return SimpleNamespace(config=SimpleNamespace(rerank_weight=0.3, **fields))

    assert validated_rerank(model()) == 0  # nothing recorded: ITC only
    assert validated_rerank(model(rerank_depth=16, rerank_gain=-0.8)) == 0  # re-ranking hurt on validation
    assert validated_rerank(model(rerank_depth=16, rerank_gain=1.2)) == 16
    c = TestClient(create_app(FakeEngine(gallery), default_rerank=16, limits=Limits(max_rerank=8)))
    assert c.get("/api/examples").json()["defaults"] == {"rerank": 8}  # never above what a request may ask
    assert TestClient(create_app(FakeEngine(gallery))).get("/api/examples").json()["defaults"] == {"rerank": 0}


def test_build_app_for_warms_up_before_it_returns(tiny_engine, tmp_path, caplog):
    from tpas.serve.run import build_app_for

    model_dir = tiny_engine.model.save_pretrained(tmp_path / "model")
    with caplog.at_level("INFO"):
        app = build_app_for(tiny_engine.index.directory, model_dir, examples=["a man is running"], token=TOKEN)
    engine = app.state.engine
    assert engine.index._faiss is not None  # FAISS was read before the first user asked
    assert "warmed up with one query" in caplog.text and "warm-up query answered" not in caplog.text  # a 200
    assert app.state.default_rerank == 0  # this model records no validated re-ranking gain
    c = TestClient(app)  # the app still answers normally afterwards
    assert c.get("/api/search", params={"q": "a woman"}, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
