"""``m2mpay vendor …`` commands.

``vendor serve`` checks what would make a second vendor misbehave before it connects anywhere:
the data directory is locked for this process (a second ``vendor serve`` on it would settle the
same sessions twice), the CoAP port must be free (two servers bound to one port with
``SO_REUSEPORT`` split the payments between them), and the credentials must be a vendor's.
Each failure is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import socket
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..files import private_dir
from ..locks import DirectoryLock
from ..logs import setup_logging
from ..mqtt import TlsLogin
from ..reach import wait_for_broker
from ..settings import file_option, option
from .agent import Credentials
from .config import VendorConfig, certified_category
from .server import load_credentials, run_vendor
from .store import VendorStore

__all__ = ["add_vendor_commands"]


def add_vendor_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vendor = commands.add_parser("vendor", help="run a vendor device").add_subparsers(dest="action", required=True)
    serve = vendor.add_parser("serve", help="serve payments over CoAP")
    option(serve, "--credentials", "vendor.credentials", "bundle from 'bank vendor enroll'", required=True)
    option(serve, "--broker", "vendor.broker", "mqtt://HOST:PORT", required=True)
    option(serve, "--coap-port", "vendor.coap_port", "UDP port to serve CoAP on")
    option(serve, "--coap-host", "vendor.coap_host", "address to bind (::1: IPv6 loopback)")
    file_option(serve, "--config", "vendor", "vendor.toml (pricing and session policy)")
    option(serve, "--data", "vendor.data", "directory for the vendor's store")
    serve.add_argument("--log-json", action="store_true", help="log JSON lines")
    option(serve, "--tls", "vendor.tls", "PKI directory: log in with VENDOR.crt/.key (mqtts:// URL)")
    serve.set_defaults(handler=_serve)
    status = vendor.add_parser("status", help="sessions, tokens held, settling, settled, outbox")
    option(status, "--data", "vendor.data", "the vendor's data directory", required=True)
    status.add_argument("--json", action="store_true", help="as JSON")
    status.set_defaults(handler=_status)


def _credentials(path: Path) -> Credentials:
    """The vendor's bundle, or one line saying the file is not one (a user's, say)."""
    try:
        return load_credentials(path)
    except ConfigError:  # not readable, or not JSON: it says so with the file's name
        raise
    except (KeyError, TypeError, ValueError) as exc:  # a missing field, or one of the wrong kind
        what = f"no {exc.args[0]!r} field" if isinstance(exc, KeyError) else "a malformed field"
        raise ValueError(f"{path} is not a vendor's credentials ({what}): give the file "
                         "'m2mpay bank vendor enroll --out' wrote") from None


def check_udp_port_free(host: str, port: int) -> None:
    """Raise ``ValueError`` when ``[host]:port`` is bound already (port 0 always passes).

    aiocoap binds with ``SO_REUSEPORT``, so a second server on a port would bind too and the
    kernel would spread datagrams over both. This probe binds without it, which fails while any
    socket holds the port, and lets go at once.
    """
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_DGRAM,
                                                             flags=socket.AI_V4MAPPED)[0]
    except socket.gaierror as exc:
        raise ValueError(f"--coap-host {host}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # as aiocoap binds it
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(f"CoAP port [{host}]:{port} is in use by another process: give another "
                                 "--coap-port") from None
            raise ValueError(f"cannot bind CoAP on [{host}]:{port}: {exc.strerror}") from None


def _serve(args: argparse.Namespace) -> int:
    credentials = _credentials(args.credentials)
    category = certified_category(credentials.cert)  # the offer may name no other: refused before serving
    config = (VendorConfig.load(args.config, category) if args.config
              else VendorConfig().for_category(category, written=False))
    private_dir(args.data)
    lock = DirectoryLock(args.data, "vendor serve")  # before the port: the same vendor twice says so
    try:
        check_udp_port_free(args.coap_host, args.coap_port)
        setup_logging(args.log_json)
        tls = TlsLogin.from_dir(args.tls, credentials.vendor) if args.tls else None

        async def serve() -> None:
            await wait_for_broker(args.broker, tls, what=f"vendor {credentials.vendor}")
            await run_vendor(credentials, args.broker, args.coap_port, args.data, config, host=args.coap_host, tls=tls)

        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    finally:
        lock.release()
    return 0


def _status(args: argparse.Namespace) -> int:
    path = args.data / "vendor.sqlite3"
    if not path.exists():
        raise FileNotFoundError(path)
    store = VendorStore(path)
    try:
        sessions = store.sessions()
        outbox = store.pending()
    finally:
        store.close()
    summary: dict[str, Any] = {
        "sessions": [{"session": s.session.hex(), "state": s.state, "tokens_held": s.paid, "credited": s.credited,
                      "deadline": s.deadline} for s in sessions],
        "open": sum(s.state == "open" for s in sessions),
        "tokens_held": sum(s.paid for s in sessions if s.state == "open"),
        "closing": sum(s.state == "closing" for s in sessions),
        "tokens_settling": sum(s.paid for s in sessions if s.state == "closing"),
        "forfeited": sum(s.state == "forfeited" for s in sessions),
        "settled": sum(s.credited for s in sessions),
        "outbox": len(outbox),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"open sessions {summary['open']}, tokens held {summary['tokens_held']}, "
              f"closing {summary['closing']} ({summary['tokens_settling']} tokens), settled {summary['settled']}, "
              f"settlements waiting for the bank {summary['outbox']}")
        for s in summary["sessions"]:
            print(f"  {s['session'][:16]}  {s['state']:9} held {s['tokens_held']:5}  credited {s['credited']}")
    return 0
