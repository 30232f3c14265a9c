"""The bank as an MQTT service: shared subscription, N workers, lapse sweeps, reconnects.

A reconnect loop (jittered exponential backoff) wraps one connection; inside it a TaskGroup runs
the workers, which share the incoming queue, and the periodic lapse sweep. Each worker takes a
request, lets :class:`~agents.bank.service.BankService` answer it, and publishes the answer to
the request's Response Topic with its Correlation Data. A request without a Response Topic, or
with one outside ``m2mpay/{bank}/resp/``, is logged and dropped: there is nobody to answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid

import aiomqtt

from ..mqtt import TlsLogin, answer_properties, connect, response_prefix
from .keys import BankKeys
from .metrics import BankMetrics, serve_metrics
from .service import BankService

__all__ = ["serve"]

log = logging.getLogger(__name__)


async def _worker(client: aiomqtt.Client, service: BankService, bank: str) -> None:
    prefix = f"m2mpay/{bank}/req/"
    async for message in client.messages:
        topic = message.topic.value
        if not topic.startswith(prefix):
            continue
        op = topic[len(prefix):]
        reply_to = getattr(message.properties, "ResponseTopic", None)
        correlation = getattr(message.properties, "CorrelationData", None) or b""
        if not reply_to or not str(reply_to).startswith(response_prefix(bank)):
            log.warning("request on %s without a usable Response Topic: dropped", topic[:80])
            continue
        payload = bytes(message.payload) if isinstance(message.payload, (bytes, bytearray)) else b""
        answer = await service.handle(op, payload)
        await client.publish(str(reply_to), answer, qos=1, properties=answer_properties(bytes(correlation)))


async def _sweeper(service: BankService, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            lapsed = await service.sweep()
            if lapsed:
                log.info("lapsed %d blocks past their deadline", lapsed)
        except Exception:
            log.exception("lapse sweep failed; retrying at the next interval")


async def serve(keys: BankKeys, service: BankService, url: str, *, workers: int = 4,
                sweep_interval: float = 5.0, ready: asyncio.Event | None = None,
                metrics_port: int | None = None, tls: TlsLogin | None = None) -> None:
    """Serve the bank until cancelled, reconnecting to the broker whenever it goes away."""
    if metrics_port is not None:
        service.metrics = service.metrics or BankMetrics()
        async with serve_metrics(service.metrics, service.store, metrics_port):
            await serve(keys, service, url, workers=workers, sweep_interval=sweep_interval, ready=ready, tls=tls)
        return
    backoff = 0.2
    client_id = f"bank-{keys.bank}-{uuid.uuid4().hex[:8]}"
    while True:
        try:
            async with connect(url, client_id, tls, max_queued_incoming_messages=10_000) as client:
                await client.publish(f"m2mpay/{keys.bank}/keys", keys.announcement, qos=1, retain=True)
                await client.subscribe(f"$share/{keys.bank}-workers/m2mpay/{keys.bank}/req/+", qos=1)
                log.info("bank %s serving on %s with %d workers", keys.bank, url, workers)
                backoff = 0.2
                if ready is not None:
                    ready.set()
                async with asyncio.TaskGroup() as group:
                    for i in range(workers):
                        group.create_task(_worker(client, service, keys.bank), name=f"bank-worker-{i}")
                    group.create_task(_sweeper(service, sweep_interval), name="bank-sweeper")
        except* aiomqtt.MqttError as group_error:
            log.warning("broker connection lost (%s); reconnecting in %.1f s",
                        group_error.exceptions[0], backoff)
        await asyncio.sleep(backoff * (0.5 + random.random()))
        backoff = min(backoff * 2, 10.0)
