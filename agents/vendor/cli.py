"""``m2mpay vendor …`` commands."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from ..logs import setup_logging
from ..mqtt import TlsLogin
from .config import VendorConfig
from .server import load_credentials, run_vendor
from .store import VendorStore

__all__ = ["add_vendor_commands"]


def add_vendor_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vendor = commands.add_parser("vendor", help="run a vendor device").add_subparsers(dest="action", required=True)
    serve = vendor.add_parser("serve", help="serve payments over CoAP")
    serve.add_argument("--credentials", type=Path, required=True, help="bundle from 'bank vendor enroll'")
    serve.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    serve.add_argument("--coap-port", type=int, default=5683, help="UDP port on [::1] (default 5683)")
    serve.add_argument("--coap-host", default="::1", help="address to bind (default: IPv6 loopback)")
    serve.add_argument("--config", type=Path, help="vendor.toml (pricing and session policy)")
    serve.add_argument("--data", type=Path, default=Path("var/vendor"), help="directory for the vendor's store")
    serve.add_argument("--log-json", action="store_true", help="log JSON lines")
    serve.add_argument("--tls", type=Path, help="PKI directory: log in with VENDOR.crt/.key (mqtts:// URL)")
    serve.set_defaults(handler=_serve)
    status = vendor.add_parser("status", help="sessions, tokens held, settling, settled, outbox")
    status.add_argument("--data", type=Path, required=True, help="the vendor's data directory")
    status.add_argument("--json", action="store_true", help="as JSON")
    status.set_defaults(handler=_status)


def _serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_json)
    config = VendorConfig.load(args.config) if args.config else VendorConfig()
    try:
        credentials = load_credentials(args.credentials)
        tls = TlsLogin.from_dir(args.tls, credentials.vendor) if args.tls else None
        asyncio.run(run_vendor(credentials, args.broker, args.coap_port, args.data, config, host=args.coap_host,
                               tls=tls))
    except KeyboardInterrupt:
        pass
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
    summary = {
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
        for s in summary["sessions"]:  # type: ignore[union-attr]
            print(f"  {s['session'][:16]}  {s['state']:9} held {s['tokens_held']:5}  credited {s['credited']}")
    return 0
