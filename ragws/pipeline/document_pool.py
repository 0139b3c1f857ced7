"""Document workers: untrusted bytes are decoded and rendered in processes that can be killed.

pymupdf and Pillow hold the GIL while they parse and render, and neither can be interrupted.
On a thread, one small hostile document froze the whole server: a content stream that inflates
to 200 MB of drawing operators (20 s), form XObjects nested to draw a line 10^8 times (33 s,
+1.3 GB), an image declaring 130 000 × 130 000 pixels (+2 GB), a PNG of five million empty
chunks (40 s); SIGTERM waited for the render. So every call into them on a client's bytes runs
here, in one of ``document_workers`` processes, each allowed ``document_worker_memory_mb``
beyond what it holds at start, each task ``document_timeout_s``:

* a task over its time is answered ``timeout`` at once, and its worker killed (SIGKILL);
* a task that runs out of memory (a MemoryError, a failed malloc in MuPDF, a worker killed by
  the kernel, or one that crashes: under the limit, most often an allocation that failed
  where C code does not check) is answered ``too_large``, with a message that says which;
* in every case a new worker takes the old one's place, and every other task goes on;
* when tasks wait and every worker has been on its task for half a second, one more worker
  starts (up to twice as many), so that a few documents that take their whole time do not
  hold up every other client for it; extra workers go once idle.

Workers fork from a fork server, a single-threaded process that has imported pymupdf once
(never from the threaded server), so a replacement is ready in milliseconds. A PDF is written
once to a spool file (in /dev/shm when it has room) and its tasks carry the path; each worker
keeps the few documents it last used open, and a document's pages render on every worker at
once. Tasks and results cross a pipe per worker, their large buffers beside them in spool files
(:class:`Channel`): a rendered page is written once by the worker and mapped by the server, by
a reader thread per worker, never the event loop. Waiting tasks are served client by client
(:mod:`ragws.runtime.fairness`): one client's 300 pages do not hold up another client's image.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from ragws.errors import ErrorCode, RequestError, too_large
from ragws.pipeline.documents import decode_image
from ragws.runtime import fairness
from ragws.runtime.fairness import FairQueue

if TYPE_CHECKING:
    import numpy as np

    from ragws.pipeline.documents import PdfFile

log = logging.getLogger(__name__)

#: Documents a worker keeps open, most recently used first out.
OPEN_DOCUMENTS = 4
#: Arguments of this many bytes or more travel beside the pickle, and are sent from a thread.
OUT_OF_BAND_BYTES = 64 * 1024
#: Buffers of this many bytes or more travel as files (see :class:`Channel`).
FILE_BYTES = 256 * 1024
#: The exit status of a worker that ran out of memory and said so before it went.
EXIT_NO_MEMORY = 3
#: Tasks wait and every worker has spent this long on its task: one more worker is started
#: (up to twice ``workers``), so that a few documents that take their whole time cannot hold
#: up every other client's image for it. Extra workers go once idle with nothing waiting.
STUCK_S = 0.5
#: /dev/shm is often 64 MiB in a container: below this much room, PDFs are spooled elsewhere.
SPOOL_MIN_FREE = 2**30
SPOOL_PREFIX = "ragws-documents-"


# --- the wire -----------------------------------------------------------------------------------


class Channel:
    """One end of a worker's pipe. A message is a pickle (protocol 5) and its buffers: small
    ones follow it through the pipe, large ones (a page's pixels, an image's bytes) are written
    to a file in the spool that the receiver maps and deletes, one copy in all. Through the
    pipe, a 23 MiB page took 115 ms on this machine; as a file, 50."""

    def __init__(self, conn: Connection, spool: str) -> None:
        self.conn = conn
        self.spool = spool
        self.written: list[str] = []  # the files of the last message sent

    def send(self, message: object) -> None:
        buffers: list[pickle.PickleBuffer] = []
        head = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
        # Files first: a message that fails (no room in the spool) fails before a byte of it
        # is in the pipe, which stays in step.
        self.written, parts = [], []
        try:
            for buffer in buffers:
                raw = buffer.raw()
                if raw.nbytes < FILE_BYTES:
                    parts.append(raw)
                else:
                    name = f"{os.getpid()}-{next(_buffer_names)}.buffer"
                    self.written.append(os.path.join(self.spool, name))
                    _write(self.written[-1], raw)
                    parts.append(self.written[-1])
        except BaseException:
            self.remove_unread()
            raise
        self.conn.send_bytes(len(buffers).to_bytes(4, "little") + head)
        for part in parts:
            if isinstance(part, str):
                self.conn.send_bytes(part.encode())
            else:
                self.conn.send_bytes(b"")
                self.conn.send_bytes(part)

    def remove_unread(self, peer: int | None = None) -> None:
        """Files the peer will not map, which would hold memory in /dev/shm: ours of the last
        message, and once the peer process ``peer`` is gone, those it wrote and never sent."""
        leftovers = list(self.written)
        with contextlib.suppress(OSError):
            leftovers += [
                os.path.join(self.spool, name)
                for name in (os.listdir(self.spool) if peer is not None else ())
                if name.startswith(f"{peer}-") and name.endswith(".buffer")
            ]
        for path in leftovers:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def receive(self) -> Any:
        head = self.conn.recv_bytes()
        buffers = []
        for _ in range(int.from_bytes(head[:4], "little")):
            path = self.conn.recv_bytes()
            buffers.append(_map(path.decode()) if path else self.conn.recv_bytes())
        return pickle.loads(memoryview(head)[4:], buffers=buffers)


def _map(path: str) -> mmap.mmap:
    """A file's bytes, mapped copy-on-write (an array sent writable stays so), the file gone."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
        os.unlink(path)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write(path: str, data: bytes | memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as out:
        out.write(data)


_buffer_names = itertools.count()


def _worker_main(conn: Connection, spool: str, memory_mb: int) -> None:
    # Imported here, in the worker: importing it keeps pymupdf's layout analyser out of the
    # process, which the server's own import of pymupdf has long decided.
    from ragws.pipeline.document_worker import serve

    serve(Channel(conn, spool), memory_mb)


# --- the pool -----------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Task:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    doc: tuple[str, Any] | None  # (path, limits): fn takes that PDF, opened, first
    what: str  # "rendering page 3": how error messages name the task
    future: asyncio.Future[Any]


@dataclass(eq=False, slots=True)
class _Worker:
    process: BaseProcess
    channel: Channel
    task: _Task | None = None
    timer: asyncio.TimerHandle | None = None
    documents: OrderedDict[str, None] = field(default_factory=OrderedDict)  # open there
    forget: list[str] = field(default_factory=list)  # to close before its next task
    retiring: bool = False  # being killed, or exiting: gets no more tasks
    answered: int = 0
    began: float = 0.0  # when its task began (event loop time)


class DocumentPool:
    """``workers`` processes that run document tasks, each under a memory and a time limit."""

    def __init__(
        self,
        workers: int,
        memory_mb: int,
        timeout_s: float,
        *,
        on_replaced: Callable[[str], None] | None = None,
    ) -> None:
        """``on_replaced(reason)`` is told of each worker replaced: ``timeout``, ``memory``,
        ``crash`` or ``cancelled``."""
        self.size = workers
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self._on_replaced = on_replaced
        methods = multiprocessing.get_all_start_methods()
        self._context = multiprocessing.get_context(
            "forkserver" if "forkserver" in methods else "spawn"
        )
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._queue: FairQueue[_Task] = FairQueue(withdrawn=lambda task: task.future.done())
        self._starting: set[asyncio.Future[None]] = set()
        self._stuck_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._spool = ""
        self._names = itertools.count()

    @property
    def workers(self) -> int:
        """Workers serving now (one killed, or still starting in its place, is not)."""
        return sum(not w.retiring for w in self._workers)

    def waiting(self) -> int:
        """Tasks waiting for a worker."""
        return len(self._queue)

    def pids(self) -> list[int]:
        """The process ids of the workers serving now."""
        return [w.process.pid for w in self._workers if not w.retiring and w.process.pid]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        shm = "/dev/shm"
        parent = shm if os.path.isdir(shm) and _free_bytes(shm) >= SPOOL_MIN_FREE else None
        _remove_stale_spools(parent or tempfile.gettempdir())
        self._spool = tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", dir=parent)
        if self._context.get_start_method() == "forkserver":
            self._context.set_forkserver_preload(["ragws.pipeline.document_worker"])  # type: ignore[attr-defined]
        spawned = await asyncio.gather(
            *(self._loop.run_in_executor(None, self._spawn) for _ in range(self.size)),
            return_exceptions=True,
        )
        for worker in spawned:
            if isinstance(worker, BaseException):
                await self.stop()
                raise RuntimeError(f"document workers did not start: {worker}") from worker
            self._add(worker)
        log.info(
            "%d document workers (%s), %d MiB and %g s per task; PDFs spooled in %s",
            self.size,
            self._context.get_start_method(),
            self.memory_mb,
            self.timeout_s,
            self._spool,
        )

    async def stop(self) -> None:
        """Kill every worker at once (a render in progress is not waited for) and answer
        what was waiting or running ``unavailable``."""
        self._closed = True
        if self._stuck_timer is not None:
            self._stuck_timer.cancel()
        for starting in self._starting:
            starting.cancel()
        stopped = RequestError(ErrorCode.UNAVAILABLE, "the server is shutting down")
        for task in self._queue.drain():
            _fail(task, stopped)
        workers = list(self._workers)
        for worker in workers:
            if worker.task is not None:
                _fail(worker.task, stopped)
            worker.retiring = True
            _kill(worker.process)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: [w.process.join(5) for w in workers])
        if self._spool:
            shutil.rmtree(self._spool, ignore_errors=True)

    # --- tasks ----------------------------------------------------------------------------

    async def run(
        self, fn: Callable[..., Any], *args: Any, doc: PdfFile | None = None, what: str
    ) -> Any:
        """``fn(*args)`` in a worker, or ``fn(document, *args)`` with ``doc`` opened there.

        ``fn`` and its arguments are pickled (``fn`` by name), its result too. Cancelling the
        caller withdraws a waiting task and kills the worker of a running one."""
        if self._closed or self._loop is None:
            raise RequestError(ErrorCode.UNAVAILABLE, "the document workers are not running")
        future = self._loop.create_future()
        task = _Task(fn, args, (doc.path, doc.limits) if doc is not None else None, what, future)
        self._queue.push(task, fairness.current.get())
        self._dispatch()
        try:
            return await future
        finally:
            if future.cancelled():
                self._withdraw(task)

    async def decode_image(self, data: bytes, max_pixels: int) -> np.ndarray:
        """:func:`ragws.pipeline.documents.decode_image` in a worker."""
        return await self.run(decode_image, data, max_pixels, what="decoding the image")

    async def store(self, data: bytes) -> str:
        """Write a PDF where every worker can open it; :meth:`discard` it when done."""
        assert self._loop is not None, "DocumentPool.start() was not awaited"
        path = os.path.join(self._spool, f"{next(self._names)}.pdf")
        written = self._loop.run_in_executor(None, _write, path, data)
        try:
            await asyncio.shield(written)
        except BaseException:  # cancelled: the file is deleted once the thread has written it
            written.add_done_callback(lambda _: _unlink(path))
            raise
        return path

    def discard(self, path: str) -> None:
        """Delete a stored PDF, and close it in the workers that have it open."""
        _unlink(path)
        for worker in self._workers:
            if path in worker.documents:
                del worker.documents[path]
                if worker.task is None and not worker.retiring:
                    self._send(worker, ("forget", [path]))
                else:
                    worker.forget.append(path)

    # --- dispatch (event loop) ------------------------------------------------------------

    def _dispatch(self) -> None:
        while self._idle and (task := self._queue.peek()) is not None:
            self._queue.pop()
            path = task.doc[0] if task.doc is not None else None
            # A worker that has the document open already, else the one idle longest.
            worker = next((w for w in self._idle if path in w.documents), self._idle[0])
            self._idle.remove(worker)
            self._begin(worker, task)
        self._watch_stuck()

    def _watch_stuck(self) -> None:
        """Start a worker more when tasks wait and every worker has been on its task for
        :data:`STUCK_S`; else look again when the latest task will have run that long."""
        assert self._loop is not None
        if self._closed or self._stuck_timer is not None or self._idle:
            return
        if self._queue.peek() is None:
            return
        busy = [w.began for w in self._workers if w.task is not None and not w.retiring]
        due = max(busy, default=0.0) + STUCK_S
        if self._loop.time() < due:
            self._stuck_timer = self._loop.call_at(due, self._on_stuck)
        elif self.workers + len(self._starting) < 2 * self.size:
            log.info("every document worker is busy on a long task: starting one more")
            self._replace(delay=0.0)

    def _on_stuck(self) -> None:
        self._stuck_timer = None
        self._watch_stuck()

    def _begin(self, worker: _Worker, task: _Task) -> None:
        assert self._loop is not None
        worker.task, worker.began = task, self._loop.time()
        if task.doc is not None:
            worker.documents[task.doc[0]] = None
            worker.documents.move_to_end(task.doc[0])
            while len(worker.documents) > OPEN_DOCUMENTS:
                worker.documents.popitem(last=False)
        forget, worker.forget = worker.forget, []
        args = tuple(_out_of_band(arg) for arg in task.args)
        message = ("task", task.fn, args, task.doc, forget)
        worker.timer = self._loop.call_later(self.timeout_s, self._expire, worker, task)
        if any(isinstance(arg, pickle.PickleBuffer) for arg in args):
            # An image of up to max_frame_bytes: written to the spool by a thread, not the loop.
            self._loop.run_in_executor(None, self._send, worker, message)
        else:
            self._send(worker, message)

    def _send(self, worker: _Worker, message: object) -> None:
        try:
            worker.channel.send(message)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker is gone: its reader answers its task
        except Exception as exc:  # no room in the spool: the worker may hold half a task
            self._post(self._on_send_failed, worker, exc)

    def _on_send_failed(self, worker: _Worker, exc: Exception) -> None:
        if worker.task is not None:
            _fail(worker.task, RequestError(ErrorCode.INTERNAL, f"{worker.task.what}: {exc}"))
        self._retire(worker, "crash")

    def _expire(self, worker: _Worker, task: _Task) -> None:
        worker.timer = None
        _fail(
            task,
            RequestError(
                ErrorCode.TIMEOUT,
                f"{task.what} took longer than {self.timeout_s:g} s (document_timeout_s); "
                "the document is too costly to process",
            ),
        )
        self._retire(worker, "timeout")

    def _withdraw(self, task: _Task) -> None:
        """A cancelled caller's task: a waiting one is dropped by the queue; a running one
        would hold its worker for nothing, so the worker goes."""
        for worker in self._workers:
            if worker.task is task:
                self._retire(worker, "cancelled")

    def _retire(self, worker: _Worker, reason: str) -> None:
        if worker.retiring:
            return
        worker.retiring = True
        if worker in self._idle:
            self._idle.remove(worker)
        _kill(worker.process)
        if reason == "surplus":
            return
        if reason != "cancelled":
            task = worker.task
            log.warning(
                "document worker %s killed (%s)%s",
                worker.process.pid,
                reason,
                f" while {task.what}" if task is not None else "",
            )
        if self._on_replaced is not None:
            self._on_replaced(reason)

    # --- replies (a reader thread per worker, then the event loop) -------------------------

    def _add(self, worker: _Worker) -> None:
        self._workers.append(worker)
        self._idle.append(worker)
        threading.Thread(
            target=self._read, args=(worker,), name="ragws-document-reader", daemon=True
        ).start()
        self._dispatch()

    def _read(self, worker: _Worker) -> None:
        while True:
            try:
                reply = worker.channel.receive()
            except (EOFError, OSError):
                break
            except Exception as exc:  # a reply that does not unpickle: the worker is broken
                self._post(self._on_reply, worker, ("broken", repr(exc)))
                break
            if not self._post(self._on_reply, worker, reply):
                return
        worker.process.join(10)  # reaped: its exit code tells why it went
        worker.channel.remove_unread(worker.process.pid)
        self._post(self._on_exit, worker)

    def _post(self, callback: Callable[..., None], *args: Any) -> bool:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: the server is gone
            return False
        return True

    def _on_reply(self, worker: _Worker, reply: tuple[Any, ...]) -> None:
        task, worker.task = worker.task, None
        worker.answered += 1
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        kind = reply[0]
        if task is not None:
            if kind == "ok":
                if not task.future.done():
                    task.future.set_result(reply[1])
            elif kind == "error":
                _fail(task, RequestError(ErrorCode(reply[1]), reply[2]))
            elif kind == "memory":
                _fail(task, self._no_memory(task))
            else:
                _fail(task, RequestError(ErrorCode.INTERNAL, f"{task.what} failed: {reply[1]}"))
        if kind in ("memory", "broken"):
            self._retire(worker, "memory" if kind == "memory" else "crash")
        elif not worker.retiring:
            if self.workers > self.size and self._queue.peek() is None:
                self._retire(worker, "surplus")  # an extra one, no longer needed
            else:
                self._idle.append(worker)
        self._dispatch()

    def _on_exit(self, worker: _Worker) -> None:
        if worker.timer is not None:
            worker.timer.cancel()
        if worker in self._workers:
            self._workers.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        code = worker.process.exitcode
        task, worker.task = worker.task, None
        if not worker.retiring:  # nobody killed it: the kernel (memory), or a crash
            memory = code in (EXIT_NO_MEMORY, -signal.SIGKILL)
            log.warning("document worker %s exited (%s)", worker.process.pid, _exit_name(code))
            if self._on_replaced is not None:
                self._on_replaced("memory" if memory else "crash")
            if task is not None:
                # Under the address-space limit a crash is most often an allocation that
                # failed where C code does not check (seen: SIGSEGV reading a page of 10^6
                # paths at 96 MiB).
                _fail(
                    task,
                    self._no_memory(task)
                    if memory
                    else too_large(
                        f"{task.what} ended its document worker ({_exit_name(code)}), most "
                        f"likely out of its {self.memory_mb} MiB (document_worker_memory_mb)"
                    ),
                )
        worker.channel.conn.close()
        worker.channel.remove_unread()  # a task sent while it was dying
        if not self._closed and self.workers + len(self._starting) < self.size:
            # One that died before it answered anything may die again at once: not in a loop.
            self._replace(delay=0.0 if worker.retiring or worker.answered else 1.0)

    def _no_memory(self, task: _Task) -> RequestError:
        return too_large(
            f"{task.what} needs more than {self.memory_mb} MiB (document_worker_memory_mb)"
        )

    def _replace(self, delay: float) -> None:
        starting = asyncio.ensure_future(self._start_one(delay))
        self._starting.add(starting)
        starting.add_done_callback(self._starting.discard)

    async def _start_one(self, delay: float) -> None:
        assert self._loop is not None
        await asyncio.sleep(delay)
        while not self._closed:
            try:
                worker = await self._loop.run_in_executor(None, self._spawn)
            except Exception:
                log.exception("a document worker did not start; trying again in 1 s")
                await asyncio.sleep(1.0)
                continue
            if self._closed:
                _kill(worker.process)
            else:
                self._add(worker)
            return

    def _spawn(self) -> _Worker:
        """Start a worker process (blocking: the first one also starts the fork server)."""
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(theirs, self._spool, self.memory_mb),
            name="ragws-document-worker",
            daemon=True,
        )
        process.start()
        theirs.close()  # the worker's end: once it exits, our reads see the end of the pipe
        return _Worker(process, Channel(ours, self._spool))


def _out_of_band(arg: Any) -> Any:
    large = isinstance(arg, bytes) and len(arg) >= OUT_OF_BAND_BYTES
    return pickle.PickleBuffer(arg) if large else arg


def _fail(task: _Task, error: BaseException) -> None:
    if not task.future.done():
        task.future.set_exception(error)


def _kill(process: BaseProcess) -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        process.kill()


def _exit_name(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit status {code}"


def _free_bytes(path: str) -> int:
    try:
        stat = os.statvfs(path)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def _remove_stale_spools(parent: str) -> None:
    """Spools of servers that died without cleaning up: in /dev/shm they hold memory."""
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            pid = name.removeprefix(SPOOL_PREFIX).split("-")[0]
            if name.startswith(SPOOL_PREFIX) and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
