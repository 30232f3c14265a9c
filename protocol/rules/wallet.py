"""The wallet's coin rules: withdraw pending → coin → positions used (DESIGN.md §3, §4a).

Write-ahead is the rule that keeps a wallet honest across crashes: every function that reveals
tokens returns the *new* coin state first; the agent stores it, and only then lets the token
leave the device. A token whose fate is unknown is never offered again, so after a crash the
next token may leave a gap, which the bank and vendors accept (DESIGN.md §4a).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import blindrsa, hashchain
from ..seed import DerivedCoin, WalletSeed, derive_coin
from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ..messages import Authorization, Coin, KeysetInfo, Pay, WithdrawAnswer, WithdrawRequest, coin_message
from .keyring import COIN_VARIANT
from .pricing import tokens_owed

__all__ = [
    "TRANSITIONS",
    "CoinStatus",
    "PendingWithdrawal",
    "WalletCoin",
    "WalletEvent",
    "authorize",
    "complete_withdrawal",
    "derive_coins",
    "finish_coin",
    "pending_withdrawal",
    "prepare_withdrawal",
    "reveal",
]

Rng = Callable[[int], bytes]


class CoinStatus(enum.Enum):
    """A wallet coin's state."""

    READY = "ready"
    IN_SESSION = "in_session"  # blocked for a vendor, paying
    UNCERTAIN = "uncertain"  # an open whose answer never came: treat as blocked until its T
    SPENT = "spent"


class WalletEvent(enum.Enum):
    """What moves a wallet coin."""

    AUTHORIZE = "authorize"
    PAY = "pay"
    CLOSED = "closed"
    LOST = "lost"
    EXPIRE = "expire"


C, W = CoinStatus, WalletEvent
TRANSITIONS: dict[tuple[CoinStatus, WalletEvent], CoinStatus] = {
    (C.READY, W.AUTHORIZE): C.IN_SESSION,
    (C.IN_SESSION, W.PAY): C.IN_SESSION,
    (C.IN_SESSION, W.CLOSED): C.READY,
    (C.IN_SESSION, W.LOST): C.UNCERTAIN,
    (C.IN_SESSION, W.EXPIRE): C.READY,
    (C.UNCERTAIN, W.EXPIRE): C.READY,
}


def _step(status: CoinStatus, event: WalletEvent) -> CoinStatus:
    nxt = TRANSITIONS.get((status, event))
    if nxt is None:
        raise LocalProtocolError(f"cannot {event.value} a coin that is {status.value}")
    return nxt


@dataclass(frozen=True, slots=True)
class WalletCoin:
    """A coin held by the wallet. ``seed`` and ``traversal`` are secret; the rest is public."""

    coin: Coin
    n: int
    token_value: int
    position: int
    """Index of the last token revealed (or written ahead); ``n`` for a fresh coin."""
    seed: bytes
    traversal: dict[str, Any]
    status: CoinStatus = CoinStatus.READY
    blocked_until: int = 0

    @property
    def remaining(self) -> int:
        """Value left, in minor units."""
        return self.position * self.token_value

    def value_of(self, tokens: int) -> int:
        """What ``tokens`` of this coin are worth, in minor units: the money a payment moves."""
        return tokens * self.token_value

    def tokens_for(self, units: int, price: int) -> int:
        """Tokens of this coin that pay for ``units`` units at ``price`` (money per unit), the
        blocking token included: the vendor's own rule (:func:`~m2mpay.protocol.rules.pricing.tokens_owed`)."""
        return tokens_owed(units, price, self.token_value)

    def available(self, now: int) -> bool:
        """Usable for a new session at ``now``."""
        if self.position == 0:
            return False
        if self.status in (CoinStatus.IN_SESSION, CoinStatus.UNCERTAIN):
            return now >= self.blocked_until
        return self.status is CoinStatus.READY

    def expire(self, now: int) -> WalletCoin:
        """After ``T`` a blocked or uncertain coin is free again (its block has lapsed)."""
        if self.status in (CoinStatus.IN_SESSION, CoinStatus.UNCERTAIN) and now >= self.blocked_until:
            return dataclasses.replace(self, status=_step(self.status, WalletEvent.EXPIRE))
        return self

    def event(self, event: WalletEvent) -> WalletCoin:
        """Apply ``CLOSED`` or ``LOST`` (the agent learned how the session ended)."""
        status = _step(self.status, event)
        if self.position == 0 and status is CoinStatus.READY:
            status = CoinStatus.SPENT
        return dataclasses.replace(self, status=status)


def _advance(wc: WalletCoin, count: int) -> tuple[dict[str, Any], int, bytes]:
    if not 0 < count <= wc.position:
        raise LocalProtocolError(f"cannot reveal {count} tokens with {wc.position} left")
    walker = hashchain.PebbleTraversal.from_state(wc.traversal)
    index, token = walker.next()
    for _ in range(count - 1):
        index, token = walker.next()
    return walker.to_state(), index, token


def authorize(
    wc: WalletCoin, *, deadline: int, nonce: bytes, cert_hash: bytes, now: int, count: int = 1
) -> tuple[WalletCoin, Authorization]:
    """Write ahead the blocking token(s) and return the authorization to seal.

    Normally one token (``index = p - 1``); the new state must be stored before it is sealed.
    """
    if not wc.available(now):
        raise RemoteProtocolError("coin not available", ErrorCode.COIN_BLOCKED)
    wc = wc.expire(now)
    state, index, token = _advance(wc, count)
    auth = Authorization(tip=wc.coin.tip, index=index, token=token, deadline=deadline,
                         cert=cert_hash, nonce=nonce)
    new = dataclasses.replace(wc, position=index, traversal=state,
                              status=_step(wc.status, WalletEvent.AUTHORIZE), blocked_until=deadline)
    return new, auth


def reveal(wc: WalletCoin, count: int) -> tuple[WalletCoin, Pay]:
    """Write ahead ``count`` tokens and return the one ``Pay`` that spends them."""
    state, index, token = _advance(wc, count)
    new = dataclasses.replace(wc, position=index, traversal=state,
                              status=_step(wc.status, WalletEvent.PAY))
    return new, Pay(index=index, token=token)


@dataclass(frozen=True, slots=True)
class PendingWithdrawal:
    """What the wallet keeps (durably) between sending a withdrawal and its answer."""

    request: WithdrawRequest
    seeds: tuple[bytes, ...]
    prefixes: tuple[bytes, ...]
    secrets: tuple[bytes, ...]
    """Serialized blinding secrets, one per coin."""


def prepare_withdrawal(
    account: str, keyset: KeysetInfo, public_key: blindrsa.PublicKey, count: int, rng: Rng = os.urandom
) -> PendingWithdrawal:
    """New seeds, their chains' tips, and the blinded coin messages for one withdrawal."""
    seeds, prefixes, secrets, blinded = [], [], [], []
    for _ in range(count):
        seed = rng(32)
        tip = hashchain.make_chain(seed, keyset.n)
        prefix, input_msg = blindrsa.prepare(coin_message(keyset.id, tip), COIN_VARIANT, rng)
        blinded_msg, secret = blindrsa.blind(public_key, input_msg, COIN_VARIANT, rng)
        seeds.append(seed)
        prefixes.append(prefix)
        secrets.append(secret.to_bytes())
        blinded.append(blinded_msg)
    request = WithdrawRequest(account=account, keyset=keyset.id, blinded=tuple(blinded), req_id=rng(16))
    return PendingWithdrawal(request=request, seeds=tuple(seeds), prefixes=tuple(prefixes),
                             secrets=tuple(secrets))


def derive_coins(seed: WalletSeed, keyset: KeysetInfo, public_key: blindrsa.PublicKey, first: int,
                 count: int) -> list[DerivedCoin]:
    """Coins ``first .. first + count - 1`` of ``keyset`` from the wallet seed (docs/LIFECYCLE.md):
    the same blinded messages every time, so a restored wallet can find them again."""
    return [derive_coin(seed, keyset, public_key, first + i, COIN_VARIANT) for i in range(count)]


def pending_withdrawal(account: str, keyset: KeysetInfo, coins: list[DerivedCoin], req_id: bytes) -> PendingWithdrawal:
    """The withdrawal of coins derived from the wallet seed (:func:`derive_coins`)."""
    if not coins or any(c.keyset != keyset.id for c in coins):
        raise LocalProtocolError("a withdrawal takes one or more coins of its own keyset")
    request = WithdrawRequest(account=account, keyset=keyset.id, blinded=tuple(c.blinded for c in coins),
                              req_id=req_id)
    return PendingWithdrawal(request=request, seeds=tuple(c.secret for c in coins),
                             prefixes=tuple(c.prefix for c in coins), secrets=tuple(c.inv.to_bytes() for c in coins))


def finish_coin(keyset: KeysetInfo, public_key: blindrsa.PublicKey, secret: bytes, prefix: bytes,
                inv: blindrsa.BlindingSecret, blind_sig: bytes, *, tip: bytes | None = None) -> WalletCoin:
    """The fresh coin a blind signature makes: unblinded and verified (``bad_signature``
    otherwise), its whole chain ahead. ``tip`` saves the ``n`` hashes when the caller has it."""
    tip = hashchain.make_chain(secret, keyset.n) if tip is None else tip
    sig = blindrsa.finalize(public_key, prefix + coin_message(keyset.id, tip), blind_sig, inv, COIN_VARIANT)
    walker = hashchain.PebbleTraversal(secret, keyset.n, keyset.n)
    return WalletCoin(coin=Coin(keyset=keyset.id, tip=tip, prefix=prefix, sig=sig), n=keyset.n,
                      token_value=keyset.token_value, position=keyset.n, seed=secret, traversal=walker.to_state())


def complete_withdrawal(
    pending: PendingWithdrawal, answer: WithdrawAnswer, keyset: KeysetInfo, public_key: blindrsa.PublicKey
) -> list[WalletCoin]:
    """Unblind and verify every signature; a bad one raises and no coin is kept."""
    if answer.req_id != pending.request.req_id or len(answer.blind_sigs) != len(pending.seeds):
        raise RemoteProtocolError("withdraw answer does not match the request")
    return [finish_coin(keyset, public_key, seed, prefix, blindrsa.BlindingSecret.from_bytes(secret), blind_sig)
            for seed, prefix, secret, blind_sig in zip(pending.seeds, pending.prefixes, pending.secrets,
                                                       answer.blind_sigs, strict=True)]
