"""Fault proxies on loopback: a UDP one between CoAP peers, a TCP one between an MQTT client and
the broker. Each forwards what it gets, drops a share of it, delays the rest, and counts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from dataclasses import dataclass, field
from typing import Any

from m2mpay.broker.launcher import free_port, free_udp_port


@dataclass
class Counts:
    forwarded: int = 0
    dropped: int = 0
    delayed: int = 0
    cuts: int = 0


@dataclass
class LossyUdp:
    """``[::1]:port`` → ``[::1]:target``: each datagram, either way, dropped with ``drop``, else
    delayed by up to ``delay`` seconds. One client at a time (the last one heard)."""

    target: int
    drop: float = 0.1
    delay: float = 0.02
    seed: int = 1
    drop_replies: bool = True  # False: only what the client sends is lost (replies are only delayed)
    port: int = field(default_factory=free_udp_port)
    counts: Counts = field(default_factory=Counts)

    async def __aenter__(self) -> LossyUdp:
        loop = asyncio.get_running_loop()
        rng = random.Random(self.seed)
        proxy = self

        def forward(transport: Any, data: bytes, address: Any) -> None:
            if rng.random() < proxy.drop and (address is None or proxy.drop_replies):
                proxy.counts.dropped += 1
                return
            proxy.counts.forwarded += 1
            wait = rng.uniform(0, proxy.delay)
            if wait:
                proxy.counts.delayed += 1
            loop.call_later(wait, lambda: transport.sendto(data, address) if not transport.is_closing() else None)

        class Upstream(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _address: Any) -> None:
                if proxy._client is not None:
                    forward(proxy._front, data, proxy._client)

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, address: Any) -> None:
                proxy._client = address
                forward(proxy._back, data, None)

        self._client: Any = None
        self._front, _ = await loop.create_datagram_endpoint(Front, local_addr=("::1", self.port))
        self._back, _ = await loop.create_datagram_endpoint(Upstream, remote_addr=("::1", self.target))
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._front.close()
        self._back.close()


@dataclass
class CuttingTcp:
    """``127.0.0.1:port`` → ``127.0.0.1:target``: bytes delayed by up to ``delay`` s; :meth:`cut`
    drops every connection at once, as a lost network does."""

    target: int
    delay: float = 0.005
    seed: int = 2
    port: int = field(default_factory=free_port)
    counts: Counts = field(default_factory=Counts)

    async def __aenter__(self) -> CuttingTcp:
        self._rng = random.Random(self.seed)
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        self.counts.cuts += 1
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink, (writer, up_writer)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    both: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        try:
            while data := await source.read(65536):
                if self.delay:
                    self.counts.delayed += 1
                    await asyncio.sleep(self._rng.uniform(0, self.delay))
                sink.write(data)
                self.counts.forwarded += 1
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for w in both:
                with contextlib.suppress(Exception):
                    w.transport.abort()


def mutate(rng: random.Random, seed: bytes) -> bytes:
    """A mutation of ``seed`` that differs from it; sometimes random bytes instead."""
    while True:
        data = _mutation(rng, seed)
        if data != seed:
            return data


def _mutation(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    kind = rng.randrange(7)
    if kind == 0 or not data:
        return os.urandom(rng.randrange(0, 300))
    if kind == 1:  # flip bits
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 2:  # truncate
        del data[rng.randrange(len(data)):]
    elif kind == 3:  # insert
        i = rng.randrange(len(data) + 1)
        data[i:i] = os.urandom(rng.randrange(1, 9))
    elif kind == 4:  # overwrite a run with a CBOR head byte (lengths, tags, floats, break)
        i = rng.randrange(len(data))
        data[i] = rng.choice([0x18, 0x19, 0x1B, 0x5F, 0x7F, 0x9F, 0xBF, 0xC0, 0xD8, 0xF9, 0xFB, 0xFF, 0xA1, 0x81])
    elif kind == 5:  # duplicate a slice
        i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
        data[j:j] = data[i:j]
    else:  # splice two valid halves
        i = rng.randrange(len(data))
        data = data[:i] + data[rng.randrange(len(data)):]
    return bytes(data)
