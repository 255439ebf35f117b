"""Client processes for `OpenAIBackend(client_processes=N)`: the CPU a request costs the client (the
SDK's request path, reading the JSON body, reducing it to what the caller keeps) spread over N
interpreters instead of one interpreter's GIL.

Each process runs one event loop with a context made once by `setup` (the backend's: its own
HTTP client) and runs every job sent to it concurrently: a job is a picklable callable, and the
parent gets back what `await job(context)` returned, or the exception it raised (its text and the
traceback added to it passed through the context's `scrub`, where it has one). The parent keeps
everything else (the concurrency limit, retries, the cache, usage): a job is one attempt of one
request, sent to the process with the fewest in flight.

A process that dies fails its jobs in flight, and every job sent after, with `ClientProcessDied`:
the pool is then spent (`broken`), and its owner makes a new one. Processes are spawned with a bare
`__main__` (the parent's script is not run again in them, and cannot be the home of a job's
functions: `pack` refuses such jobs), ignore the terminal's Ctrl-C (the parent decides), exit when
their pipe closes (the parent closed the pool, or died), and are shut down on `close`, when the
pool is garbage collected, and at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger(__name__)

_STOP = -1  # job id of the message that asks a process to exit
_READY = 0  # job id of a process's first message: it has made its context
_ID_BYTES = 8


class ClientProcessDied(RuntimeError):
    """A client process exited while the pool was in use; the requests it held have no answer."""


class NotPortable(Exception):
    """A job that cannot be sent to a client process (a lambda, a closure, something of `__main__`)."""


@dataclass(eq=False)
class _Worker:
    name: str
    process: Any  # multiprocessing.Process (spawn context)
    conn: Connection
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    load: int = 0  # jobs in flight
    alive: bool = True
    ready: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _State:
    """What the reader thread and the finalizer share (never the pool itself, so it can be collected)."""

    workers: list[_Worker]
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], _Worker]] = field(default_factory=dict)
    broken: str | None = None
    closing: bool = False
    reader: threading.Thread | None = None


@contextlib.contextmanager
def _bare_main() -> Iterator[None]:
    """Spawn children without the parent's `__main__`: spawn would run the parent's script (or a CLI's
    entry module, e.g. Dagster's) again in each of them, which costs seconds and, for a script without
    an `if __name__ == "__main__"` guard, repeats its work."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class ProcessPool:
    """`processes` spawned client processes, each with the context `setup()` made (see the module doc)."""

    def __init__(self, processes: int, setup: Callable[[], Any], name: str = "llm-client"):
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        ctx = multiprocessing.get_context("spawn")
        workers: list[_Worker] = []
        state = _State(workers)
        # Shut down on close, on collection and at exit, whatever state the start below leaves.
        self._finalizer = weakref.finalize(self, _shutdown, state)
        with _bare_main():
            for i in range(processes):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(theirs, setup), name=f"{name}-{i}", daemon=True)
                proc.start()
                theirs.close()  # the child's end lives in the child only: its exit is our EOF
                workers.append(_Worker(proc.name, proc, ours))
        state.reader = threading.Thread(target=_read, args=(state,), name=f"{name}-reader", daemon=True)
        state.reader.start()
        self._state = state
        self._ids = itertools.count(1)

    @property
    def broken(self) -> bool:
        """Whether a process has died (or the pool was closed): every job from now on fails."""
        return self._state.broken is not None

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._state.workers]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every process has made its context (imports done, client built)."""
        for w in self._state.workers:
            while not w.ready.wait(0.05):
                if self._state.broken is not None:
                    raise ClientProcessDied(self._state.broken)
                timeout -= 0.05
                if timeout <= 0:
                    raise TimeoutError(f"client process {w.name} did not start")

    def pack(self, job: Any) -> bytes:
        """The job as bytes for `run`, or `NotPortable`: checked before anything is counted or sent."""
        try:
            data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise NotPortable(f"{type(exc).__name__}: {exc}") from exc
        if b"__main__" in data:  # a reference to the parent's script: the processes do not have it
            raise NotPortable("the job refers to __main__")
        return data

    async def run(self, data: bytes) -> Any:
        """What the packed job returned in the least busy process (or the exception it raised there)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        state = self._state
        with state.lock:  # one lock with the reader's handling of a death: a job is failed or refused
            if state.broken is not None:
                raise ClientProcessDied(state.broken)
            job_id = next(self._ids)
            # The least busy; among equals, the next in turn (so a trickle of requests is spread too).
            n = len(state.workers)
            turn = [state.workers[(job_id + k) % n] for k in range(n)]
            worker = min((w for w in turn if w.alive), key=lambda w: w.load)
            state.pending[job_id] = (loop, future, worker)
            worker.load += 1
        try:
            with worker.send_lock:
                worker.conn.send_bytes(job_id.to_bytes(_ID_BYTES, "little", signed=True) + data)
        except (OSError, ValueError) as exc:  # its pipe is closed: it died (the reader will say how)
            with state.lock:
                if state.pending.pop(job_id, None) is not None:
                    worker.load -= 1
            raise ClientProcessDied(state.broken or f"client process {worker.name} cannot be reached: {exc}") from exc
        status, value = await future
        if status == "ok":
            return value
        if status == "raise":
            raise value
        raise ClientProcessDied(f"client process {worker.name} could not read a request: {value}")

    def close(self) -> None:
        """Stop the processes (at once for the idle; those with requests in flight are stopped too)."""
        self._finalizer()


def _resolve(future: asyncio.Future[Any], outcome: tuple[str, Any]) -> None:
    if not future.done():  # its awaiter may have been cancelled
        future.set_result(outcome)


def _fail(future: asyncio.Future[Any], message: str) -> None:
    if not future.done():
        future.set_exception(ClientProcessDied(message))


def _deliver(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # that run's loop is closed: nobody waits for it
        loop.call_soon_threadsafe(callback, *args)


def _read(state: _State) -> None:
    """The parent's reader thread: results back to their loops; a process's EOF is its death."""
    while True:
        with state.lock:
            conns = {w.conn: w for w in state.workers if w.alive}
        if not conns:
            return
        for conn in wait(list(conns)):
            worker = conns[conn]
            try:
                job_id, status, blob = conn.recv()
            except (EOFError, OSError):
                _died(state, worker)
                continue
            if job_id == _READY:
                worker.ready.set()
                continue
            try:
                value = pickle.loads(blob)
            except Exception as exc:  # e.g. an exception class whose constructor wants other arguments
                status, value = "raise", RuntimeError(f"a result from client process {worker.name}: {exc}")
            with state.lock:
                entry = state.pending.pop(job_id, None)
                if entry is not None:
                    worker.load -= 1
            if entry is not None:
                _deliver(entry[0], _resolve, entry[1], (status, value))
            # Not kept until the next message: a raised value's traceback holds its caller's frames.
            del entry, value, blob


def _died(state: _State, worker: _Worker) -> None:
    worker.process.join(1.0)
    code = worker.process.exitcode
    how = "was stopped" if code is None else f"exited with code {code}"
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            how = f"was killed by {signal.Signals(-code).name}"
    with state.lock:
        worker.alive = False
        lost = [(loop, fut) for job, (loop, fut, w) in list(state.pending.items()) if w is worker]
        for job, (_, _, w) in list(state.pending.items()):
            if w is worker:
                del state.pending[job]
        message = f"client process {worker.name} (pid {worker.process.pid}) {how}"
        if lost:
            message += f" with {len(lost)} request(s) in flight"
        if state.broken is None:
            state.broken = message if not state.closing else "the client processes were shut down"
    worker.conn.close()
    if not state.closing:
        log.error("%s", message)
    for loop, fut in lost:
        _deliver(loop, _fail, fut, message)


def _shutdown(state: _State) -> None:
    """Ask every process to exit, then make sure: terminated after a grace period, killed after another."""
    with state.lock:
        state.closing = True
        if state.broken is None:
            state.broken = "the client processes were shut down"
        workers = [w for w in state.workers if w.alive]
    for w in workers:
        with contextlib.suppress(OSError, ValueError), w.send_lock:
            w.conn.send_bytes(_STOP.to_bytes(_ID_BYTES, "little", signed=True))
    for w in state.workers:
        w.process.join(2.0)
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(2.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join(2.0)
    reader = state.reader
    if reader is not None and reader is not threading.current_thread():
        reader.join(5.0)
    with state.lock:
        for w in state.workers:
            if w.alive:  # the reader never started, or gave up
                w.alive = False
                w.conn.close()


# -- in the client process --------------------------------------------------------------------------


def _serve(conn: Connection, setup: Callable[[], Any]) -> None:
    """A client process: run every job that arrives, until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_loop(conn, setup))
    # Nothing is left to finish: skip tearing down the interpreter (half a second after importing
    # openai), which `close` would otherwise wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


async def _loop(conn: Connection, setup: Callable[[], Any]) -> None:
    loop = asyncio.get_running_loop()
    context = setup()
    stopped: asyncio.Future[None] = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()

    def send(job_id: int, status: str, value: Any) -> None:
        # The value pickled on its own: one the parent cannot unpickle fails its job there, not the pipe.
        try:
            blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a value or exception that does not pickle: say what it was
            text = f"{type(value).__name__} from a client process does not pickle ({exc}): {value}"
            status, blob = "raise", pickle.dumps(RuntimeError(text))
        try:
            conn.send_bytes(pickle.dumps((job_id, status, blob), protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:  # the parent is gone
            if not stopped.done():
                stopped.set_result(None)

    async def run(job_id: int, payload: bytes) -> None:
        try:
            job = pickle.loads(payload)
        except Exception as exc:
            send(job_id, "unreadable", f"{type(exc).__name__}: {exc}")
            return
        try:
            value = await job(context)
        except Exception as exc:
            scrub = getattr(context, "scrub", None) or (lambda text: text)  # e.g. of a key a server quoted
            if exc.args and all(isinstance(a, str) for a in exc.args):
                exc.args = tuple(scrub(a) for a in exc.args)
            exc.add_note(scrub("in a client process:\n" + "".join(traceback.format_exception(exc)).rstrip()))
            send(job_id, "raise", exc)
            return
        send(job_id, "ok", value)

    def readable() -> None:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            data = _STOP.to_bytes(_ID_BYTES, "little", signed=True)
        job_id = int.from_bytes(data[:_ID_BYTES], "little", signed=True)
        if job_id == _STOP:
            loop.remove_reader(conn.fileno())
            if not stopped.done():
                stopped.set_result(None)
            return
        task = loop.create_task(run(job_id, data[_ID_BYTES:]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_reader(conn.fileno(), readable)
    send(_READY, "ok", None)
    await stopped
    for task in tasks:
        task.cancel()
    conn.close()
    if (aclose := getattr(context, "aclose", None)) is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(aclose(), 1.0)
