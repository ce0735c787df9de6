"""`AsyncEngine`: the asyncio face of the `Engine` for the server, with one thread that owns it.

Owns the engine thread (the only code that touches the `Engine`), the thread-safe command queue
callers submit and abort through, routing each step's deltas to the asyncio queue of the request
group that asked, admission control (a bounded number of requests in flight), isolating a step
that raises to the requests it touched, and graceful shutdown. No HTTP and no OpenAI shapes here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from anyquant.engine.engine import Engine, EngineStats, RequestDelta
from anyquant.engine.multimodal import MultimodalPrompt
from anyquant.engine.sampling import SamplingParams
from anyquant.errors import EngineDeadError

log = logging.getLogger(__name__)

T = TypeVar("T")


class QueueFullError(Exception):
    """Too many requests in flight; the caller should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailableError(Exception):
    """The engine is shutting down or its thread has died: no new requests are accepted."""


class EngineObserver(Protocol):
    """Hooks the engine thread calls for metrics; implementations must be thread-safe."""

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def request_finished(
        self, finish_reason: str, num_prompt_tokens: int, num_output_tokens: int
    ) -> None: ...


@dataclass(frozen=True)
class GenerationItem:
    prompt_token_ids: list[int]
    params: SamplingParams
    multimodal: MultimodalPrompt | None = None  # images, laid out by engine.multimodal.prepare_prompt


@dataclass(frozen=True)
class Event:
    """One delta of the `index`-th request of a group."""

    index: int
    delta: RequestDelta


@dataclass
class _Group:
    """The requests of one caller: deltas go to one asyncio queue on the caller's loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Event]


@dataclass
class _Route:
    group: _Group
    index: int
    num_prompt_tokens: int
    arrival: float
    last_token: float | None = None
    num_output_tokens: int = 0


@dataclass
class _Add:
    group: _Group
    ids: list[str]
    items: list[GenerationItem]
    done: asyncio.Future[None]


@dataclass
class _Abort:
    ids: list[str]


@dataclass
class _AbortAll:
    reason: str


@dataclass
class _Call:
    fn: Callable[[Engine], Any]
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[Any]


@dataclass
class _Stop:
    pass


_Command = _Add | _Abort | _AbortAll | _Call | _Stop


class RequestStream:
    """Async iterator over the events of a group of requests; ends when all of them finished.
    `abort()` (or leaving an `async with` block early) aborts those still running."""

    def __init__(self, engine: AsyncEngine, ids: list[str], group: _Group) -> None:
        self.ids = ids
        self._engine = engine
        self._queue = group.queue
        self._open = set(ids)

    @property
    def finished(self) -> bool:
        return not self._open

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if not self._open:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event.delta.finished:
            self._open.discard(event.delta.request_id)
        return event

    def abort(self) -> None:
        if self._open:
            self._engine.abort(sorted(self._open))
            self._open.clear()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


class AsyncEngine:
    """Runs `engine` on a daemon thread. At most `engine.config.max_num_seqs + max_waiting`
    requests are in flight (admitted and not finished); beyond that `generate` raises
    `QueueFullError`."""

    def __init__(
        self, engine: Engine, max_waiting: int = 256, observer: EngineObserver | None = None
    ) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.capacity = engine.config.max_num_seqs + max_waiting
        self.observer = observer
        self.stats = EngineStats(kv_pages_total=engine.num_kv_pages)
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}  # engine thread only
        self._lock = threading.Lock()  # guards the counters below
        self._in_flight = 0
        self._accepting = True
        self._mean_seconds = 1.0  # running mean of request durations, for Retry-After
        self._loop_failures = 0  # steps that broke outside the forward pass
        self.dead_reason: str | None = None
        self._thread = threading.Thread(target=self._run, name="anyquant-engine", daemon=True)
        self._loop_started = threading.Event()
        self._loop_stopped = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if not self._loop_started.is_set():
            self._loop_started.set()
            self._thread.start()

    def run_here(self) -> None:
        """Run the engine loop in the calling thread until `shutdown()` / `close()`, instead of
        `start()`. `anyquant serve` runs it on the process's main thread: torch's OpenMP kernels
        launched from a secondary thread ran about 2x slower here (a 128-token prompt and 16
        tokens: 1.3 s from the main thread, 2.8 s from another; 2 cores, libgomp)."""
        if self._loop_started.is_set():
            raise RuntimeError("the engine loop is already running")
        self._loop_started.set()
        self._thread = threading.current_thread()
        self._run()

    @property
    def _loop_alive(self) -> bool:
        return self._loop_started.is_set() and not self._loop_stopped.is_set()

    @property
    def is_healthy(self) -> bool:
        return self._loop_alive and self.dead_reason is None and self._accepting

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `timeout` seconds, abort the
        rest (their streams end with finish_reason "abort"), then stop the thread."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + max(timeout, 0.0)
        while self.num_in_flight and time.monotonic() < deadline and self._loop_alive:
            await asyncio.sleep(0.02)
        self._commands.put(_AbortAll("the server is shutting down"))
        self._commands.put(_Stop())
        if self._loop_alive:  # wait for the loop, not its thread: that may be the main thread
            await asyncio.to_thread(self._loop_stopped.wait, 10.0)

    def close(self) -> None:
        """Synchronous shutdown without a grace period (tests, interpreter exit)."""
        with self._lock:
            self._accepting = False
        self._commands.put(_AbortAll("the engine was closed"))
        self._commands.put(_Stop())
        if self._loop_alive and self._thread is not threading.current_thread():
            self._loop_stopped.wait(10.0)

    # -- caller side (any thread with a running event loop) ------------------------------------
    async def generate(self, ids: list[str], items: list[GenerationItem]) -> RequestStream:
        """Add one request per item (ids must be unique); raises QueueFullError, EngineUnavailableError,
        or the engine's ValueError naming a limit (then none of the items was added)."""
        if len(ids) != len(items) or not items:
            raise ValueError(f"generate(): {len(ids)} ids for {len(items)} items")
        self._reserve(len(items))
        loop = asyncio.get_running_loop()
        group = _Group(loop, asyncio.Queue())
        done: asyncio.Future[None] = loop.create_future()
        self._commands.put(_Add(group, ids, items, done))
        try:
            await self._wait(done)
        except asyncio.CancelledError:
            # The caller left before the engine thread added them: take them back out.
            self.abort(ids)
            raise
        return RequestStream(self, ids, group)

    def abort(self, ids: list[str]) -> None:
        """Abort requests (thread-safe, non-blocking); unknown or finished ids are ignored."""
        if ids:
            self._commands.put(_Abort(list(ids)))

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the engine thread between steps and return its result."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._commands.put(_Call(fn, loop, done))
        return await self._wait(done)

    async def _wait(self, done: asyncio.Future[T]) -> T:
        # A command queued just as the thread died would never be answered: look up now and then.
        while True:
            finished, _ = await asyncio.wait({done}, timeout=0.5)
            if finished:
                return done.result()
            if self._loop_stopped.is_set():
                done.cancel()
                raise EngineUnavailableError(f"the engine has stopped: {self.dead_reason or 'thread exited'}")

    def _reserve(self, n: int) -> None:
        with self._lock:
            if self.dead_reason is not None:
                raise EngineUnavailableError(f"the engine has stopped: {self.dead_reason}")
            if not self._accepting:
                raise EngineUnavailableError("the server is shutting down and accepts no new requests")
            if self._in_flight + n > self.capacity:
                retry = max(1, math.ceil(self._mean_seconds))
                raise QueueFullError(
                    f"{self._in_flight} requests in flight and this one adds {n}; the server accepts "
                    f"at most {self.capacity} (max_num_seqs + waiting queue); retry after {retry}s",
                    retry,
                )
            self._in_flight += n

    def _release(self, n: int, seconds: float | None = None) -> None:
        with self._lock:
            self._in_flight -= n
            if seconds is not None:
                self._mean_seconds = 0.9 * self._mean_seconds + 0.1 * seconds

    # -- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._loop_stopped.set()

    def _loop(self) -> None:
        try:
            while True:
                # Block only when there is nothing to step; otherwise take what has arrived.
                commands = [self._commands.get()] if not self.engine.has_unfinished() else []
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for command in commands:
                    if isinstance(command, _Stop):
                        return
                    self._apply(command)
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self._publish_stats()
        except Exception as exc:  # the loop itself broke (a bug): fail everyone, refuse new work
            log.exception("engine thread died")
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            for rid in list(self._routes):
                self._abort_quietly(rid)
                self._deliver(rid, _final(rid, "error", f"the engine thread died: {self.dead_reason}"))

    def _apply(self, command: _Command) -> None:
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _Abort | _AbortAll):
            ids = (
                [r for r in command.ids if r in self._routes]
                if isinstance(command, _Abort)
                else list(self._routes)
            )
            reason = command.reason if isinstance(command, _AbortAll) else None
            for rid in ids:
                self.engine.abort(rid)
            self._publish_stats()  # pages are free before anyone hears the request ended
            for rid in ids:
                self._deliver(rid, _final(rid, "abort", reason))
        elif isinstance(command, _Call):
            try:
                result = command.fn(self.engine)
            except Exception as exc:
                _resolve(command.loop, command.done, None, exc)
            else:
                _resolve(command.loop, command.done, result, None)

    def _add(self, command: _Add) -> None:
        added: list[str] = []
        now = time.monotonic()
        try:
            for index, (rid, item) in enumerate(zip(command.ids, command.items)):
                self.engine.add_request(item.prompt_token_ids, item.params, rid, item.multimodal)
                added.append(rid)
                self._routes[rid] = _Route(command.group, index, len(item.prompt_token_ids), now)
        except Exception as exc:
            for rid in added:
                self.engine.abort(rid)
                del self._routes[rid]
            self._release(len(command.items))
            _resolve(command.group.loop, command.done, None, exc)
        else:
            _resolve(command.group.loop, command.done, None, None)

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed")
            self._recover(exc)
            return
        self._publish_stats()  # before the deltas: a client that saw its end sees its pages freed
        for delta in deltas:
            self._deliver(delta.request_id, delta)

    def _recover(self, exc: Exception) -> None:
        """The step broke outside the forward pass (the engine isolates those itself): fail the
        requests of its open plan, or every running request when the failure came before or after
        any plan, and carry on with the waiting ones."""
        self._loop_failures += 1
        message = (
            f"the engine step running this request failed ({type(exc).__name__}: {exc}); the requests "
            "of that step were stopped, the server goes on serving the others"
        )
        affected = self.engine.abandon_step(message)
        if isinstance(exc, EngineDeadError):
            affected = set(self._routes)  # every later step would fail the same way
        # Requests the engine finished on its way out (an abandoned plan) are told here too.
        affected |= {rid for rid in self._routes if not self.engine.has_request(rid)}
        ids = sorted(affected & set(self._routes)) or sorted(self._routes)
        for rid in ids:
            self._abort_quietly(rid)
        self._publish_stats()
        for rid in ids:
            self._deliver(rid, _final(rid, "error", message))

    def _abort_quietly(self, rid: str) -> None:
        try:
            self.engine.abort(rid)
        except Exception:  # keep failing the others; the request is gone either way
            log.exception("abort of %s failed", rid)

    def _deliver(self, rid: str, delta: RequestDelta) -> None:
        route = self._routes.get(rid)
        if route is None:
            return
        now = time.monotonic()
        if delta.new_token_ids:
            route.num_output_tokens += len(delta.new_token_ids)
            if self.observer is not None:
                if route.last_token is None:
                    self.observer.first_token(now - route.arrival)
                else:
                    self.observer.inter_token((now - route.last_token) / len(delta.new_token_ids))
            route.last_token = now
        if delta.finished:
            del self._routes[rid]
            self._release(1, now - route.arrival)
            if self.observer is not None:
                self.observer.request_finished(
                    delta.finish_reason or "stop", route.num_prompt_tokens, route.num_output_tokens
                )
        try:
            route.group.loop.call_soon_threadsafe(route.group.queue.put_nowait, Event(route.index, delta))
        except RuntimeError:  # the caller's loop is closed: nobody listens any more
            if not delta.finished:
                self.engine.abort(rid)
                self._routes.pop(rid, None)
                self._release(1)

    def _publish_stats(self) -> None:
        stats = self.engine.stats()
        self.stats = dataclasses.replace(
            stats, num_step_failures=stats.num_step_failures + self._loop_failures
        )


def _final(rid: str, reason: str, error: str | None) -> RequestDelta:
    return RequestDelta(rid, [], "", finished=True, finish_reason=reason, error=error)


def _resolve(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], result: Any, exc: BaseException | None
) -> None:
    def settle() -> None:
        if fut.done():  # cancelled by a caller who left
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
        loop.call_soon_threadsafe(settle)
