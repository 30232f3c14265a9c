"""The bank as an MQTT service: shared subscription, batches of requests, lapse sweeps, reconnects.

A reconnect loop under the broker-reconnect rule (:class:`~m2mpay.agents.reach.Reconnect`: jittered
exponential backoff; a login the broker will never accept again ends :func:`serve` with
:class:`~m2mpay.agents.reach.BrokerRefused`) wraps one connection (the bank's own MQTT client,
:mod:`~m2mpay.agents.bank.link`); inside it a TaskGroup runs
the request handler and the periodic lapse sweep. The handler takes every request that has
arrived, lets :class:`~m2mpay.agents.bank.service.BankService` answer each, makes their commits durable
together, and publishes each answer to its request's Response Topic with its Correlation Data.

Where answers go: a Response Topic must be exactly an answer topic (``m2mpay/{bank}/resp/{name}``,
:func:`~m2mpay.protocol.wire.response_name`) with ``name`` a valid name (so never a wildcard, never
another level); anything else is logged and dropped, since there is nobody to answer. Once the
request's signature is verified, the answer goes only to the signer's own answer topic
(:func:`~m2mpay.protocol.wire.response_topic`): a request that names another device's topic gets
no answer there (its signer's retry finds the stored answer). No single request can end the serve
loop: whatever one request raises becomes a logged refusal or a dropped message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass

from m2mpay.protocol import wire

from ..mqtt import TlsLogin
from ..reach import Reconnect
from .keys import BankKeys, reannounce
from .link import Incoming, Link, LinkError, open_link
from .metrics import BankMetrics, serve_metrics
from .phases import announced
from .service import BankService, Reply

__all__ = ["serve"]

log = logging.getLogger(__name__)


_BATCH = 64  # requests answered together at most: one fdatasync for all of them
_OVERLAP = 4  # batches waiting for PostgreSQL at once, at most


@dataclass(frozen=True, slots=True)
class _Request:
    op: str
    payload: bytes
    reply_to: str
    correlation: bytes


def _request(message: Incoming, bank: str) -> _Request | None:
    """The request a message carries, or ``None`` when nobody can be answered."""
    topic = message.topic
    op = wire.request_op(bank, topic)
    if op is None:
        return None
    if message.retain:
        # A retained request is one some device left on the broker for every future worker:
        # never a live request (devices publish without retain), so never answered.
        log.warning("retained request on %r: dropped", topic[:80])
        return None
    reply_to = message.response_topic
    if reply_to is None or wire.response_name(bank, reply_to) is None:
        log.warning("request on %r without a usable Response Topic: dropped", topic[:80])
        return None
    return _Request(op, message.payload, reply_to, message.correlation or b"")


def _destination(request: _Request, reply: Reply, bank: str) -> str | None:
    """Where the answer goes: the verified signer's own topic, or back where an unverified
    request came from (a refusal signed over that request's digest, useless to anyone else)."""
    if reply.signer is None:
        return request.reply_to
    own = wire.response_topic(bank, reply.signer) if wire.is_name(reply.signer) else None
    if request.reply_to != own:
        log.warning("answer to %s's %s not sent to %r: a signer is answered only on its own topic",
                    reply.signer, request.op[:32], request.reply_to[:80])
        return None
    return own


async def _reply(service: BankService, request: _Request) -> Reply | None:
    try:
        return await service.reply(request.op, request.payload, defer_sync=True)
    except Exception:  # the service answers every input; this is a bug, and it costs one request only
        log.exception("no answer to a %r request", request.op[:32])
        return None


def _reply_now(service: BankService, request: _Request) -> Reply | None:
    try:
        return service.reply_now(request.op, request.payload)
    except Exception:  # as in _reply
        log.exception("no answer to a %r request", request.op[:32])
        return None


async def _replies(service: BankService, requests: list[_Request]) -> list[Reply | None]:
    """Every request's answer. On PostgreSQL they run concurrently, each waiting on a connection
    of its own; on SQLite nothing waits, so they run one after the other without a task each."""
    if service.store.runs_inline:
        return [_reply_now(service, r) for r in requests]
    return list(await asyncio.gather(*(_reply(service, r) for r in requests)))


def _publish(link: Link, bank: str, requests: list[_Request], replies: list[Reply | None]) -> None:
    """Send each answer. A broken connection ends the batch (the answers are stored; devices retry);
    anything one answer raises ends only that answer."""
    for request, reply in zip(requests, replies, strict=True):
        if reply is None:
            continue
        topic = _destination(request, reply, bank)
        if topic is None:
            continue
        try:
            link.publish_nowait(topic, reply.answer, correlation=request.correlation)
        except LinkError:
            raise
        except Exception:
            log.exception("could not publish an answer to %r", topic[:80])


def _parse(batch: list[Incoming], bank: str) -> list[_Request]:
    requests = []
    for message in batch:
        try:
            request = _request(message, bank)
        except Exception:
            log.exception("unreadable MQTT message: dropped")
            continue
        if request is not None:
            requests.append(request)
    return requests


async def _answer_batches(link: Link, service: BankService, bank: str) -> None:
    """Take the requests that have arrived, answer them, make their commits durable at once, send.

    With one request in flight a batch is that request; under load, the requests that arrived
    during the previous batch's sync share the next one. Answers are queued on the link without
    waiting for the broker's PUBACK: each is stored under its request id, so one lost with the
    connection is sent again when its device retries.
    """
    syncing = 0

    async def release(mark: int, requests: list[_Request], replies: list[Reply | None]) -> None:
        nonlocal syncing
        try:
            await service.store.durable(mark)
        finally:
            syncing -= 1
        _publish(link, bank, requests, replies)

    slots = asyncio.Semaphore(_OVERLAP)

    async def overlapped(requests: list[_Request]) -> None:
        try:
            replies = await _replies(service, requests)
        finally:
            slots.release()
        _publish(link, bank, requests, replies)

    async with asyncio.TaskGroup() as group:
        while True:
            batch = [await link.next()]
            while len(link) and len(batch) < _BATCH:
                batch.append(link.take())
            requests = _parse(batch, bank)
            if not service.store.runs_inline:
                # PostgreSQL: a commit is durable when it returns. The next batch is read while
                # this one waits for the server, so the database's transactions take the
                # requests of several batches together (see agents.bank.fastroad).
                await slots.acquire()
                group.create_task(overlapped(requests))
                continue
            replies = await _replies(service, requests)
            # Nothing leaves before its commit is on disk. With more requests waiting, the sync
            # runs on its thread while the loop answers them (they share the next one); with
            # none, there is nothing to overlap, and syncing right here saves two thread wake-ups.
            if len(link) or syncing:
                mark = service.store.commits
                syncing += 1
                group.create_task(release(mark, requests, replies))
            else:
                service.store.flush()
                _publish(link, bank, requests, replies)


async def _sweeper(service: BankService, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            lapsed = await service.sweep()
            if lapsed:
                log.info("lapsed %d blocks past their deadline", lapsed)
        except Exception:
            log.exception("lapse sweep failed; retrying at the next interval")


async def _announcer(link: Link, keys: BankKeys, service: BankService, state: dict[str, bytes],
                     interval: float) -> None:
    """Republish the keys announcement when the vendors revoked or the keysets' phases in the
    database change.

    A revocation is refused at once by every worker (it is read in each block and settlement), and
    so is a withdrawal from a retired keyset (its phase is read at the debit); this tells the
    devices, so wallets stop paying the vendor or withdrawing from the keyset, without a restart.
    """
    warned = 0.0
    while True:
        await asyncio.sleep(interval)
        now = int(service.clock())
        if keys.delegation.exp - now < 30 * 86400 and now - warned >= 3600:
            # Devices refuse an announcement past its delegation: the bank would look dead to them
            log.error("the announcement key's delegation expires at %d (in %d s): run 'm2mpay bank delegate' "
                      "where the CA key is, then restart the bank", keys.delegation.exp, keys.delegation.exp - now)
            warned = now
        if await _refresh(keys, service, state):
            await link.publish(wire.keys_topic(keys.bank), state["announcement"], retain=True)


async def _refresh(keys: BankKeys, service: BankService, state: dict[str, bytes]) -> bool:
    """Sign the announcement again if the revoked vendors or the keysets' phases changed; whether it did."""
    try:
        now = int(service.clock())
        listed = await service.store.run(lambda tx: announced(tx, now))
        fresh = reannounce(keys, state["announcement"], listed.revoked, now, listed=listed)
    except Exception:
        log.exception("could not check the revoked vendors and keyset phases; the announcement stays as it is")
        return False
    if fresh is None:
        return False
    state["announcement"] = fresh
    log.info("keys announcement signed again: %d revoked vendor(s), %d keyset(s), %d phase record(s)",
             len(listed.revoked), len(listed.keysets), len(listed.phases))
    return True


def _first(group: BaseExceptionGroup[LinkError]) -> BaseException:
    """The first error in a (nested) group, for the log: the TaskGroup inside the connection nests its own."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def serve(keys: BankKeys, service: BankService, url: str, *,
                sweep_interval: float | None = 5.0, ready: asyncio.Event | None = None,
                metrics_port: int | None = None, tls: TlsLogin | None = None) -> None:
    """Serve the bank until cancelled, reconnecting to the broker whenever it goes away.

    ``sweep_interval`` ``None`` leaves lapse sweeps to another process. Raises
    :class:`~m2mpay.agents.reach.BrokerRefused` when the broker will never accept our login again.
    """
    if metrics_port is not None:
        service.metrics = service.metrics or BankMetrics()
        async with serve_metrics(service.metrics, service.store, metrics_port):
            await serve(keys, service, url, sweep_interval=sweep_interval, ready=ready, tls=tls)
        return
    rule = Reconnect(url, tls, f"bank {keys.bank}")
    client_id = f"bank-{keys.bank}-{uuid.uuid4().hex[:8]}"
    state = {"announcement": keys.announcement}  # the latest one this process published
    while True:
        error: BaseException | str = "the connection ended"
        try:
            async with open_link(url, client_id, tls) as link:
                rule.connected()
                if sweep_interval is not None:
                    # One process announces (the one that sweeps): another worker, started before
                    # a revocation, must never put an older list back.
                    await _refresh(keys, service, state)
                    await link.publish(wire.keys_topic(keys.bank), state["announcement"], retain=True)
                # Retain Handling 2: a request some device left retained is not handed to a new
                # worker (Mosquitto 2.0.11 does that for shared subscriptions; later ones don't).
                await link.subscribe(wire.shared_request_filter(keys.bank), qos=1, retain_handling=2)
                log.info("bank %s serving on %s (pid %d)", keys.bank, url, os.getpid())
                if ready is not None:
                    ready.set()
                async with asyncio.TaskGroup() as group:
                    group.create_task(_answer_batches(link, service, keys.bank), name="bank-requests")
                    if sweep_interval is not None:  # the one process that sweeps also announces
                        group.create_task(_sweeper(service, sweep_interval), name="bank-sweeper")
                        group.create_task(_announcer(link, keys, service, state, sweep_interval),
                                          name="bank-announcer")
        except* LinkError as group_error:
            error = _first(group_error)
        await rule.after(error)  # logs the attempt and waits; a permanent refusal raises
