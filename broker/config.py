"""Mosquitto configuration for m2mpay: listener, persistence, TLS, limits and the ACL (DESIGN.md §6).

The ACL lets a device publish only on the request topics of the bank's operations
(``m2mpay/{bank}/req/{op}``) and read only its own answers (``m2mpay/{bank}/resp/{its username}``)
and the retained keys; bank workers read every request through the shared subscription and publish
answers. Every topic is :mod:`m2mpay.protocol.wire`'s (:func:`device_grants`, :func:`bank_grants`).
With certificate logins the username is the certificate's CN and ``use_username_as_clientid``
stops one client from taking over another's client id. Without TLS a username is whatever the
client claims, so an ACL protects nothing: a bank's ACL needs TLS unless ``insecure_acl`` says
otherwise.

Retained messages: Mosquitto 2.0 can switch them off only for everyone (``retain_available`` is
global), and the bank's keys announcement must stay retained; its ACL file cannot tell a retained
publish from another. So a device can leave one retained message on each operation's request
topic, and no other: at most ``len(REQUEST_OPS)`` messages of ``MAX_PACKET_BYTES`` for the whole
broker, overwritten rather than added to. Mosquitto 2.0.13 and later send no retained messages to
a shared subscription; 2.0.11 (Debian 12) does, so a bank worker must subscribe with Retain
Handling 2 (or drop messages flagged retained) for such a leftover never to be served as a request.

TLS: version 1.2 at least, and on 1.2 only ECDHE-ECDSA suites with AEAD ciphers (``TLS12_CIPHERS``:
no CBC, no RSA key exchange; the PKI's keys are P-256); TLS 1.3 suites are all AEAD. Client
certificates are checked against the CA's CRL (``crlfile``, ``ca.crl`` beside ``ca.crt`` unless
given), which Mosquitto reads at start-up.

Limits, all per client: ``MAX_PACKET_BYTES`` for any packet (a larger one ends the connection),
and ``MAX_INFLIGHT_BYTES`` + ``MAX_QUEUED_BYTES`` of answers waiting for a slow or offline
client. An MQTT v5 client's Receive Maximum overrides ``max_inflight_messages`` in Mosquitto
2.0, so the byte caps are the ones that hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from m2mpay.protocol import wire
from m2mpay.protocol.messages import OPS, ErrorAnswer, KeysAnnouncement, Message

from .pki import is_bank_login

__all__ = [
    "MAX_INFLIGHT_BYTES",
    "MAX_PACKET_BYTES",
    "MAX_QUEUED_BYTES",
    "MAX_QUEUED_MESSAGES",
    "REQUEST_OPS",
    "TLS12_CIPHERS",
    "TLS_MIN_VERSION",
    "BrokerConfig",
    "Grant",
    "bank_grants",
    "device_grants",
    "render_acl",
    "render_config",
]

REQUEST_OPS: tuple[str, ...] = tuple(OPS)
"""The operations whose request topics devices may publish on."""

_FRAMING = 2048  # COSE signature and headers, MQTT topic and properties (response topic, correlation data)
_BROKERED: list[type[Message]] = [KeysAnnouncement, ErrorAnswer, *(kind for pair in OPS.values() for kind in pair)]
MAX_PACKET_BYTES = max(kind.MAX_SIZE for kind in _BROKERED) + _FRAMING
"""The largest MQTT packet the broker accepts: the largest message the protocol allows, framed.

Mosquitto applies it to every client alike, so the bank's keys announcement (the largest message)
sets it for devices too."""

MAX_INFLIGHT_MESSAGES = 20  # Mosquitto's default, said out loud
MAX_INFLIGHT_BYTES = 1024 * 1024
"""Bytes sent to one client and not yet acknowledged by it."""
MAX_QUEUED_MESSAGES = 1000  # the default: a bank worker absorbs bursts of requests in its queue
MAX_QUEUED_BYTES = 2 * 1024 * 1024
"""Bytes held for one client beyond those in flight: 32 of the largest withdrawals, or all 1000
messages of typical (~1 KiB) requests. Beyond either cap Mosquitto drops messages, which the
protocol survives: a device repeats a request and the bank answers a repeat from its stored answers."""
SESSION_EXPIRY = "1d"  # a persistent session unused this long is dropped with its queue
MAX_KEEPALIVE_S = 60  # a v5 client asking for more (or for none) is told 60: dead links go within 90 s

TLS_MIN_VERSION = "tlsv1.2"
TLS12_CIPHERS = ":".join(("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                          "ECDHE-ECDSA-CHACHA20-POLY1305"))
"""The suites a TLS 1.2 client may use: forward secret, authenticated encryption, ECDSA certificates."""

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a bank user, written into the ACL file: no newline, no space


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """What a generated Mosquitto configuration says.

    Raises :class:`ValueError` for a bank without TLS (unless ``insecure_acl``), for TLS files given
    only in part, and for a bank or bank user name that is not a plain identifier.
    """

    port: int
    data_dir: Path
    host: str = "127.0.0.1"
    persistence: bool = True
    bank: str | None = None
    """With a bank id the ACL is enforced; without, any local client may do anything (tests, demo)."""
    bank_users: tuple[str, ...] = ("bank",)
    """The certificate names the bank's grants go to: one per worker (:func:`~m2mpay.broker.pki.bank_logins`)."""
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_crl: Path | None = None
    """The CA's CRL (default: ``ca.crl`` beside ``tls_ca``, as ``broker pki`` writes it)."""
    run_as_root: bool = False
    insecure_acl: bool = False
    """Allow a bank's ACL without TLS, where it keys on self-asserted usernames and protects nothing."""

    def __post_init__(self) -> None:
        tls = (self.tls_ca, self.tls_cert, self.tls_key)
        if any(path is None for path in tls) and any(path is not None for path in tls):
            raise ValueError("TLS needs all of tls_ca, tls_cert and tls_key")
        if self.bank is None:
            return
        if not wire.is_name(self.bank):  # it is written into every topic of the ACL
            raise ValueError(f"bank {self.bank!r} is not a name (1-32 of [a-z0-9-_.])")
        for name in self.bank_users:
            if not _NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a plain name ([A-Za-z0-9._-], at most 64)")
            if not is_bank_login(name):  # the PKI issues these names to the bank only, never to a device
                raise ValueError(f"{name!r} is not a bank worker's name (bank, bank-2, bank-3 …)")
        if self.tls_cert is None and not self.insecure_acl:
            raise ValueError("a bank's ACL without TLS client certificates keys on usernames any client "
                             "can claim; give the TLS files (or insecure_acl=True for a test broker)")


USERNAME = "%u"
"""What Mosquitto puts the client's username in place of, in an ACL ``pattern`` line."""


@dataclass(frozen=True, slots=True)
class Grant:
    """One ACL line: ``access`` (``read``, ``write`` or ``readwrite``) to a topic filter."""

    access: str
    topic: str


def device_grants(bank: str, ops: tuple[str, ...] = REQUEST_OPS) -> tuple[Grant, ...]:
    """What every device may do: publish on the request topic of each operation (nothing else, so
    anything it retains stays on these few), read its own answers (:data:`USERNAME` standing for
    its certificate name) and the keys announcement."""
    return (*(Grant("write", wire.request_topic(bank, op)) for op in ops),
            Grant("read", wire.response_prefix(bank) + USERNAME),
            Grant("read", wire.keys_topic(bank)))


def bank_grants(bank: str) -> tuple[Grant, ...]:
    """What a bank worker may do: read every request (alone or in the workers' shared
    subscription), answer any device, and publish the retained keys announcement."""
    return (Grant("read", wire.request_filter(bank)), Grant("read", wire.shared_request_filter(bank)),
            Grant("write", wire.response_filter(bank)), Grant("readwrite", wire.keys_topic(bank)))


def render_acl(bank: str, bank_users: tuple[str, ...], ops: tuple[str, ...] = REQUEST_OPS) -> str:
    """The ACL file: :func:`device_grants` as patterns, :func:`bank_grants` for each bank user.

    Every topic comes from :mod:`m2mpay.protocol.wire`, so a renamed topic changes the ACL with it.
    """
    for user in bank_users:
        if not is_bank_login(user):  # a device under a name given the bank's grants would read every request
            raise ValueError(f"{user!r} is not a bank worker's name (bank, bank-2, bank-3 …)")
    lines = [
        "# generated by m2mpay: devices publish requests, read their own answers and the keys",
        "# (only the operations' topics: anything a device retains stays on these few)",
        # pattern lines: topic lines up here would bind anonymous clients only
        *(f"pattern {grant.access} {grant.topic}" for grant in device_grants(bank, ops)),
        "",
    ]
    for user in bank_users:
        lines += [f"user {user}", *(f"topic {grant.access} {grant.topic}" for grant in bank_grants(bank)), ""]
    return "\n".join(lines)


def render_config(cfg: BrokerConfig) -> str:
    """The mosquitto.conf text; the ACL file (if any) is written beside it by the caller."""
    data = cfg.data_dir.resolve()
    lines = [
        "# generated by m2mpay",
        f"listener {cfg.port} {cfg.host}",
        "set_tcp_nodelay true",  # without it a request/response takes ~90 ms instead of ~0.7 ms
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        f"max_inflight_bytes {MAX_INFLIGHT_BYTES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        f"persistent_client_expiration {SESSION_EXPIRY}",
        f"max_keepalive {MAX_KEEPALIVE_S}",
        f"persistence {'true' if cfg.persistence else 'false'}",
        f"persistence_location {data}/",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]
    if cfg.run_as_root:
        lines.append("user root")
    if cfg.tls_cert is not None and cfg.tls_ca is not None:
        lines += [
            f"cafile {cfg.tls_ca}",
            f"certfile {cfg.tls_cert}",
            f"keyfile {cfg.tls_key}",
            f"crlfile {cfg.tls_crl or cfg.tls_ca.parent / 'ca.crl'}",  # devices revoked with 'broker pki revoke'
            f"tls_version {TLS_MIN_VERSION}",
            f"ciphers {TLS12_CIPHERS}",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "allow_anonymous false",
        ]
    else:
        lines.append("allow_anonymous true")
    if cfg.bank is not None:
        lines.append(f"acl_file {data}/acl")
    return "\n".join(lines) + "\n"
