"""A wallet's exchange: one coin's whole remainder into fresh coins of issuing keysets.

The wallet does not need to know how far the bank saw its coin spent (tokens written ahead may
never have left): it sends no outputs and one change slot per power of two of the coin's token
value up to its ``n``, and the bank signs exactly the slots that make the remainder
(:func:`~m2mpay.protocol.rules.exchange.plan_change`), which the wallet checks
(:func:`~m2mpay.protocol.rules.exchange.check_answer`) before it keeps the coins. The request's
secrets and exact bytes are stored before it leaves and resent as they are until an answer or a
final refusal comes (docs/LIFECYCLE.md). A seeded wallet derives every change slot from its
seed (``derive``: the next counter of the slot's keyset), so a restore finds the coins an
exchange made too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from m2mpay.protocol import blindrsa, hashchain, sealing
from m2mpay.protocol.errors import RemoteProtocolError
from m2mpay.protocol.messages import KeysetInfo, coin_message
from m2mpay.protocol.messages.exchange import (
    ExchangeAnswer,
    ExchangeProof,
    ExchangeRequest,
    Output,
    exchange_sealing_info,
    outputs_digest,
)
from m2mpay.protocol.rules.exchange import Use, change_slots, check_answer, require
from m2mpay.protocol.rules.keyring import COIN_VARIANT, Keyring
from m2mpay.protocol.seed import DerivedCoin
from m2mpay.protocol.rules.wallet import WalletCoin, finish_coin

__all__ = ["PendingExchange", "complete_exchange", "issuing", "prepare_exchange"]

Rng = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class PendingExchange:
    """What the wallet keeps (durably) between sending an exchange and its answer."""

    request: ExchangeRequest
    seeds: tuple[bytes, ...]
    prefixes: tuple[bytes, ...]
    secrets: tuple[bytes, ...]
    """Serialized blinding secrets, one per output, then one per change slot."""

    @property
    def data(self) -> bytes:
        """The request's exact bytes: what is sent, and sent again."""
        return self.request.encode()


def issuing(keyring: Keyring, currency: str, now: int) -> list[str]:
    """Keysets of ``currency`` that may sign exchange outputs at ``now``."""
    found = []
    for info in keyring.keysets.values():
        if info.currency != currency:
            continue
        try:
            require(info, keyring.phases.get(info.id), now, Use.ISSUE)
        except RemoteProtocolError:
            continue
        found.append(info.id)
    return found


def prepare_exchange(wc: WalletCoin, keyring: Keyring, now: int, rng: Rng = os.urandom, *,
                     derive: Callable[[KeysetInfo], DerivedCoin] | None = None) -> PendingExchange:
    """The request exchanging ``wc``'s whole remainder, with its secrets (nothing is sent).

    With ``derive`` each change slot is the coin it derives for the slot's keyset (a seeded
    wallet); without, its secrets are drawn from ``rng``.
    """
    old = keyring.keyset(wc.coin.keyset)
    keysets = [keyring.keysets[k] for k in issuing(keyring, old.currency, now)]
    slots = change_slots(wc.token_value, wc.n, keysets)
    change, seeds, prefixes, secrets = [], [], [], []
    for info in slots:
        if derive is not None:
            derived = derive(info)
            seed, prefix, blinded, secret = derived.secret, derived.prefix, derived.blinded, derived.inv
        else:
            seed = rng(32)
            tip = hashchain.make_chain(seed, info.n)
            prefix, input_msg = blindrsa.prepare(coin_message(info.id, tip), COIN_VARIANT, rng)
            blinded, secret = blindrsa.blind(keyring.rsa_keys[info.id], input_msg, COIN_VARIANT, rng)
        change.append(Output(keyset=info.id, blinded=blinded))
        seeds.append(seed)
        prefixes.append(prefix)
        secrets.append(secret.to_bytes())
    req_id = rng(16)
    proof = ExchangeProof(tip=wc.coin.tip, token=wc.seed, outputs=outputs_digest((), tuple(change)), req_id=req_id)
    sealed = sealing.seal(proof.encode(), keyring.sealing_key, exchange_sealing_info(keyring.bank))
    request = ExchangeRequest(coin=wc.coin, sealed=sealed, outputs=(), change=tuple(change), req_id=req_id)
    return PendingExchange(request=request, seeds=tuple(seeds), prefixes=tuple(prefixes), secrets=tuple(secrets))


def complete_exchange(pending: PendingExchange, answer: ExchangeAnswer, keyring: Keyring) -> list[WalletCoin]:
    """Check the answer (every output, exactly the change the remainder needs), unblind and verify
    every signature; anything wrong raises and no coin is kept."""
    request = pending.request
    old = keyring.keyset(request.coin.keyset)
    pairs = check_answer(request, answer, old.token_value, keyring.keysets)
    slots = request.outputs + request.change
    coins = []
    for output, blind_sig in pairs:
        i = slots.index(output)
        info = keyring.keyset(output.keyset)
        coins.append(finish_coin(info, keyring.rsa_keys[info.id], pending.seeds[i], pending.prefixes[i],
                                 blindrsa.BlindingSecret.from_bytes(pending.secrets[i]), blind_sig))
    return coins
