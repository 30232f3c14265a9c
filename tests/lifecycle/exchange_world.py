"""A bank that can exchange: change keysets of 1, 2, 4, … 64 one-unit tokens beside the world's
keyset of 100, the pure wallet steps of an exchange, and restore requests."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from m2mpay.agents.bank.exchange_rows import SIGNED_TABLES, exchanges
from m2mpay.agents.bank.keys import add_keyset, load_bank
from m2mpay.agents.bank.service import BankService
from m2mpay.agents.bank.store import Tx
from m2mpay.agents.bench.driver import Device
from m2mpay.agents.user.exchange import PendingExchange, complete_exchange, prepare_exchange
from m2mpay.protocol import envelope, sealing
from m2mpay.protocol.messages import MAX_WITHDRAW_BATCH, WithdrawAnswer, WithdrawRequest
from m2mpay.protocol.messages.exchange import (
    ExchangeAnswer,
    ExchangeProof,
    Output,
    RestoreAnswer,
    RestoreRequest,
    exchange_sealing_info,
    outputs_digest,
)
from m2mpay.protocol.rules import wallet
from tests.bank_world import BankWorld

POWERS = tuple(1 << k for k in range(7))


@contextmanager
def exchanging(world: BankWorld, days: float = 365, coin_days: float | None = None) -> Iterator[str]:
    """Give ``world`` the change keysets (withdrawn from for ``days``, spent for twice that) and
    reload the bank; yields the id of the 100-token keyset (with ``coin_days``, a new one withdrawn
    from for that many days and spent for twice that)."""
    coin_keyset = world.keyset
    if coin_days is not None:
        coin_keyset = add_keyset(world.directory / "bank", world.store, value=100, tokens=100,
                                 withdraw_days=coin_days, spend_days=2 * coin_days, now=world.clock.now).id
    for value in POWERS:
        add_keyset(world.directory / "bank", world.store, value=value, tokens=value, withdraw_days=days,
                   spend_days=2 * days, now=world.clock.now)
    keys, store = load_bank(world.directory / "bank", world.clock.now, connections=4)
    world.keys, world.service = keys, BankService(keys, store, clock=world.clock)
    world.send = world.service.handle
    try:
        yield coin_keyset
    finally:
        store.close()


async def withdraw(world: BankWorld, user: Device, keyset: str, count: int = 1) -> list[wallet.WalletCoin]:
    """``count`` coins of ``keyset`` for ``user``, in withdrawals of at most ``MAX_WITHDRAW_BATCH``."""
    info, public = world.keys.keyring.keysets[keyset], world.keys.keyring.rsa_keys[keyset]
    coins: list[wallet.WalletCoin] = []
    while len(coins) < count:
        pending = wallet.prepare_withdrawal(user.name, info, public, min(MAX_WITHDRAW_BATCH, count - len(coins)))
        signed = user.sign(pending.request, "withdraw")
        answer = world.open(await world.send("withdraw", signed), "withdraw", WithdrawAnswer, request=signed)
        coins += wallet.complete_withdrawal(pending, answer, info, public)
    return coins


def prepare(world: BankWorld, wc: wallet.WalletCoin) -> PendingExchange:
    return prepare_exchange(wc, world.keys.keyring, world.clock.now)


async def send(world: BankWorld, data: bytes) -> bytes:
    return await world.send("exchange", data)


def answer_of(world: BankWorld, raw: bytes, data: bytes) -> ExchangeAnswer:
    return envelope.open_answer(raw, world.keys.answer_key.public_key(), world.bank, "exchange", ExchangeAnswer,
                                request=data)


async def exchange(world: BankWorld, wc: wallet.WalletCoin) -> list[wallet.WalletCoin]:
    """Exchange ``wc`` at the bank; the fresh coins, verified."""
    pending = prepare(world, wc)
    answer = answer_of(world, await send(world, pending.data), pending.data)
    return complete_exchange(pending, answer, world.keys.keyring)


def books(world: BankWorld, tip: bytes) -> tuple[object, ...]:
    """Everything an exchange could change, to compare before and after a refusal."""
    def read(tx: Tx) -> tuple[object, ...]:
        return tuple(tx.journal()), tx.coin(tip, lock=False), tuple(exchanges(tx)), \
            tx.all("SELECT blinded FROM signed_messages ORDER BY blinded")

    return world.store.run_sync(read)


def with_change(pending: PendingExchange, **changes: object) -> bytes:
    """The request's bytes with some fields replaced (its seal left as it was)."""
    return dataclasses.replace(pending.request, **changes).encode()  # type: ignore[arg-type]


def resealed(world: BankWorld, wc: wallet.WalletCoin, pending: PendingExchange, change: tuple[Output, ...]) -> bytes:
    """``pending``'s request with ``change`` in place of its own, under a proof sealed for it: what
    the coin's holder can send (the seal binds the outputs, so only it can)."""
    request = pending.request
    proof = ExchangeProof(tip=wc.coin.tip, token=wc.seed, outputs=outputs_digest(request.outputs, change),
                          req_id=request.req_id)
    sealed = sealing.seal(proof.encode(), world.keys.keyring.sealing_key, exchange_sealing_info(world.bank))
    return dataclasses.replace(request, change=change, sealed=sealed).encode()


async def send_withdrawal(world: BankWorld, user: Device, request: WithdrawRequest) -> tuple[bytes, bytes]:
    """``request`` signed by ``user`` and the bank's raw answer to it."""
    signed = user.sign(request, "withdraw")
    return signed, await world.send("withdraw", signed)


def random_blinded(world: BankWorld, keyset: str) -> bytes:
    """A blinded message for ``keyset``'s key that nobody had signed (what an unused counter looks like)."""
    key = world.keys.keyring.rsa_keys[keyset]
    return (int.from_bytes(os.urandom(key.size), "big") % key.n).to_bytes(key.size, "big")


def restore_request(asked: Sequence[tuple[str, bytes]]) -> bytes:
    """The bytes of a restore request asking about ``(keyset, blinded)`` pairs, in order."""
    return RestoreRequest(blinded=tuple(Output(keyset=k, blinded=b) for k, b in asked), req_id=os.urandom(16)).encode()


async def restore(world: BankWorld, data: bytes) -> RestoreAnswer:
    """The bank's verified answer to the restore request ``data``."""
    raw = await world.send("restore", data)
    return envelope.open_answer(raw, world.keys.answer_key.public_key(), world.bank, "restore", RestoreAnswer,
                                request=data)


def every_row(world: BankWorld) -> tuple[object, ...]:
    """Every row a request could change: accounts, journal, issuance, stored answers, coins,
    exchanges and the signed messages (to compare before and after a request that must change nothing)."""
    def read(tx: Tx) -> tuple[object, ...]:
        return (tuple(tx.accounts()), tuple(tx.journal()), sorted(tx.issuance(), key=repr),
                sorted(tx.stored_answers()), sorted(tx.coins(), key=lambda c: c.tip),
                sorted(exchanges(tx), key=lambda e: e.tip),
                *(tx.all(f"SELECT blinded, keyset FROM {table} ORDER BY blinded") for table in SIGNED_TABLES))  # noqa: S608 - constant names

    return world.store.run_sync(read)
