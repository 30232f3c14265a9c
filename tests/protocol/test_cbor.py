"""Strict deterministic CBOR: what we accept, what we refuse, and that refusals are ours."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2mpay.protocol import cbor
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=8) | st.integers(-1000, 1000), inner, max_size=5),
    max_leaves=20,
)


@given(values)
def test_round_trip(value: object) -> None:
    assert cbor.decode(cbor.encode(value)) == value


def test_map_keys_in_bytewise_order_of_their_encoding() -> None:
    # RFC 8949 §4.2.1: 24 (0x1818) sorts before "" (0x60), unlike length-first ordering.
    assert cbor.encode({"": 1, 24: 2}) == bytes.fromhex("a2 1818 02 60 01")
    assert cbor.decode(bytes.fromhex("a2 1818 02 60 01")) == {24: 2, "": 1}
    with pytest.raises(RemoteProtocolError):
        cbor.decode(bytes.fromhex("a2 60 01 1818 02"))


@settings(max_examples=500)
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_our_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        cbor.decode(data)


REFUSED = [
    ("empty", b""),
    ("truncated", bytes.fromhex("43 0102")),
    ("trailing", bytes.fromhex("01 01")),
    ("non-shortest int", bytes.fromhex("1801")),
    ("non-shortest 2-byte", bytes.fromhex("1900ff")),
    ("indefinite array", bytes.fromhex("9f01ff")),
    ("float", bytes.fromhex("f93c00")),
    ("undefined", bytes.fromhex("f7")),
    ("tag 35 regex", bytes.fromhex("d823") + cbor2.dumps("a+")),
    ("tag 36 mime", bytes.fromhex("d824") + cbor2.dumps("x")),
    ("bignum tag", bytes.fromhex("c2 41 01")),
    ("unsorted map", bytes.fromhex("a2 6162 01 6161 02")),
    ("duplicate key", bytes.fromhex("a2 6161 01 6161 02")),
    ("bytes map key", bytes.fromhex("a1 4161 01")),
    ("bad utf-8", bytes.fromhex("62 c328")),
    ("length beyond data", bytes.fromhex("5a 7fffffff 00")),
    ("array count lie", bytes.fromhex("9b 00000001 00000000")),
]


@pytest.mark.parametrize("data", [d for _, d in REFUSED], ids=[n for n, _ in REFUSED])
def test_refusals(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        cbor.decode(data)


def test_depth_limit() -> None:
    nested = b"\x81" * 9 + b"\x00"
    with pytest.raises(RemoteProtocolError, match="deeply"):
        cbor.decode(nested)
    assert cbor.decode(b"\x81" * 8 + b"\x00", max_depth=8) == [[[[[[[[0]]]]]]]]


def test_size_limit_has_its_own_code() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        cbor.decode(cbor.encode(b"x" * 100), max_size=50)
    assert info.value.code is ErrorCode.TOO_LARGE
