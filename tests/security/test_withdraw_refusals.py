"""A refused withdrawal costs the bank no RSA, and its replay costs a lookup (SQLite and PostgreSQL).

The keyset's blind signer is wrapped in a counter: every private RSA operation goes through
``BlindSigner.sign``, so the count is the work a request made the bank do.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.keys import add_keyset, retire_keyset
from m2mpay.protocol import blindrsa, cbor, cose, envelope
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import MAX_WITHDRAW_BATCH, WithdrawAnswer
from m2mpay.protocol.rules import wallet

from tests.bank_world import BankWorld, Device

pytestmark = pytest.mark.asyncio


class CountingSigner:
    """A keyset's blind signer that counts its private operations (and can fail once, like a crash)."""

    def __init__(self, inner: blindrsa.BlindSigner) -> None:
        self._inner = inner
        self.calls = 0
        self.fail_next = False

    def sign(self, blinded_msg: bytes) -> bytes:
        self.calls += 1
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the bank process died while signing")
        return self._inner.sign(blinded_msg)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def counting(world: BankWorld) -> CountingSigner:
    """Count every blind signature of the world's keyset from now on."""
    signer = CountingSigner(world.keys.signers[world.keyset])
    world.keys.signers[world.keyset] = signer  # type: ignore[assignment]
    return signer


def request(world: BankWorld, user: Device, count: int) -> tuple[wallet.PendingWithdrawal, bytes]:
    info = world.keys.keyring.keysets[world.keyset]
    pending = wallet.prepare_withdrawal(user.name, info, world.keys.keyring.rsa_keys[world.keyset], count)
    return pending, user.sign(pending.request, "withdraw")


def opened(world: BankWorld, raw: bytes, data: bytes) -> WithdrawAnswer:
    """The bank's verified answer ``raw`` to the request ``data``."""
    return world.open(raw, "withdraw", WithdrawAnswer, request=data)


def refusal(world: BankWorld, raw: bytes, data: bytes) -> ErrorCode:
    """The code of the bank's signed refusal ``raw`` of the request ``data``."""
    with pytest.raises(RemoteProtocolError) as info:
        opened(world, raw, data)
    return info.value.code


def stored(world: BankWorld, signer: str, req_id: bytes) -> envelope.StoredAnswer | None:
    return world.store.run_sync(lambda tx: tx.answer(signer, req_id))


async def test_insufficient_funds_signs_nothing_and_its_replay_is_the_stored_refusal(world: BankWorld) -> None:
    signer = counting(world)
    user = world.user("alice", deposit=6_300)
    _, data = request(world, user, MAX_WITHDRAW_BATCH)  # 64 coins of 100: 6_400
    first = await world.send("withdraw", data)
    assert refusal(world, first, data) is ErrorCode.INSUFFICIENT_FUNDS
    assert signer.calls == 0
    admin.deposit(world.store, "alice", 1_000, world.clock.now)  # the cause is gone ...
    for _ in range(3):  # ... but the request was answered: its retry gets the same bytes, not a new check
        assert await world.send("withdraw", data) == first
    assert signer.calls == 0 and admin.balance(world.store, "alice") == 7_300
    _, fresh = request(world, user, 2)  # a new request under a new req_id is judged afresh
    opened(world, await world.send("withdraw", fresh), fresh)
    assert signer.calls == 2 and admin.balance(world.store, "alice") == 7_100


async def test_unknown_keyset_refusal_is_stored(world: BankWorld) -> None:
    signer = counting(world)
    user = world.user("alice")
    pending, _ = request(world, user, 3)
    bad = dataclasses.replace(pending.request, keyset="ks-0000000000000000")
    data = user.sign(bad, "withdraw")
    first = await world.send("withdraw", data)
    assert refusal(world, first, data) is ErrorCode.UNKNOWN_KEYSET
    kept = stored(world, "alice", bad.req_id)
    assert kept is not None and kept.answer == first and kept.digest == envelope.request_digest(data)
    assert await world.send("withdraw", data) == first
    assert signer.calls == 0 and admin.balance(world.store, "alice") == 10_000


async def test_retired_keyset_refusal_is_stored(world: BankWorld) -> None:
    signer = counting(world)
    user = world.user("alice")
    info = add_keyset(world.directory / "bank", world.store, value=100, tokens=100, withdraw_days=1,
                      spend_days=2, now=world.clock.now)
    retire_keyset(world.store, info.id, world.clock.now)
    pending = wallet.prepare_withdrawal("alice", info, blindrsa.PublicKey.from_der(info.public_key), 3)
    data = user.sign(pending.request, "withdraw")
    first = await world.send("withdraw", data)
    assert refusal(world, first, data) is ErrorCode.UNKNOWN_KEYSET  # added after this bank loaded its keys
    assert stored(world, "alice", pending.request.req_id) is not None
    assert await world.send("withdraw", data) == first
    assert signer.calls == 0 and admin.balance(world.store, "alice") == 10_000


async def test_expired_keyset_refusal_is_stored_and_not_checked_again(world: BankWorld) -> None:
    signer = counting(world)
    user = world.user("alice")
    _, data = request(world, user, 3)
    opened_at = world.clock.now
    world.clock.now = world.keys.keyring.keysets[world.keyset].withdraw_until + 1
    first = await world.send("withdraw", data)
    assert refusal(world, first, data) is ErrorCode.KEYSET_EXPIRED
    world.clock.now = opened_at  # were it checked again, it would now pass
    assert await world.send("withdraw", data) == first
    assert signer.calls == 0 and admin.balance(world.store, "alice") == 10_000


async def test_too_many_coins_sign_nothing(world: BankWorld) -> None:
    signer = counting(world)
    user = world.user("alice", deposit=6_300)
    pending, data = request(world, user, MAX_WITHDRAW_BATCH)
    obj = cbor.decode(pending.request.encode(), max_size=1 << 20)
    obj["blinded"] = [*obj["blinded"], obj["blinded"][0]]  # one above the batch limit: refused undecoded
    oversized = cose.sign1(cbor.encode(obj), user.key, kid=b"alice",
                           external_aad=envelope.request_aad(world.bank, "withdraw"))
    assert refusal(world, await world.send("withdraw", oversized), oversized) is ErrorCode.BAD_REQUEST
    assert refusal(world, await world.send("withdraw", data), data) is ErrorCode.INSUFFICIENT_FUNDS  # 64 x 100
    assert signer.calls == 0 and admin.balance(world.store, "alice") == 6_300


async def test_other_request_under_a_refused_req_id_is_a_replay(world: BankWorld) -> None:
    signer = counting(world)
    user = world.user("alice", deposit=150)
    pending, data = request(world, user, 2)
    first = await world.send("withdraw", data)
    assert refusal(world, first, data) is ErrorCode.INSUFFICIENT_FUNDS
    smaller = user.sign(dataclasses.replace(pending.request, blinded=pending.request.blinded[:1]), "withdraw")
    assert refusal(world, await world.send("withdraw", smaller), smaller) is ErrorCode.REPLAY  # affordable, too late
    assert await world.send("withdraw", data) == first
    assert signer.calls == 0 and admin.balance(world.store, "alice") == 150


async def test_concurrent_withdrawals_sign_only_what_is_debited(world: BankWorld) -> None:
    signer = counting(world)
    user = world.user("alice", deposit=3_000)
    requests = [request(world, user, 20)[1] for _ in range(4)]  # each affordable alone, one of them together
    answers = await asyncio.gather(*(world.send("withdraw", data) for data in requests))
    outcomes = []
    for data, raw in zip(requests, answers, strict=True):
        try:
            opened(world, raw, data)
            outcomes.append("ok")
        except RemoteProtocolError as exc:
            outcomes.append(exc.code.wire)
    assert sorted(outcomes) == ["insufficient_funds"] * 3 + ["ok"]
    assert signer.calls == 20 and admin.balance(world.store, "alice") == 1_000
    for data, raw in zip(requests, answers, strict=True):  # every answer, refusals too, is the stored one
        assert await world.send("withdraw", data) == raw
    assert signer.calls == 20


async def test_a_debit_whose_signing_failed_is_completed_by_the_retry(world: BankWorld) -> None:
    signer = counting(world)
    user = world.user("alice")
    pending, data = request(world, user, 2)
    signer.fail_next = True
    assert refusal(world, await world.send("withdraw", data), data) is ErrorCode.INTERNAL
    answer = opened(world, await world.send("withdraw", data), data)
    info = world.keys.keyring.keysets[world.keyset]
    coins = wallet.complete_withdrawal(pending, answer, info, world.keys.keyring.rsa_keys[world.keyset])
    assert len(coins) == 2 and admin.balance(world.store, "alice") == 9_800
    assert await world.send("withdraw", data) == await world.send("withdraw", data)
    assert admin.balance(world.store, "alice") == 9_800
