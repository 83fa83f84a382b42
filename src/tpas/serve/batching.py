"""Coalesce concurrent searches into one model call.

The model runs one call at a time (torch modules are not guaranteed thread-safe, and on a small
CPU parallel calls only fight over the same cores). Requests that arrive while it is busy wait in
a queue; when it is free, all waiting requests with the same re-rank depth go to the engine as one
``search_batch`` call. An idle server therefore adds no delay, and a busy one amortises the
per-call overhead (tokenisation, padding, FAISS, ITM batches) over several queries.

Taking the top-``max(k)`` for a batch and cutting each answer to its own ``k`` gives the same
ranking as a single search: the re-ranked head depends on the re-rank depth only, and the tail
is in ITC order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class _Request:
    text: str
    k: int
    rerank: int
    future: asyncio.Future = field(repr=False)


class SearchBatcher:
    """``await batcher.search(text, k, rerank) -> (hits, model_ms, batch_size)``; one model call at a time."""

    def __init__(self, engine: Any, max_batch: int = 16,
                 run_in_thread: Callable[..., Any] | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.engine = engine
        self.max_batch = max_batch
        self._queue: list[_Request] = []
        self._draining = False
        self._task: asyncio.Task | None = None  # keep a reference: the loop holds tasks weakly
        self._lock = threading.Lock()  # also guards direct engine use from other threads
        if run_in_thread is None:
            from starlette.concurrency import run_in_threadpool as run_in_thread
        self._run_in_thread = run_in_thread
        self.calls = 0  # model calls made (for tests and /healthz)

    async def search(self, text: str, k: int, rerank: int) -> tuple[list[Any], float, int]:
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(text, k, rerank, future))
        if not self._draining:
            self._draining = True
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    def _take_batch(self) -> list[_Request]:
        """The oldest request and the next waiting ones with its re-rank depth (FIFO otherwise)."""
        depth = self._queue[0].rerank
        batch = [r for r in self._queue if r.rerank == depth][: self.max_batch]
        taken = set(map(id, batch))
        self._queue = [r for r in self._queue if id(r) not in taken]
        return [r for r in batch if not r.future.done()]  # drop requests whose client went away

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._take_batch()
                if not batch:
                    continue
                texts = [r.text for r in batch]
                k = max(r.k for r in batch)
                try:
                    results, ms = await self._run_in_thread(self._search_batch, texts, k, batch[0].rerank)
                except Exception as exc:  # every waiting request learns about the failure
                    for r in batch:
                        if not r.future.done():
                            r.future.set_exception(exc)
                    continue
                for r, hits in zip(batch, results):
                    if not r.future.done():
                        r.future.set_result((hits[: r.k], ms, len(batch)))
        finally:
            self._draining = False

    def _search_batch(self, texts: list[str], k: int, rerank: int) -> tuple[list[list[Any]], float]:
        with self._lock:
            start = time.perf_counter()
            batch_fn = getattr(self.engine, "search_batch", None)
            if batch_fn is not None:
                results = batch_fn(texts, k=k, rerank=rerank)
            else:
                results = [self.engine.search(t, k=k, rerank=rerank) for t in texts]
            self.calls += 1
            return results, (time.perf_counter() - start) * 1000.0
