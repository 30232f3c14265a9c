"""The user device: withdraw online, pay vendors offline, always under its policy.

Withdrawing checks the bank's keys announcement against the CA fingerprint the device was
provisioned with and keeps it, so paying needs no bank. Paying: fetch the offer, check the
vendor's certificate against the bank CA, ask the policy (in the money of the coin it would pay
with), pick a coin, write ahead, seal, and hand the session to :class:`~m2mpay.agents.user.paying.Payment`,
which keeps the vendor's signed final receipt (:meth:`UserAgent.receipts`).
Every policy decision is appended to ``decisions.jsonl`` in the wallet directory; spending and
withdrawals live in the wallet's database. One process holds a wallet at a time
(:class:`~m2mpay.agents.user.lock.WalletLock`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiocoap
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.protocol import envelope, sealing, wire
from m2mpay.protocol.certificates import cert_hash, verify_announcement, verify_certificate
from m2mpay.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from m2mpay.protocol.messages import MAX_WITHDRAW_BATCH, CertificateBody, KeysetInfo, Offer, OpenSession, WithdrawAnswer
from m2mpay.protocol.receipts import verify_receipt
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.rules.keyring import Keyring, default_withdrawal
from m2mpay.protocol.seed import WalletSeed

from ..files import append_private, private_dir
from ..mqtt import BankClient
from ..config import read_json
from ..policy.config import PolicyConfig
from ..policy.engine import DAY, CoinView, Decision, OfferView, PolicyEngine, Spend
from .coap import call
from . import exchanger
from .errors import PolicyRefusal, Refused, UsageError, VendorUnreachable
from .exchange import prepare_exchange
from .lock import WalletLock
from .outcome import PaymentResult, Stop
from .paying import Payment
from .store import KeptReceipt, WalletStore, require_wallet

__all__ = ["PaymentResult", "PolicyRefusal", "Stop", "UserAgent", "UserCredentials", "WithdrawOutcome"]

log = logging.getLogger(__name__)
_KEYS_FILE = "bank-keys.cose"
_OLD_SPENDING_LOG = "spending.jsonl"
EXCHANGE_MARGIN = 7 * 86400
"""Coins of a keyset that no longer issues are exchanged when its spending ends within this."""
_ASK_AGAIN_WAIT = 10.0
"""How long a close asked again may take: a vendor gone for now is asked again next time."""


@dataclass(frozen=True)
class UserCredentials:
    """What ``bank account open`` wrote."""

    account: str
    key: Ed25519PrivateKey
    bank: str
    ca_fingerprint: str

    @classmethod
    def load(cls, path: Path) -> UserCredentials:
        """Read a credentials file."""
        data = read_json(path, "a credentials file")  # a file that is not JSON is named in the error
        return cls(account=data["account"], key=Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["key"])),
                   bank=data["bank"], ca_fingerprint=data["ca_fingerprint"])


@dataclass(frozen=True)
class WithdrawOutcome:
    """What one ``withdraw`` brought: the coins asked for, and what earlier requests came to."""

    coins: list[wallet.WalletCoin]
    """The coins of this request: exactly as many as asked for."""
    recovered: list[wallet.WalletCoin]
    """Coins of earlier requests whose answer had not arrived (resent first, same bytes)."""
    refused: list[envelope.Refusal]
    """Earlier requests the bank refused: dropped with their secrets, nothing was debited."""


class UserAgent:
    """One wallet directory and its policy (the conservative default when none is given).

    With ``exclusive`` (the default) the wallet is locked for this process until :meth:`close`;
    a second process gets :class:`~m2mpay.agents.user.errors.WalletBusy`. Without ``create`` (the
    reading commands) a wallet that does not exist is :class:`~m2mpay.agents.user.errors.UsageError`
    and nothing is created: a mistyped path must not read as an empty wallet.
    """

    def __init__(self, directory: Path, policy: PolicyConfig | None = None,
                 clock: Callable[[], float] = time.time, *, exclusive: bool = True, create: bool = True) -> None:
        self.directory = directory
        if not create:
            require_wallet(directory)
        private_dir(directory)
        self._lock = WalletLock(directory) if exclusive else None
        try:
            self.store = WalletStore(directory)
        except BaseException:
            self._release()
            raise
        self.policy = policy or PolicyConfig()
        self.clock = clock
        self.seed_made = False
        """Whether this process gave the wallet its seed (a command then says how to see it)."""
        self.on_decision: Callable[[str, Decision], None] | None = None
        """Told of every decision after it is logged (``user pay`` shows progress with it)."""
        meta = directory / "wallet.json"
        self.meta = json.loads(meta.read_text()) if meta.exists() else {}
        if exclusive:
            self._import_spending_log()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        """Close the store and let another process have the wallet."""
        self.store.close()
        self._release()

    def now(self) -> int:
        """The device's clock, in whole seconds."""
        return int(self.clock())

    def _log(self, action: str, decision: Decision) -> None:
        append_private(self.directory / "decisions.jsonl", decision.to_json(action, self.now()) + "\n")
        if self.on_decision is not None:
            self.on_decision(action, decision)

    def record_decision(self, action: str, decision: Decision) -> None:
        """Log a policy decision taken outside a payment (``refill``, ``choose``): appended to
        ``decisions.jsonl`` with the device's time, like the agent's own."""
        self._log(action, decision)

    def spending(self, since: int = 0) -> list[Spend]:
        """Money that left the wallet since ``since``: every token from when it may have left."""
        return self.store.spends(since)

    def _import_spending_log(self) -> None:
        """Move an older wallet's ``spending.jsonl`` into the database; a torn line is skipped."""
        path = self.directory / _OLD_SPENDING_LOG
        if not path.exists():
            return
        spends, torn = [], 0
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                spends.append(Spend(ts=int(data["ts"]), vendor=str(data["vendor"]), category=str(data["category"]),
                                    amount=int(data["amount"])))
            except (ValueError, KeyError, TypeError):
                torn += 1
        self.store.import_spends(spends, source=_OLD_SPENDING_LOG)
        path.rename(path.with_name(_OLD_SPENDING_LOG + ".imported"))
        if torn:
            log.warning("%d unreadable line(s) of %s skipped (a write cut short)", torn, path)

    def keyring(self) -> Keyring:
        """The bank's keys as verified at the last withdrawal (no network needed)."""
        path = self.directory / _KEYS_FILE
        if not path.exists() or "ca_fingerprint" not in self.meta:
            raise RemoteProtocolError("no bank keys yet: withdraw first", ErrorCode.UNKNOWN_KEYSET)
        return Keyring.from_announcement(verify_announcement(path.read_bytes(), self.meta["ca_fingerprint"],
                                                             self.now()), self.store.phases())

    def spendable_value(self, keyring: Keyring | None = None) -> int:
        """Value the wallet can pay with now, minor units: coins free for a session (not in one,
        not uncertain) of keysets still spendable. What a refill is decided on."""
        now = self.now()
        try:
            keyring = keyring or self.keyring()
        except RemoteProtocolError:
            return 0  # no keys (or expired ones): nothing can be paid until the next withdrawal
        busy = self.store.exchanging()
        return sum(wc.remaining for wc, _ in self.store.coins()
                   if wc.available(now) and keyring.spendable(wc.coin.keyset, now) and wc.coin.tip not in busy)

    def wallet_seed(self) -> WalletSeed:
        """The seed new coins derive from; a wallet without one gets one now (:attr:`seed_made`),
        not shown: ``user init`` shows it once."""
        seed = self.store.seeds.seed()
        if seed is None:
            seed = WalletSeed.generate(os.urandom)
            self.store.seeds.put_seed(seed)
            self.seed_made = True
            log.info("wallet %s has a new seed, not shown yet: 'm2mpay user init --wallet %s' shows it once",
                        self.directory, self.directory)
        return seed

    # --- withdrawing -----------------------------------------------------------------------
    async def withdraw(self, bank: BankClient, credentials: UserCredentials, count: int,
                       keyset: str | None = None) -> list[wallet.WalletCoin]:
        """Resend any unfinished withdrawal, then withdraw ``count`` coins; every coin that came."""
        outcome = await self.withdraw_outcome(bank, credentials, count, keyset)
        return outcome.recovered + outcome.coins

    async def withdraw_outcome(self, bank: BankClient, credentials: UserCredentials, count: int,
                               keyset: str | None = None) -> WithdrawOutcome:
        """Resend any unfinished withdrawal, then withdraw ``count`` coins (0: only resend).

        A refusal by the bank is final for its request: the request and its blinding secrets
        are dropped, and the refusal is raised (this request's) or reported in the outcome (an
        earlier one's). Only a transport failure, or the bank's own trouble, keeps a request to
        be sent again, byte for byte.
        """
        if not 0 <= count <= MAX_WITHDRAW_BATCH:
            raise UsageError(f"coins must be between 0 and {MAX_WITHDRAW_BATCH} per withdrawal")
        keyring = await self.fresh_keyring(bank, credentials)
        recovered: list[wallet.WalletCoin] = []
        refused: list[envelope.Refusal] = []
        for pending, signed in self.store.pending_withdrawals():
            try:
                recovered += await self._complete(bank, keyring, pending, signed)
            except envelope.Refusal as refusal:
                if not refusal.final:
                    raise  # the bank's own trouble: kept, and resent first next time
                log.warning("an earlier withdrawal was refused by the bank: %s (%s)", refusal.code.wire,
                            refusal.message)
                refused.append(refusal)  # already forgotten; the new withdrawal goes ahead
        coins: list[wallet.WalletCoin] = []
        if count > 0:
            info = self._withdrawable(keyring, keyset)
            pending, first = self.store.seeds.withdrawal(self.wallet_seed(), credentials.account, info, keyring, count)
            signed = envelope.sign_request(pending.request, credentials.key, credentials.account, credentials.bank,
                                           "withdraw")
            # Before it leaves, with its value: the daily refill cap counts it from now on.
            self.store.begin_withdrawal(pending, signed, self.now(), value=count * info.value)
            try:
                coins = await self._complete(bank, keyring, pending, signed)
            except envelope.Refusal as refusal:
                # Nothing was signed: the next withdrawal takes these counters again; unless the
                # bank had signed one of these messages before (a coin of this seed the wallet does
                # not hold: `user restore` fetches it), then the next one takes new counters.
                if refusal.final and refusal.code is not ErrorCode.REPLAY:
                    self.store.seeds.release(info.id, first, count)
                raise
        return WithdrawOutcome(coins=coins, recovered=recovered, refused=refused)

    def can_withdraw(self, keyring: Keyring, keyset: str) -> bool:
        """Whether the bank takes withdrawals from ``keyset`` now (not retired, not past its date)."""
        try:
            keyring.withdrawable(keyset, self.now())
        except RemoteProtocolError:
            return False
        return True

    async def fresh_keyring(self, bank: BankClient, credentials: UserCredentials) -> Keyring:
        """Fetch the bank's announcement, follow its keyset phases (never back) and keep it."""
        announcement = await bank.keys()
        keyring, rolled_back = Keyring.following(
            verify_announcement(announcement, credentials.ca_fingerprint, self.now()), self.store.phases())
        if rolled_back:
            log.error("the bank's announcement moves keyset phases back (%s): kept the earlier ones (%s)",
                      ", ".join(rolled_back), ErrorCode.PHASE_ROLLBACK.wire)
        self.store.put_phases(keyring.phases)
        (self.directory / _KEYS_FILE).write_bytes(announcement)
        self.meta = {"ca_fingerprint": credentials.ca_fingerprint, "bank": credentials.bank}
        (self.directory / "wallet.json").write_text(json.dumps(self.meta))
        return keyring

    async def exchange_due(self, bank: BankClient, credentials: UserCredentials,
                           margin: int = EXCHANGE_MARGIN) -> list[wallet.WalletCoin]:
        """Resend unfinished exchanges, then exchange every coin due (see
        :func:`~m2mpay.agents.user.exchanger.due`); the fresh coins. A refusal costs that coin's
        exchange only (logged); a transport failure is raised and the request resent next time."""
        keyring = await self.fresh_keyring(bank, credentials)
        fresh: list[wallet.WalletCoin] = []
        todo = self.store.pending_exchanges()
        for wc in exchanger.due(self.store, keyring, self.now(), margin):
            number = self.store.seeds.exchange_number()
            try:
                pending = prepare_exchange(wc, keyring, self.now(),
                                           derive=self.store.seeds.deriver(self.wallet_seed(), keyring, number))
            except LocalProtocolError as exc:  # the bank offers no keysets to take the value in
                self.store.seeds.release_exchange(number)
                log.warning("coin %s not exchanged: %s", wc.coin.tip.hex()[:8], exc.message)
                continue
            self.store.begin_exchange(pending, self.now())  # before it leaves: resent as it is
            todo.append(pending)
        for pending in todo:
            try:
                fresh += await exchanger.send_exchange(self.store, bank, keyring, pending)
            except envelope.Refusal as refusal:
                log.warning("exchange of coin %s refused: %s (%s)", pending.request.coin.tip.hex()[:8],
                            refusal.code.wire, refusal.message)
        return fresh

    def _withdrawable(self, keyring: Keyring, keyset: str | None) -> KeysetInfo:
        now = self.now()
        if keyset is None:
            open_ = [k for k in keyring.keysets.values() if self.can_withdraw(keyring, k.id)]
            chosen = default_withdrawal(open_)
            if chosen is None:
                raise RemoteProtocolError("no keyset is open for withdrawal", ErrorCode.KEYSET_EXPIRED)
            return chosen
        if keyset not in keyring.keysets:  # the bank's signed announcement, fresh: the bank's own answer
            raise Refused(f"the bank refused the withdrawal: {ErrorCode.UNKNOWN_KEYSET.wire} (the bank has no "
                          f"keyset {keyset}; 'm2mpay bank keys' lists them); nothing was debited")
        try:
            return keyring.withdrawable(keyset, now)
        except RemoteProtocolError as exc:
            raise UsageError(f"keyset {keyset}: {exc.message}") from exc

    async def _complete(self, bank: BankClient, keyring: Keyring, pending: wallet.PendingWithdrawal,
                        signed: bytes) -> list[wallet.WalletCoin]:
        raw = await bank.request("withdraw", signed)
        try:
            answer = envelope.open_answer(raw, keyring.answer_key, keyring.bank, "withdraw", WithdrawAnswer,
                                          request=signed)
        except envelope.Refusal as refusal:
            # Signed over this request and final (the bank keeps refusals too): resending it
            # would only get the same refusal, ahead of every later withdrawal. An `internal`
            # refusal is not final: the debit may be made, and the same bytes get the coins.
            if refusal.final:
                self.store.drop_withdrawal(pending.request.req_id)
            raise
        info = keyring.keyset(pending.request.keyset)
        coins = wallet.complete_withdrawal(pending, answer, info, keyring.rsa_keys[info.id])
        self.store.finish_withdrawal(pending.request.req_id, coins)
        return coins

    # --- paying ----------------------------------------------------------------------------
    async def discover(self, ctx: aiocoap.Context, base: str) -> Offer:
        """Find the vendor's offer through ``/.well-known/core`` (``rt=m2mpay.offer``) and fetch it."""
        links = (await call(ctx, Code.GET, wire.uri(base, wire.WELL_KNOWN_CORE_PATH))).decode("utf-8", "replace")
        path = next((part.split(">")[0].lstrip("<") for part in links.split(",")
                     if f'rt="{wire.RT_OFFER}"' in part or f"rt={wire.RT_OFFER}" in part), None)
        if path is None or not path.startswith("/"):
            raise RemoteProtocolError("no m2mpay offer at this address", ErrorCode.UNKNOWN_OP)
        return Offer.decode(await call(ctx, Code.GET, base + path))

    def offer_view(self, offer: Offer) -> OfferView:
        """What the policy needs to know of an offer, its certificate checked against the bank CA.

        Its token value is the smallest among the keysets the vendor accepts: good for comparing
        offers; a payment judges again with the coin it actually uses.
        """
        return self._checked(offer)[0]

    def _checked(self, offer: Offer) -> tuple[OfferView, CertificateBody]:
        """The offer's view, and the vendor certificate it was checked with (its key signs receipts)."""
        keyring = self.keyring()
        cert = verify_certificate(offer.cert, keyring.ca_key, keyring.bank, self.now())
        keyring.refuse_revoked(cert.vendor)  # as of the announcement kept at the last withdrawal
        if offer.bank != keyring.bank:
            raise RemoteProtocolError("vendor is paid by another bank", ErrorCode.CERT_INVALID)
        values = [keyring.keysets[k].token_value for k in offer.keysets if k in keyring.keysets]
        if not values:
            raise RemoteProtocolError("vendor accepts none of our keysets", ErrorCode.UNKNOWN_KEYSET)
        return OfferView(vendor=cert.vendor, category=cert.category, price=offer.price, token_value=min(values),
                         deadline=offer.deadline), cert

    def _choose(self, engine: PolicyEngine, offer: Offer, view: OfferView, units: int,
                now: int) -> tuple[wallet.WalletCoin, frozenset[str], OfferView]:
        """The coin to pay with and the offer as judged in that coin's money; or ``PolicyRefusal``."""
        keyring, busy = self.keyring(), self.store.exchanging()
        held = [(wc.expire(now), vendors) for wc, vendors in self.store.coins()
                if wc.coin.keyset in offer.keysets and wc.available(now) and keyring.spendable(wc.coin.keyset, now)
                and wc.coin.tip not in busy]
        values = sorted({wc.token_value for wc, _ in held}) or [view.token_value]
        judged = {v: engine.check_offer(dataclasses.replace(view, token_value=v), units, now) for v in values}
        allowed = [v for v in values if judged[v].allowed]
        if not allowed:
            self._log("offer", judged[values[0]])  # the smallest tokens: the nearest to being allowed
            raise PolicyRefusal(judged[values[0]])
        views = [CoinView(tip=wc.coin.tip, remaining=wc.remaining, token_value=wc.token_value, n=wc.n,
                          position=wc.position, vendors=vendors) for wc, vendors in held if wc.token_value in allowed]
        chosen, decision = engine.select_coin(views, units, offer.price, view.vendor)
        self._log("offer", judged[allowed[0] if chosen is None else chosen.token_value])
        self._log("coin", decision)
        if chosen is None:
            raise PolicyRefusal(decision)
        wc, shown = next((w, v) for w, v in held if w.coin.tip == chosen.tip)
        return wc, shown, dataclasses.replace(view, token_value=wc.token_value)

    async def pay(self, ctx: aiocoap.Context, base: str, units: int) -> PaymentResult:
        """Buy ``units`` units from the vendor at ``base`` (``coap://host:port``).

        Raises before anything is spent: ``UsageError`` (units not positive), ``PolicyRefusal``,
        a vendor's refusal or ``VendorUnreachable``. Once the blocking token is written ahead the
        result says how the session ended (:class:`~m2mpay.agents.user.outcome.Stop`), unless the
        session never opened (the refusal or ``VendorUnreachable`` is raised).
        """
        if units < 1:
            raise UsageError("units must be a positive whole number")
        if not (self.directory / _KEYS_FILE).exists():  # never withdrew: nothing to pay with, vendor or not
            raise PolicyRefusal(Decision(False, "no_coin", "the wallet holds no coin and no bank keys yet"))
        keyring = self.keyring()
        offer = await self.discover(ctx, base)
        view, cert = self._checked(offer)
        now = self.now()
        engine = PolicyEngine(self.policy, self.store.spends(since=now - DAY))
        wc, shown, view = self._choose(engine, offer, view, units, now)
        wc, auth = wallet.authorize(wc, deadline=offer.deadline, nonce=offer.nonce, cert_hash=cert_hash(offer.cert),
                                    now=now)
        shown = shown | {view.vendor}
        blocking = Spend(now, view.vendor, view.category, wc.value_of(1))
        self.store.save(wc, shown, blocking)  # written ahead with its money: the blocking token may leave now
        engine.record(blocking)
        sealed = sealing.seal(auth.encode(), keyring.sealing_key, sealing.info_for_bank(keyring.bank))
        request = OpenSession(coin=wc.coin, sealed=sealed, deadline=offer.deadline, nonce=offer.nonce)
        payment = Payment(store=self.store, policy=self.policy, engine=engine, view=view, coin=wc, shown=shown,
                          base=base, units=units, clock=self.now, decide=self._log, spent=blocking.amount,
                          cert=cert, cert_bytes=offer.cert)
        # One deadline for the whole session: the policy's, or the vendor's T if that is sooner.
        seconds = min(self.policy.session.max_duration, max(offer.deadline - now, 0))
        return await payment.run(ctx, request, asyncio.get_running_loop().time() + seconds)

    def receipts(self) -> list[KeptReceipt]:
        """The vendors' signed final receipts this wallet kept, oldest first."""
        return self.store.receipts()

    async def settle_pending(self, ctx: aiocoap.Context) -> int:
        """Ask the close again of every session whose receipt is still pending; keep the final ones.

        A final receipt frees its coin at once, if the coin still stands where that session left it
        (otherwise it was used again after ``T``, or lost a token in flight, and is left as it is).
        A vendor that does not answer, or still says pending, is asked again next time. Returns how
        many receipts became final.
        """
        pending = [kept for kept in self.store.receipts() if kept.receipt.pending]
        if not pending:
            return 0
        try:
            keyring = self.keyring()
        except RemoteProtocolError as exc:  # the kept keys expired: the next withdrawal renews them
            log.info("pending receipts not asked again: %s", exc.message)
            return 0
        final = 0
        for kept in pending:
            old = kept.receipt
            try:
                cert = verify_certificate(kept.cert, keyring.ca_key, keyring.bank, self.now())
                signed = await call(ctx, Code.POST, wire.uri(kept.address, wire.session_path(old.session, wire.CLOSE)),
                                    b"", wait=_ASK_AGAIN_WAIT)
                receipt = verify_receipt(signed, cert, tip=old.tip, session=old.session)
            except (RemoteProtocolError, VendorUnreachable) as exc:
                log.info("pending receipt of %s not settled yet: %s", kept.address, exc)
                continue
            if receipt.pending:
                continue
            now_final = dataclasses.replace(kept, receipt=receipt, signed=signed)
            wc = self.store.coin(old.tip)
            if wc is not None and wc.status is wallet.CoinStatus.IN_SESSION and wc.position == receipt.index:
                self.store.save(wc.event(wallet.WalletEvent.CLOSED), receipt=now_final)
            else:
                self.store.keep_receipt(now_final)
            final += 1
        return final

    def public_coins(self) -> list[dict[str, object]]:
        """Public parts only: never the seed or the traversal state."""
        return [{"keyset": wc.coin.keyset, "tip": wc.coin.tip.hex(), "prefix": wc.coin.prefix.hex(),
                 "sig": wc.coin.sig.hex(), "position": wc.position, "remaining": wc.remaining,
                 "status": wc.status.value} for wc, _ in self.store.coins()]
