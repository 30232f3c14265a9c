"""``m2mpay user init`` and ``m2mpay user restore``: the wallet seed, shown once, and a wallet
rebuilt from it (docs/LIFECYCLE.md).

The seed is read from a file, from standard input, or typed at a prompt that does not echo it;
never from the command line, where every process on the device could read it. It is printed
once, by ``user init``, and never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from m2mpay.protocol.errors import LocalProtocolError
from m2mpay.protocol.seed import WalletSeed

from ..money import format_money
from ..mqtt import BankClient, TlsLogin
from ..settings import option
from .agent import UserAgent, UserCredentials
from .errors import UsageError
from .restore import RESTORE_GAP, RestoreReport, restore
from .seeds import SeedMismatch

__all__ = ["add_seed_commands"]

Handler = Callable[[argparse.Namespace], int]


def add_seed_commands(user: argparse._SubParsersAction[argparse.ArgumentParser], guarded: Callable[[Handler], Handler],
                      wallet_help: str) -> None:
    """``user init`` and ``user restore``."""
    init = user.add_parser("init", help="create a wallet and show its seed, once")
    option(init, "--wallet", "user.wallet", wallet_help, required=True)
    init.set_defaults(handler=guarded(_init))
    again = user.add_parser("restore", help="rebuild a lost wallet from its seed, in a new wallet directory")
    option(again, "--wallet", "user.wallet", wallet_help, required=True)
    option(again, "--credentials", "user.credentials", "from bank account open", required=True)
    option(again, "--broker", "user.broker", "mqtt://HOST:PORT", required=True)
    option(again, "--tls", "user.tls", "PKI directory: log in with ACCOUNT.crt/.key (mqtts:// URL)")
    again.add_argument("--seed-file", type=Path,
                       help="read the seed from this file (default: standard input, or a prompt on a terminal)")
    again.add_argument("--gap", type=int, default=RESTORE_GAP,
                       help=f"counters in a row with nothing found before a keyset is done (default {RESTORE_GAP})")
    again.add_argument("--json", action="store_true", help="as JSON (minor units; see docs/CLI.md)")
    again.set_defaults(handler=guarded(_restore))


def _show(directory: Path, seed: WalletSeed, *, earlier: bool = False) -> None:
    print(f"wallet {directory}: its seed, shown this once; write it down and keep it offline:\n")
    print(f"    {seed.phrase()}\n")
    print("'m2mpay user restore' rebuilds the wallet's coins from it on any device; whoever has it can spend them")
    if earlier:
        print("coins this wallet holds from before it had a seed cannot be restored from it")


def _init(args: argparse.Namespace) -> int:
    directory: Path = args.wallet
    agent = UserAgent(directory)
    try:
        seeds = agent.store.seeds
        if seeds.seed() is not None and seeds.unshown() is None:
            raise UsageError(f"user: the wallet at {directory} has a seed already; it was shown when it was "
                             "made and is never shown again")
        had_coins = bool(agent.store.coins())
        seed = seeds.unshown() or agent.wallet_seed()
        _show(directory, seed, earlier=agent.seed_made and had_coins)
        seeds.mark_shown()
    finally:
        agent.close()
    return 0


def _read_seed(path: Path | None) -> WalletSeed:
    if path is not None:
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise UsageError(f"user: cannot read the seed file {path}: {exc.strerror}") from exc
    elif sys.stdin.isatty():
        text = getpass.getpass("wallet seed (m2mseed1 …): ")
    else:
        text = sys.stdin.readline().strip()
    if not text:
        raise UsageError("user: no seed given (on standard input, or with --seed-file)")
    try:
        return WalletSeed.parse(text)
    except LocalProtocolError as exc:
        raise UsageError(f"user: {exc.message}") from exc


def _restore(args: argparse.Namespace) -> int:
    if args.gap < 1:
        raise UsageError("--gap must be a positive whole number")
    seed = _read_seed(args.seed_file)
    credentials = UserCredentials.load(args.credentials)
    agent = UserAgent(args.wallet)
    try:
        try:
            agent.store.seeds.put_seed(seed, shown=True)
        except SeedMismatch as exc:
            raise UsageError(f"user: {args.wallet} holds a wallet with another seed: restore into a new "
                             "directory") from exc

        def say(line: str) -> None:
            if not args.json:
                print(line, flush=True)

        async def run() -> RestoreReport:
            tls = TlsLogin.from_dir(args.tls, credentials.account) if args.tls else None
            async with BankClient(args.broker, credentials.bank, f"{credentials.account}-{uuid.uuid4().hex[:6]}",
                                  tls=tls) as bank:
                return await restore(agent, bank, credentials, seed, gap=args.gap, progress=say)

        report = asyncio.run(run())
        spendable = agent.spendable_value()
        currencies = {k.currency for k in agent.keyring().keysets.values()}
    finally:
        agent.close()
    found = sum(report.found.values())
    if args.json:
        print(json.dumps({"found": found, "exchanged": report.exchanged, "spent": report.spent,
                          "waiting": report.waiting, "fresh_value": report.fresh_value,
                          "spendable": spendable}, indent=2))
        return 0
    money = (lambda v: format_money(v, next(iter(currencies)))) if len(currencies) == 1 else str
    print(f"restored {found} coin(s): {report.exchanged} exchanged for {money(report.fresh_value)}, "
          f"{report.spent} spent, {report.waiting} waiting (in a payment now: exchanged later)")
    print(f"spendable {money(spendable)}")
    return 0
