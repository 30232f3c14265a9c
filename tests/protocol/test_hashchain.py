"""Hash chains and their traversals: known values, span checks, equivalence and cost bounds."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2mpay.protocol import cbor, hashchain
from m2mpay.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

SEED = bytes(range(32))
STRATEGIES = [hashchain.NaiveTraversal, hashchain.CheckpointTraversal, hashchain.PebbleTraversal]


def test_known_values() -> None:
    one = hashlib.sha256(SEED).digest()
    three = hashlib.sha256(hashlib.sha256(one).digest()).digest()
    assert hashchain.iterate(SEED, 0) == SEED
    assert hashchain.h(SEED) == hashchain.iterate(SEED, 1) == one
    assert hashchain.iterate(SEED, 3) == hashchain.make_chain(SEED, 3) == three


def test_verify_span() -> None:
    tip = hashchain.make_chain(SEED, 10)
    hashchain.verify_span(hashchain.iterate(SEED, 9), 1, tip)
    hashchain.verify_span(hashchain.iterate(SEED, 4), 6, tip)
    bad = [(hashchain.iterate(SEED, 4), 5, ErrorCode.CHAIN_MISMATCH),  # wrong q
           (bytes(32), 1, ErrorCode.CHAIN_MISMATCH),  # wrong token
           (b"short", 1, ErrorCode.BAD_REQUEST),
           (hashchain.iterate(SEED, 9), 0, ErrorCode.BAD_REQUEST)]
    for token, q, code in bad:
        with pytest.raises(RemoteProtocolError) as info:
            hashchain.verify_span(token, q, tip)
        assert info.value.code is code


def test_check_position() -> None:
    hashchain.check_position(0, 5)
    hashchain.check_position(5, 5)
    for index in (-1, 6, True):
        with pytest.raises(RemoteProtocolError):
            hashchain.check_position(index, 5)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), data=st.data())
def test_every_strategy_equals_direct_computation(n: int, data: st.DataObject) -> None:
    p = data.draw(st.integers(1, n))
    expected = [(i, hashchain.iterate(SEED, i)) for i in range(p - 1, -1, -1)] if p <= 200 else None
    outputs = {}
    for cls in STRATEGIES:
        walker = cls(SEED, n, p)
        outputs[cls] = [walker.next() for _ in range(p)]
        assert walker.remaining == 0
        with pytest.raises(LocalProtocolError):
            walker.next()
    naive = outputs[hashchain.NaiveTraversal]
    assert [i for i, _ in naive] == list(range(p - 1, -1, -1))
    assert outputs[hashchain.CheckpointTraversal] == naive == outputs[hashchain.PebbleTraversal]
    if expected is not None:
        assert naive == expected


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 2000), data=st.data())
def test_state_round_trips_mid_way_through_cbor(n: int, data: st.DataObject) -> None:
    p = data.draw(st.integers(2, n))
    steps = data.draw(st.integers(0, p - 1))
    for cls in STRATEGIES:
        walker = cls(SEED, n, p)
        for _ in range(steps):
            walker.next()
        state = cbor.decode(cbor.encode(walker.to_state()), max_size=1 << 20)
        resumed = cls.from_state(state)  # type: ignore[attr-defined]
        reference = cls(SEED, n, p)
        reference.skip_to(p - steps)
        assert [resumed.next() for _ in range(p - steps)] == [reference.next() for _ in range(p - steps)]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 2000), data=st.data())
def test_skip_to_leaves_a_gap_and_goes_on(n: int, data: st.DataObject) -> None:
    p = data.draw(st.integers(2, n))
    target = data.draw(st.integers(0, p - 1))
    walker = hashchain.PebbleTraversal(SEED, n, p)
    walker.next()
    walker.skip_to(target)
    if target:
        assert walker.next() == (target - 1, hashchain.iterate(SEED, target - 1))
    with pytest.raises(LocalProtocolError):
        walker.skip_to(walker.position + 1)


@pytest.mark.parametrize("exponent", [10, 12, 14])
def test_pebbling_cost_bounds_over_a_whole_chain(exponent: int) -> None:
    """At most ⌈k/2⌉ hashes for every token and at most k+1 stored values (n = 2^k)."""
    n = 1 << exponent
    walker = hashchain.PebbleTraversal(SEED, n, n)
    worst, most, before = 0, walker.stored, 0
    for _ in range(n):
        walker.next()
        worst, before = max(worst, walker.hashes - before), walker.hashes
        most = max(most, walker.stored)
    assert worst == math.ceil(exponent / 2)
    assert most <= exponent + 1
    assert walker.hashes <= n * math.ceil(exponent / 2)


def test_naive_costs_more_than_pebbling() -> None:
    naive, pebble = hashchain.NaiveTraversal(SEED, 256, 256), hashchain.PebbleTraversal(SEED, 256, 256)
    for _ in range(256):
        naive.next()
        pebble.next()
    assert pebble.hashes * 10 < naive.hashes


def test_damaged_state_is_refused() -> None:
    state = hashchain.PebbleTraversal(SEED, 16, 16).to_state()
    without_z = {k: v for k, v in state.items() if k != "z"}
    for broken in ({**state, "z": state["z"][:-1]}, {**state, "r": 10**6}, without_z):
        with pytest.raises(LocalProtocolError):
            hashchain.PebbleTraversal.from_state(broken)
