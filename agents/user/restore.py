"""Rebuilding a wallet from its seed (docs/LIFECYCLE.md, "Restore").

1. The bank's announcement names the keysets (every one not closed).
2. For each keyset the wallet derives the withdrawal counters 0, 1, 2, … and asks the bank, in
   requests of :data:`~m2mpay.protocol.messages.exchange.MAX_RESTORE`, which of these blinded
   messages it signed (``restore``: no account, no coin); then the exchange numbers 0, 1, 2, …,
   each in every keyset (:data:`~m2mpay.protocol.seed.EXCHANGE_COUNTERS`). Each scan stops after
   :data:`RESTORE_GAP` counters (numbers) in a row with nothing found.
3. Each signature is finalized with the derived blinding secret and verified: the coin is rebuilt
   from its chain secret. How much of it is left only the bank knows, so the coin is kept as
   *uncertain* (never paid with) together with an exchange of its whole remainder, in one
   transaction (:meth:`~m2mpay.agents.user.store.WalletStore.restore_coin`).
4. The exchanges are sent: the bank signs exactly the change that makes each coin's remainder,
   in fresh coins it cannot link to the old ones (and which derive from the seed, so a later
   restore finds them). ``coin_spent``: nothing was left; ``coin_blocked``: the coin is in a
   payment now, and its exchange is sent again later (``user run``, or ``user restore`` again).

Restoring the same seed into the same directory again resumes: coins already in the wallet are
skipped and unfinished exchanges are sent first. Two wallets running from one seed at once would
derive the same counters: the bank signs each blinded message once, so one of them is refused
(``replay``) rather than paid twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from m2mpay.protocol import envelope
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import KeysetInfo
from m2mpay.protocol.messages.exchange import MAX_RESTORE, Output, RestoreAnswer, RestoreRequest
from m2mpay.protocol.rules.keyring import COIN_VARIANT, Keyring
from m2mpay.protocol.rules.requests import BlockWindow
from m2mpay.protocol.rules.wallet import CoinStatus, WalletCoin, derive_coins, finish_coin
from m2mpay.protocol.seed import EXCHANGE_COUNTERS, DerivedCoin, WalletSeed, derive_coin

from ..mqtt import BankClient
from . import exchanger
from .exchange import PendingExchange, prepare_exchange

if TYPE_CHECKING:  # the agent's module imports nothing of this one; no cycle at run time either way
    from .agent import UserAgent, UserCredentials

__all__ = ["RESTORE_GAP", "RestoreReport", "restore"]

log = logging.getLogger(__name__)

RESTORE_GAP = 64
"""Counters (exchange numbers) in a row with nothing found after which a scan is done. A wallet
leaves such a run only where requests it reserved them for never reached the bank (a crash
before sending) or were refused after a later request had reserved its own (a refused request
gives its counters back when it was the last); one withdrawal takes at most 64 counters."""

_BUSY_WAITS = (1.0, 2.0, 4.0, 8.0)
"""Waits before asking again when the bank is busy signing restores (``unavailable``)."""


@dataclass
class RestoreReport:
    """What a restore found and what became of it."""

    found: dict[str, int] = field(default_factory=dict)
    """Coins the bank had signed for this seed, per keyset (those already in the wallet left out)."""
    exchanged: int = 0
    """Coins whose remainder came back as fresh coins."""
    spent: int = 0
    """Coins with nothing left."""
    waiting: int = 0
    """Coins in a payment now (or whose exchange did not get through): exchanged later."""
    fresh_value: int = 0
    """What the fresh coins are worth, minor units."""


async def _ask(bank: BankClient, keyring: Keyring, coins: list[DerivedCoin]) -> RestoreAnswer:
    request = RestoreRequest(blinded=tuple(Output(keyset=c.keyset, blinded=c.blinded) for c in coins),
                             req_id=os.urandom(16))
    data = request.encode()
    waits = iter(_BUSY_WAITS)
    while True:
        raw = await bank.request("restore", data)
        try:
            answer = envelope.open_answer(raw, keyring.answer_key, keyring.bank, "restore", RestoreAnswer,
                                          request=data)
        except envelope.Refusal as refusal:
            wait = next(waits, None)
            if refusal.code is not ErrorCode.UNAVAILABLE or wait is None:
                raise
            log.info("the bank is busy signing restores: asking again in %.0f s", wait)
            await asyncio.sleep(wait)
            continue
        if answer.req_id != request.req_id or (answer.found and answer.found[-1] >= len(coins)):
            raise RemoteProtocolError("restore answer does not match the request", ErrorCode.BAD_SIGNATURE)
        return answer


def _coin(derived: DerivedCoin, blind_sig: bytes, info: KeysetInfo, keyring: Keyring, now: int) -> WalletCoin:
    """The coin a found signature makes: verified, its remainder unknown until its exchange."""
    fresh = finish_coin(info, keyring.rsa_keys[info.id], derived.secret, derived.prefix, derived.inv, blind_sig,
                        tip=derived.tip)
    return dataclasses.replace(fresh, status=CoinStatus.UNCERTAIN, blocked_until=now + BlockWindow().max_ahead)


async def _signed(bank: BankClient, keyring: Keyring,
                  asked: list[tuple[DerivedCoin, KeysetInfo]]) -> list[tuple[DerivedCoin, KeysetInfo, bytes]]:
    """Those of ``asked`` the bank signed, with the blind signature, in requests of at most 64."""
    found = []
    for at in range(0, len(asked), MAX_RESTORE):
        chunk = asked[at:at + MAX_RESTORE]
        answer = await _ask(bank, keyring, [derived for derived, _ in chunk])
        found += [(*chunk[i], sig) for i, sig in zip(answer.found, answer.blind_sigs, strict=True)]
    return found


Batch = Callable[[int], list[tuple[DerivedCoin, KeysetInfo]]]
"""The coins to ask about from one counter (or exchange number) on, with their keysets."""


async def _scan(bank: BankClient, keyring: Keyring, batch: Batch, step: int, number: Callable[[DerivedCoin], int],
                gap: int, now: int) -> tuple[list[WalletCoin], int]:
    """Ask ``batch(0)``, ``batch(step)``, … until ``gap`` numbers in a row found nothing: every coin
    found, and the number past the last one (``number`` says which a derived coin has)."""
    coins: list[WalletCoin] = []
    start, past = 0, 0
    while start - past < gap:
        for derived, info, sig in await _signed(bank, keyring, batch(start)):
            coins.append(_coin(derived, sig, info, keyring, now))
            past = max(past, number(derived) + 1)
        start += step
    return coins, past


def _withdrawals(seed: WalletSeed, keyring: Keyring, info: KeysetInfo) -> Batch:
    """A keyset's withdrawal counters, 64 at a time."""
    return lambda start: [(d, info) for d in derive_coins(seed, info, keyring.rsa_keys[info.id], start, MAX_RESTORE)]


def _exchanges(seed: WalletSeed, keyring: Keyring, per_request: int) -> Batch:
    """Exchange numbers, each in every listed keyset."""
    keysets = sorted(keyring.keysets.values(), key=lambda k: k.id)
    return lambda start: [(derive_coin(seed, info, keyring.rsa_keys[info.id], EXCHANGE_COUNTERS + e, COIN_VARIANT),
                           info) for e in range(start, start + per_request) for info in keysets]


async def restore(agent: UserAgent, bank: BankClient, credentials: UserCredentials, seed: WalletSeed, *,
                  gap: int = RESTORE_GAP, progress: Callable[[str], None] | None = None) -> RestoreReport:
    """Find every coin the bank signed for ``seed``, keep it, and exchange it (see the module's
    docstring); the wallet must hold ``seed`` already."""
    if agent.store.seeds.seed() != seed:
        raise ValueError("restore into a wallet that holds this seed")
    keyring = await agent.fresh_keyring(bank, credentials)
    report = RestoreReport()
    found: list[WalletCoin] = []
    for info in sorted(keyring.keysets.values(), key=lambda k: k.id):
        coins, past = await _scan(bank, keyring, _withdrawals(seed, keyring, info), MAX_RESTORE,
                                  lambda d: d.counter, gap, agent.now())
        agent.store.seeds.advance(info.id, past)
        found += coins
    per_request = max(1, MAX_RESTORE // len(keyring.keysets))
    coins, past = await _scan(bank, keyring, _exchanges(seed, keyring, per_request), per_request,
                              lambda d: d.counter - EXCHANGE_COUNTERS, gap, agent.now())
    agent.store.seeds.restored_exchanges(past)  # before this restore's own exchanges take numbers
    found += coins
    new = [wc for wc in found if agent.store.coin(wc.coin.tip) is None]
    for wc in new:
        report.found[wc.coin.keyset] = report.found.get(wc.coin.keyset, 0) + 1
    if progress is not None:
        progress(f"found {len(new)} coin(s) the bank signed for this seed"
                 + (f" ({len(found) - len(new)} already in the wallet)" if len(found) > len(new) else ""))
    for pending in agent.store.pending_exchanges():  # a restore interrupted before: those first
        await _send(agent, bank, keyring, pending, report, None)
    for wc in new:
        number = agent.store.seeds.exchange_number()
        pending = prepare_exchange(wc, keyring, agent.now(), derive=agent.store.seeds.deriver(seed, keyring, number))
        agent.store.restore_coin(wc, pending, agent.now())
        await _send(agent, bank, keyring, pending, report, number)
    return report


async def _send(agent: UserAgent, bank: BankClient, keyring: Keyring, pending: PendingExchange,
                report: RestoreReport, number: int | None) -> None:
    """Send one exchange and count what became of it. A final refusal signed nothing, so its
    exchange number goes back: a restore's exchanges of spent coins leave no run of unused numbers."""
    try:
        fresh = await exchanger.send_exchange(agent.store, bank, keyring, pending)
    except envelope.Refusal as refusal:
        if refusal.final and number is not None:
            agent.store.seeds.release_exchange(number)
        if refusal.code is ErrorCode.COIN_SPENT:
            report.spent += 1
        else:
            report.waiting += 1
            log.warning("coin %s not exchanged now: %s (%s)", pending.request.coin.tip.hex()[:8],
                        refusal.code.wire, refusal.message)
        return
    report.exchanged += 1
    report.fresh_value += sum(c.remaining for c in fresh)
