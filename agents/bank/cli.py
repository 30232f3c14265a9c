"""``m2mpay bank …`` and ``m2mpay broker …`` commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from m2mpay.protocol import cose

from ..locks import DirectoryLock
from ..logs import setup_logging
from ..mqtt import TlsLogin

from . import admin
from .keys import DELEGATION_DAYS, BankKeys, add_keyset, delegate, init_bank, load_bank, load_ca_key, retire_keyset
from .server import serve
from .workers import orphan_watch, run_workers, stop_on_sigterm
from .service import BankService
from .store import Store

__all__ = ["add_bank_commands", "add_broker_commands"]


def add_broker_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker = commands.add_parser("broker", help="run a Mosquitto for m2mpay").add_subparsers(dest="action", required=True)
    run = broker.add_parser("run", help="run Mosquitto on a port until interrupted")
    run.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    run.add_argument("--data", type=Path, required=True, help="directory for its config and persistence")
    run.add_argument("--bank", help="enforce the ACL for this bank id")
    run.add_argument("--tls", type=Path, help="PKI directory from 'broker pki': TLS with client certificates")
    run.add_argument("--insecure-acl", action="store_true", help=_INSECURE_ACL_HELP)
    run.set_defaults(handler=_broker_run)
    pki = broker.add_parser("pki", help="create a CA, the broker's certificate and one per client, "
                                        "or 'pki revoke NAME'")
    pki.add_argument("--dir", type=Path, help="the PKI directory (required)")
    pki.add_argument("--client", action="append", default=[], help="a client's name (its MQTT username); repeat")
    pki.add_argument("--server-name", action="append", default=[],
                     help="the broker's DNS name or IP; repeat (re-issues the broker's certificate)")
    pki.set_defaults(handler=_broker_pki)
    revoke = pki.add_subparsers(dest="pki_action", metavar="revoke").add_parser(
        "revoke", help="list a client's certificate in the CRL (restart Mosquitto afterwards)")
    revoke.add_argument("name", help="the client's name")
    revoke.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help="the PKI directory")
    revoke.set_defaults(handler=_broker_pki_revoke)
    config = broker.add_parser("config", help="print a production Mosquitto config (TLS, ACL)")
    config.add_argument("--port", type=int, default=8883, help="TLS listener port (default 8883)")
    config.add_argument("--data", type=Path, required=True, help="persistence directory (the ACL file goes here)")
    config.add_argument("--bank", required=True, help="the bank id whose topics the ACL protects")
    config.add_argument("--tls", type=Path, help="PKI directory from 'broker pki' (needed unless --insecure-acl)")
    config.add_argument("--insecure-acl", action="store_true", help=_INSECURE_ACL_HELP)
    config.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    config.add_argument("--dropin", action="store_true",
                        help="a conf.d drop-in for the system's Mosquitto: its mosquitto.conf keeps persistence")
    config.add_argument("--root", type=Path,
                        help="write the ACL below this directory as if it were / (paths in the config stay as given)")
    config.set_defaults(handler=_broker_config)


_CA_KEY_HELP = "the CA's private key where it is kept offline (default: DATA/keys/ca.key)"


def add_bank_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bank = commands.add_parser("bank", help="operate a bank").add_subparsers(dest="action", required=True)

    def sub(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = bank.add_parser(name, help=help_text)
        parser.add_argument("--data", type=Path, required=True, help="the bank's data directory")
        return parser

    init = sub("init", "create a bank: keys, keysets, database")
    init.add_argument("--bank", default="bank", help="bank id (used in topics)")
    init.add_argument("--db", help="database URL: a SQLite path (default) or postgresql://…")
    init.set_defaults(handler=_init)

    run = sub("serve", "serve requests over MQTT")
    run.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    run.add_argument("--workers", type=int, default=1,
                     help="processes answering requests (one per core is the most that helps)")
    run.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)  # set for the started ones
    run.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    run.add_argument("--log-json", action="store_true", help="log JSON lines")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT")
    run.add_argument("--tls", type=Path, help="PKI directory: log in with bank.crt/bank.key (mqtts:// URL)")
    run.set_defaults(handler=_serve)

    account = bank.add_parser("account", help="user accounts").add_subparsers(dest="account_action", required=True)
    opened = account.add_parser("open", help="open an account and write its credentials")
    opened.add_argument("--data", type=Path, required=True, help="the bank's data directory")
    opened.add_argument("name", help="account name: 1-32 of [a-z0-9-_.]")
    opened.add_argument("--out", type=Path, required=True, help="credentials file to write (mode 0600)")
    opened.set_defaults(handler=_account_open)
    paid = account.add_parser("deposit", help="pay money into an account")
    paid.add_argument("--data", type=Path, required=True, help="the bank's data directory")
    paid.add_argument("name", help="user account")
    paid.add_argument("amount", type=int, help="minor units")
    paid.set_defaults(handler=_deposit)

    vendor = bank.add_parser("vendor", help="vendors").add_subparsers(dest="vendor_action", required=True)
    enroll = vendor.add_parser("enroll", help="certify a vendor and write its key bundle")
    enroll.add_argument("--data", type=Path, required=True, help="the bank's data directory")
    enroll.add_argument("name", help="vendor id: 1-32 of [a-z0-9-_.], also its certificate name")
    enroll.add_argument("--category", required=True, help="what it sells, e.g. parking or ev")
    enroll.add_argument("--out", type=Path, required=True, help="credentials file to write (mode 0600)")
    enroll.add_argument("--ca-key", type=Path, help=_CA_KEY_HELP)
    enroll.set_defaults(handler=_enroll)
    revoke = vendor.add_parser("revoke", help="revoke a vendor: its blocks and settlements are refused at once, "
                                              "wallets learn it from the bank's announcement")
    revoke.add_argument("--data", type=Path, required=True, help="the bank's data directory")
    revoke.add_argument("name", help="vendor id")
    revoke.set_defaults(handler=_revoke)

    delegated = sub("delegate", "certify a new online key for the keys announcement (needs the CA key)")
    delegated.add_argument("--valid-days", type=float, default=DELEGATION_DAYS, help="how long the key is certified")
    delegated.add_argument("--ca-key", type=Path, help=_CA_KEY_HELP)
    delegated.set_defaults(handler=_delegate)

    show = sub("balance", "an account's balance")
    show.add_argument("name", help="account or vendor id")
    show.set_defaults(handler=_balance)

    keys = sub("keys", "the bank's public keys")
    keys.add_argument("--json", action="store_true", help="as JSON")
    keys.set_defaults(handler=_keys)

    state = sub("status", "accounts, vendors, keysets with their phase and outstanding value, open blocks")
    state.add_argument("--json", action="store_true", help="as JSON (amounts in minor units, times in Unix seconds)")
    state.set_defaults(handler=_status)

    check = sub("audit", "check the books; exit 0 only when they balance")
    check.set_defaults(handler=_audit)

    keyset = bank.add_parser("keyset", help="denominations").add_subparsers(dest="keyset_action", required=True)
    added = keyset.add_parser("add", help="add a keyset")
    added.add_argument("--data", type=Path, required=True, help="the bank's data directory")
    added.add_argument("--value", type=int, required=True, help="coin value M, minor units")
    added.add_argument("--tokens", type=int, required=True, help="tokens per coin n")
    added.add_argument("--valid-days", type=float, default=365, help="days coins can be withdrawn (spending: twice that)")
    added.set_defaults(handler=_keyset_add)
    retired = keyset.add_parser("retire", help="retire a keyset (the announcement follows at the next serve)")
    retired.add_argument("--data", type=Path, required=True, help="the bank's data directory")
    retired.add_argument("id", help="keyset id (see bank keys)")
    retired.set_defaults(handler=_keyset_retire)


def _now() -> int:
    return int(time.time())


_INSECURE_ACL_HELP = ("allow --bank without --tls: clients then pick their own usernames, so the ACL "
                      "protects nothing (a test broker on one machine only)")


def _acl_refused(args: argparse.Namespace) -> bool:
    """A bank's ACL without TLS trusts usernames any client can claim: say so unless asked for."""
    if args.bank is None or args.tls is not None or args.insecure_acl:
        return False
    print(f"m2mpay broker {args.action}: --bank without --tls would key the ACL on usernames any client can "
          "claim; give --tls PKI_DIR (or --insecure-acl for a test broker)", file=sys.stderr)
    return True


def _broker_run(args: argparse.Namespace) -> int:
    from m2mpay.broker.launcher import Mosquitto

    if _acl_refused(args) or _crl_missing(args.tls):
        return 2
    # Blocked before anything starts, so that SIGINT and SIGTERM wait for sigtimedwait below
    # (sigwait on unblocked signals leaves them to their default action: the broker would outlive us).
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        with Mosquitto(args.data, port=args.port, bank=args.bank, tls_dir=args.tls,
                       insecure_acl=args.insecure_acl) as broker:
            print(f"mosquitto listening on {broker.url}", flush=True)
            while signal.sigtimedwait(stops, 1.0) is None:
                if broker.process is not None and broker.process.poll() is not None:
                    print(f"m2mpay: broker: mosquitto exited with {broker.process.returncode}; see "
                          f"{args.data}/mosquitto.log", file=sys.stderr)
                    return 1
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    return 0


def _crl_missing(tls: Path | None, on_disk: Path | None = None) -> bool:
    """A PKI from before revocation has no CRL, which the config names: say how to write one."""
    from m2mpay.broker.pki import CRL_NAME

    if tls is None or (on_disk or tls).joinpath(CRL_NAME).exists():
        return False
    print(f"m2mpay broker: no {tls / CRL_NAME} (a PKI from before revocation): run "
          f"'m2mpay broker pki --dir {tls}' to write it", file=sys.stderr)
    return True


def _broker_pki(args: argparse.Namespace) -> int:
    from m2mpay.broker.pki import make_pki

    if args.dir is None:
        print("m2mpay broker pki: --dir DIR is required", file=sys.stderr)
        return 2
    make_pki(args.dir, tuple(args.client), tuple(args.server_name) or None)
    print(f"PKI in {args.dir}: ca.crt, ca.crl, broker.crt/.key" + "".join(f", {c}.crt/.key" for c in args.client))
    return 0


def _broker_pki_revoke(args: argparse.Namespace) -> int:
    from m2mpay.broker.pki import CRL_NAME, revoke

    if args.dir is None:
        print("m2mpay broker pki revoke: --dir DIR is required", file=sys.stderr)
        return 2
    serial = revoke(args.dir, args.name)
    print(f"{args.name}'s certificate (serial {serial:x}) is listed in {args.dir / CRL_NAME}; restart Mosquitto "
          "(systemctl restart mosquitto) to refuse it")
    return 0


# Mosquitto refuses a second persistence_location; a drop-in leaves persistence to mosquitto.conf
_MAIN_CONF_ONLY = ("persistence", "persistence_location")


def _broker_config(args: argparse.Namespace) -> int:
    from m2mpay.broker.config import BrokerConfig, render_acl, render_config

    if _acl_refused(args):
        return 2
    root: Path | None = args.root
    if root is not None and not (args.data.is_absolute() and (args.tls is None or args.tls.is_absolute())):
        print("m2mpay broker config: with --root, give --data and --tls as absolute paths", file=sys.stderr)
        return 2

    def on_disk(path: Path) -> Path:
        return path if root is None else root / path.relative_to("/")

    tls = args.tls if root is not None else args.tls.resolve() if args.tls is not None else None
    if _crl_missing(tls, on_disk(tls) if tls is not None else None):
        return 2
    cfg = BrokerConfig(port=args.port, data_dir=args.data, host=args.host, bank=args.bank,
                       tls_ca=tls / "ca.crt" if tls else None, tls_cert=tls / "broker.crt" if tls else None,
                       tls_key=tls / "broker.key" if tls else None, insecure_acl=args.insecure_acl)
    on_disk(args.data).mkdir(parents=True, exist_ok=True)
    (on_disk(args.data) / "acl").write_text(render_acl(args.bank, cfg.bank_users))
    lines = render_config(cfg).splitlines()
    if args.dropin:
        lines = [line for line in lines if line.split(" ", 1)[0] not in _MAIN_CONF_ONLY]
    print("\n".join(lines))
    return 0


def _init(args: argparse.Namespace) -> int:
    init_bank(args.data, args.bank, args.db, _now())
    with _bank(args) as (keys, _):
        print(f"bank {keys.bank} created in {args.data}; CA fingerprint {keys.fingerprint}")
    print("keys/ca.key is needed only to enrol vendors and to renew the announcement key ('bank delegate'): "
          "keep it offline")
    return 0


_CONNECTIONS = 8  # PostgreSQL connections per process (SQLite has one writer anyway)


def _serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_json)
    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    # The first process holds the directory for all the workers it starts (they inherit nothing)
    lock = DirectoryLock(args.data, "bank serve") if args.worker_index == 0 and args.data.is_dir() else None
    keys, store = load_bank(args.data, _now(), connections=_CONNECTIONS)
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
    tls = TlsLogin.from_dir(args.tls, "bank") if args.tls else None
    first = args.worker_index == 0
    serving = serve(keys, BankService(keys, store), args.broker, tls=tls,
                    sweep_interval=5.0 if first else None, metrics_port=args.metrics_port if first else None)
    main = asyncio.current_task()
    if main is not None:
        stop_on_sigterm(main)
    with contextlib.suppress(asyncio.CancelledError):
        if not first:
            async with asyncio.TaskGroup() as group:
                server = group.create_task(serving)
                await orphan_watch(args.parent_pid)
                server.cancel()
            return
        argv = ["bank", "serve", "--data", str(args.data), "--broker", args.broker]
        argv += ["--log-json"] if args.log_json else []
        argv += ["--tls", str(args.tls)] if args.tls else []
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


def _deposit(args: argparse.Namespace) -> int:
    with _bank(args) as (_, store):
        print(admin.deposit(store, args.name, args.amount, _now()))
    return 0


def _enroll(args: argparse.Namespace) -> int:
    with _bank(args) as (keys, store):
        admin.enroll_vendor(keys, store, args.name, args.category, args.out, _now(),
                            ca_key=load_ca_key(args.data, args.ca_key))
    print(f"vendor {args.name} enrolled; certificate and key in {args.out}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with _bank(args) as (_, store):
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
    with _bank(args) as (_, store):
        print(admin.balance(store, args.name))
    return 0


def _keys(args: argparse.Namespace) -> int:
    with _bank(args) as (keys, _):
        ring = keys.keyring
    keysets = [{"id": k.id, "value": k.value, "n": k.n, "currency": k.currency,
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
        for k in keysets:
            print(f"  {k['id']}  {k['value']} {k['currency']} in {k['n']} tokens")
    return 0


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
        retire_keyset(store, args.id)
    print(f"keyset {args.id} retired")
    return 0
