"""``m2mpay user …`` commands.

Every command's error goes through one place (:func:`_guarded`): one line on stderr saying what
happened, and the exit status from :func:`m2mpay.agents.user.errors.exit_status` — usage 2, policy
refusal 3, bank or vendor refusal 4, unreachable 5, interrupted 130, internal 70. ``user pay``
exits 0 only when every unit asked for was delivered.
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
from datetime import UTC, datetime
from pathlib import Path

import aiocoap

from m2mpay.protocol import envelope

from ..mqtt import BankClient, TlsLogin, TransportError
from ..policy.config import PolicyConfig
from .agent import UserAgent, UserCredentials, WithdrawOutcome
from .errors import EXIT, PaymentIncomplete, Refused, UsageError, describe, exit_status
from .outcome import PaymentResult
from .store import KeptReceipt

__all__ = ["add_user_commands"]

Handler = Callable[[argparse.Namespace], int]


def _guarded(handler: Handler) -> Handler:
    """Run a command; any error becomes one line on stderr and its exit status."""

    def run(args: argparse.Namespace) -> int:
        # A command speaks through its one line; the library's warnings (a close that failed, a
        # retry) are for `user run`'s log, which sets up handlers of its own.
        logging.getLogger("agents").addHandler(logging.NullHandler())
        try:
            return handler(args)
        except (Exception, KeyboardInterrupt) as exc:
            status = exit_status(exc)
            print(f"m2mpay: {describe(exc)}", file=sys.stderr)
            if status == EXIT["internal"]:  # a bug, not a user's mistake: keep what finds it
                traceback.print_exception(exc, file=sys.stderr)
            return status

    return run


def add_user_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``user withdraw|pay|wallet|receipts|run|decisions``."""
    user = commands.add_parser("user", help="a user device's wallet").add_subparsers(dest="action", required=True)
    withdraw = user.add_parser("withdraw", help="withdraw coins from the bank")
    withdraw.add_argument("--wallet", type=Path, required=True, help="the wallet directory (private: it holds every coin's secret)")
    withdraw.add_argument("--credentials", type=Path, required=True, help="from bank account open")
    withdraw.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    withdraw.add_argument("--coins", type=int, required=True,
                          help="coins to withdraw (0: only finish earlier withdrawals)")
    withdraw.add_argument("--keyset", help="keyset id (default: the smallest denomination)")
    withdraw.add_argument("--tls", type=Path, help="PKI directory: log in with ACCOUNT.crt/.key (mqtts:// URL)")
    withdraw.set_defaults(handler=_guarded(_withdraw))
    pay = user.add_parser("pay", help="pay a vendor")
    pay.add_argument("--wallet", type=Path, required=True, help="the wallet directory (private: it holds every coin's secret)")
    pay.add_argument("vendor", help="coap://HOST:PORT")
    pay.add_argument("--units", type=int, default=1, help="units of service to pay for (default 1)")
    pay.add_argument("--policy", type=Path, help="policy.toml (default: the conservative default policy)")
    pay.set_defaults(handler=_guarded(_pay))
    show = user.add_parser("wallet", help="coins (public parts only)")
    show.add_argument("--wallet", type=Path, required=True, help="the wallet directory (private: it holds every coin's secret)")
    show.add_argument("--json", action="store_true", help="as JSON")
    show.set_defaults(handler=_guarded(_wallet))
    receipts = user.add_parser("receipts", help="the vendors' signed final receipts: what was paid whom")
    receipts.add_argument("--wallet", type=Path, required=True, help="the wallet directory (private: it holds every coin's secret)")
    receipts.add_argument("--json", action="store_true", help="as JSON (times in ISO 8601 UTC)")
    receipts.set_defaults(handler=_guarded(_receipts))
    run = user.add_parser("run", help="the autonomous agent: refill, choose offers, pay")
    run.add_argument("--config", type=Path, required=True, help="user.toml")
    run.add_argument("--log-json", action="store_true", help="log JSON lines")
    run.set_defaults(handler=_guarded(_run))
    log = user.add_parser("decisions", help="the policy's decision log")
    log.add_argument("--wallet", type=Path, required=True, help="the wallet directory (private: it holds every coin's secret)")
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
                          "debited and the request is dropped") from refusal
        raise TransportError(f"the bank could not answer ({refusal.code.wire}); the withdrawal is kept and sent "
                             "again by the next 'user withdraw'") from refusal
    except TransportError as exc:
        kept = len(agent.store.pending_withdrawals())
        if kept:
            raise TransportError(f"{exc}; {kept} withdrawal(s) kept, sent again by the next 'user withdraw'") from exc
        raise
    finally:
        agent.close()
    print(f"withdrew {len(outcome.coins)} coin(s)")
    if outcome.recovered:
        print(f"also {len(outcome.recovered)} coin(s) of an earlier withdrawal whose answer had not arrived")
    for earlier in outcome.refused:
        print(f"m2mpay: an earlier withdrawal was refused by the bank and dropped: {earlier.code.wire}: "
              f"{earlier.message}", file=sys.stderr)
    return 0


def _pay(args: argparse.Namespace) -> int:
    if args.units < 1:
        raise UsageError("--units must be a positive whole number")
    policy = PolicyConfig.load(args.policy) if args.policy else None
    agent = UserAgent(args.wallet, policy)

    async def run() -> PaymentResult:
        ctx = await aiocoap.Context.create_client_context()
        try:
            return await agent.pay(ctx, args.vendor.rstrip("/"), args.units)
        finally:
            await ctx.shutdown()

    try:
        result = asyncio.run(run())
    finally:
        agent.close()
    print(result.summary())
    if not result.complete:
        raise PaymentIncomplete(result)
    return 0


def _run(args: argparse.Namespace) -> int:
    from ..logs import setup_logging
    from .run import RunConfig, run_user

    setup_logging(args.log_json)
    payments = asyncio.run(run_user(RunConfig.load(args.config)))
    for p in payments:
        print(p.summary() if p.complete else f"{p.summary()} ({p.why()})")
    return 0


def _wallet(args: argparse.Namespace) -> int:
    agent = UserAgent(args.wallet, exclusive=False)  # reading only: beside a paying process
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


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _receipt_json(kept: KeptReceipt) -> dict[str, object]:
    """One receipt as ``user receipts --json`` shows it; ``receipt`` and ``cert`` are its proof."""
    r = kept.receipt
    return {"session": r.session.hex(), "vendor": r.vendor, "tip": r.tip.hex(), "index": r.index,
            "tokens": r.tokens, "credited": r.credited, "pending": bool(r.pending), "time": _iso(r.ts),
            "receipt": kept.signed.hex(), "cert": kept.cert.hex()}


def _receipts(args: argparse.Namespace) -> int:
    agent = UserAgent(args.wallet, exclusive=False)  # reading only: beside a paying process
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
        print(f"  {_iso(r.ts)}  {r.vendor}  session {r.session.hex()[:16]}  {r.tokens} token(s)  credited "
              f"{r.credited}{'  pending' if r.pending else ''}")
    return 0


def _decisions(args: argparse.Namespace) -> int:
    path = args.wallet / "decisions.jsonl"
    if path.exists():
        print(path.read_text(), end="")
    return 0
