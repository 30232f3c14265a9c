"""``m2mpay user …`` commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from pathlib import Path

import aiocoap

from ..mqtt import BankClient, TlsLogin
from ..policy.config import PolicyConfig
from .agent import PolicyRefusal, UserAgent, UserCredentials

__all__ = ["add_user_commands"]


def add_user_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    user = commands.add_parser("user", help="a user device's wallet").add_subparsers(dest="action", required=True)
    withdraw = user.add_parser("withdraw", help="withdraw coins from the bank")
    withdraw.add_argument("--wallet", type=Path, required=True)
    withdraw.add_argument("--credentials", type=Path, required=True)
    withdraw.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    withdraw.add_argument("--coins", type=int, required=True)
    withdraw.add_argument("--keyset", help="keyset id (default: the smallest denomination)")
    withdraw.add_argument("--tls", type=Path, help="PKI directory: log in with ACCOUNT.crt/.key (mqtts:// URL)")
    withdraw.set_defaults(handler=_withdraw)
    pay = user.add_parser("pay", help="pay a vendor")
    pay.add_argument("--wallet", type=Path, required=True)
    pay.add_argument("vendor", help="coap://HOST:PORT")
    pay.add_argument("--units", type=int, default=1)
    pay.add_argument("--policy", type=Path, help="policy.toml")
    pay.set_defaults(handler=_pay)
    show = user.add_parser("wallet", help="coins (public parts only)")
    show.add_argument("--wallet", type=Path, required=True)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_wallet)
    run = user.add_parser("run", help="the autonomous agent: refill, choose offers, pay")
    run.add_argument("--config", type=Path, required=True, help="user.toml")
    run.add_argument("--log-json", action="store_true", help="log JSON lines")
    run.set_defaults(handler=_run)
    log = user.add_parser("decisions", help="the policy's decision log")
    log.add_argument("--wallet", type=Path, required=True)
    log.set_defaults(handler=_decisions)


def _withdraw(args: argparse.Namespace) -> int:
    credentials = UserCredentials.load(args.credentials)
    agent = UserAgent(args.wallet)

    async def run() -> int:
        tls = TlsLogin.from_dir(args.tls, credentials.account) if args.tls else None
        async with BankClient(args.broker, credentials.bank, f"{credentials.account}-{uuid.uuid4().hex[:6]}",
                              tls=tls) as bank:
            return len(await agent.withdraw(bank, credentials, args.coins, args.keyset))

    try:
        print(f"withdrew {asyncio.run(run())} coin(s)")
    finally:
        agent.close()
    return 0


def _pay(args: argparse.Namespace) -> int:
    agent = UserAgent(args.wallet, PolicyConfig.load(args.policy) if args.policy else None)

    async def run() -> str:
        ctx = await aiocoap.Context.create_client_context()
        try:
            result = await agent.pay(ctx, args.vendor.rstrip("/"), args.units)
        finally:
            await ctx.shutdown()
        return f"paid {result.vendor} {result.tokens} token(s); credited {result.credited}"

    try:
        print(asyncio.run(run()))
        return 0
    except PolicyRefusal as refusal:
        print(f"refused by policy: {refusal.decision.reason}: {refusal.decision.message}")
        return 3
    finally:
        agent.close()


def _run(args: argparse.Namespace) -> int:
    from ..logs import setup_logging
    from .run import RunConfig, run_user

    setup_logging(args.log_json)
    try:
        payments = asyncio.run(run_user(RunConfig.load(args.config)))
    except KeyboardInterrupt:
        return 0
    for p in payments:
        print(f"paid {p.vendor} {p.tokens} token(s); credited {p.credited}")
    return 0


def _wallet(args: argparse.Namespace) -> int:
    agent = UserAgent(args.wallet)
    try:
        coins = agent.public_coins()
    finally:
        agent.close()
    if args.json:
        print(json.dumps(coins, indent=2))
    else:
        print(f"{len(coins)} coin(s), {sum(int(c['remaining']) for c in coins)} in all")  # type: ignore[call-overload]
        for c in coins:
            print(f"  {c['keyset']}  {str(c['tip'])[:16]}  position {c['position']:>6}  remaining {c['remaining']}"
                  f"  {c['status']}")
    return 0


def _decisions(args: argparse.Namespace) -> int:
    path = args.wallet / "decisions.jsonl"
    if path.exists():
        print(path.read_text(), end="")
    return 0
