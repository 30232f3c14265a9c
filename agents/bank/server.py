"""The bank as an MQTT service: shared subscription, batches of requests, lapse sweeps, reconnects.

A reconnect loop (jittered exponential backoff) wraps one connection; inside it a TaskGroup runs
the request handler and the periodic lapse sweep. The handler takes every request that has
arrived, lets :class:`~agents.bank.service.BankService` answer each, makes their commits durable
together, and publishes each answer to its request's Response Topic with its Correlation Data.
A request without a Response Topic, or with one outside ``m2mpay/{bank}/resp/``, is logged and
dropped: there is nobody to answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import uuid

import aiomqtt

from ..mqtt import TlsLogin, answer_properties, connect, publish_nowait, response_prefix
from .keys import BankKeys
from .metrics import BankMetrics, serve_metrics
from .service import BankService

__all__ = ["serve"]

log = logging.getLogger(__name__)


_BATCH = 64  # requests answered together at most: one fdatasync for all of them


def _request(message: aiomqtt.Message, bank: str) -> tuple[str, bytes, str, bytes] | None:
    """``(op, payload, response topic, correlation data)``, or ``None`` when nobody can be answered."""
    prefix = f"m2mpay/{bank}/req/"
    topic = message.topic.value
    if not topic.startswith(prefix):
        return None
    reply_to = getattr(message.properties, "ResponseTopic", None)
    correlation = getattr(message.properties, "CorrelationData", None) or b""
    if not reply_to or not str(reply_to).startswith(response_prefix(bank)):
        log.warning("request on %s without a usable Response Topic: dropped", topic[:80])
        return None
    payload = bytes(message.payload) if isinstance(message.payload, (bytes, bytearray)) else b""
    return topic[len(prefix):], payload, str(reply_to), bytes(correlation)


async def _answer_batches(client: aiomqtt.Client, service: BankService, bank: str) -> None:
    """Take the requests that have arrived, answer them, make their commits durable at once, send.

    With one request in flight a batch is that request; under load, the requests that arrived
    during the previous batch's sync share the next one. Answers go to paho without waiting for
    the broker's PUBACK (see :func:`~agents.mqtt.publish_nowait`).
    """
    syncing = 0

    def publish_all(requests: list[tuple[str, bytes, str, bytes]], answers: list[bytes]) -> None:
        for (_, _, reply_to, correlation), answer in zip(requests, answers, strict=True):
            publish_nowait(client, reply_to, answer, answer_properties(correlation))

    async def release(mark: int, requests: list[tuple[str, bytes, str, bytes]], answers: list[bytes]) -> None:
        nonlocal syncing
        try:
            await service.store.durable(mark)
        finally:
            syncing -= 1
        publish_all(requests, answers)

    async with asyncio.TaskGroup() as group:
        async for message in client.messages:
            batch = [message]
            while len(client.messages) and len(batch) < _BATCH:
                batch.append(await anext(client.messages))
            requests = [r for r in (_request(m, bank) for m in batch) if r is not None]
            # Concurrently: on PostgreSQL each waits on its own connection; on SQLite they take
            # turns on the loop and only their sync is shared.
            answers = await asyncio.gather(*(service.handle(op, payload, defer_sync=True)
                                             for op, payload, _, _ in requests))
            # Nothing leaves before its commit is on disk. With more requests waiting, the sync
            # runs on its thread while the loop answers them (they share the next one); with
            # none, there is nothing to overlap, and syncing right here saves two thread wake-ups.
            if len(client.messages) or syncing:
                mark = service.store.commits
                syncing += 1
                group.create_task(release(mark, requests, answers))
            else:
                service.store.flush()
                publish_all(requests, answers)


async def _sweeper(service: BankService, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            lapsed = await service.sweep()
            if lapsed:
                log.info("lapsed %d blocks past their deadline", lapsed)
        except Exception:
            log.exception("lapse sweep failed; retrying at the next interval")


async def serve(keys: BankKeys, service: BankService, url: str, *,
                sweep_interval: float | None = 5.0, ready: asyncio.Event | None = None,
                metrics_port: int | None = None, tls: TlsLogin | None = None) -> None:
    """Serve the bank until cancelled, reconnecting to the broker whenever it goes away.

    ``sweep_interval`` ``None`` leaves lapse sweeps to another process.
    """
    if metrics_port is not None:
        service.metrics = service.metrics or BankMetrics()
        async with serve_metrics(service.metrics, service.store, metrics_port):
            await serve(keys, service, url, sweep_interval=sweep_interval, ready=ready, tls=tls)
        return
    backoff = 0.2
    client_id = f"bank-{keys.bank}-{uuid.uuid4().hex[:8]}"
    while True:
        try:
            async with connect(url, client_id, tls, max_queued_incoming_messages=10_000) as client:
                await client.publish(f"m2mpay/{keys.bank}/keys", keys.announcement, qos=1, retain=True)
                await client.subscribe(f"$share/{keys.bank}-workers/m2mpay/{keys.bank}/req/+", qos=1)
                log.info("bank %s serving on %s (pid %d)", keys.bank, url, os.getpid())
                backoff = 0.2
                if ready is not None:
                    ready.set()
                async with asyncio.TaskGroup() as group:
                    group.create_task(_answer_batches(client, service, keys.bank), name="bank-requests")
                    if sweep_interval is not None:
                        group.create_task(_sweeper(service, sweep_interval), name="bank-sweeper")
        except* aiomqtt.MqttError as group_error:
            log.warning("broker connection lost (%s); reconnecting in %.1f s",
                        group_error.exceptions[0], backoff)
        await asyncio.sleep(backoff * (0.5 + random.random()))
        backoff = min(backoff * 2, 10.0)
