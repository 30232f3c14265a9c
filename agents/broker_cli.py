"""``m2mpay broker``: a Mosquitto for m2mpay — run one, write its configuration, issue its PKI.

The bank's own commands are in :mod:`m2mpay.agents.bank.cli`; these are the broker's, whoever runs it.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


from .locks import DirectoryLock

__all__ = ["add_broker_commands"]


def add_broker_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker = commands.add_parser("broker", help="run a Mosquitto for m2mpay").add_subparsers(dest="action",
                                                                                             required=True)
    run = broker.add_parser("run", help="run Mosquitto on a port until interrupted")
    run.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    run.add_argument("--data", type=Path, required=True, help="directory for its config and persistence")
    run.add_argument("--bank", help="enforce the ACL for this bank id")
    run.add_argument("--tls", type=Path, help="PKI directory from 'broker pki': TLS with client certificates")
    run.add_argument("--insecure-acl", action="store_true", help=_INSECURE_ACL_HELP)
    run.add_argument("--bank-workers", type=int, default=1, help=_BANK_WORKERS_HELP)
    run.set_defaults(handler=_broker_run)
    pki = broker.add_parser("pki", help="create a CA, the broker's certificate and one per client, "
                                        "or 'pki revoke NAME'")
    pki.add_argument("--dir", type=Path, help="the PKI directory (required)")
    pki.add_argument("--client", action="append", default=[], help="a client's name (its MQTT username); repeat")
    pki.add_argument("--bank-workers", type=int, default=0,
                     help="also issue the bank's N worker certificates: bank, bank-2 … bank-N")
    pki.add_argument("--server-name", action="append", default=[],
                     help="the broker's DNS name or IP; repeat (re-issues the broker's certificate)")
    pki.set_defaults(handler=_broker_pki)
    pki_actions = pki.add_subparsers(dest="pki_action", metavar="{revoke,add-client}")
    revoke = pki_actions.add_parser(
        "revoke", help="list a client's certificate in the CRL (restart Mosquitto afterwards)")
    revoke.add_argument("name", help="the client's name")
    revoke.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help="the PKI directory")
    revoke.set_defaults(handler=_broker_pki_revoke)
    added = pki_actions.add_parser("add-client", help="issue one client's certificate; no other file changes")
    added.add_argument("name", help="the client's name (its MQTT username)")
    added.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help="the PKI directory")
    added.add_argument("--role", choices=("device", "bank"), default="device",
                       help="device (default), or bank for a bank worker's certificate (bank, bank-2 …)")
    added.set_defaults(handler=_broker_pki_add_client)
    config = broker.add_parser("config", help="print a production Mosquitto config (TLS, ACL)")
    config.add_argument("--port", type=int, default=8883, help="TLS listener port (default 8883)")
    config.add_argument("--data", type=Path, required=True, help="persistence directory (the ACL file goes here)")
    config.add_argument("--bank", required=True, help="the bank id whose topics the ACL protects")
    config.add_argument("--tls", type=Path, help="PKI directory from 'broker pki' (needed unless --insecure-acl)")
    config.add_argument("--insecure-acl", action="store_true", help=_INSECURE_ACL_HELP)
    config.add_argument("--bank-workers", type=int, default=1, help=_BANK_WORKERS_HELP)
    # A deployed broker serves the devices around it: all interfaces, TLS and the ACL in front.
    every_interface = "0.0.0.0"  # noqa: S104 - on purpose: see the line above
    config.add_argument("--host", default=every_interface, help="address to listen on (default: all)")
    config.add_argument("--dropin", action="store_true",
                        help="a conf.d drop-in for the system's Mosquitto: its mosquitto.conf keeps persistence")
    config.add_argument("--root", type=Path,
                        help="write the ACL below this directory as if it were / (paths in the config stay as given)")
    config.set_defaults(handler=_broker_config)


_BANK_WORKERS_HELP = "grant the bank's topics to N worker certificates: bank, bank-2 … bank-N (default 1)"

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
    args.data.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(args.data, "broker run")  # two Mosquittos would share one persistence file
    # Blocked before anything starts, so that SIGINT and SIGTERM wait for sigtimedwait below
    # (sigwait on unblocked signals leaves them to their default action: the broker would outlive us).
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        with Mosquitto(args.data, port=args.port, bank=args.bank, tls_dir=args.tls,
                       insecure_acl=args.insecure_acl, bank_workers=args.bank_workers) as broker:
            print(f"mosquitto listening on {broker.url}", flush=True)
            while signal.sigtimedwait(stops, 1.0) is None:
                if broker.process is not None and broker.process.poll() is not None:
                    print(f"m2mpay: broker: mosquitto exited with {broker.process.returncode}; see "
                          f"{args.data}/mosquitto.log", file=sys.stderr)
                    return 1
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        lock.release()
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
    from m2mpay.broker.pki import bank_logins

    make_pki(args.dir, tuple(args.client), tuple(args.server_name) or None, bank_workers=args.bank_workers)
    banks = bank_logins(args.bank_workers) if args.bank_workers else ()
    issued = [*banks, *(c for c in args.client if c not in banks)]
    print(f"PKI in {args.dir}: ca.crt, ca.crl, broker.crt/.key" + "".join(f", {c}.crt/.key" for c in issued))
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


def _broker_pki_add_client(args: argparse.Namespace) -> int:
    from m2mpay.broker.pki import add_client

    if args.dir is None:
        print("m2mpay broker pki add-client: --dir DIR is required", file=sys.stderr)
        return 2
    add_client(args.dir, args.name, role=args.role)
    print(f"{args.name}'s certificate and key in {args.dir}: {args.name}.crt, {args.name}.key (nothing else changed)")
    return 0


# Mosquitto refuses a second persistence_location; a drop-in leaves persistence to mosquitto.conf
_MAIN_CONF_ONLY = ("persistence", "persistence_location")


def _broker_config(args: argparse.Namespace) -> int:
    from m2mpay.broker.config import BrokerConfig, render_acl, render_config
    from m2mpay.broker.pki import bank_logins

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
                       tls_key=tls / "broker.key" if tls else None, insecure_acl=args.insecure_acl,
                       bank_users=bank_logins(args.bank_workers))
    on_disk(args.data).mkdir(parents=True, exist_ok=True)
    (on_disk(args.data) / "acl").write_text(render_acl(args.bank, cfg.bank_users))
    lines = render_config(cfg).splitlines()
    if args.dropin:
        lines = [line for line in lines if line.split(" ", 1)[0] not in _MAIN_CONF_ONLY]
    print("\n".join(lines))
    return 0
