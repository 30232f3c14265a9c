"""``m2mpay user …`` commands.

Every command's error goes through one place (:func:`_guarded`): one line on stderr saying what
happened, and the exit status from :func:`m2mpay.agents.user.errors.exit_status` — usage 2, policy
refusal 3, bank or vendor refusal 4, unreachable 5, interrupted 130, internal 70. ``user pay``
exits 0 only when every unit asked for was delivered. ``--json`` keys are listed in docs/CLI.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import traceback
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import aiocoap

from m2mpay.protocol import envelope
from m2mpay.protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError

from ..mqtt import BankClient, TlsLogin, TransportError
from ..policy.config import PolicyConfig
from ..settings import file_option, from_environment, option
from .agent import UserAgent, UserCredentials, WithdrawOutcome
from .errors import EXIT, PaymentIncomplete, Refused, UsageError, describe, exit_status
from .outcome import PaymentResult
from .progress import PaymentProgress, RunProgress
from .seed_cli import add_seed_commands
from .status import iso, render_status, wallet_status
from .store import KeptReceipt, require_wallet

__all__ = ["add_user_commands"]

Handler = Callable[[argparse.Namespace], int]


def _guarded(handler: Handler) -> Handler:
    """Run a command; any error becomes one line on stderr and its exit status."""

    def run(args: argparse.Namespace) -> int:
        # A command speaks through its one line; the library's warnings (a close that failed, a
        # retry) are for `user run`'s log, which sets up handlers of its own.
        for name in ("m2mpay.agents", "mqtt"):  # ours, and paho's (through aiomqtt)
            logging.getLogger(name).addHandler(logging.NullHandler())
        try:
            return handler(args)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every error ends as its one line and status
            status = exit_status(exc)
            print(f"m2mpay: {describe(exc)}", file=sys.stderr)
            if status == EXIT["internal"]:  # a bug, not a user's mistake: keep what finds it
                traceback.print_exception(exc, file=sys.stderr)
            return status

    return run


_WALLET_HELP = "the wallet directory (private: it holds every coin's secret)"


def add_user_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``user init|restore|withdraw|pay|status|wallet|receipts|run|decisions``."""
    user = commands.add_parser("user", help="a user device's wallet").add_subparsers(dest="action", required=True)
    add_seed_commands(user, _guarded, _WALLET_HELP)
    withdraw = user.add_parser("withdraw", help="withdraw coins from the bank")
    option(withdraw, "--wallet", "user.wallet", _WALLET_HELP, required=True)
    option(withdraw, "--credentials", "user.credentials", "from bank account open", required=True)
    option(withdraw, "--broker", "user.broker", "mqtt://HOST:PORT", required=True)
    withdraw.add_argument("--coins", type=int, required=True,
                          help="coins to withdraw (0: only finish earlier withdrawals)")
    withdraw.add_argument("--keyset", help="keyset id (default: the smallest denomination)")
    option(withdraw, "--tls", "user.tls", "PKI directory: log in with ACCOUNT.crt/.key (mqtts:// URL)")
    withdraw.add_argument("--json", action="store_true", help="as JSON (see docs/CLI.md)")
    withdraw.set_defaults(handler=_guarded(_withdraw))
    pay = user.add_parser("pay", help="pay a vendor")
    option(pay, "--wallet", "user.wallet", _WALLET_HELP, required=True)
    pay.add_argument("vendor", help="coap://HOST:PORT")
    pay.add_argument("--units", type=int, default=1, help="units of service to pay for (default 1)")
    file_option(pay, "--policy", "policy", "policy.toml (none found: the conservative default policy)")
    pay.add_argument("--json", action="store_true", help="the outcome as JSON, no progress (see docs/CLI.md)")
    pay.add_argument("--quiet", action="store_true", help="no progress, only the outcome")
    pay.set_defaults(handler=_guarded(_pay))
    status = user.add_parser("status", help="spendable, in session, uncertain (with deadlines), pending withdrawals")
    option(status, "--wallet", "user.wallet", _WALLET_HELP, required=True)
    status.add_argument("--json", action="store_true", help="as JSON (minor units, ISO 8601 UTC times)")
    status.set_defaults(handler=_guarded(_status))
    show = user.add_parser("wallet", help="coins (public parts only)")
    option(show, "--wallet", "user.wallet", _WALLET_HELP, required=True)
    show.add_argument("--json", action="store_true", help="as JSON")
    show.set_defaults(handler=_guarded(_wallet))
    receipts = user.add_parser("receipts", help="the vendors' signed final receipts: what was paid whom")
    option(receipts, "--wallet", "user.wallet", _WALLET_HELP, required=True)
    receipts.add_argument("--json", action="store_true", help="as JSON (times in ISO 8601 UTC)")
    receipts.set_defaults(handler=_guarded(_receipts))
    run = user.add_parser("run", help="the autonomous agent: refill, choose offers, pay")
    file_option(run, "--config", "user", "user.toml", required=True)
    run.add_argument("--log-json", action="store_true", help="log JSON lines")
    run.add_argument("--quiet", action="store_true", help="no progress, only each payment's outcome at the end")
    run.set_defaults(handler=_guarded(_run))
    log = user.add_parser("decisions", help="the policy's decision log")
    option(log, "--wallet", "user.wallet", _WALLET_HELP, required=True)
    log.add_argument("--json", action="store_true", help="one JSON array, each entry with its ISO 8601 'time'")
    log.set_defaults(handler=_guarded(_decisions))


def _withdraw(args: argparse.Namespace) -> int:
    if args.coins < 0:
        raise UsageError("--coins must not be negative")
    credentials = UserCredentials.load(args.credentials)
    agent = UserAgent(args.wallet)

    async def run() -> WithdrawOutcome:
        tls = TlsLogin.from_dir(args.tls, credentials.account) if args.tls else None
        async with BankClient(args.broker, credentials.bank, f"{credentials.account}-{uuid.uuid4().hex[:6]}",
                              tls=tls) as bank:
            return await agent.withdraw_outcome(bank, credentials, args.coins, args.keyset)

    try:
        outcome = asyncio.run(run())
    except envelope.Refusal as refusal:
        if refusal.final:
            raise Refused(f"the bank refused the withdrawal: {refusal.code.wire} ({refusal.message}); nothing was "
                          f"debited and the request is dropped{_REFUSAL_HINTS.get(refusal.code, '')}") from refusal
        raise TransportError(f"the bank could not answer ({refusal.code.wire}); the withdrawal is kept and sent "
                             "again by the next 'user withdraw'") from refusal
    except RemoteProtocolError as exc:
        if exc.code is not ErrorCode.BAD_SIGNATURE:
            raise
        # What the bank signed does not verify under the CA these credentials name: another bank's file.
        raise Refused(f"the bank's keys do not match the credentials: {exc.message} ({_CREDENTIALS_HINT})") from exc
    except TransportError as exc:
        kept = len(agent.store.pending_withdrawals())
        if kept:
            raise TransportError(f"{exc}; {kept} withdrawal(s) kept, sent again by the next 'user withdraw'") from exc
        raise
    finally:
        agent.close()
    if args.json:
        print(json.dumps({
            "coins": len(outcome.coins), "value": sum(wc.remaining for wc in outcome.coins),
            "recovered": len(outcome.recovered), "recovered_value": sum(wc.remaining for wc in outcome.recovered),
            "refused": [{"code": r.code.wire, "message": r.message} for r in outcome.refused]}, indent=2))
        return 0
    print(f"withdrew {len(outcome.coins)} coin(s)")
    if agent.seed_made:
        print(f"m2mpay: this wallet's seed has not been shown: 'm2mpay user init --wallet {args.wallet}' shows it "
              "once (without it a lost wallet cannot be restored)", file=sys.stderr)
    if outcome.recovered:
        print(f"also {len(outcome.recovered)} coin(s) of an earlier withdrawal whose answer had not arrived")
    for earlier in outcome.refused:
        print(f"m2mpay: an earlier withdrawal was refused by the bank and dropped: {earlier.code.wire}: "
              f"{earlier.message}", file=sys.stderr)
    return 0


_CREDENTIALS_HINT = "is --credentials the file 'm2mpay bank account open' wrote at this bank?"
_REFUSAL_HINTS = {
    # The bank does not say whether the account exists: an unknown account and a wrong key look alike.
    ErrorCode.BAD_SIGNATURE: f" ({_CREDENTIALS_HINT})",
    ErrorCode.REPLAY: (" (the bank had signed coins of this wallet's seed that the wallet does not hold: "
                       "'m2mpay user restore' into this wallet fetches them; the next withdrawal takes new ones)"),
}
"""What the user can do about a final refusal of a withdrawal, said after it."""


def _pay(args: argparse.Namespace) -> int:
    if args.units < 1:
        raise UsageError("--units must be a positive whole number")
    if urlsplit(args.vendor).scheme != "coap":  # http://… would reach nothing and wait to say so
        raise UsageError(f"user pay: {args.vendor} is not a vendor address (give coap://HOST:PORT)")
    policy = PolicyConfig.load(args.policy) if args.policy else None
    agent = UserAgent(args.wallet, policy)
    progress = None
    if not (args.json or args.quiet):
        progress = PaymentProgress(sys.stdout, args.units, agent.policy.session.max_duration, _currency(agent),
                                   terminal=sys.stdout.isatty())
        agent.on_decision = progress

    async def run() -> PaymentResult:
        ctx = await aiocoap.Context.create_client_context()
        try:
            return await agent.pay(ctx, args.vendor.rstrip("/"), args.units)
        finally:
            await ctx.shutdown()

    try:
        result = asyncio.run(run())
    finally:
        if progress is not None:
            progress.finish()
        agent.close()
    if args.json:
        print(json.dumps(_payment_json(result), indent=2))
    else:
        print(result.summary())
    if not result.complete:
        raise PaymentIncomplete(result)
    return 0


def _currency(agent: UserAgent) -> str | None:
    """The wallet's money, if its keysets agree on one (for showing amounts; JSON keeps minor units)."""
    try:
        currencies = {k.currency for k in agent.keyring().keysets.values()}
    except ProtocolError:  # no keys yet (or expired): the payment itself will say so
        return None
    return currencies.pop() if len(currencies) == 1 else None


def _payment_json(result: PaymentResult) -> dict[str, object]:
    return {"vendor": result.vendor, "complete": result.complete, "asked": result.asked,
            "delivered": result.delivered, "tokens": result.tokens, "spent": result.spent,
            "credited": result.credited, "stop": result.stop.code, "detail": result.detail}


def _run(args: argparse.Namespace) -> int:
    from ..logs import setup_logging
    from .run import RunConfig, run_user

    setup_logging(args.log_json)
    config = RunConfig.load(args.config, from_environment("user"))
    progress = None
    if not args.quiet:
        reader = UserAgent(config.wallet, exclusive=False)  # only to name the money; the run locks the wallet
        try:
            currency = _currency(reader)
        finally:
            reader.close()
        progress = RunProgress(sys.stdout, config.units, config.policy.session.max_duration, currency,
                               terminal=sys.stdout.isatty())
    try:
        payments = asyncio.run(run_user(config, on_decision=progress))
    finally:
        if progress is not None:
            progress.payment.finish()
    for p in payments:
        print(p.summary() if p.complete else f"{p.summary()} ({p.why()})")
    return 0


def _wallet(args: argparse.Namespace) -> int:
    agent = UserAgent(args.wallet, exclusive=False, create=False)  # reading only: beside a paying process
    try:
        coins = agent.public_coins()
    finally:
        agent.close()
    if args.json:
        print(json.dumps(coins, indent=2))
    else:
        print(f"{len(coins)} coin(s), {sum(int(str(c['remaining'])) for c in coins)} in all")
        for c in coins:
            print(f"  {c['keyset']}  {str(c['tip'])[:16]}  position {c['position']:>6}  remaining {c['remaining']}"
                  f"  {c['status']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    agent = UserAgent(args.wallet, exclusive=False, create=False)  # reading only: beside a paying process
    try:
        data = wallet_status(agent.store, agent.now(), _currency(agent))
    finally:
        agent.close()
    print(json.dumps(data, indent=2) if args.json else "\n".join(render_status(data)))
    return 0


def _receipt_json(kept: KeptReceipt) -> dict[str, object]:
    """One receipt as ``user receipts --json`` shows it; ``receipt`` and ``cert`` are its proof."""
    r = kept.receipt
    return {"session": r.session.hex(), "vendor": r.vendor, "tip": r.tip.hex(), "index": r.index,
            "tokens": r.tokens, "credited": r.credited, "pending": bool(r.pending), "time": iso(r.ts),
            "receipt": kept.signed.hex(), "cert": kept.cert.hex()}


def _receipts(args: argparse.Namespace) -> int:
    agent = UserAgent(args.wallet, exclusive=False, create=False)  # reading only: beside a paying process
    try:
        kept = agent.receipts()
    finally:
        agent.close()
    if args.json:
        print(json.dumps([_receipt_json(k) for k in kept], indent=2))
        return 0
    print(f"{len(kept)} receipt(s)")
    for k in kept:
        r = k.receipt
        print(f"  {iso(r.ts)}  {r.vendor}  session {r.session.hex()[:16]}  {r.tokens} token(s)  credited "
              f"{r.credited}{'  pending' if r.pending else ''}")
    return 0


def _decisions(args: argparse.Namespace) -> int:
    require_wallet(args.wallet, database=False)  # the log alone is read: a directory holding it will do
    path = args.wallet / "decisions.jsonl"
    text = path.read_text() if path.exists() else ""
    if not args.json:
        print(text, end="")
        return 0
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    print(json.dumps([{"time": iso(int(e["ts"])), **e} for e in entries], indent=2))
    return 0
