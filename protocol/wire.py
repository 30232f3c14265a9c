"""Every name m2mpay puts on the wire, written once (DESIGN.md §1, §4-§6; docs/PROTOCOL.md).

Pure: constants and small functions that build and parse names, no I/O. Four kinds:

- **MQTT topics and filters** — the keys announcement (:func:`keys_topic`), the request topic of
  each operation (:func:`request_topic`, parsed back by :func:`request_op`), each device's answer
  topic (:func:`response_topic`, parsed back by :func:`response_name`), and the filters that read
  them (:func:`request_filter`, :func:`shared_request_filter`, :func:`response_filter`).
- **CoAP resources** of a vendor — ``/.well-known/core``, ``/offer``, ``/sessions`` and
  ``/sessions/{id}/{due,pay,close}`` (:func:`session_path`, parsed back by :func:`session_leaf`),
  with the resource types ``/.well-known/core`` lists.
- **Content formats** — :data:`CONTENT_FORMAT_CBOR`, the only one.
- **Signing contexts** — the domain-separation strings of every signature, MAC, KDF and HPKE
  ``info`` (:data:`AAD_CERT` … :func:`sealing_info`): a signature made under one never verifies
  under another.

Every name a topic is built from (a bank, an operation, a device) must be an identifier of the
protocol: 1-32 characters of ``[a-z0-9-_.]`` (:func:`is_name`), so it can never be a wildcard
(``+``, ``#``), another level (``/``) or empty; a builder raises :class:`ValueError` for anything
else, and a parser returns ``None``. Renaming anything here is a change of the wire format:
docs/PROTOCOL.md states each of these names (a test holds the two together), and the broker's
ACL is generated from the filters.
"""

from __future__ import annotations

__all__ = [
    "AAD_CERT",
    "AAD_DELEGATION",
    "AAD_KEYS",
    "AAD_RECEIPT",
    "COIN_DOMAIN",
    "EXCHANGE_SEALING_CONTEXT",
    "WALLET_BLIND_INFO",
    "WALLET_CHAIN_INFO",
    "WALLET_EXTRACT_SALT",
    "WALLET_PREFIX_INFO",
    "WALLET_SALT_INFO",
    "CLOSE",
    "CONTENT_FORMAT_CBOR",
    "DUE",
    "KEYSET_DOMAIN",
    "OFFER_KEY_INFO",
    "OFFER_MAC_CONTEXT",
    "OFFER_PATH",
    "PAY",
    "RT_OFFER",
    "RT_SESSIONS",
    "SESSIONS_PATH",
    "SESSION_LEAVES",
    "TOPIC_ROOT",
    "WELL_KNOWN_CORE_PATH",
    "answer_context",
    "is_name",
    "keys_topic",
    "path_text",
    "request_aad",
    "request_filter",
    "request_op",
    "request_prefix",
    "request_topic",
    "response_filter",
    "response_name",
    "response_prefix",
    "response_topic",
    "sealing_info",
    "session_leaf",
    "session_path",
    "share_group",
    "shared_request_filter",
    "uri",
]

# --- names -----------------------------------------------------------------------------------
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_NAME_MAX = 32


def is_name(text: object) -> bool:
    """Whether ``text`` is an identifier of the protocol (1-32 of ``[a-z0-9-_.]``): a bank, an
    operation, an account, a vendor. The same rule as the messages' identifier fields."""
    return isinstance(text, str) and 0 < len(text) <= _NAME_MAX and _NAME_CHARS.issuperset(text)


def _name(text: str, what: str) -> str:
    if not is_name(text):
        raise ValueError(f"{what} {text!r} is not a name (1-{_NAME_MAX} of [a-z0-9-_.])")
    return text


# --- MQTT (DESIGN.md §6) ----------------------------------------------------------------------
TOPIC_ROOT = "m2mpay"
"""The first level of every m2mpay topic."""
_KEYS = "keys"
_REQ = "req"
_RESP = "resp"
_SINGLE_LEVEL = "+"
_SHARE = "$share"
_WORKERS = "-workers"


def keys_topic(bank: str) -> str:
    """``m2mpay/{bank}/keys``: the bank's keys announcement, retained, QoS 1."""
    return f"{TOPIC_ROOT}/{_name(bank, 'bank')}/{_KEYS}"


def request_prefix(bank: str) -> str:
    """``m2mpay/{bank}/req/``: every request topic of ``bank`` starts with it."""
    return f"{TOPIC_ROOT}/{_name(bank, 'bank')}/{_REQ}/"


def request_topic(bank: str, op: str) -> str:
    """``m2mpay/{bank}/req/{op}``: where requests for the operation ``op`` are published."""
    return request_prefix(bank) + _name(op, "operation")


def request_op(bank: str, topic: str) -> str | None:
    """The operation level of a request topic of ``bank`` (``None`` if ``topic`` is not one).

    The level is returned as it came, even empty (``+`` matches an empty level), and is not
    checked against the operations: the bank answers an operation it does not know with a signed
    ``unknown_op``.
    """
    prefix = request_prefix(bank)
    if not topic.startswith(prefix) or "/" in topic[len(prefix):]:
        return None
    return topic[len(prefix):]


def request_filter(bank: str) -> str:
    """``m2mpay/{bank}/req/+``: every request to ``bank``."""
    return request_prefix(bank) + _SINGLE_LEVEL


def share_group(bank: str) -> str:
    """``{bank}-workers``: the shared-subscription group of the bank's workers."""
    return _name(bank, "bank") + _WORKERS


def shared_request_filter(bank: str) -> str:
    """``$share/{bank}-workers/m2mpay/{bank}/req/+``: the bank's workers share the requests."""
    return f"{_SHARE}/{share_group(bank)}/{request_filter(bank)}"


def response_prefix(bank: str) -> str:
    """``m2mpay/{bank}/resp/``: every answer topic starts with it; the bank answers nowhere else."""
    return f"{TOPIC_ROOT}/{_name(bank, 'bank')}/{_RESP}/"


def response_topic(bank: str, name: str) -> str:
    """``m2mpay/{bank}/resp/{name}``: the answers to the requests ``name`` signed."""
    return response_prefix(bank) + _name(name, "device")


def response_name(bank: str, topic: object) -> str | None:
    """The device a Response Topic names: exactly ``m2mpay/{bank}/resp/{name}`` with ``name`` a
    name (never a wildcard, never another level); ``None`` for anything else."""
    if not isinstance(topic, str):
        return None
    prefix = response_prefix(bank)
    name = topic[len(prefix):]
    return name if topic.startswith(prefix) and is_name(name) else None


def response_filter(bank: str) -> str:
    """``m2mpay/{bank}/resp/+``: every device's answers (what the bank's workers publish to)."""
    return response_prefix(bank) + _SINGLE_LEVEL


# --- CoAP (DESIGN.md §4) ----------------------------------------------------------------------
CONTENT_FORMAT_CBOR = 60
"""CoAP Content-Format of ``application/cbor``: every body, both ways."""
WELL_KNOWN_CORE_PATH: tuple[str, ...] = (".well-known", "core")
"""``/.well-known/core``: the vendor's resources, in link-format (RFC 6690)."""
OFFER_PATH: tuple[str, ...] = ("offer",)
"""``/offer`` (GET): a fresh offer."""
SESSIONS_PATH: tuple[str, ...] = ("sessions",)
"""``/sessions`` (POST): open a session; ``/sessions/{id}/{leaf}`` are the session's own."""
DUE, PAY, CLOSE = "due", "pay", "close"
SESSION_LEAVES: tuple[str, ...] = (DUE, PAY, CLOSE)
"""``/sessions/{id}/due`` (GET, Observe), ``/sessions/{id}/pay`` (POST), ``/sessions/{id}/close`` (POST)."""
RT_OFFER = "m2mpay.offer"
"""The resource type ``/.well-known/core`` lists for the offer: how a wallet finds it."""
RT_SESSIONS = "m2mpay.sessions"
"""The resource type ``/.well-known/core`` lists for ``/sessions``."""
_SESSION_ID_BYTES = 16


def path_text(path: tuple[str, ...]) -> str:
    """A resource path as written in a URI: ``("sessions",)`` → ``/sessions``."""
    return "".join("/" + segment for segment in path)


def uri(base: str, path: tuple[str, ...]) -> str:
    """A vendor's resource at ``base`` (``coap://host:port``): ``uri(base, OFFER_PATH)``."""
    return base + path_text(path)


def session_path(session: bytes, leaf: str) -> tuple[str, ...]:
    """``/sessions/{id}/{leaf}``, the id in lowercase hex."""
    if len(session) != _SESSION_ID_BYTES:
        raise ValueError(f"a session id is {_SESSION_ID_BYTES} bytes")
    if leaf not in SESSION_LEAVES:
        raise ValueError(f"no session resource {leaf!r}")
    return (*SESSIONS_PATH, session.hex(), leaf)


def session_leaf(below_sessions: tuple[str, ...]) -> tuple[str, str] | None:
    """``(id text, leaf)`` of a path below ``/sessions`` (``(id, leaf)``), or ``None`` if it names
    no session resource. The id is returned as text: whether it is a session is the vendor's to say."""
    if len(below_sessions) != 2 or below_sessions[1] not in SESSION_LEAVES:
        return None
    return below_sessions[0], below_sessions[1]


# --- signing contexts (docs/PROTOCOL.md, "Signatures, encryption and encodings") ---------------
COIN_DOMAIN = "m2mpay/coin/1"
"""First element of the CBOR array the bank blind-signs for a coin: ``[COIN_DOMAIN, keyset, tip]``."""
KEYSET_DOMAIN = "m2mpay/keyset/1"
"""First element of the CBOR array a keyset id is the digest of."""
AAD_CERT = b"m2mpay/cert/1"
"""external_aad of a vendor certificate (signed by the CA key)."""
AAD_DELEGATION = b"m2mpay/delegation/1"
"""external_aad of a key delegation (signed by the CA key)."""
AAD_KEYS = b"m2mpay/keys/2"  # /1 was signed by the CA key itself
"""external_aad of the keys announcement (signed by the delegated announcement key)."""
AAD_RECEIPT = b"m2mpay/receipt/1"
"""external_aad of a vendor's final receipt (signed by the vendor's certified key)."""
OFFER_MAC_CONTEXT = "m2mpay/offer/1"
"""First element of the CBOR array an offer's nonce MACs (a vendor's own; opaque to clients)."""
OFFER_KEY_INFO = b"m2mpay/vendor/offer-mac-key/1"
"""HKDF ``info`` deriving a vendor's offer-MAC key from its signing key."""
_REQUEST_CONTEXT = "m2mpay/req/1"
_ANSWER_CONTEXT = "m2mpay/resp/2"
_SEALED_CONTEXT = "m2mpay/sealed/1"


EXCHANGE_SEALING_CONTEXT = "m2mpay/exchange/1"
"""HPKE ``info`` prefix of a sealed exchange proof (``{context}/{bank}``); distinct from a block's."""
WALLET_EXTRACT_SALT = b"m2mpay/wallet/1"
"""HKDF-Extract salt of a wallet seed (docs/LIFECYCLE.md, "The wallet seed")."""
WALLET_CHAIN_INFO = "m2mpay/wallet/chain/1"
"""HKDF info label of a coin's chain secret."""
WALLET_PREFIX_INFO = "m2mpay/wallet/prefix/1"
"""HKDF info label of a coin's RFC 9474 message randomizer."""
WALLET_SALT_INFO = "m2mpay/wallet/salt/1"
"""HKDF info label of a coin's PSS salt."""
WALLET_BLIND_INFO = "m2mpay/wallet/blind/1"
"""HKDF info label of a coin's blinding factor stream."""


def request_aad(bank: str, op: str) -> bytes:
    """external_aad of a request: ``m2mpay/req/1/{bank}/{op}`` (UTF-8)."""
    return f"{_REQUEST_CONTEXT}/{bank}/{op}".encode()


def answer_context(bank: str, op: str) -> bytes:
    """The start of an answer's external_aad: ``m2mpay/resp/2/{bank}/{op}/`` (UTF-8), which the
    32-byte SHA-256 of the request's bytes follows."""
    return f"{_ANSWER_CONTEXT}/{bank}/{op}/".encode()


def sealing_info(bank: str) -> bytes:
    """HPKE ``info`` of an authorization sealed to ``bank``: ``m2mpay/sealed/1/{bank}`` (UTF-8)."""
    return f"{_SEALED_CONTEXT}/{bank}".encode()
