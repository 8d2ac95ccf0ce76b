"""A bounded request queue and a micro-batcher: concurrent compatible requests share one model call.

Requests wait in arrival order, at most `queue_size` of them (one more is refused: the caller
answers 429). One worker coroutine takes the oldest request, waits up to `batch_wait_s` for
company when fewer than `max_batch` compatible ones are waiting, and hands up to `max_batch`
requests with the same batch key (steps, guidance, size, frames, ...: everything that shapes the
model call; the output format does not) to `runner` in a single worker thread. torch releases
the GIL while it computes, so the event loop keeps accepting, validating and refusing requests
during a batch. Requests that arrive while a batch runs form the next one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("reelforge.serve")


class QueueFull(Exception):
    """The queue holds `queue_size` waiting requests already."""


@dataclass(eq=False)
class Job:
    """One request waiting for the model: its batch key, its own inputs, and the future it is answered by."""

    key: Hashable  # requests with equal keys may share a model call
    payload: Any  # what `runner` needs for this request (prompt, seed, format, ...)
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]
    cancelled: bool = False  # the caller gave up (timeout): skip it if it has not started


class MicroBatcher:
    """Bounded FIFO of Jobs, served in batches of compatible jobs by one worker thread.

    `runner(jobs)` runs in the worker thread and returns one result per job (a value, or an
    Exception instance for a job that failed alone); if it raises, every job of the batch gets
    that exception. `on_batch(size)` and `on_depth(waiting)` feed metrics.
    """

    def __init__(self, runner: Callable[[list[Job]], list[Any]], *, max_batch: int, queue_size: int,
                 batch_wait_s: float, on_batch: Callable[[int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None) -> None:
        self.runner = runner
        self.max_batch, self.queue_size, self.batch_wait_s = max_batch, queue_size, batch_wait_s
        self.on_batch = on_batch or (lambda size: None)
        self.on_depth = on_depth or (lambda depth: None)
        self._pending: deque[Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being computed)."""
        return len(self._pending)

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reelforge-generate")
        self._task = asyncio.get_running_loop().create_task(self._work(), name="reelforge-batcher")

    async def stop(self) -> None:
        """Stop taking batches; the batch being computed finishes, waiting requests are failed."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def submit(self, key: Hashable, payload: Any) -> Job:
        """Queue a request; QueueFull when `queue_size` are waiting already."""
        if len(self._pending) >= self.queue_size:
            raise QueueFull(f"{len(self._pending)} requests waiting (serve.queue_size)")
        job = Job(key, payload, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self.on_depth(len(self._pending))
        assert self._wake is not None, "MicroBatcher.start() was not called"
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """The caller gave up on `job`: drop it if it is still waiting (a running batch finishes anyway)."""
        job.cancelled = True
        # Nobody awaits this future any more: consume its outcome so asyncio does not warn about it.
        job.future.add_done_callback(lambda future: future.cancelled() or future.exception())
        try:
            self._pending.remove(job)
        except ValueError:
            return  # already taken into a batch
        self.on_depth(len(self._pending))

    def _compatible(self, key: Hashable) -> list[Job]:
        return [job for job in self._pending if job.key == key and not job.cancelled][: self.max_batch]

    async def _work(self) -> None:
        assert self._wake is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if not self._pending:
                self._wake.clear()
                continue
            try:
                first = self._pending[0]
                if self.max_batch > 1 and self.batch_wait_s > 0 and len(self._compatible(first.key)) < self.max_batch:
                    await asyncio.sleep(self.batch_wait_s)  # let concurrent compatible requests join
                    if not self._pending:
                        continue
                    first = self._pending[0]  # the first one may have timed out meanwhile
                batch = self._compatible(first.key)
                for job in batch:
                    self._pending.remove(job)
                self.on_depth(len(self._pending))
                if not batch:
                    continue
                self.on_batch(len(batch))
                try:
                    results = await loop.run_in_executor(self._executor, self.runner, batch)
                    if len(results) != len(batch):
                        raise RuntimeError(f"runner returned {len(results)} results for {len(batch)} jobs")
                except Exception as error:  # noqa: BLE001 - the whole batch failed: each request answers 500
                    results = [error] * len(batch)
                for job, result in zip(batch, results, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the worker must outlive any one batch
                log.exception("batcher: unexpected error (the worker keeps running)")
