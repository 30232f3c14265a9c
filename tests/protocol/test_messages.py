"""Every message round-trips, validates itself, and refuses bad peer data with our error only."""

from __future__ import annotations

import contextlib

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2mpay.protocol import cbor
from m2mpay.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from m2mpay.protocol.messages import Coin, Message, Pay

from .catalog import ALL
from .strategies import for_message



def test_catalog_is_complete() -> None:
    names = {cls.__name__ for cls in ALL}
    assert {"WithdrawRequest", "BlockRequest", "SettleRequest", "StatusRequest", "Offer", "OpenSession",
            "Due", "Pay", "Receipt", "FinalReceipt", "KeysAnnouncement", "CertificateBody", "Authorization",
            "ErrorAnswer"} <= names


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
          deadline=None)
@given(data=st.data())
def test_round_trip(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(for_message(cls))
    encoded = msg.encode()
    assert cls.decode(encoded) == msg
    assert cbor.encode(cbor.decode(encoded, max_size=cls.MAX_SIZE)) == encoded  # deterministic


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@settings(max_examples=150, deadline=None)
@given(blob=st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_errors(cls: type[Message], blob: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        cls.decode(blob)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@settings(max_examples=40, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(["v", "index", "token", "tip", "keyset", "code", "x"]),
                           st.none() | st.booleans() | st.integers(-5, 2**70) | st.binary(max_size=40)
                           | st.text(max_size=5) | st.lists(st.integers(), max_size=2), max_size=6))
def test_random_maps_raise_only_protocol_errors(cls: type[Message], obj: dict[str, object]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        cls.decode(cbor.encode(obj))


def _pay_obj(**changes: object) -> bytes:
    obj: dict[str, object] = {"v": 1, "index": 5, "token": b"\x01" * 32}
    obj.update(changes)
    return cbor.encode({k: v for k, v in obj.items() if v is not None})


@pytest.mark.parametrize(
    ("blob", "code"),
    [
        (_pay_obj(index=True), ErrorCode.BAD_REQUEST),  # bool is an int in Python, not here
        (_pay_obj(index=-1), ErrorCode.BAD_REQUEST),
        (_pay_obj(index=1 << 30), ErrorCode.BAD_REQUEST),
        (_pay_obj(token=b"\x01" * 31), ErrorCode.BAD_REQUEST),
        (_pay_obj(token="text"), ErrorCode.BAD_REQUEST),
        (_pay_obj(extra=1), ErrorCode.BAD_REQUEST),
        (_pay_obj(token=None), ErrorCode.BAD_REQUEST),
        (_pay_obj(v=2), ErrorCode.UNSUPPORTED_VERSION),
        (_pay_obj(v=None), ErrorCode.UNSUPPORTED_VERSION),
        (cbor.encode([1, 2]), ErrorCode.BAD_REQUEST),
        (b"\xa1" + b"\x00" * 20000, ErrorCode.TOO_LARGE),
    ],
    ids=["bool-as-int", "negative", "above-max", "short-token", "text-token", "unknown-field",
         "missing-field", "future-version", "no-version", "not-a-map", "oversize"],
)
def test_specific_refusals(blob: bytes, code: ErrorCode) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        Pay.decode(blob)
    assert info.value.code is code
    assert Pay.decode(_pay_obj()) == Pay(index=5, token=b"\x01" * 32)


def test_local_construction_is_checked() -> None:
    with pytest.raises(LocalProtocolError):
        Pay(index=1, token=b"short")
    with pytest.raises(LocalProtocolError):
        Coin(keyset="UPPER", tip=os.urandom(32), prefix=os.urandom(32), sig=os.urandom(256))
    with pytest.raises(AttributeError):
        Pay(index=1, token=b"\x00" * 32).index = 2  # type: ignore[misc]


def test_error_codes_are_unique_and_map_to_coap() -> None:
    wires = [c.wire for c in ErrorCode]
    assert len(wires) == len(set(wires))
    assert all(c.coap[0] in "45" and c.coap[1] == "." for c in ErrorCode)
    assert ErrorCode.from_wire("no-such-code") is ErrorCode.INTERNAL
