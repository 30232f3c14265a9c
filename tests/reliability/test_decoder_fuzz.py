"""Every decoder of peer bytes, fuzzed: mutations of valid encodings (from the message strategies)
and random bytes. Only our protocol errors may come out, or a clean decode. Light: 300 inputs per
decoder; heavy (``make reliability``): 10,000 per decoder."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2mpay.protocol.errors import RemoteProtocolError

from ..protocol.strategies import for_message
from ..protocol.catalog import ALL, DECODERS
from .faults import mutate

SURFACES = {f"message:{cls.__name__}": cls.decode for cls in ALL} | {f"decoder:{n}": f for n, f in DECODERS.items()}


def _seeds(count: int) -> list[bytes]:
    """Valid encodings of every message, drawn by hypothesis."""
    found: list[bytes] = []

    @settings(max_examples=count, suppress_health_check=list(HealthCheck), deadline=None, database=None)
    @given(data=st.data())
    def draw(data: st.DataObject) -> None:
        cls = data.draw(st.sampled_from(ALL))
        found.append(data.draw(for_message(cls)).encode())

    draw()
    return found


def _fuzz(count: int) -> Counter[str]:
    seeds = _seeds(60)
    rng = random.Random(25112026)
    outcomes: Counter[str] = Counter()
    for decode in SURFACES.values():
        for _ in range(count):
            blob = mutate(rng, rng.choice(seeds))
            try:
                decode(blob)
                outcomes["decoded"] += 1
            except RemoteProtocolError as refusal:
                outcomes[refusal.code.wire] += 1
    return outcomes


def test_every_decoder_fuzzed() -> None:
    outcomes = _fuzz(300)
    assert sum(outcomes.values()) == 300 * len(SURFACES)


@pytest.mark.heavy
def test_every_decoder_fuzzed_10000() -> None:
    outcomes = _fuzz(10_000)
    print(f"decoder fuzz: {len(SURFACES)} decoders × 10,000:", dict(outcomes))
    assert sum(outcomes.values()) == 10_000 * len(SURFACES)
