"""Every decoder of peer bytes raises only our protocol errors; every state table is total."""

from __future__ import annotations

import contextlib

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from m2mpay.protocol import certificates, cose
from m2mpay.protocol.errors import ProtocolError, RemoteProtocolError
from m2mpay.protocol.messages import Offer, Pay
from m2mpay.protocol.rules import bank, wallet
from m2mpay.protocol.rules.vendor import TRANSITIONS as VENDOR_TRANSITIONS
from m2mpay.protocol.rules.vendor import SessionEvent, SessionState, VendorSession

from .catalog import CA, DECODERS


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=300))
def test_random_bytes(name: str, blob: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        DECODERS[name](blob)


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_valid_input(name: str, data: st.DataObject) -> None:
    """Flip, cut or extend a valid signed blob: still only our errors (or a clean success)."""
    valid = cose.sign1(os.urandom(40), CA, kid=b"bank")
    position = data.draw(st.integers(0, len(valid) - 1))
    mutated = data.draw(st.sampled_from([
        valid[:position] + bytes([valid[position] ^ data.draw(st.integers(1, 255))]) + valid[position + 1:],
        valid[:position],
        valid + data.draw(st.binary(min_size=1, max_size=8)),
    ]))
    with contextlib.suppress(RemoteProtocolError):
        DECODERS[name](mutated)


def test_bank_table_is_total() -> None:
    """Each (status, event) pair transitions or is refused with its code; only lapsing a block
    that is not open is neither (apply_lapse treats it as a no-op and never asks the table)."""
    uncovered = set()
    for status in bank.BlockStatus:
        for event in bank.CoinEvent:
            pair = (status, event)
            assert not (pair in bank.TRANSITIONS and pair in bank.REFUSALS)
            if pair in bank.TRANSITIONS:
                assert bank._step(status, event) is bank.TRANSITIONS[pair]
                continue
            with pytest.raises(RemoteProtocolError) as info:
                bank._step(status, event)
            if pair in bank.REFUSALS:
                assert info.value.code is bank.REFUSALS[pair]
            else:
                uncovered.add(pair)
    lapse = bank.CoinEvent.LAPSE
    assert uncovered == {(bank.BlockStatus.NONE, lapse), (bank.BlockStatus.LAPSED, lapse)}


def _session() -> VendorSession:
    offer = Offer(cert=os.urandom(100), service="s", unit="u", price=1, deadline=100, nonce=os.urandom(16),
                  bank="bank", keysets=("ks-1",))
    return VendorSession(offer, keyring=None, vendor="v")  # type: ignore[arg-type]


@pytest.mark.parametrize("state", list(SessionState), ids=lambda s: s.value)
@pytest.mark.parametrize("event", list(SessionEvent), ids=lambda e: e.value)
def test_vendor_table_pairs_move_or_poison(state: SessionState, event: SessionEvent) -> None:
    session = _session()
    session.state = state
    if (state, event) in VENDOR_TRANSITIONS:
        session._move(event)
        assert session.state is VENDOR_TRANSITIONS[(state, event)]
    else:
        with pytest.raises(ProtocolError):
            session._move(event)
        assert session.state is SessionState.ERROR  # poisoned: refuses further use
        with pytest.raises(ProtocolError):
            session._move(SessionEvent.DUE)


@pytest.mark.parametrize("status", list(wallet.CoinStatus), ids=lambda s: s.value)
@pytest.mark.parametrize("event", list(wallet.WalletEvent), ids=lambda e: e.value)
def test_wallet_table_pairs_move_or_refuse(status: wallet.CoinStatus, event: wallet.WalletEvent) -> None:
    if (status, event) in wallet.TRANSITIONS:
        assert wallet._step(status, event) is wallet.TRANSITIONS[(status, event)]
    else:
        with pytest.raises(ProtocolError):
            wallet._step(status, event)


def test_closed_session_refuses_payment() -> None:
    session = _session()
    with pytest.raises(RemoteProtocolError):
        session.pay(Pay(index=1, token=os.urandom(32)), 0)


def test_certificate_cache_checks_validity_every_time() -> None:
    from m2mpay.protocol.messages import CertificateBody

    body = CertificateBody(bank="bank", vendor="v", account="a", name="V", category="c", key=os.urandom(32),
                           nbf=100, exp=200)
    cert = certificates.issue_certificate(body, CA)
    cache = certificates.CertificateCache(CA.public_key(), "bank")
    assert cache.verify(cert, 150) == body
    assert cache.verify(cert, 199) == body  # from the cache
    with pytest.raises(RemoteProtocolError):
        cache.verify(cert, 200)  # expired, even though cached
    with pytest.raises(RemoteProtocolError):
        cache.verify(certificates.issue_certificate(body, Ed25519PrivateKey.generate()), 150)  # another CA
