"""Attacks on the bank that the protocol tests do not already cover, through the bank service on
SQLite and PostgreSQL: multiplicative forgeries, forged settlements, and unlinkability."""

from __future__ import annotations

import dataclasses
import os

import gmpy2
import pytest

from tests.bank_world import BankWorld
from m2mpay.protocol import blindrsa, cbor, cose
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import BlockRequest, Coin, WithdrawAnswer, WithdrawRequest
from m2mpay.protocol.rules import wallet

pytestmark = pytest.mark.asyncio


async def _refusal(world: BankWorld, op: str, data: bytes) -> ErrorCode:
    raw = await world.send(op, data)
    with pytest.raises(RemoteProtocolError) as info:
        world.open(raw, op, WithdrawAnswer, request=data)
    return info.value.code


async def test_multiplicative_forgery_from_small_blinded_values(world: BankWorld) -> None:
    """Blind signatures on 2 and 3 give (2·3)^d; no product of them is a coin (PSS encodes)."""
    user, vendor = world.user("mallory", deposit=10_000), world.vendor("meter")
    info, public = world.keys.keyring.keysets[world.keyset], world.keys.keyring.rsa_keys[world.keyset]
    small = [(2).to_bytes(public.size, "big"), (3).to_bytes(public.size, "big")]
    request = WithdrawRequest(account="mallory", keyset=info.id, blinded=tuple(small), req_id=os.urandom(16))
    signed = user.sign(request, "withdraw")
    answer = world.open(await world.send("withdraw", signed), "withdraw", WithdrawAnswer, request=signed)
    assert isinstance(answer, WithdrawAnswer)  # the bank signs blindly: it cannot tell
    s2, s3 = (int.from_bytes(s, "big") for s in answer.blind_sigs)
    n, e = public.n, public.e
    assert gmpy2.powmod(s2 * s3 % n, e, n) == 6  # a valid raw RSA signature on 6 ...
    # ... but a coin's signature must verify as RSASSA-PSS over its own message, so none of these
    # combinations is a coin, whatever tip they are put on.
    (genuine,) = await world.withdraw(user)
    _, _, signed = world.session(vendor, genuine)
    template = BlockRequest.decode(cose.decode_sign1(signed).payload)
    for forged_sig in (s2 * s3 % n, s2 * s2 % n, s2, s3, s2 * pow(s3, -1, n) % n):
        forged = dataclasses.replace(genuine.coin, sig=int(forged_sig).to_bytes(public.size, "big"))
        assert not blindrsa.is_valid(public, forged.signed_input, forged.sig, blindrsa.SHA384_PSS_RANDOMIZED)
        with pytest.raises(RemoteProtocolError):  # an honest vendor refuses it before asking the bank
            world.session(vendor, dataclasses.replace(genuine, coin=forged))
        block = vendor.sign(dataclasses.replace(template, coin=forged, req_id=os.urandom(16)), "block")
        assert await _refusal(world, "block", block) is ErrorCode.BAD_SIGNATURE  # and so does the bank
    report = world.audit()
    assert report.ok and report.coins == 0  # no forged coin was ever registered


async def test_forged_settlements_are_refused(world: BankWorld) -> None:
    user, vendor, thief = world.user("alice"), world.vendor("meter"), world.vendor("thief")
    (wc,) = await world.withdraw(user)
    wc, session = await world.block(vendor, wc)
    wc, pay = wallet.reveal(wc, 5)
    session.pay(pay, world.clock.now)
    request = session.settle_request(os.urandom(16), keep_open=False)
    # Signed by another vendor, for this vendor's session: the session is not the thief's.
    assert await _refusal(world, "settle", thief.sign(request, "settle")) is ErrorCode.SESSION_CLOSED
    # A token that does not hash up to the coin, and a position above what the chain allows.
    bad_token = dataclasses.replace(request, req_id=os.urandom(16), token=os.urandom(32))
    assert await _refusal(world, "settle", vendor.sign(bad_token, "settle")) is ErrorCode.CHAIN_MISMATCH
    # Unsigned bytes (the request's CBOR with a signature of zeros).
    signed = bytearray(vendor.sign(request, "settle"))
    signed[-64:] = bytes(64)
    assert await _refusal(world, "settle", bytes(signed)) is ErrorCode.BAD_SIGNATURE
    assert world.audit().credited == 0
    answer = await world.settle(vendor, session)  # the genuine settlement still goes through
    assert answer.credited == 6


async def test_the_bank_cannot_link_a_spend_to_its_withdrawal(world: BankWorld) -> None:
    """What the bank holds from withdrawals (blinded messages seen, blind signatures given) and
    what it stores at spending (tip, chain, the coin's signature) share no value, and the
    linking test a bank could try — is this coin's encoded message one of the blinded ones? — fails."""
    user, vendor = world.user("alice"), world.vendor("meter")
    info, public = world.keys.keyring.keysets[world.keyset], world.keys.keyring.rsa_keys[world.keyset]
    pendings = [wallet.prepare_withdrawal("alice", info, public, 4) for _ in range(3)]
    seen_blinded = [m for p in pendings for m in p.request.blinded]
    coins = []
    for pending in pendings:
        signed = user.sign(pending.request, "withdraw")
        answer = world.open(await world.send("withdraw", signed), "withdraw", WithdrawAnswer, request=signed)
        coins += wallet.complete_withdrawal(pending, answer, info, public)  # type: ignore[arg-type]
    for wc in coins:
        wc, session = await world.block(vendor, wc)
        wc, pay = wallet.reveal(wc, 3)
        session.pay(pay, world.clock.now)
        await world.settle(vendor, session)
    withdrawal_values: set[bytes] = set(seen_blinded)
    spend_values: set[bytes] = set()
    for signer, _req, answer in world.store.run_sync(lambda tx: tx.all("SELECT signer, req_id, answer FROM answers")):
        payload = cbor.decode(cbor.decode(bytes(answer))[2])
        target = withdrawal_values if signer == "alice" else spend_values
        target |= {bytes(v) for v in _blobs(payload)}
    for record in world.store.run_sync(lambda tx: tx.coins()):
        spend_values |= {record.tip, record.last}
    spend_values |= {wc.coin.sig for wc in coins} | {wc.coin.tip for wc in coins}
    assert len(withdrawal_values) > 12 and len(spend_values) > 12
    assert not withdrawal_values & spend_values
    # The bank's best linking test: the coin's signature, raised to e, is the EMSA-PSS encoding of
    # the coin; the blinded message is that encoding times r^e. They never match.
    n, e = public.n, public.e
    encodings = {int(gmpy2.powmod(int.from_bytes(wc.coin.sig, "big"), e, n)) for wc in coins}
    assert not encodings & {int.from_bytes(m, "big") for m in seen_blinded}
    assert world.audit().ok


def _blobs(value: object) -> list[bytes]:
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value)] if len(value) >= 16 else []
    if isinstance(value, dict):
        return [b for v in value.values() for b in _blobs(v)]
    if isinstance(value, (list, tuple)):
        return [b for v in value for b in _blobs(v)]
    return []


_ = Coin  # the message the forged coins above are made of
