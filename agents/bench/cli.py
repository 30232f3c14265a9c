"""``m2mpay bench``: every figure beside a baseline measured in the same run, as a table and JSON.

Sections (``--only`` picks some): ``protocol`` (hash-chain traversal, blind signatures against
OpenSSL), ``bank`` (requests/s through Mosquitto against a bare MQTT v5 echo; withdrawals against
OpenSSL), ``pay`` (tokens/s in one CoAP session against a bare aiocoap echo), ``population``
(U users × V vendors, and the agents' memory). ``--quick`` runs each briefly (under a minute in
all); ``--png`` draws the ratios (needs the ``plot`` extra: ``pip install m2mpay[plot]``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the sections and rich load only when a benchmark runs, not with every command
    from rich.console import Console
    from rich.table import Table

__all__ = ["add_parser", "cpu_table", "summary"]

SECTIONS = ("protocol", "bank", "pay", "population")
GOALS = {"bank": 0.60, "bank_pg": 0.50, "pg_scale": 1.30, "pay": 0.70, "withdraw": 0.25, "user_mb": 45.0,
         "bank_idle_mb": 60.0}
"""``bank``: SQLite's ratio to the echo; ``bank_pg``: PostgreSQL's, one process, many requests in
flight; ``pg_scale``: two PostgreSQL bank processes over one."""


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("bench", help="measure this machine: m2mpay beside its transports' and crypto's limits",
                            description=(__doc__ or "").replace("``", ""),  # reST quotes are not for a terminal
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                        help=f"some of: {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, help="write every figure as JSON")
    parser.add_argument("--png", type=Path, help="draw the ratios (needs the plot extra)")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="PostgreSQL to create a scratch database in ('' to skip)")
    parser.add_argument("--users", type=int, default=50, help="user devices in the population run")
    parser.add_argument("--vendors", type=int, default=5, help="vendor devices in the population run")
    parser.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(width=None if Console().is_terminal else 140)
    results: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpu": platform.machine(),
                                           "cores": os.cpu_count(), "quick": args.quick,
                                           "when": time.strftime("%Y-%m-%d %H:%M:%S")}}
    started = time.monotonic()
    for section in SECTIONS:
        if section not in args.only:
            continue
        with console.status(f"[bold]running {section}[/bold] …"):
            console.rule(section)
            results[section] = _run(section, args)
    results["seconds"] = time.monotonic() - started
    console.print(summary(results))
    if (cpu := cpu_table(results)) is not None:
        console.print(cpu)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.png:
        _chart(results, args.png, console)
    return 0


def _run(section: str, args: argparse.Namespace) -> Any:
    from . import bank, coap, population, protocol

    quick = args.quick
    if section == "protocol":
        seconds = 0.3 if quick else 2.0
        return {"traversal": protocol.traversal(list(range(10, 15 if quick else 21, 2))),
                "signing": protocol.signing(seconds), "verification": protocol.opening(seconds)}
    if section == "bank":
        return asyncio.run(bank.run(300 if quick else 1200, args.pg or None, quick=quick))
    if section == "pay":
        return asyncio.run(coap.main_async(900 if quick else 3000))
    users, vendors = (10, 2) if quick else (args.users, args.vendors)
    return asyncio.run(population.population(users, vendors, 5.0 if quick else 20.0))


def _row(table: Table, figure: str, ours: str, baseline: str, ratio: float | None, goal: float | None,
         *, value: float | None = None, unit: str = "") -> None:
    """One figure; the goal is on ``ratio`` (at least) or, given ``value``, on that (at most)."""
    verdict, goal_text = "", ""
    if goal is not None:
        checked = ratio if value is None else value
        met = checked is not None and (checked >= goal if value is None else checked <= goal)
        verdict = "[green]met[/green]" if met else "[red]missed[/red]"
        goal_text = f"≥ {goal:.2f}" if value is None else f"≤ {goal:g}{unit}"
    table.add_row(figure, ours, baseline, "" if ratio is None else f"{ratio:.2f}", goal_text, verdict)


def summary(results: dict[str, Any]) -> Table:
    """The table: each figure, its baseline from the same run, the ratio and the goal."""
    from rich.table import Table

    table = Table(title=f"m2mpay bench ({results['machine']['cores']} cores, {results['machine']['cpu']}, "
                        f"Python {results['machine']['python']})")
    for column in ("figure", "m2mpay", "baseline (same run)", "ratio", "goal", ""):
        table.add_column(column, justify="left" if column in ("figure", "baseline (same run)") else "right")
    if "bank" in results:
        for key, r in results["bank"].items():
            if key == "lapse":
                rates = ", ".join(f"{db} {rate:,.0f} coins/s" for db, rate in r["coins_per_s"].items())
                _row(table, "lapse sweep", rates, "", None, None)
                continue
            if key == "withdraw":
                _row(table, "withdrawals (32 coins per request)", f"{r['coins_per_s']:,.0f} coins/s",
                     f"OpenSSL RSA-2048 {r['openssl_sign_per_s']:,.0f} sig/s", r["ratio"], GOALS["withdraw"])
                continue
            goal = GOALS["bank"] if r["db"] == "sqlite" else (
                GOALS["bank_pg"] if r["workers"] == 1 and r["in_flight"] > 1 else None)
            # The goals were set against an echo on the stock client (aiomqtt over paho); the echo
            # on the bank's own client shows how far the transport itself would go.
            _row(table, f"bank {r['db']}, {r['workers']} proc, {r['in_flight']} in flight",
                 f"{r['bank_req_per_s']:,.0f} req/s ({r['spends_per_s']:,.0f} spends/s)",
                 f"MQTT v5 echo, stock client {r['stock_echo_req_per_s']:,.0f} req/s", r["stock_ratio"], goal)
            _row(table, "  the same beside the echo on the bank's own client", "",
                 f"MQTT v5 echo {r['echo_req_per_s']:,.0f} req/s", r["ratio"], None)
        for r in results["bank"].values():
            one = results["bank"].get(f"{r.get('db')}/1w/{r.get('in_flight')}")
            if r.get("db") == "postgresql" and r["workers"] > 1 and one is not None:
                _row(table, f"bank postgresql, {r['workers']} proc over 1, {r['in_flight']} in flight",
                     f"{r['bank_req_per_s']:,.0f} req/s", f"1 process {one['bank_req_per_s']:,.0f} req/s",
                     r["bank_req_per_s"] / one["bank_req_per_s"], GOALS["pg_scale"] if r["workers"] == 2 else None)
    if "pay" in results:
        p = results["pay"]
        _row(table, "payment tokens, one CoAP session",
             f"{p['pay']['per_s']:,.0f}/s p50 {p['pay']['p50_ms']:.2f} p99 {p['pay']['p99_ms']:.2f} ms",
             f"aiocoap echo {p['echo']['per_s']:,.0f}/s p50 {p['echo']['p50_ms']:.2f} ms", p["ratio"], GOALS["pay"])
    if "population" in results:
        q = results["population"]
        ok = "audit passed" if q["audit_ok"] and q["balanced"] else "AUDIT FAILED"
        _row(table, f"population {q['users']} users × {q['vendors']} vendors",
             f"{q['sessions_per_s']:,.1f} sessions/s, {q['tokens_per_s']:,.0f} tokens/s",
             f"{q['failures']} failed payments; {ok}", None, None)
        _row(table, "peak RSS, `user pay`", f"{q['user_pay_peak_mb']:.1f} MB", "", None,
             GOALS["user_mb"], value=q["user_pay_peak_mb"], unit=" MB")
        _row(table, "RSS, bank serving idle", f"{q['bank_idle_mb']:.1f} MB",
             f"peak under load {q['bank_peak_mb']:.1f} MB", None, GOALS["bank_idle_mb"],
             value=q["bank_idle_mb"], unit=" MB")
        _row(table, "peak RSS, vendor", f"{q['vendor_peak_mb']:.1f} MB", "", None, None)
    if "protocol" in results:
        t = results["protocol"]["traversal"][-1]
        _row(table, f"hash chain n = {t['n']:,}", f"≤ {t['stored_max']} stored, ≤ {t['hashes_worst']} hashes/token",
             f"bound ⌈log2 n / 2⌉ = {t['bound']}", None, None)
        s = results["protocol"]["signing"]
        _row(table, "blind signatures, one core", f"{s['blind_sign_per_s']:,.0f}/s",
             f"OpenSSL RSA-2048 PSS {s['openssl_sign_per_s']:,.0f}/s", s["ratio"], None)
    return table


def cpu_table(results: dict[str, Any]) -> Table | None:
    """Where the CPU of one bank request went, by process, beside the echo's (see agents.bench.cpu)."""
    from rich.table import Table

    rows = [(k, r) for k, r in results.get("bank", {}).items() if k != "withdraw" and r.get("cpu_ms_per_request")]
    if not rows:
        return None
    groups = ("bank", "postgres", "broker", "load", "other")
    table = Table(title="CPU per request, ms (the echo's in brackets), the machine's busy share, and the ms per "
                        "request the bank's processes were ready to run but waited for a core")
    for column in ("figure", *groups, "busy", "bank waited", "lock waits"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for _, r in rows:
        cpu, echo = r["cpu_ms_per_request"], r.get("echo_cpu_ms_per_request", {})
        cells = [f"{cpu.get(g, 0):.2f} ({echo.get('echo' if g == 'bank' else g, 0):.2f})" for g in groups]
        locks = r.get("locks")
        table.add_row(f"{r['db']}, {r['workers']} proc, {r['in_flight']} in flight", *cells,
                      f"{r.get('machine_busy', 0):.0%}", f"{r.get('queued_ms_per_request', {}).get('bank', 0):.2f}",
                      "" if not locks else f"{locks['lock_wait_share']:.1%}")
    return table


def _chart(results: dict[str, Any], path: Path, console: Console) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("[yellow]--png needs the plot extra: pip install 'm2mpay[plot]'[/yellow]")
        return
    labels, ratios, goals = [], [], []
    for key, r in results.get("bank", {}).items():
        if key == "lapse":
            continue
        if key == "withdraw":
            labels.append("withdraw / OpenSSL")
            ratios.append(r["ratio"])
            goals.append(GOALS["withdraw"])
        else:
            labels.append(f"bank {r['db']} {r['workers']}p {r['in_flight']}f")
            ratios.append(r["stock_ratio"])  # the goals' echo: see summary()
            goals.append(GOALS["bank"] if r["db"] == "sqlite" else
                         GOALS["bank_pg"] if r["workers"] == 1 and r["in_flight"] > 1 else float("nan"))
    if "pay" in results:
        labels.append("pay / CoAP echo")
        ratios.append(results["pay"]["ratio"])
        goals.append(GOALS["pay"])
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(labels) + 1.5))
    ax.barh(labels, ratios, color="#4c78a8")
    ax.scatter(goals, labels, marker="|", s=400, color="#e45756", label="goal")
    ax.set_xlabel("ratio to the baseline measured in the same run")
    ax.set_xlim(0, 1.05)
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    console.print(f"chart written to {path}")
