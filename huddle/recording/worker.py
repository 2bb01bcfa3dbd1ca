"""The composite recording's worker process, and its parent side: a Compositor fed over a pipe.

Kept apart from huddle.recording.composite so that the server process, which only starts workers and sends
them records, never imports the decoding, compositing and encoding libraries (PyAV, numpy, Pillow: some 50 MB
of memory a node that never records would carry).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import struct
from pathlib import Path
from typing import Any

from huddle.recording.records import RecordError, decode

log = logging.getLogger("huddle.recording")


_LENGTH = struct.Struct("!I")  # each record on the pipe: its length, then its bytes; length 0 means stop
_STOP = _LENGTH.pack(0)
_IOV_MAX = 64
_PIPE_SIZE = 1 << 20


def _worker_main(reader: Any, result: Any, position: Any, path: str, options: dict[str, Any]) -> None:
    """The worker process: records from the pipe into a Compositor until stop or EOF (the parent died),
    then finish the file. Signals are the parent's business: it stops recordings cleanly on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from huddle.recording.composite import Compositor  # here: the server process never loads the codecs

    stream = open(reader.fileno(), "rb", buffering=_PIPE_SIZE, closefd=False)
    reason = "eof"
    compositor = Compositor(path, **options)
    try:
        while True:
            header = stream.read(_LENGTH.size)
            if len(header) < _LENGTH.size:
                break
            (length,) = _LENGTH.unpack(header)
            if length == 0:
                reason = "stop"
                break
            data = stream.read(length)
            if len(data) < length:
                break
            try:
                record = decode(data)
            except RecordError:
                compositor.stats["bad_records"] += 1
                continue
            try:
                compositor.feed(record)
            except Exception:
                compositor.stats["errors"] += 1
                log.exception("composite %s: record not used", path)
            position.value = compositor.position
    finally:
        if reason == "eof":
            log.warning("composite %s: input ended without stop (parent gone?); finishing the file", path)
        try:
            compositor.close()
        finally:
            position.value = compositor.position
            stats = dict(compositor.stats, position=compositor.position, reason=reason)
            with contextlib.suppress(OSError):
                result.send_bytes(json.dumps(stats).encode())
            stream.close()


class CompositeWorker:
    """A Compositor in a process of its own, fed from an asyncio event loop.

    `send` never blocks: records go to a pipe (non-blocking) and, when the pipe is full, to a buffer that
    the event loop drains as the pipe empties. The buffer is bounded by `max_pending_bytes` (enough for
    tens of seconds of a large call, so a healthy worker never reaches it, its start included); beyond it
    frames are dropped and counted, other records (small, and the timeline depends on them) always go.

    The process is started with the "spawn" context (no fork of a server with sockets and threads). It
    ignores SIGINT and SIGTERM and finishes the file when told to `stop` or when the pipe reaches EOF, which
    is also what happens when the parent dies or drops this object."""

    def __init__(
        self,
        path: Path | str,
        width: int = 1280,
        height: int = 720,
        fps: int = 30,
        *,
        max_pending_bytes: int = 64 << 20,
        context: str = "spawn",
        **options: Any,
    ) -> None:
        self.path = Path(path)
        self.max_pending_bytes = max_pending_bytes
        self._options = dict(options, width=width, height=height, fps=fps)
        self._context = multiprocessing.get_context(context)
        self._process: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._closing = False
        self._writing = False
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._pending = 0
        self._drained: asyncio.Future[None] | None = None
        self._result: Any = None
        self._position: Any = None
        self._finalizer: multiprocessing.util.Finalize | None = None
        self.stats: dict[str, Any] | None = None  # the compositor's counters, once stopped
        self.sent = 0
        self.dropped = 0

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def position(self) -> float:
        """Seconds of video the worker has written (shared memory, updated per record)."""
        return 0.0 if self._position is None else float(self._position.value)

    @property
    def pending_bytes(self) -> int:
        return self._pending

    def start(self) -> None:
        """Start the process. Call from the event loop that will `send`."""
        if self._process is not None:
            raise RuntimeError("worker already started")
        self._loop = asyncio.get_running_loop()
        ctx = self._context
        reader, writer = ctx.Pipe(duplex=False)
        result_reader, result_writer = ctx.Pipe(duplex=False)
        self._position = ctx.RawValue("d", 0.0)
        process = ctx.Process(
            target=_worker_main,
            args=(reader, result_writer, self._position, str(self.path), self._options),
            name=f"composite:{self.path.name}",
        )
        try:
            process.start()
        finally:
            reader.close()
            result_writer.close()
        self._process = process
        self._result = result_reader
        self._fd = os.dup(writer.fileno())
        writer.close()
        os.set_blocking(self._fd, False)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        # If this object is dropped or the interpreter exits without stop(), the worker sees EOF and
        # finishes the file. multiprocessing's own finalizer (rather than weakref.finalize) because at exit
        # it runs before multiprocessing joins its children, which would otherwise wait on a reading worker.
        self._finalizer = multiprocessing.util.Finalize(self, _close_fd, args=(self._fd,), exitpriority=10)

    def send(self, data: bytes) -> bool:
        """Queue one encoded record; False if it was dropped (worker behind, stopping or gone)."""
        if self._fd < 0 or self._closing:
            self.dropped += 1
            return False
        size = _LENGTH.size + len(data)
        if self._pending + size > self.max_pending_bytes and data[:1] == b"\x03":
            self.dropped += 1
            return False
        self._chunks.append(memoryview(_LENGTH.pack(len(data))))
        self._chunks.append(memoryview(data))
        self._pending += size
        self.sent += 1
        if not self._writing:
            self._flush()
        return True

    def _flush(self) -> None:
        while self._chunks:
            try:
                written = os.writev(self._fd, list(_take(self._chunks, _IOV_MAX)))
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the worker is gone
                self._broken()
                return
            self._pending -= written
            while written:
                head = self._chunks[0]
                if len(head) <= written:
                    written -= len(head)
                    self._chunks.popleft()
                else:
                    self._chunks[0] = head[written:]
                    written = 0
        if self._chunks and not self._writing:
            assert self._loop is not None
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not self._chunks:
            if self._writing:
                assert self._loop is not None
                self._loop.remove_writer(self._fd)
                self._writing = False
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)

    def _broken(self) -> None:
        self.dropped += sum(1 for _ in self._chunks) // 2
        self._chunks.clear()
        self._pending = 0
        self._close_pipe()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _close_pipe(self) -> None:
        if self._chunks:  # stop() gave up waiting for the pipe: the rest never goes
            self.dropped += len(self._chunks) // 2
            self._chunks.clear()
            self._pending = 0
        if self._fd >= 0:
            if self._writing and self._loop is not None:
                self._loop.remove_writer(self._fd)
                self._writing = False
            if self._finalizer is not None:
                self._finalizer()  # closes the fd, once
            self._fd = -1

    async def stop(self, timeout: float = 10.0) -> None:
        """Tell the worker to finish the file and wait for it; kill it if it takes longer than `timeout`."""
        if self._process is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._fd >= 0 and not self._closing:
            self._closing = True
            self._chunks.append(memoryview(_STOP))
            self._pending += len(_STOP)
            self._drained = loop.create_future()
            if not self._writing:
                self._flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), max(0.0, deadline - loop.time()))
        self._close_pipe()
        if not await self._wait_exit(max(0.0, deadline - loop.time())):
            log.warning("composite %s: worker did not finish in %.1f s, killing it", self.path, timeout)
            self._process.kill()
            await self._wait_exit(5.0)
        self._process.join(0)
        self._read_result()

    def kill(self) -> None:
        """SIGKILL the worker (what an abrupt end of the machine does; the file keeps its fragments)."""
        if self._process is not None:
            self._process.kill()

    async def _wait_exit(self, timeout: float) -> bool:
        process = self._process
        if not process.is_alive():
            return True
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(process.sentinel, lambda: exited.done() or exited.set_result(None))
        try:
            await asyncio.wait_for(exited, timeout)
        except TimeoutError:
            return not process.is_alive()
        finally:
            loop.remove_reader(process.sentinel)
        # The sentinel closes as the process exits, a moment before it can be reaped.
        for _ in range(200):
            if not process.is_alive():
                break
            await asyncio.sleep(0.005)
        return True

    def _read_result(self) -> None:
        if self._result is None:
            return
        with contextlib.suppress(OSError, EOFError, ValueError):
            if self._result.poll():
                self.stats = json.loads(self._result.recv_bytes())
        self._result.close()
        self._result = None


def _take(chunks: collections.deque[memoryview], count: int) -> Any:
    for i, chunk in enumerate(chunks):
        if i == count:
            return
        yield chunk


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
