"""Hypothesis strategies for every message, derived from the field kinds of its schema."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import strategies as st

from m2mpay.protocol.messages import MAX_TOKENS, PHASES, KeysetInfo, KeysetPhase, Message, keyset_id
from m2mpay.protocol.messages._schema import Bool, Bytes, Kind, ListOf, Nested, Optional, Text, UInt

_IDENT = "abcdefghijklmnopqrstuvwxyz0123456789-_."


def for_kind(kind: Kind[Any]) -> st.SearchStrategy[Any]:
    """Values that ``kind`` accepts."""
    if isinstance(kind, Bytes):
        return st.binary(min_size=kind.min_len, max_size=min(kind.max_len, kind.min_len + 64))
    if isinstance(kind, Text):
        alphabet = _IDENT if kind.ident else st.characters(codec="utf-8")
        return st.text(alphabet, min_size=max(kind.min_len, 1 if kind.ident else 0), max_size=kind.max_len)
    if isinstance(kind, UInt):
        return st.integers(kind.minimum, kind.maximum)
    if isinstance(kind, Bool):
        return st.booleans()
    if isinstance(kind, Nested):
        return for_message(kind.cls)
    if isinstance(kind, ListOf):
        return st.lists(for_kind(kind.inner), min_size=kind.min_items, max_size=min(kind.max_items, 3)).map(tuple)
    if isinstance(kind, Optional):
        return st.none() | for_kind(kind.inner)
    raise TypeError(kind)


@st.composite
def _keyset(draw: st.DrawFn) -> KeysetInfo:
    n = draw(st.integers(1, MAX_TOKENS))
    value = n * draw(st.integers(1, 1000))
    withdraw_until = draw(st.integers(0, 1 << 39))
    spend_until = withdraw_until + draw(st.integers(0, 1 << 20))
    key = draw(st.binary(min_size=200, max_size=300))
    return KeysetInfo(id=keyset_id(value, n, "EUR", withdraw_until, spend_until, key), value=value, n=n,
                      currency="EUR", withdraw_until=withdraw_until, spend_until=spend_until, public_key=key)


@st.composite
def _phase(draw: st.DrawFn) -> KeysetPhase:
    withdraw_until = draw(st.integers(0, 1 << 39))
    retired = draw(st.none() | st.integers(withdraw_until, 1 << 40))
    return KeysetPhase(keyset=draw(st.text(_IDENT, min_size=1, max_size=32)), phase=draw(st.sampled_from(PHASES)),
                       withdraw_until=withdraw_until, redeem_until=draw(st.integers(withdraw_until, 1 << 40)),
                       retired=retired)


def for_message(cls: type[Message]) -> st.SearchStrategy[Any]:
    """Valid instances of ``cls`` (drawn values failing cross-field checks are filtered out)."""
    if cls is KeysetInfo:
        return _keyset()
    if cls is KeysetPhase:
        return _phase()
    fields = {f.name: for_kind(f.metadata["kind"]) for f in dataclasses.fields(cls)}

    def build(values: dict[str, Any]) -> Any:
        try:
            return cls(**values)
        except Exception:  # noqa: BLE001 - whatever a cross-field rule raises, the draw is discarded
            return None

    return st.fixed_dictionaries(fields).map(build).filter(lambda m: m is not None)
