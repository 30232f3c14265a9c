"""Sending a wallet's exchanges and deciding which coins are due for one (docs/LIFECYCLE.md).

A coin is due when its keyset no longer issues and its spending ends within ``margin`` seconds,
or has ended (``exchange-only``): the wallet turns it into coins of current keysets before it
would be stranded. An uncertain coin (an open whose answer never came) is due once its possible
block's deadline has passed: the exchange's change gives back exactly what the bank saw left,
whether or not the blocking token reached it. The request is written ahead (:meth:`WalletStore.begin_exchange`) and sent
again, the same bytes, until an answer or a final refusal; ``coin_blocked`` is not final for it
(the block lapses at its deadline, and the same bytes then succeed).
"""

from __future__ import annotations

import dataclasses
import logging

from m2mpay.protocol import envelope
from m2mpay.protocol.errors import ErrorCode
from m2mpay.protocol.messages.exchange import ExchangeAnswer
from m2mpay.protocol.rules.keyring import Keyring
from m2mpay.protocol.rules.phases import Phase, phase_at
from m2mpay.protocol.rules.wallet import CoinStatus, WalletCoin

from ..mqtt import BankClient
from .exchange import PendingExchange, complete_exchange
from .store import WalletStore

__all__ = ["due", "send_exchange"]

log = logging.getLogger(__name__)


def due(store: WalletStore, keyring: Keyring, now: int, margin: int) -> list[WalletCoin]:
    """Coins to exchange now: free, with value left, either uncertain past their deadline or of a
    keyset past issuing whose spending ends within ``margin`` seconds (or has ended)."""
    busy = store.exchanging()
    found = []
    for wc, _ in store.coins():
        if wc.coin.tip in busy or wc.position == 0 or wc.status is CoinStatus.SPENT or not wc.available(now):
            continue
        info = keyring.keysets.get(wc.coin.keyset)
        if info is None:
            continue  # closed (or never ours): nothing can be done with it
        phase = phase_at(info, keyring.phases.get(info.id), now)
        if phase is Phase.CLOSED:
            continue
        if (wc.status is CoinStatus.UNCERTAIN or phase is Phase.EXCHANGE_ONLY
                or (phase is Phase.SPEND_ONLY and info.spend_until - now <= margin)):
            found.append(wc.expire(now))
    return found


async def send_exchange(store: WalletStore, bank: BankClient, keyring: Keyring,
                        pending: PendingExchange) -> list[WalletCoin]:
    """Send a stored exchange and keep its coins; a refusal is raised (and forgotten if final)."""
    tip = pending.request.coin.tip
    raw = await bank.request("exchange", pending.data)
    try:
        answer = envelope.open_answer(raw, keyring.answer_key, keyring.bank, "exchange", ExchangeAnswer,
                                      request=pending.data)
    except envelope.Refusal as refusal:
        old = store.coin(tip)
        if refusal.code is ErrorCode.COIN_SPENT and old is not None:
            store.drop_exchange(tip, spent=dataclasses.replace(old, position=0, status=CoinStatus.SPENT))
        elif refusal.final and refusal.code is not ErrorCode.COIN_BLOCKED:
            store.drop_exchange(tip)
        raise
    old = store.coin(tip)
    if old is None:
        raise LookupError("exchanged coin not in the wallet")  # a bug: exchanges are begun from stored coins
    coins = complete_exchange(pending, answer, keyring)
    store.finish_exchange(old, coins)
    log.info("coin %s exchanged: %d fresh coin(s) worth %d", tip.hex()[:8], len(coins),
             sum(c.remaining for c in coins))
    return coins
