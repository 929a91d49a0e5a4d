"""A TCP proxy that injects real network faults between a client and a server.

It can throttle bandwidth, cut every connection (and refuse new ones) for a while, and
flip one byte in the next server→client stream. Used to exercise the fetcher against a
real S3 server through real sockets, without mocking boto3.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, rate_bytes_per_s: float = 0):
        self.upstream = (upstream_host, upstream_port)
        self.rate = rate_bytes_per_s
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut = False
        self._corrupt_at: int | None = None
        self.connections = 0
        self.refused = 0  # connections refused while cut
        self.corrupted = 0  # bytes flipped so far

    # -- control (thread-safe) --------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close_all(stop=True), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until :meth:`resume`."""
        self._cut = True
        asyncio.run_coroutine_threadsafe(self._close_all(), self._loop).result(10)

    def resume(self) -> None:
        self._cut = False

    def corrupt_next_response(self, at_byte: int = 4096) -> None:
        """Flip one byte at ``at_byte`` of the next connection's server→client stream."""
        self._corrupt_at = at_byte

    # -- internals ----------------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_all(self, stop: bool = False) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()
        if stop and self._server:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            writer.transport.abort()
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})
        corrupt_at, self._corrupt_at = self._corrupt_at, None
        await asyncio.gather(
            self._pipe(reader, up_writer, None),
            self._pipe(up_reader, writer, corrupt_at),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            with contextlib.suppress(Exception):
                w.close()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, corrupt_at: int | None
    ) -> None:
        seen = 0
        started = time.monotonic()
        while True:
            data = await src.read(64 << 10)
            if not data:
                break
            if corrupt_at is not None and seen <= corrupt_at < seen + len(data):
                i = corrupt_at - seen
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                self.corrupted += 1
            seen += len(data)
            dst.write(data)
            await dst.drain()
            if self.rate:
                # Sleep until the bytes so far fit the configured rate.
                ahead = seen / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        with contextlib.suppress(Exception):
            dst.write_eof()
