"""Stateless offers: the nonce is a MAC over the offer's terms, so issuing one keeps nothing.

``nonce = salt || HMAC-SHA256(secret, CBOR(["m2mpay/offer/1", salt, cert, service, unit, price,
deadline, block_window, bank, keysets]))[:8]`` with an 8-byte random salt (the 16-byte nonce of
the wire format, unchanged). On open the vendor rebuilds the offer from its own terms and the
request's ``T`` and nonce, and recomputes the tag: an offer it did not issue, or one whose ``T``
was changed, does not verify. A flood of ``GET /offer`` therefore holds no state and cannot push
a user's offer out of anything.

An offer can be opened for :data:`OFFER_TTL` seconds after it was issued (its issue time is
``T - block_window``; the MAC covers ``block_window``). Only offers that are being opened or were
opened are remembered, by nonce and until they expire, so a replayed open is refused; reaching
that memory takes a coin whose signature verifies, and keeping an entry takes a block at the bank.

The secret is derived from the vendor's Ed25519 signing key with HKDF-SHA256 under a fixed
context string rather than kept in a file of its own: the signing key is already the vendor's
best-guarded secret, so there is nothing new to create, protect or lose; offers stay valid across
a restart; re-enrolling with a new key retires them. HKDF separates the uses: the MAC key reveals
nothing about the signing key, nor the signatures about the MAC key.
"""

from __future__ import annotations

import heapq
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from m2mpay.protocol import cbor, wire
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import Offer

__all__ = ["MAX_REMEMBERED", "OFFER_TTL", "OfferBook", "Terms", "offer_secret"]

OFFER_TTL = 120
"""Seconds after its issue during which an offer can be opened."""
MAX_REMEMBERED = 65_536
"""Offers being opened or opened within the last :data:`OFFER_TTL` seconds that are remembered;
about 13 MB at most, and each one took a block at the bank (or is waiting for it)."""
_SALT = 8
_TAG = 8  # 2^-64 per guess, and a guess is one CoAP request: forging is out of reach
_MAC_CONTEXT = wire.OFFER_MAC_CONTEXT
_KDF_INFO = wire.OFFER_KEY_INFO


def offer_secret(key: Ed25519PrivateKey) -> bytes:
    """The 32-byte offer-MAC key: HKDF-SHA256 of the vendor signing key's seed, fixed context."""
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KDF_INFO).derive(seed)


@dataclass(frozen=True, slots=True)
class Terms:
    """Everything an offer says besides its deadline and nonce."""

    cert: bytes
    service: str
    unit: str
    price: int
    block_window: int
    bank: str
    keysets: tuple[str, ...]


class OfferBook:
    """Issues offers and admits each one to at most one session."""

    def __init__(self, secret: bytes, terms: Terms, *, ttl: int = OFFER_TTL, capacity: int = MAX_REMEMBERED,
                 salt: Callable[[int], bytes] = os.urandom) -> None:
        self._secret, self.terms, self._ttl, self._capacity, self._salt = secret, terms, ttl, capacity, salt
        self._used: dict[bytes, int] = {}
        """nonce → when the offer expires (it cannot be opened after that, so needs no memory)."""
        self._expiries: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._used)

    def _tag(self, salt: bytes, deadline: int) -> bytes:
        t = self.terms
        data = cbor.encode([_MAC_CONTEXT, salt, t.cert, t.service, t.unit, t.price, deadline, t.block_window,
                            t.bank, list(t.keysets)])
        return hmac.new(self._secret, data, sha256).digest()[:_TAG]

    def _offer(self, deadline: int, nonce: bytes) -> Offer:
        t = self.terms
        return Offer(cert=t.cert, service=t.service, unit=t.unit, price=t.price, deadline=deadline, nonce=nonce,
                     bank=t.bank, keysets=t.keysets)

    def issue(self, now: int) -> Offer:
        """A fresh offer, valid until ``now + ttl``, blocking until ``now + block_window``."""
        deadline = now + self.terms.block_window
        salt = self._salt(_SALT)
        return self._offer(deadline, salt + self._tag(salt, deadline))

    def admit(self, nonce: bytes, deadline: int, now: int) -> Offer:
        """The offer an open request names, if we issued it, it is fresh and it was not used."""
        if not hmac.compare_digest(nonce[_SALT:], self._tag(nonce[:_SALT], deadline)):
            raise RemoteProtocolError("not an offer of this vendor (nonce or deadline altered)",
                                      ErrorCode.BAD_REQUEST)
        if now >= self._expiry(deadline):
            raise RemoteProtocolError("offer expired: fetch a new one", ErrorCode.DEADLINE)
        self._forget_expired(now)
        if nonce in self._used:
            raise RemoteProtocolError("offer already used", ErrorCode.REPLAY)
        return self._offer(deadline, nonce)

    def claim(self, offer: Offer, now: int) -> None:
        """Mark ``offer`` used (before the bank is asked); a later open of it is a replay."""
        self._forget_expired(now)
        if offer.nonce in self._used:
            raise RemoteProtocolError("offer already used", ErrorCode.REPLAY)
        if len(self._used) >= self._capacity:
            raise RemoteProtocolError("too many sessions opening; retry later", ErrorCode.UNAVAILABLE)
        expiry = self._expiry(offer.deadline)
        self._used[offer.nonce] = expiry
        heapq.heappush(self._expiries, (expiry, offer.nonce))
        if len(self._expiries) > 2 * len(self._used) + 64:
            # Released offers leave their heap entries behind; a peer retrying refused opens
            # must not grow the heap past what is remembered.
            self._expiries = [(when, nonce) for nonce, when in self._used.items()]
            heapq.heapify(self._expiries)

    def release(self, offer: Offer) -> None:
        """The bank refused the block: the offer may be tried again (with another coin)."""
        self._used.pop(offer.nonce, None)  # its heap entry goes when it expires

    def _expiry(self, deadline: int) -> int:
        issued = deadline - self.terms.block_window
        return min(issued + self._ttl, deadline)

    def _forget_expired(self, now: int) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expiry, nonce = heapq.heappop(self._expiries)
            if self._used.get(nonce) == expiry:
                del self._used[nonce]
