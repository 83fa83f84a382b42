"""Run the app with uvicorn: in the foreground (``tpas serve``, the demo) or in a background thread
(browser test, load benchmark). We bind the socket ourselves so port 0 picks a free port and the
printed address is always the real one."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tpas.errors import TpasError

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


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
                  announce: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C, announcing the address once the socket is bound."""
    if host not in LOOPBACK:
        log.warning("listening on %s: the server is reachable from other machines (no authentication)", host)
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
                  device: str | None = None, runtime: str = "torch", **kwargs: Any):
    """Engine + app in one call (``tpas serve`` and the demo)."""
    from tpas.serve.app import create_app

    engine = load_engine(index, model, device=device, runtime=runtime)
    info = {"index": str(index), "model": str(model)}
    size = getattr(engine, "__len__", None)
    if size is not None:
        info["gallery_size"] = len(engine)
    return create_app(engine, examples=examples, info=info, **kwargs)
