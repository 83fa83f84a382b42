"""Run the app with uvicorn: in the foreground (``tpas serve``, the demo) or in a background thread
(browser test, load benchmark). We bind the socket ourselves so port 0 picks a free port and the
printed address is always the real one.

Before it says it is ready, the server answers one search request itself (:func:`warm_up`), so the
first user does not wait for FAISS, the token memory map, the model's first call or the web stack's
first request. It listens on the
loopback address unless told otherwise (``allow_remote``), and takes its bearer token from
``$TPAS_SERVE_TOKEN`` or a file, never from the command line, where ``ps`` would show it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tpas.errors import TpasError

log = logging.getLogger(__name__)

TOKEN_ENV = "TPAS_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_bind(host: str, allow_remote: bool, token: str | None) -> None:
    """Refuse a non-loopback address unless ``allow_remote``; warn when it has no token."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise TpasError(f"--host {host} makes the search server reachable from other machines; pass --allow-remote "
                        f"to mean it, and set a token (${TOKEN_ENV} or --token-file) so that only you can search")
    if not token:
        log.warning("listening on %s without a token: anyone who can reach this port can search the gallery "
                    "and read its images (set $%s or --token-file)", host, TOKEN_ENV)


def read_token(token_file: str | Path | None = None) -> str | None:
    """The bearer token: the first line of ``token_file``, else ``$TPAS_SERVE_TOKEN``, else None."""
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise TpasError(f"{token_file}: cannot read the token file ({exc})") from None
        token, where = (lines[0].strip() if lines else ""), str(token_file)
    else:
        token, where = os.environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}"
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
        raise TpasError(f"{where}: the token must be at least {MIN_TOKEN_CHARS} printable characters without spaces "
                        "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def bind_socket(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket; ``port=0`` lets the OS choose a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TpasError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (try another --port; 0 picks a free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _server(app: Any, log_level: str = "warning"):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=30, lifespan="off")
    return uvicorn.Server(config)


@dataclass
class RunningServer:
    """A uvicorn server in a daemon thread; ``stop()`` shuts it down and joins the thread."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> RunningServer:
    """Start ``app`` in a background thread and wait until it accepts connections."""
    sock = bind_socket(host, port)
    server = _server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="tpas-serve")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the search server did not start")
        time.sleep(0.02)
    return RunningServer(url_of(sock), server, thread)


def serve_forever(app: Any, host: str = "127.0.0.1", port: int = 8000,
                  announce: Callable[[str], None] = print, allow_remote: bool = False) -> None:
    """Serve until Ctrl-C, announcing the address once the socket is bound."""
    check_bind(host, allow_remote, getattr(app.state, "token", None))
    sock = bind_socket(host, port)
    announce(f"tpas: search page at {url_of(sock)}  (Ctrl-C to stop)")
    try:
        _server(app, log_level="info").run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; stopping is the normal end
        pass
    announce("tpas: search server stopped")


def read_examples(path: str | Path | None) -> list[str] | None:
    """Example queries for the page: one per line, blank lines and ``#`` comments ignored."""
    if path is None:
        return None
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def validated_rerank(model: Any) -> int:
    """The re-rank depth the page starts with: what the model's validation showed.

    Training records in the model config the depth its fusion weight was fitted at
    (``rerank_depth``) and the R@1 points re-ranking gained over ITC alone on validation
    (``rerank_gain``). Re-ranking is on by default only when both are there and the gain is
    positive; a model without that record (or where re-ranking did not help) starts with ITC only.
    """
    config = getattr(model, "config", None)
    depth, gain = getattr(config, "rerank_depth", None), getattr(config, "rerank_gain", None)
    if not depth or gain is None or gain <= 0:
        return 0
    return int(depth)


def warm_up(app: Any, text: str, rerank: int = 0) -> float:
    """Answer one search request before the server reports ready, in process, through the whole app
    (token check, validation, batcher, engine): the first user then pays neither for the lazy parts
    of the engine (FAISS read, token memory map, the model's first call) nor for the web stack's
    first request. Returns its milliseconds."""
    import asyncio
    from urllib.parse import urlencode

    token = getattr(app.state, "token", None)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/api/search", "raw_path": b"/api/search", "root_path": "",
             "query_string": urlencode({"q": text, "rerank": rerank}).encode(),
             "headers": [(b"authorization", f"Bearer {token}".encode())] if token else [],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    statuses: list[int] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    start = time.perf_counter()
    asyncio.run(app(scope, receive, send))
    ms = (time.perf_counter() - start) * 1000.0
    if statuses != [200]:
        log.warning("warm-up query answered %s; the first user's query may be slow", statuses)
    log.info("warmed up with one query in %.0f ms", ms)
    return ms


def load_engine(index: str | Path, model: str | Path, device: str | None = None, runtime: str = "torch"):
    """A :class:`~tpas.search.engine.SearchEngine` over ``index`` with the model from ``model``, run by
    ``runtime`` (:mod:`tpas.search.runtime`: "auto" = ONNX Runtime on a CPU)."""
    from tpas.models import create_model
    from tpas.search.engine import SearchEngine
    from tpas.search.runtime import OnnxModel, with_runtime

    engine = SearchEngine(index, with_runtime(create_model(model, device=device), runtime))
    if isinstance(engine.model, OnnxModel):  # export/open the graphs now, not in the first request
        engine.model.warm_up(("text", "itm") if engine.index.has_tokens else ("text",))
    return engine


def build_app_for(index: str | Path, model: str | Path, examples: Sequence[str] | None = None,
                  device: str | None = None, runtime: str = "torch", token: str | None = None, **kwargs: Any):
    """Engine + app in one call (``tpas serve`` and the demo), warmed up with one query; the page's
    re-rank default follows the model's validation (:func:`validated_rerank`)."""
    from tpas.serve.app import DEFAULT_EXAMPLES, create_app

    engine = load_engine(index, model, device=device, runtime=runtime)
    info = {"index": str(index), "model": str(model)}
    size = getattr(engine, "__len__", None)
    if size is not None:
        info["gallery_size"] = len(engine)
    kwargs.setdefault("default_rerank", validated_rerank(engine.model))
    app = create_app(engine, examples=examples, info=info, token=token, **kwargs)
    warm_up(app, (list(examples or ()) or list(DEFAULT_EXAMPLES))[0], app.state.default_rerank)
    return app
