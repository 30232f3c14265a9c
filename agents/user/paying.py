"""One payment session, from the open to the close, under a deadline and the policy.

The agent has chosen the coin and written the blocking token ahead; :class:`Payment` opens the
session, answers the vendor's "due" notifications with tokens as far as the policy allows, and
closes. Every token is written ahead *with its money* before it leaves (so a token the vendor
keeps without a receipt is still counted), and the whole session runs under one deadline: the
policy's ``max_duration`` or the vendor's ``T``, whichever comes first. A vendor that stops
asking (``Due.tokens = 0`` forever, or silence) is closed after the policy's ``max_idle``.
Whatever stops a payment, the wallet tries to close the session (after the deadline, for at most
10 s more), so the vendor settles and the coin is free again; a close that fails leaves the coin
blocked until ``T``, as the bank does. The close's answer is the vendor's signed final receipt: it
is kept (with the certificate that names the signing key) only if it verifies against the
certificate checked at the offer; one that does not counts as a failed close.

How many tokens the units cost is the core's rule (:mod:`m2mpay.protocol.rules.pricing`), the same the
vendor's meter follows: the blocking token is the first token owed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiocoap
from aiocoap.numbers.codes import Code

from m2mpay.protocol import wire
from m2mpay.protocol.errors import RemoteProtocolError
from m2mpay.protocol.messages import CertificateBody, OpenSession, Receipt, SessionOpened
from m2mpay.protocol.receipts import verify_receipt
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.rules.pricing import units_paid

from ..policy.config import PolicyConfig
from ..policy.engine import Decision, OfferView, PolicyEngine, Spend
from .coap import EXCHANGE_WAIT, DueStream, call
from .errors import VendorUnreachable
from .outcome import PaymentResult, Stop
from .store import KeptReceipt, WalletStore

__all__ = ["Payment"]

log = logging.getLogger(__name__)

_CLOSE_AFTER_DEADLINE = 10.0
"""A close is tried even after the deadline, briefly: the vendor settles idle sessions anyway."""


@dataclass
class Payment:
    """The wallet's side of one session. ``coin`` has its blocking token written ahead already."""

    store: WalletStore
    policy: PolicyConfig
    engine: PolicyEngine
    view: OfferView
    """The offer as judged for ``coin`` (its token value)."""
    coin: wallet.WalletCoin
    shown: frozenset[str]
    base: str
    units: int
    clock: Callable[[], int]
    decide: Callable[[str, Decision], None]
    """Appends a decision to the wallet's decision log."""
    cert: CertificateBody
    """The vendor's certificate as checked at the offer: its key signs the final receipt."""
    cert_bytes: bytes
    """The same certificate as the offer carried it, kept with the receipt: together they prove it."""
    spent: int = 0
    """Money this session moved, the blocking token included."""
    paid: int = 0
    """Tokens paid (and acknowledged) after the blocking one."""

    @property
    def wanted(self) -> int:
        """Tokens owed after the blocking one for every unit asked for (the blocking token is the first)."""
        return self.coin.tokens_for(self.units, self.view.price) - 1

    def _result(self, stop: Stop, detail: str, credited: int | None) -> PaymentResult:
        # Units count what the acknowledged tokens pay for, the blocking token included (the open
        # acknowledged it); tokens that left count whether or not acknowledged: the money moved.
        delivered = min(self.units, units_paid(self.paid + 1, self.view.price, self.coin.token_value))
        return PaymentResult(vendor=self.view.vendor, asked=self.units, delivered=delivered,
                             tokens=self.spent // self.coin.token_value, spent=self.spent, credited=credited,
                             stop=stop, detail=detail)

    async def run(self, ctx: aiocoap.Context, request: OpenSession, deadline: float) -> PaymentResult:
        """Open, pay, close; ``deadline`` is on the event loop's clock.

        Raises ``RemoteProtocolError`` or ``VendorUnreachable`` only when the session never
        opened (the coin is then left blocked until ``T``: the bank may have blocked it).
        """
        try:
            async with asyncio.timeout_at(deadline):
                opened = SessionOpened.decode(await call(ctx, Code.POST, wire.uri(self.base, wire.SESSIONS_PATH),
                                                         request.encode()))
        except (RemoteProtocolError, VendorUnreachable, TimeoutError) as exc:
            self.store.save(self.coin.event(wallet.WalletEvent.LOST), self.shown)
            if isinstance(exc, TimeoutError):
                raise VendorUnreachable("no answer to the open before the payment's deadline") from exc
            raise
        sid = opened.session
        try:
            async with asyncio.timeout_at(deadline):
                stop, detail = await self._meter(ctx, sid)
        except TimeoutError:
            stop, detail = Stop.DEADLINE, "the payment's deadline passed"
        # Before the deadline a close gets CoAP's whole exchange span (a lossy link retransmits);
        # after it, a short try.
        remaining = deadline - asyncio.get_running_loop().time()
        wait = min(EXCHANGE_WAIT, max(_CLOSE_AFTER_DEADLINE, remaining))
        credited = await self._close(ctx, opened.session, wait)
        result = self._result(stop, detail, credited)
        self.decide("close", Decision(result.complete, stop.code, result.why(), {
            "vendor": self.view.vendor, "asked": self.units, "delivered": result.delivered,
            "tokens": result.tokens, "spent": self.spent, "credited": credited}))
        return result

    async def _meter(self, ctx: aiocoap.Context, sid: bytes) -> tuple[Stop, str]:
        """Answer the vendor's notifications until the units are paid for or something stops us."""
        loop = asyncio.get_running_loop()
        idle = self.policy.session.max_idle
        last_ask = loop.time()
        notes = DueStream(ctx, wire.uri(self.base, wire.session_path(sid, wire.DUE)))
        try:
            while True:
                try:
                    due = await notes.next(last_ask + idle - loop.time())
                except RemoteProtocolError as exc:
                    return Stop.VENDOR_STOPPED, f"{exc.code.wire}: {exc.message}"
                except VendorUnreachable as exc:
                    return Stop.VENDOR_UNREACHABLE, str(exc)
                if due is None:
                    return Stop.VENDOR_IDLE, f"the vendor asked for nothing for {idle} s"
                tokens = min(due.tokens, self.wanted - self.paid, self.coin.position)
                if tokens > 0:
                    last_ask = loop.time()
                    stopped = await self._pay(ctx, sid, tokens)
                    if stopped is not None:
                        return stopped
                if self.paid >= self.wanted:
                    return Stop.COMPLETE, ""
                if self.coin.position == 0:
                    return Stop.COIN_EXHAUSTED, f"the coin ran out with {self.wanted - self.paid} token(s) owed"
        finally:
            notes.cancel()

    async def _pay(self, ctx: aiocoap.Context, sid: bytes, tokens: int) -> tuple[Stop, str] | None:
        """Pay ``tokens`` if the policy allows; ``None`` when they were paid and acknowledged."""
        amount = self.coin.value_of(tokens)
        decision = self.engine.may_pay(self.view, self.spent, amount, self.clock())
        self.decide("pay", decision)
        if not decision.allowed:
            return Stop.POLICY, f"{decision.reason}: {decision.message}"
        self.coin, pay = wallet.reveal(self.coin, tokens)
        spend = Spend(self.clock(), self.view.vendor, self.view.category, amount)
        self.store.save(self.coin, self.shown, spend)  # written ahead with its money: it may leave now
        self.engine.record(spend)
        self.spent += amount
        try:
            Receipt.decode(await call(ctx, Code.POST, wire.uri(self.base, wire.session_path(sid, wire.PAY)),
                                      pay.encode()))
        except RemoteProtocolError as exc:
            return Stop.VENDOR_STOPPED, f"the vendor refused a token: {exc.code.wire}: {exc.message}"
        except VendorUnreachable as exc:
            return Stop.VENDOR_UNREACHABLE, f"no receipt: {exc}"
        self.paid += tokens
        return None

    async def _close(self, ctx: aiocoap.Context, sid: bytes, wait: float) -> int | None:
        """Close the session and keep the vendor's signed receipt; what it says was credited, or
        ``None`` if the vendor would not say (or said it in a receipt that does not verify)."""
        try:
            signed = await call(ctx, Code.POST, wire.uri(self.base, wire.session_path(sid, wire.CLOSE)), b"",
                                wait=wait)
            receipt = verify_receipt(signed, self.cert, tip=self.coin.coin.tip, session=sid)
        except (RemoteProtocolError, VendorUnreachable) as exc:
            log.warning("closing the session at %s failed (%s): the coin stays blocked until its deadline",
                        self.base, exc)
            return None
        kept = KeptReceipt(receipt=receipt, signed=signed, cert=self.cert_bytes, address=self.base)
        if receipt.pending:
            # The vendor's final settlement has not reached the bank yet: the coin stays blocked
            # for that vendor until T. Were it used at another vendor first, that vendor's block
            # would make the bank credit it the tokens this vendor was paid (PROTOCOL.md).
            log.info("session at %s closed with its settlement pending: the coin rests until its deadline",
                     self.base)
            self.store.keep_receipt(kept)
            return receipt.credited
        self.store.save(self.coin.event(wallet.WalletEvent.CLOSED), self.shown, receipt=kept)
        return receipt.credited
