"""``m2mpay bank …`` and ``m2mpay broker …`` commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from m2mpay.protocol import cose
from m2mpay.protocol.messages import KeysetInfo
from m2mpay.protocol.rules.keyring import default_withdrawal, is_change
from m2mpay.protocol.rules.phases import Phase, phase_at

from ..locks import DirectoryLock
from ..logs import setup_logging
from ..money import format_money
from ..mqtt import TlsLogin
from ..reach import BrokerRefused, wait_for_broker
from ..settings import option
from . import admin
from .keys import DELEGATION_DAYS, BankKeys, add_keyset, delegate, init_bank, load_bank, load_ca_key, retire_keyset
from .server import serve
from .workers import check_logins, orphan_watch, run_workers, stop_on_sigterm, worker_login
from .service import BankService
from .store import Store

__all__ = ["add_bank_commands"]


_CA_KEY_HELP = "the CA's private key where it is kept offline (default: DATA/keys/ca.key)"


def add_bank_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bank = commands.add_parser("bank", help="operate a bank").add_subparsers(dest="action", required=True)

    def sub(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = bank.add_parser(name, help=help_text)
        option(parser, "--data", "bank.data", "the bank's data directory", required=True)
        return parser

    init = sub("init", "create a bank: keys, keysets, database")
    init.add_argument("--bank", default="bank", help="bank id (used in topics)")
    init.add_argument("--db", help="database URL: a SQLite path (default) or postgresql://…")
    init.set_defaults(handler=_init)

    run = sub("serve", "serve requests over MQTT")
    option(run, "--broker", "bank.broker", "mqtt://HOST:PORT", required=True)
    option(run, "--workers", "bank.workers", "processes answering requests (one per core is the most that helps)")
    run.add_argument("--first-worker", type=int, default=1,
                     help="with --tls on one of several machines: this one's workers log in as bank-K … "
                          "(default 1: bank, bank-2 …)")
    run.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)  # set for the started ones
    run.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    run.add_argument("--log-json", action="store_true", help="log JSON lines")
    option(run, "--metrics-port", "bank.metrics_port", "serve Prometheus metrics on 127.0.0.1:PORT")
    option(run, "--tls", "bank.tls", "PKI directory: worker 1 logs in with bank.crt/bank.key, worker i with "
                                     "bank-i.crt/.key (mqtts:// URL)")
    run.set_defaults(handler=_serve)

    account = bank.add_parser("account", help="user accounts").add_subparsers(dest="account_action", required=True)
    opened = account.add_parser("open", help="open an account and write its credentials")
    option(opened, "--data", "bank.data", "the bank's data directory", required=True)
    opened.add_argument("name", help="account name: 1-32 of [a-z0-9-_.]")
    opened.add_argument("--out", type=Path, required=True, help="credentials file to write (mode 0600)")
    opened.set_defaults(handler=_account_open)
    paid = account.add_parser("deposit", help="pay money into an account")
    option(paid, "--data", "bank.data", "the bank's data directory", required=True)
    paid.add_argument("name", help="user account")
    paid.add_argument("amount", type=int, help="minor units")
    paid.set_defaults(handler=_deposit)

    vendor = bank.add_parser("vendor", help="vendors").add_subparsers(dest="vendor_action", required=True)
    enroll = vendor.add_parser("enroll", help="certify a vendor and write its key bundle")
    option(enroll, "--data", "bank.data", "the bank's data directory", required=True)
    enroll.add_argument("name", help="vendor id: 1-32 of [a-z0-9-_.], also its certificate name")
    enroll.add_argument("--category", required=True, help="what it sells, e.g. parking or ev")
    enroll.add_argument("--out", type=Path, required=True, help="credentials file to write (mode 0600)")
    enroll.add_argument("--ca-key", type=Path, help=_CA_KEY_HELP)
    enroll.set_defaults(handler=_enroll)
    revoke = vendor.add_parser("revoke", help="revoke a vendor: its blocks and settlements are refused at once, "
                                              "wallets learn it from the bank's announcement")
    option(revoke, "--data", "bank.data", "the bank's data directory", required=True)
    revoke.add_argument("name", help="vendor id")
    revoke.set_defaults(handler=_revoke)

    delegated = sub("delegate", "certify a new online key for the keys announcement (needs the CA key)")
    delegated.add_argument("--valid-days", type=float, default=DELEGATION_DAYS, help="how long the key is certified")
    delegated.add_argument("--ca-key", type=Path, help=_CA_KEY_HELP)
    delegated.set_defaults(handler=_delegate)

    show = sub("balance", "an account's balance")
    show.add_argument("name", help="account or vendor id")
    show.add_argument("--json", action="store_true", help="as JSON: name, balance (minor units)")
    show.set_defaults(handler=_balance)

    keys = sub("keys", "the bank's public keys")
    keys.add_argument("--json", action="store_true", help="as JSON")
    keys.set_defaults(handler=_keys)

    state = sub("status", "accounts, vendors, keysets with their phase and outstanding value, open blocks")
    state.add_argument("--json", action="store_true", help="as JSON (amounts in minor units, times in Unix seconds)")
    state.set_defaults(handler=_status)

    check = sub("audit", "check the books; exit 0 only when they balance")
    check.add_argument("--json", action="store_true", help="as JSON: ok, the totals, problems")
    check.set_defaults(handler=_audit)

    keyset = bank.add_parser("keyset", help="denominations").add_subparsers(dest="keyset_action", required=True)
    added = keyset.add_parser("add", help="add a keyset")
    option(added, "--data", "bank.data", "the bank's data directory", required=True)
    added.add_argument("--value", type=int, required=True, help="coin value M, minor units")
    added.add_argument("--tokens", type=int, required=True, help="tokens per coin n")
    added.add_argument("--valid-days", type=float, default=365,
                       help="days coins can be withdrawn (spending: twice that)")
    added.set_defaults(handler=_keyset_add)
    retired = keyset.add_parser("retire", help="stop withdrawals from a keyset (its coins are spent until its "
                                "spend_until); states the outstanding value it affects")
    option(retired, "--data", "bank.data", "the bank's data directory", required=True)
    retired.add_argument("id", help="keyset id (see bank keys)")
    retired.add_argument("--dry-run", action="store_true", help="only state what retiring would affect")
    retired.set_defaults(handler=_keyset_retire)


def _now() -> int:
    return int(time.time())


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def _change_summary(change: list[KeysetInfo]) -> str:
    """``1, 2, 4 tokens of 0.01 EUR``: the change keysets' token counts, per token value."""
    groups: dict[tuple[str, int], list[int]] = {}
    for k in change:
        groups.setdefault((k.currency, k.token_value), []).append(k.n)
    return "; ".join(f"{', '.join(map(str, sorted(set(ns))))} tokens of {format_money(tv, cur)}"
                     for (cur, tv), ns in sorted(groups.items()))


def _by_use(keysets: Iterable[KeysetInfo]) -> tuple[list[KeysetInfo], list[KeysetInfo]]:
    """The keysets to withdraw from, then the change ones (:func:`is_change`), each in order of
    currency, token value and size."""
    ordered = sorted(keysets, key=lambda k: (k.currency, k.token_value, k.n, k.id))
    return [k for k in ordered if not is_change(k)], [k for k in ordered if is_change(k)]


def _init(args: argparse.Namespace) -> int:
    made = init_bank(args.data, args.bank, args.db, _now())
    with _bank(args) as (keys, _):
        print(f"bank {keys.bank} created in {args.data}; CA fingerprint {keys.fingerprint}")
    withdraw, change = _by_use(made)
    coins = ", ".join(format_money(k.value, k.currency) for k in withdraw)
    print(f"{len(made)} keysets: {len(withdraw)} to withdraw (coins of {coins or 'none'}), {len(change)} for "
          f"change ({_change_summary(change) or 'none: wallets cannot exchange'}); 'm2mpay bank keys' lists them")
    print("keys/ca.key is needed only to enrol vendors and to renew the announcement key ('bank delegate'): "
          "keep it offline")
    return 0


_CONNECTIONS = 8  # PostgreSQL connections per process (SQLite has one writer anyway)


def _serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_json)
    if args.workers < 1 or args.first_worker < 1:
        raise ValueError("--workers and --first-worker must be at least 1")
    if args.tls and args.worker_index == 0:  # one certificate per worker, all there before any starts
        check_logins(args.tls, args.workers, args.first_worker)
    # The first process holds the directory for all the workers it starts (they inherit nothing)
    lock = DirectoryLock(args.data, "bank serve") if args.worker_index == 0 and args.data.is_dir() else None
    # One process on a SQLite file groups its commits; several would hold its one write lock in turns
    keys, store = load_bank(args.data, _now(), connections=_CONNECTIONS, group_commits=args.workers == 1)
    try:
        asyncio.run(_serve_async(args, keys, store))
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
        if lock is not None:
            lock.release()
    return 0


async def _serve_async(args: argparse.Namespace, keys: BankKeys, store: Store) -> None:
    tls = TlsLogin.from_dir(args.tls, worker_login(args.worker_index, args.first_worker)) if args.tls else None
    first = args.worker_index == 0
    if first:  # a broker that is not up yet is waited for; one that refuses our login ends the command
        await wait_for_broker(args.broker, tls, what=f"bank {keys.bank}")
    serving = serve(keys, BankService(keys, store), args.broker, tls=tls,
                    sweep_interval=5.0 if first else None, metrics_port=args.metrics_port if first else None)
    main = asyncio.current_task()
    if main is not None:
        stop_on_sigterm(main)
    with contextlib.suppress(asyncio.CancelledError):
        if not first:
            try:
                async with asyncio.TaskGroup() as group:
                    server = group.create_task(serving)
                    await orphan_watch(args.parent_pid)
                    server.cancel()
            except* BrokerRefused as refused:  # one line and exit 5, not a group of one
                raise refused.exceptions[0] from None
            return
        argv = ["bank", "serve", "--data", str(args.data), "--broker", args.broker]
        argv += ["--log-json"] if args.log_json else []
        argv += ["--tls", str(args.tls), "--first-worker", str(args.first_worker)] if args.tls else []
        async with run_workers(argv, args.workers):
            await serving


@contextlib.contextmanager
def _bank(args: argparse.Namespace) -> Iterator[tuple[BankKeys, Store]]:
    """The bank of ``--data``, its database closed afterwards whatever happens."""
    keys, store = load_bank(args.data, _now())
    try:
        yield keys, store
    finally:
        store.close()


def _account_open(args: argparse.Namespace) -> int:
    with _bank(args) as (keys, store):
        admin.open_account(keys, store, args.name, args.out, _now())
    print(f"account {args.name} opened; credentials in {args.out}")
    return 0


@contextlib.contextmanager
def _known(what: str, name: str) -> Iterator[None]:
    """An unknown name is the operator's mistake: one line naming it, not ``KeyError: 'name'``."""
    try:
        yield
    except KeyError as exc:
        raise ValueError(f"no {what} named {name!r} in this bank") from exc


def _deposit(args: argparse.Namespace) -> int:
    with _bank(args) as (_, store), _known("account", args.name):
        print(admin.deposit(store, args.name, args.amount, _now()))
    return 0


def _enroll(args: argparse.Namespace) -> int:
    with _bank(args) as (keys, store):
        admin.enroll_vendor(keys, store, args.name, args.category, args.out, _now(),
                            ca_key=load_ca_key(args.data, args.ca_key))
    print(f"vendor {args.name} enrolled; certificate and key in {args.out}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with _bank(args) as (_, store), _known("vendor", args.name):
        changed = admin.revoke_vendor(store, args.name, _now())
    print(f"vendor {args.name} {'revoked' if changed else 'was already revoked'}: the bank refuses its blocks and "
          "settlements now, and a running bank lists it in its announcement within 5 s")
    return 0


def _delegate(args: argparse.Namespace) -> int:
    body = delegate(args.data, _now(), valid_days=args.valid_days, ca_key=load_ca_key(args.data, args.ca_key))
    print(f"new announcement key certified until {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(body.exp))}; "
          "restart 'bank serve' to announce with it")
    return 0


def _balance(args: argparse.Namespace) -> int:
    with _bank(args) as (_, store), _known("account or vendor", args.name):
        balance = admin.balance(store, args.name)
    print(json.dumps({"name": args.name, "balance": balance}) if args.json else balance)
    return 0


def _keys(args: argparse.Namespace) -> int:
    with _bank(args) as (keys, _):
        ring = keys.keyring
    now = _now()
    phases = {k.id: phase_at(k, ring.phases.get(k.id), now).value for k in ring.keysets.values()}
    keysets = [{"id": k.id, "value": k.value, "n": k.n, "currency": k.currency, "phase": phases[k.id],
                "withdraw_until": k.withdraw_until, "spend_until": k.spend_until,
                "public_key": k.public_key.hex()} for k in ring.keysets.values()]
    data = {
        "bank": keys.bank, "ca_fingerprint": keys.fingerprint,
        "ca_key": cose.public_key_bytes(ring.ca_key).hex(), "answer_key": cose.public_key_bytes(ring.answer_key).hex(),
        "sealing_key": ring.sealing_key.public_bytes_raw().hex(),
        "announce_key": keys.delegation.key.hex(), "announce_key_expires": keys.delegation.exp,
        "revoked": sorted(ring.revoked), "keysets": keysets,
    }
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"bank {keys.bank}  CA fingerprint {keys.fingerprint}")
        if ring.revoked:
            print(f"  revoked vendors: {', '.join(sorted(ring.revoked))}")
        withdraw, change = _by_use(ring.keysets.values())
        default = default_withdrawal(k for k in withdraw + change if phases[k.id] == Phase.ACTIVE.value)
        print(f"  to withdraw ({len(withdraw)}):")
        for k in withdraw:
            print(_keyset_line(k, phases[k.id], k is default))
        print(f"  change, for exchanges ({len(change)}): {_change_summary(change) or 'none: wallets cannot exchange'}")
        for k in change:
            print(_keyset_line(k, phases[k.id], k is default))
    return 0


def _keyset_line(k: KeysetInfo, phase: str, default: bool) -> str:
    # Money with its decimals: "1000 EUR" would read as a thousand euros.
    notes = ([] if phase == Phase.ACTIVE.value else [phase]) + (["wallets' default"] if default else [])
    return (f"    {k.id}  coin {format_money(k.value, k.currency)} in {_tokens(k.n)} of "
            f"{format_money(k.token_value, k.currency)}" + (f"  ({', '.join(notes)})" if notes else ""))


def _status(args: argparse.Namespace) -> int:
    from .status import bank_status

    with _bank(args) as (keys, store):
        data = bank_status(keys, store, _now())
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"bank {data['bank']} at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(data['time']))} "
          "(amounts in minor units)")
    print(f"  outstanding coins {data['outstanding']}, open blocks {data['open_blocks']}")
    print(f"  accounts ({len(data['accounts'])}):")
    for account in data["accounts"]:
        print(f"    {account['name']:<32} {account['balance']:>12}")
    print(f"  vendors ({len(data['vendors'])}):")
    for vendor in data["vendors"]:
        flag = "  REVOKED" if vendor["revoked"] else ""
        print(f"    {vendor['vendor']:<32} {vendor['category']:<12} credited {vendor['credited']:>12}{flag}")
    print(f"  keysets ({len(data['keysets'])}):")
    for k in data["keysets"]:
        print(f"    {k['id']}  {k['phase']:<10} coin {k['value']} in {k['n']} tokens ({k['currency']}), "
              f"issued {k['issued']}, outstanding {k['outstanding']}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    with _bank(args) as (_, store):
        report = admin.audit(store)
    if args.json:
        print(json.dumps({"ok": report.ok, "withdrawn": report.withdrawn, "credited": report.credited,
                          "outstanding": report.outstanding, "coins": report.coins, "problems": report.problems},
                         indent=2))
        return 0 if report.ok else 1
    print(f"withdrawn {report.withdrawn}, credited {report.credited}, outstanding {report.outstanding}, "
          f"coins seen {report.coins}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print("audit passed" if report.ok else f"audit FAILED: {len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def _keyset_add(args: argparse.Namespace) -> int:
    with _bank(args) as (_, store):
        info = add_keyset(args.data, store, value=args.value, tokens=args.tokens, withdraw_days=args.valid_days,
                          spend_days=2 * args.valid_days, now=_now())
    print(info.id)
    return 0


def _keyset_retire(args: argparse.Namespace) -> int:
    with _bank(args) as (_, store):
        report = retire_keyset(store, args.id, _now(), dry_run=args.dry_run)
    if args.dry_run and not report.already:
        print(f"would retire keyset {args.id}: no more withdrawals from it (nothing changed)")
        print("\n".join(report.lines()[1:]))
    else:
        print("\n".join(report.lines()))
    return 0
