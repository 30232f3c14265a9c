"""The wire names: their exact values, the names they refuse, and docs/PROTOCOL.md stating each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from m2mpay.protocol import wire
from m2mpay.protocol.messages import OPS, is_name

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
SID = bytes(range(16))

# A rename here is a change of the wire format: every device and bank in the field speaks these.
EXACT: list[tuple[str, object, object]] = [
    ("keys topic", wire.keys_topic("b1"), "m2mpay/b1/keys"),
    ("request topic", wire.request_topic("b1", "withdraw"), "m2mpay/b1/req/withdraw"),
    ("request prefix", wire.request_prefix("b1"), "m2mpay/b1/req/"),
    ("request filter", wire.request_filter("b1"), "m2mpay/b1/req/+"),
    ("share group", wire.share_group("b1"), "b1-workers"),
    ("shared request filter", wire.shared_request_filter("b1"), "$share/b1-workers/m2mpay/b1/req/+"),
    ("response topic", wire.response_topic("b1", "meter-1"), "m2mpay/b1/resp/meter-1"),
    ("response prefix", wire.response_prefix("b1"), "m2mpay/b1/resp/"),
    ("response filter", wire.response_filter("b1"), "m2mpay/b1/resp/+"),
    ("content format", wire.CONTENT_FORMAT_CBOR, 60),
    ("well-known", wire.path_text(wire.WELL_KNOWN_CORE_PATH), "/.well-known/core"),
    ("offer", wire.uri("coap://[::1]:5683", wire.OFFER_PATH), "coap://[::1]:5683/offer"),
    ("sessions", wire.path_text(wire.SESSIONS_PATH), "/sessions"),
    ("due", wire.path_text(wire.session_path(SID, wire.DUE)), "/sessions/000102030405060708090a0b0c0d0e0f/due"),
    ("pay", wire.path_text(wire.session_path(SID, wire.PAY)), "/sessions/000102030405060708090a0b0c0d0e0f/pay"),
    ("close", wire.path_text(wire.session_path(SID, wire.CLOSE)),
     "/sessions/000102030405060708090a0b0c0d0e0f/close"),
    ("rt offer", wire.RT_OFFER, "m2mpay.offer"),
    ("rt sessions", wire.RT_SESSIONS, "m2mpay.sessions"),
    ("coin", wire.COIN_DOMAIN, "m2mpay/coin/1"),
    ("keyset", wire.KEYSET_DOMAIN, "m2mpay/keyset/1"),
    ("cert", wire.AAD_CERT, b"m2mpay/cert/1"),
    ("delegation", wire.AAD_DELEGATION, b"m2mpay/delegation/1"),
    ("keys", wire.AAD_KEYS, b"m2mpay/keys/2"),
    ("receipt", wire.AAD_RECEIPT, b"m2mpay/receipt/1"),
    ("offer mac", wire.OFFER_MAC_CONTEXT, "m2mpay/offer/1"),
    ("offer key", wire.OFFER_KEY_INFO, b"m2mpay/vendor/offer-mac-key/1"),
    ("request aad", wire.request_aad("b1", "settle"), b"m2mpay/req/1/b1/settle"),
    ("answer context", wire.answer_context("b1", "error"), b"m2mpay/resp/2/b1/error/"),
    ("sealing info", wire.sealing_info("b1"), b"m2mpay/sealed/1/b1"),
]


@pytest.mark.parametrize(("what", "got", "expected"), EXACT, ids=[row[0] for row in EXACT])
def test_exact_wire_names(what: str, got: object, expected: object) -> None:
    assert got == expected


HOSTILE_NAMES = ["", "+", "#", "a/b", "a+", "UPPER", "a" * 33, "x\u0000y", "é", " a"]
BUILDERS: list[tuple[str, Callable[[str], object]]] = [
    ("keys_topic", wire.keys_topic),
    ("request_topic bank", lambda name: wire.request_topic(name, "block")),
    ("request_topic op", lambda name: wire.request_topic("b1", name)),
    ("request_filter", wire.request_filter),
    ("shared_request_filter", wire.shared_request_filter),
    ("response_topic bank", lambda name: wire.response_topic(name, "alice")),
    ("response_topic device", lambda name: wire.response_topic("b1", name)),
    ("response_filter", wire.response_filter),
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize(("builder", "build"), BUILDERS, ids=[row[0] for row in BUILDERS])
def test_builders_refuse_what_is_not_a_name(builder: str, build: Callable[[str], object], name: str) -> None:
    """A wildcard, a level separator or a NUL never gets into a topic (nor the ACL built from them)."""
    with pytest.raises(ValueError, match="is not a name"):
        build(name)


@pytest.mark.parametrize("name", [*HOSTILE_NAMES, "alice", "a" * 32, "v-1.x_2"])
def test_name_rule_is_the_messages_rule(name: str) -> None:
    assert wire.is_name(name) is is_name(name)


@pytest.mark.parametrize(("topic", "name"), [
    ("m2mpay/b1/resp/alice", "alice"),
    ("m2mpay/b1/resp/+", None), ("m2mpay/b1/resp/#", None), ("m2mpay/b1/resp/a/b", None),
    ("m2mpay/b1/resp/", None), ("m2mpay/b1/resp/x\u0000y", None), ("m2mpay/b1/resp/" + "a" * 40, None),
    ("m2mpay/b1/resp/UPPER", None), ("m2mpay/other/resp/alice", None), ("m2mpay/b1/req/alice", None),
    (None, None), (b"m2mpay/b1/resp/alice", None),
])
def test_response_name_accepts_exactly_one_device(topic: object, name: str | None) -> None:
    assert wire.response_name("b1", topic) == name


@pytest.mark.parametrize(("topic", "op"), [
    ("m2mpay/b1/req/withdraw", "withdraw"), ("m2mpay/b1/req/junk", "junk"), ("m2mpay/b1/req/", ""),
    ("m2mpay/b1/req/withdraw/more", None), ("m2mpay/b1/resp/alice", None), ("m2mpay/b2/req/block", None),
    ("m2mpay/b1/keys", None),
])
def test_request_op(topic: str, op: str | None) -> None:
    """The level as it came: the bank answers an unknown one with a signed ``unknown_op``."""
    assert wire.request_op("b1", topic) == op


def test_every_operation_has_a_request_topic() -> None:
    assert [wire.request_op("b1", wire.request_topic("b1", op)) for op in OPS] == list(OPS)


@pytest.mark.parametrize(("below", "route"), [
    (("00ff", "pay"), ("00ff", "pay")), (("x", "due"), ("x", "due")), (("x", "close"), ("x", "close")),
    (("x", "other"), None), (("x",), None), (("x", "pay", "more"), None), ((), None),
])
def test_session_leaf(below: tuple[str, ...], route: tuple[str, str] | None) -> None:
    assert wire.session_leaf(below) == route


@pytest.mark.parametrize(("session", "leaf"), [(bytes(15), "pay"), (bytes(17), "pay"), (SID, "other"), (SID, "")])
def test_session_path_refuses(session: bytes, leaf: str) -> None:
    with pytest.raises(ValueError):
        wire.session_path(session, leaf)


def _template(text: str) -> str:
    """A name built for placeholder names, written as the document writes it."""
    return text.replace("zzbankzz", "{bank}").replace("zzopzz", "{op}").replace("zznamezz", "{name}")


def _stated() -> list[str]:
    bank, op, name = "zzbankzz", "zzopzz", "zznamezz"
    topics = [wire.keys_topic(bank), wire.request_topic(bank, op), wire.response_topic(bank, name),
              wire.shared_request_filter(bank)]
    contexts = [wire.request_aad(bank, op).decode(), wire.answer_context(bank, op).decode(),
                wire.sealing_info(bank).decode(), wire.COIN_DOMAIN, wire.KEYSET_DOMAIN, wire.OFFER_MAC_CONTEXT,
                *(aad.decode() for aad in (wire.AAD_CERT, wire.AAD_DELEGATION, wire.AAD_KEYS, wire.AAD_RECEIPT,
                                           wire.OFFER_KEY_INFO))]
    paths = [wire.path_text(path) for path in (wire.WELL_KNOWN_CORE_PATH, wire.OFFER_PATH, wire.SESSIONS_PATH)]
    paths += [f"{wire.path_text(wire.SESSIONS_PATH)}/{{id}}/{leaf}" for leaf in wire.SESSION_LEAVES]
    return [*(_template(t) for t in topics + contexts), *paths, f"rt={wire.RT_OFFER}", f"rt={wire.RT_SESSIONS}",
            f"content-format {wire.CONTENT_FORMAT_CBOR}"]


@pytest.mark.parametrize("name", _stated())
def test_protocol_doc_states_every_wire_name(name: str) -> None:
    """docs/PROTOCOL.md is the normative wire spec: it must state each name exactly as the code has it."""
    assert name in DOC.read_text()
