"""FastAPI app over a search engine: a JSON search API, gallery images, and a small web page.

The app only needs an object with ``search(text, k, rerank) -> list[Hit]`` and
``image_path(image_id) -> Path`` (raising ``KeyError`` for unknown ids), so tests can hand it a
fake engine and ``tpas serve`` hands it a real :class:`tpas.search.engine.SearchEngine`.

Security model: image ids are looked up in the engine's index and never joined into a path, so a
request can only ever read a file the index already lists. With a ``token``, every API and image
request must carry ``Authorization: Bearer <token>`` (:class:`BearerAuth`); the page itself holds
no data and loads without it, then asks for the token. Model inference runs in the threadpool, one
call at a time, so the event loop keeps answering while the model works; queries that arrive
meanwhile share the next call (``SearchBatcher``).

Queries: whitespace is collapsed before the length limit applies, and a query in which the model
knows no word (emoji, another script, bytes that were not UTF-8) is answered with a ``notice``
saying that its results are arbitrary (:func:`query_notice`).
"""

from __future__ import annotations

import hmac
import logging
import mimetypes
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, Sequence
from urllib.parse import quote

from tpas.errors import TpasError
from tpas.serve.batching import SearchBatcher

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Shown on the page when the caller passes no examples (phrased like mini-PAB / PAB captions).
DEFAULT_EXAMPLES: tuple[str, ...] = (
    "a man in a red jacket and black trousers is running across the street",
    "a woman in a white shirt and blue jeans falls down on the pavement",
    "a person with a backpack is walking slowly",
    "a man in a dark coat is fighting with another person",
    "a woman in a yellow dress is standing still",
)

IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".bmp": "image/bmp", ".gif": "image/gif"}


class Engine(Protocol):
    """What the app needs from a search engine (``tpas.search.engine.SearchEngine`` fits)."""

    def search(self, text: str, k: int = 10, rerank: int = 0) -> list[Any]: ...

    def image_path(self, image_id: str) -> Path: ...


@dataclass(frozen=True)
class Limits:
    """Request limits; anything outside them is answered with 422 and a JSON reason."""

    max_query_chars: int = 300
    max_k: int = 100
    max_rerank: int = 100
    max_id_chars: int = 256


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
                                  b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
]


class SecurityHeaders:
    """Pure ASGI middleware adding the headers above to every response (cheaper than BaseHTTPMiddleware)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BearerAuth:
    """Pure ASGI middleware: requests under ``protected`` prefixes need ``Authorization: Bearer <token>``
    (compared in constant time); others (the page, its script and style) pass."""

    def __init__(self, app: Any, token: str, protected: tuple[str, ...] = ("/api/", "/images/", "/healthz")):
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.protected = protected

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.protected):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or ()).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = b'{"error": "missing or wrong token: send the header Authorization: Bearer <token>"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": body})


LETTER = re.compile(r"[a-z]", re.IGNORECASE)


def clean_query(q: str, limits: Limits) -> tuple[str, str | None]:
    """``(text, problem)``: whitespace collapsed first, then the length limit, so padding a query with
    spaces never makes it too long."""
    text = " ".join(q.split())
    if not text:
        return text, "the query is empty"
    if len(text) > limits.max_query_chars:
        return text, f"at most {limits.max_query_chars} characters (this one has {len(text)})"
    return text, None


def query_notice(text: str, tokenizer: Any | None = None) -> str | None:
    """Why the results of ``text`` mean nothing, or None.

    The models read English descriptions: a query with no word piece the tokenizer knows that holds
    a letter (emoji, another script, bytes that were not UTF-8) still gets a ranking, an arbitrary
    one. Without a tokenizer with ``known_tokens`` the query's own words are looked at.
    """
    known = getattr(tokenizer, "known_tokens", None)
    pieces = known(text) if known is not None else text.split()
    if any(LETTER.search(piece) for piece in pieces):
        return None
    notice = "the model knows no word of this query (it reads English descriptions), so these results are arbitrary"
    if "\ufffd" in text:
        notice += "; the query held bytes that are not UTF-8 (shown as \ufffd)"
    return notice


def hit_to_json(hit: Any) -> dict[str, Any]:
    """One search hit as the API returns it; the URL quotes the id so any id round-trips."""
    image_id = str(hit.image_id)
    itm = getattr(hit, "itm_score", None)
    return {
        "rank": int(hit.rank),
        "id": image_id,
        "score": float(hit.score),
        "itc_score": float(hit.itc_score),
        "itm_score": None if itm is None else float(itm),
        "url": "/images/" + quote(image_id, safe=""),
    }


def create_app(
    engine: Engine,
    *,
    examples: Sequence[str] | None = None,
    limits: Limits | None = None,
    title: str = "tpas — text-based person anomaly search",
    info: dict[str, Any] | None = None,
    max_batch: int = 16,
    token: str | None = None,
    default_rerank: int = 0,
):
    """Build the FastAPI app. ``examples`` are clickable queries on the page; ``info`` is shown by
    ``/healthz`` (e.g. model and index paths, gallery size); ``max_batch`` caps how many waiting
    queries share one model call (1 = no batching; see :mod:`tpas.serve.batching`); ``token`` makes
    every API and image request carry it as a bearer token; ``default_rerank`` is the re-rank depth
    the page starts with (0 = ITC only; :func:`tpas.serve.run.validated_rerank` reads it from the
    model)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()
    index = getattr(engine, "index", None)
    if limits.max_rerank and index is not None and not getattr(index, "has_tokens", True):
        log.warning("the index holds no image tokens: ITM re-ranking is off (rebuild the index with tokens)")
        limits = replace(limits, max_rerank=0)
    default_rerank = max(0, min(default_rerank, limits.max_rerank))
    tokenizer = getattr(getattr(engine, "model", None), "tokenizer", None)
    example_list = [e for e in (examples if examples is not None else DEFAULT_EXAMPLES) if e.strip()]
    example_list = [e[: limits.max_query_chars] for e in example_list]
    batcher = SearchBatcher(engine, max_batch=max_batch)  # inference in the threadpool, one call at a time
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.default_rerank = default_rerank
    app.state.token = token

    def reason(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in err.get("loc", ())[1:]) or "request", "message": err.get("msg", "")}
            for err in exc.errors()
        ]
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details) or "invalid request"
        return reason(422, message, detail=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return reason(exc.status_code, str(exc.detail))

    app.add_middleware(SecurityHeaders)
    if token:
        app.add_middleware(BearerAuth, token=token)

    @app.get("/api/search")
    async def api_search(
        q: str = Query(..., min_length=1, max_length=20 * limits.max_query_chars, description="text description"),
        k: int = Query(10, ge=1, le=limits.max_k),
        rerank: int = Query(0, ge=0, le=limits.max_rerank, description="ITM re-rank the ITC top-K (0 = off)"),
    ) -> JSONResponse:
        text, problem = clean_query(q, limits)
        if problem:
            return reason(422, f"q: {problem}", detail=[{"field": "q", "message": problem}])
        notice = query_notice(text, tokenizer)
        received = time.perf_counter()
        try:
            hits, model_ms, batch_size = await batcher.search(text, k, rerank)
        except (ValueError, TpasError) as exc:  # the engine refused this input (e.g. no text tokens)
            return reason(422, f"q: {exc}", detail=[{"field": "q", "message": str(exc)}])
        except Exception:
            log.exception("search failed for %r (k=%d, rerank=%d)", text, k, rerank)
            return reason(500, "search failed; see the server log")
        latency_ms = (time.perf_counter() - received) * 1000.0
        return JSONResponse({
            "query": text,
            "k": k,
            "rerank": rerank,
            "latency_ms": round(latency_ms, 2),
            "search_ms": round(model_ms, 2),
            "batch": batch_size,
            "understood": notice is None,
            "notice": notice,
            "results": [hit_to_json(h) for h in hits],
        })

    @app.get("/api/examples")
    async def api_examples() -> dict[str, Any]:
        return {"examples": example_list, "limits": {"max_query_chars": limits.max_query_chars,
                                                     "max_k": limits.max_k, "max_rerank": limits.max_rerank},
                "defaults": {"rerank": default_rerank}}

    @app.get("/images/{image_id:path}")  # ids may hold "/"; still only a lookup key
    async def image(image_id: str) -> Response:
        # The id is only ever a dictionary key for the engine: never part of a filesystem path.
        if not image_id or len(image_id) > limits.max_id_chars or "\x00" in image_id:
            return reason(404, "unknown image id")
        try:
            path = Path(engine.image_path(image_id))
        except KeyError:
            return reason(404, "unknown image id")
        if not path.is_file():
            log.warning("gallery image %s listed in the index but missing on disk: %s", image_id, path)
            return reason(404, "image missing on disk")
        media = IMAGE_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0]
        if media is None or not media.startswith("image/"):
            return reason(404, "not an image")
        return FileResponse(path, media_type=media, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", **(info or {})}

    def static(name: str, media: str):
        async def handler() -> Response:
            return FileResponse(STATIC_DIR / name, media_type=media, headers={"Cache-Control": "no-cache"})
        return handler

    app.add_api_route("/", static("index.html", "text/html; charset=utf-8"), methods=["GET"], include_in_schema=False)
    app.add_api_route("/static/app.js", static("app.js", "text/javascript; charset=utf-8"), methods=["GET"])
    app.add_api_route("/static/style.css", static("style.css", "text/css; charset=utf-8"), methods=["GET"])

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    return app
