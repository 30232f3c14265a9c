"""The user device: withdraw online, pay vendors offline, always under its policy.

Withdrawing checks the bank's keys announcement against the CA fingerprint the device was
provisioned with and keeps it, so paying needs no bank. Paying: fetch the offer, check the
vendor's certificate against the bank CA, ask the policy, pick a coin, write ahead, seal, open,
answer the vendor's Observe notifications with tokens as far as the policy allows, close. Every
policy decision is appended to ``decisions.jsonl`` in the wallet directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiocoap
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import cbor, envelope, sealing
from protocol.certificates import cert_hash, verify_announcement, verify_certificate
from protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from protocol.messages import Closed, Due, Offer, OpenSession, Receipt, SessionOpened, WithdrawAnswer
from protocol.rules import wallet
from protocol.rules.keyring import Keyring

from ..files import append_private
from ..mqtt import BankClient
from ..policy.config import PolicyConfig
from ..policy.engine import CoinView, Decision, OfferView, PolicyEngine, Spend
from .store import WalletStore

# CoAP retransmits a confirmable request for up to MAX_TRANSMIT_SPAN (45 s, RFC 7252 §4.8.2); a
# shorter wait gives up on a lossy link while the exchange would still have succeeded.
_EXCHANGE_WAIT = 45.0

__all__ = ["PaymentResult", "PolicyRefusal", "UserAgent", "UserCredentials"]

log = logging.getLogger(__name__)
_KEYS_FILE = "bank-keys.cose"
_CBOR = 60


class PolicyRefusal(Exception):
    """The policy said no; the wallet is unchanged."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.message)
        self.decision = decision


@dataclass(frozen=True)
class UserCredentials:
    """What ``bank account open`` wrote."""

    account: str
    key: Ed25519PrivateKey
    bank: str
    ca_fingerprint: str

    @classmethod
    def load(cls, path: Path) -> UserCredentials:
        data = json.loads(path.read_text())
        return cls(account=data["account"], key=Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["key"])),
                   bank=data["bank"], ca_fingerprint=data["ca_fingerprint"])


@dataclass(frozen=True)
class PaymentResult:
    vendor: str
    tokens: int
    credited: int


class UserAgent:
    """One wallet directory and its policy."""

    def __init__(self, directory: Path, policy: PolicyConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.store = WalletStore(directory)
        self.policy = policy or PolicyConfig()
        self.clock = clock
        meta = directory / "wallet.json"
        self.meta = json.loads(meta.read_text()) if meta.exists() else {}

    def close(self) -> None:
        self.store.close()

    def now(self) -> int:
        return int(self.clock())

    def _log(self, action: str, decision: Decision) -> None:
        append_private(self.directory / "decisions.jsonl", decision.to_json(action, self.now()) + "\n")

    def _history(self) -> list[Spend]:
        path = self.directory / "spending.jsonl"
        if not path.exists():
            return []
        return [Spend(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]

    def _spent(self, spend: Spend) -> None:
        append_private(self.directory / "spending.jsonl", json.dumps(
            {"ts": spend.ts, "vendor": spend.vendor, "category": spend.category, "amount": spend.amount}) + "\n")

    def keyring(self) -> Keyring:
        """The bank's keys as verified at the last withdrawal (no network needed)."""
        path = self.directory / _KEYS_FILE
        if not path.exists() or "ca_fingerprint" not in self.meta:
            raise RemoteProtocolError("no bank keys yet: withdraw first", ErrorCode.UNKNOWN_KEYSET)
        return Keyring.from_announcement(verify_announcement(path.read_bytes(), self.meta["ca_fingerprint"],
                                                             self.now()))

    # --- withdrawing -----------------------------------------------------------------------
    async def withdraw(self, bank: BankClient, credentials: UserCredentials, count: int,
                       keyset: str | None = None) -> list[wallet.WalletCoin]:
        """Resend any unfinished withdrawal, then withdraw ``count`` coins."""
        announcement = await bank.keys()
        keyring = Keyring.from_announcement(verify_announcement(announcement, credentials.ca_fingerprint,
                                                                self.now()))
        (self.directory / _KEYS_FILE).write_bytes(announcement)
        self.meta = {"ca_fingerprint": credentials.ca_fingerprint, "bank": credentials.bank}
        (self.directory / "wallet.json").write_text(json.dumps(self.meta))
        coins: list[wallet.WalletCoin] = []
        for pending, signed in self.store.pending_withdrawals():
            try:
                coins += await self._complete(bank, keyring, pending, signed)
            except envelope.Refusal as refusal:  # already forgotten; the new withdrawal goes ahead
                log.warning("an earlier withdrawal was refused by the bank: %s (%s)", refusal.code.wire,
                            refusal.message)
        if count > 0:
            info = keyring.withdrawable(keyset, self.now()) if keyset else min(
                (k for k in keyring.keysets.values() if k.withdraw_until >= self.now()), key=lambda k: k.value)
            pending = wallet.prepare_withdrawal(credentials.account, info, keyring.rsa_keys[info.id], count)
            signed = envelope.sign_request(pending.request, credentials.key, credentials.account, credentials.bank,
                                           "withdraw")
            self.store.begin_withdrawal(pending, signed, self.now())  # before it leaves
            coins += await self._complete(bank, keyring, pending, signed)
        return coins

    async def _complete(self, bank: BankClient, keyring: Keyring, pending: wallet.PendingWithdrawal,
                        signed: bytes) -> list[wallet.WalletCoin]:
        raw = await bank.request("withdraw", signed)
        try:
            answer = envelope.open_answer(raw, keyring.answer_key, keyring.bank, "withdraw", WithdrawAnswer,
                                          request=signed)
        except envelope.Refusal:
            # Signed over this request: final (the bank keeps refusals too), so resending it
            # would only get the same refusal, ahead of every later withdrawal.
            self.store.drop_withdrawal(pending.request.req_id)
            raise
        info = keyring.keyset(pending.request.keyset)
        coins = wallet.complete_withdrawal(pending, answer, info, keyring.rsa_keys[info.id])
        self.store.finish_withdrawal(pending.request.req_id, coins)
        return coins

    # --- paying ----------------------------------------------------------------------------
    async def _call(self, ctx: aiocoap.Context, code: Code, uri: str, body: bytes | None = None) -> bytes:
        msg = aiocoap.Message(code=code, uri=uri, payload=body or b"")
        if body is not None:
            msg.opt.content_format = _CBOR
        async with asyncio.timeout(_EXCHANGE_WAIT):
            response = await ctx.request(msg).response
        if not response.code.is_successful():
            code, text = ErrorCode.INTERNAL, f"vendor answered {response.code}"
            with contextlib.suppress(ProtocolError):
                error = cbor.decode(response.payload)
                if isinstance(error, dict):
                    code = ErrorCode.from_wire(str(error.get("code")))
                    text = str(error.get("message", text))[:200]
            raise RemoteProtocolError(text, code)
        return bytes(response.payload)

    async def discover(self, ctx: aiocoap.Context, base: str) -> Offer:
        """Find the vendor's offer through ``/.well-known/core`` (``rt=m2mpay.offer``) and fetch it."""
        links = (await self._call(ctx, Code.GET, base + "/.well-known/core")).decode("utf-8", "replace")
        path = next((part.split(">")[0].lstrip("<") for part in links.split(",")
                     if 'rt="m2mpay.offer"' in part or "rt=m2mpay.offer" in part), None)
        if path is None or not path.startswith("/"):
            raise RemoteProtocolError("no m2mpay offer at this address", ErrorCode.UNKNOWN_OP)
        return Offer.decode(await self._call(ctx, Code.GET, base + path))

    def offer_view(self, offer: Offer) -> OfferView:
        """What the policy needs to know of an offer, its certificate checked against the bank CA."""
        keyring = self.keyring()
        cert = verify_certificate(offer.cert, keyring.ca_key, keyring.bank, self.now())
        keyring.refuse_revoked(cert.vendor)  # as of the announcement kept at the last withdrawal
        if offer.bank != keyring.bank:
            raise RemoteProtocolError("vendor is paid by another bank", ErrorCode.CERT_INVALID)
        values = [keyring.keysets[k].token_value for k in offer.keysets if k in keyring.keysets]
        if not values:
            raise RemoteProtocolError("vendor accepts none of our keysets", ErrorCode.UNKNOWN_KEYSET)
        return OfferView(vendor=cert.vendor, category=cert.category, price=offer.price, token_value=min(values),
                         deadline=offer.deadline)

    async def pay(self, ctx: aiocoap.Context, base: str, units: int) -> PaymentResult:
        """Buy ``units`` units from the vendor at ``base`` (``coap://host:port``)."""
        keyring = self.keyring()
        offer = await self.discover(ctx, base)
        view = self.offer_view(offer)
        token_value = view.token_value
        engine = PolicyEngine(self.policy, self._history())
        decision = engine.check_offer(view, units, self.now())
        self._log("offer", decision)
        if not decision.allowed:
            raise PolicyRefusal(decision)
        now = self.now()
        held = [(wc.expire(now), vendors) for wc, vendors in self.store.coins()
                if wc.coin.keyset in offer.keysets and wc.available(now)]
        views = [CoinView(tip=wc.coin.tip, remaining=wc.remaining, token_value=wc.token_value, n=wc.n,
                          position=wc.position, vendors=vendors) for wc, vendors in held]
        chosen, decision = engine.select_coin(views, units * view.unit_price + token_value, view.vendor)
        self._log("coin", decision)
        if chosen is None:
            raise PolicyRefusal(decision)
        wc, shown = next((w, v) for w, v in held if w.coin.tip == chosen.tip)
        wc, auth = wallet.authorize(wc, deadline=offer.deadline, nonce=offer.nonce, cert_hash=cert_hash(offer.cert),
                                    now=now)
        shown = shown | {view.vendor}
        self.store.save(wc, shown)  # written ahead: the blocking token may leave now
        sealed = sealing.seal(auth.encode(), keyring.sealing_key, sealing.info_for_bank(keyring.bank))
        request = OpenSession(coin=wc.coin, sealed=sealed, deadline=offer.deadline, nonce=offer.nonce)
        try:
            opened = SessionOpened.decode(await self._call(ctx, Code.POST, base + "/sessions", request.encode()))
        except (RemoteProtocolError, TimeoutError):
            self.store.save(wc.event(wallet.WalletEvent.LOST), shown)  # may be blocked: leave it until T
            raise
        spent = token_value
        self._spent(Spend(self.now(), view.vendor, view.category, token_value))
        sid = opened.session.hex()
        wanted = units * offer.price
        paid_tokens = 0
        observation = ctx.request(aiocoap.Message(code=Code.GET, uri=f"{base}/sessions/{sid}/due", observe=0))
        try:
            await asyncio.wait_for(observation.response, _EXCHANGE_WAIT)
            notes = aiter(observation.observation)
            while paid_tokens < wanted and wc.position > 0:
                due = Due.decode((await asyncio.wait_for(anext(notes), 60)).payload)
                tokens = min(due.tokens, wanted - paid_tokens, wc.position)
                if tokens <= 0:
                    continue
                amount = tokens * token_value
                decision = engine.may_pay(view, spent, amount, self.now())
                self._log("pay", decision)
                if not decision.allowed:
                    break
                wc, pay = wallet.reveal(wc, tokens)
                self.store.save(wc, shown)  # written ahead
                Receipt.decode(await self._call(ctx, Code.POST, f"{base}/sessions/{sid}/pay", pay.encode()))
                self._spent(Spend(self.now(), view.vendor, view.category, amount))
                spent += amount
                paid_tokens += tokens
        finally:
            if not observation.observation.cancelled:
                observation.observation.cancel()
        closed = Closed.decode(await self._call(ctx, Code.POST, f"{base}/sessions/{sid}/close", b""))
        self.store.save(wc.event(wallet.WalletEvent.CLOSED), shown)
        return PaymentResult(vendor=view.vendor, tokens=paid_tokens + 1, credited=closed.credited)

    def public_coins(self) -> list[dict[str, object]]:
        """Public parts only: never the seed or the traversal state."""
        return [{"keyset": wc.coin.keyset, "tip": wc.coin.tip.hex(), "prefix": wc.coin.prefix.hex(),
                 "sig": wc.coin.sig.hex(), "position": wc.position, "remaining": wc.remaining,
                 "status": wc.status.value} for wc, _ in self.store.coins()]

