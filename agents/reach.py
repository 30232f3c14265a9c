"""Reaching the broker, at start and while running: retry what may pass, stop on what never will.

``bank serve`` and ``vendor serve`` follow one rule. Before they start they log in once the way
their MQTT client will (TCP, TLS with the device's certificate, an MQTT v5 CONNECT) and read
the broker's answer. A *transient* failure — nobody listening yet, a timeout, a reset, the
broker saying it is busy or unavailable — is logged and tried again with jittered exponential
backoff, for as long as it takes: a broker that starts after its agents is normal. A
*permanent* failure ends the command (exit status 5) with one line saying what to fix: the
broker's certificate is not signed by our CA (or not for that name), the broker refused our
certificate (unknown CA, revoked, expired), or the broker answered "not authorised" or "bad
user name or password". Retrying those changes nothing and only fills the log.

The probe speaks just enough MQTT v5 (CONNECT, CONNACK, DISCONNECT) to read the broker's
verdict, with the standard library's ``ssl`` so that TLS alerts arrive as exceptions rather than
as a closed connection: with TLS 1.3 a refused client certificate is reported after the
handshake, on the first read.

Once running, the same rule holds (:class:`Reconnect`, used by the bank's serve loop and by every
device's :class:`~m2mpay.agents.mqtt.BankClient`): a connection attempt that fails is judged by
this probe — aiomqtt drops the cause of a TLS failure, and after a TLS 1.3 handshake a refused
certificate reaches it only as a CONNACK that never came, so the client's own exception cannot
tell a revoked certificate from a broker that is restarting. A permanent verdict ends the agent
(:class:`BrokerRefused`, exit status 5); anything else is logged once per attempt with its delay
and tried again, 0.2 s doubling up to 10 s apart (a running agent has requests waiting, so it
tries sooner than one starting). A connection lost after it was up is simply made again; one
that dies within 10 s of being made (a twin with the same certificate taking the session over)
does not reset the backoff, so two such processes cannot spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

from .mqtt import TlsLogin, TransportError, broker_address
from .mqtt_packets import connect

__all__ = ["Backoff", "BrokerRefused", "Reconnect", "probe_login", "wait_for_broker"]

log = logging.getLogger(__name__)

_WAIT = 5.0
"""Seconds for one probe's connect, handshake and CONNACK."""
_BACKOFF_MAX = 30.0

# CONNACK reason codes that no retry can change (MQTT v5 §3.2.2.2).
_PERMANENT = {0x84: "unsupported protocol version", 0x85: "client identifier not valid",
              0x86: "bad user name or password", 0x87: "not authorised", 0x8A: "banned",
              0x8C: "bad authentication method"}


class BrokerRefused(TransportError):
    """The broker will not accept this login however often it is tried (exit status 5)."""


class _Transient(Exception):
    """Worth trying again."""


_CONNACK_MAX = 65536
"""Largest CONNACK body read: a reason string and user properties fit; a hostile length does not."""


def _read_exactly(sock: socket.socket, count: int, deadline: float) -> bytes:
    data = b""
    while len(data) < count:
        if time.monotonic() > deadline:  # a broker that drips bytes does not hold the start-up forever
            raise _Transient("the broker's answer did not come in time")
        chunk = sock.recv(min(count - len(data), 4096))
        if not chunk:
            raise _Transient("the broker closed the connection before answering")
        data += chunk
    return data


_VERDICT_WAIT = 0.5
"""With TLS 1.3 the broker judges our certificate after the handshake: listen this long for its
alert before sending anything (data sent after it would reset the connection and lose it)."""


def _await_verdict(sock: socket.socket, timeout: float) -> None:
    sock.settimeout(_VERDICT_WAIT)
    try:
        if sock.recv(1) == b"":
            raise _Transient("the broker closed the connection after the TLS handshake")
        raise BrokerRefused("the broker spoke before it was asked: not an MQTT broker")
    except TimeoutError:
        pass  # silence: the certificate passed, the broker waits for our CONNECT
    finally:
        sock.settimeout(timeout)


def _alert(exc: ssl.SSLError) -> str:
    """``SSLV3_ALERT_CERTIFICATE_REVOKED`` → ``certificate revoked``."""
    reason = exc.reason or str(exc)
    return reason.split("ALERT_", 1)[-1].replace("_", " ").lower()


def probe_login(url: str, tls: TlsLogin | None, client_id: str, timeout: float = _WAIT) -> None:
    """Log in once and out again; raise :class:`BrokerRefused` or ``_Transient`` (blocking: run it in a thread)."""
    host, port = broker_address(url)
    name = tls.name if tls is not None else client_id
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise _Transient(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    sock: socket.socket = raw
    try:
        try:
            if tls is not None:
                context = ssl.create_default_context(cafile=str(tls.ca))
                context.load_cert_chain(str(tls.cert), str(tls.key))
                sock = context.wrap_socket(raw, server_hostname=host)
                _await_verdict(sock, timeout)
            sock.sendall(connect(name, keepalive=10))
            deadline = time.monotonic() + timeout
            kind, length = _read_exactly(sock, 1, deadline)[0], 0
            for shift in range(0, 28, 7):  # the remaining length, a variable byte integer
                digit = _read_exactly(sock, 1, deadline)[0]
                length += (digit & 0x7F) << shift
                if not digit & 0x80:
                    break
            if length > _CONNACK_MAX:
                raise BrokerRefused(f"{host}:{port} does not answer as an MQTT v5 broker")
            body = _read_exactly(sock, length, deadline)
        except ssl.SSLCertVerificationError as exc:
            raise BrokerRefused(f"the broker at {host}:{port} is not the one {tls.ca if tls else ''} vouches for "
                                f"({exc.verify_message}): check the broker's certificate and the name in the "
                                "URL") from exc
        except ssl.SSLError as exc:
            if "ALERT" in str(exc.reason or exc):  # the broker refused our certificate, in the handshake or after it
                raise BrokerRefused(f"the broker at {host}:{port} refused the certificate "
                                    f"{tls.cert if tls else ''} ({_alert(exc)}): issue this device a certificate "
                                    "from the broker's CA ('m2mpay broker pki add-client')") from exc
            raise _Transient(f"TLS with {host}:{port} failed: {exc.reason or exc}") from exc
        except OSError as exc:
            raise _Transient(f"{host}:{port}: {exc.strerror or exc}") from exc
        if kind >> 4 != 2 or len(body) < 2:
            raise BrokerRefused(f"{host}:{port} does not answer as an MQTT v5 broker")
        code = body[1]
        if code in _PERMANENT:
            raise BrokerRefused(f"the broker at {host}:{port} refused the login {name!r}: {_PERMANENT[code]}")
        if code >= 0x80:
            raise _Transient(f"the broker at {host}:{port} answered reason code 0x{code:02x}")
        with contextlib.suppress(OSError):  # logged in is what we wanted to know
            sock.sendall(b"\xe0\x00")  # DISCONNECT, normal
    finally:
        sock.close()  # the TLS socket took the connection over, if there is one
        raw.close()


class Backoff:
    """Jittered exponential backoff: waits around ``first``, doubling, never longer than ``cap``.

    Each wait is drawn between half and one and a half times the current step, so agents that
    lost the same broker at the same moment do not come back at the same moment.
    """

    def __init__(self, first: float, cap: float) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"backoff needs 0 < first <= cap, not {first} and {cap}")
        self.first, self.cap = first, cap
        self._step = first

    def reset(self) -> None:
        """Start again from ``first`` (after a connection that held)."""
        self._step = self.first

    def next(self) -> float:
        """The next wait in seconds."""
        wait = min(self._step * (0.5 + random.random()), self.cap)  # noqa: S311 - jitter, not a secret
        self._step = min(self._step * 2, self.cap)
        return wait


def _probe_id() -> str:
    """The probe's client id without a certificate (with one, the broker names it after the certificate)."""
    return f"m2mpay-probe-{os.getpid()}-{os.urandom(4).hex()}"


async def wait_for_broker(url: str, tls: TlsLogin | None, *, what: str,
                          sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Return once the broker accepts our login; retry transient failures forever, with backoff.

    Raises :class:`BrokerRefused` on a failure no retry can change. ``what`` names the agent in
    the log (``vendor meter-1``).
    """
    backoff = Backoff(0.5, _BACKOFF_MAX)
    client_id = _probe_id()
    while True:
        try:
            await asyncio.to_thread(probe_login, url, tls, client_id)
            return
        except _Transient as exc:
            wait = backoff.next()
            log.warning("%s: broker not reachable yet (%s); trying again in %.1f s", what, exc, wait)
            await sleep(wait)


RUNNING_FIRST, RUNNING_CAP = 0.2, 4.0  # a request waits 30 attempts of a second: a reconnect falls within it
"""Seconds between reconnect attempts of a running agent: the first, and the most."""
_STABLE = 10.0
"""A connection that held this long resets the backoff; a shorter one counts as a failed attempt."""


class Reconnect:
    """The broker-reconnect rule of a running agent; call :meth:`connected` and :meth:`after`.

    ``what`` names the agent in the log. ``sleep`` and ``clock`` are injectable for tests.
    """

    def __init__(self, url: str, tls: TlsLogin | None, what: str, *, first: float = RUNNING_FIRST,
                 cap: float = RUNNING_CAP, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url, self.tls, self.what = url, tls, what
        self.backoff = Backoff(first, cap)
        self._sleep, self._clock = sleep, clock
        self._since: float | None = None
        self._away = False  # a loss or a failed attempt was logged: the next connection is said
        self._client_id = _probe_id()

    def connected(self) -> None:
        """The broker accepted the connection (its CONNACK came)."""
        self._since = self._clock()
        if self._away:
            self._away = False
            log.info("%s: broker connection restored", self.what)

    async def judge(self, error: BaseException | str) -> str:
        """Log in once to judge a failed attempt: why it failed, when another attempt may pass.

        Raises :class:`BrokerRefused` when none will. Bounded by the probe's own waits.
        """
        try:
            await asyncio.to_thread(probe_login, self.url, self.tls, self._client_id)
        except _Transient as exc:
            return str(exc)
        return str(error)  # the broker takes the login now: the attempt met a passing fault

    async def after(self, error: BaseException | str) -> None:
        """After a connection ended or an attempt failed: wait before the next attempt.

        Raises :class:`BrokerRefused` instead when the attempt failed and the broker will never
        accept this login. A connection that was up is not judged: the next attempt will be.
        """
        self._away = True
        if self._since is not None:
            if self._clock() - self._since >= _STABLE:
                self.backoff.reset()
            self._since = None
            wait = self.backoff.next()
            log.warning("%s: broker connection lost (%s); reconnecting in %.1f s", self.what, error, wait)
        else:
            reason = await self.judge(error)
            wait = self.backoff.next()
            log.warning("%s: broker not reachable (%s); trying again in %.1f s", self.what, reason, wait)
        await self._sleep(wait)
