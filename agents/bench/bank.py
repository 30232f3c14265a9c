"""Bank throughput through Mosquitto, beside a bare MQTT v5 echo measured in the same run.

    m2mpay bench --only bank   (or: python -m m2mpay.agents.bench.bank) [--spends N] [--pg postgresql://…/postgres]
                               [--config sqlite:1:32 …] [--json FILE]

For each database (SQLite with durable commits; PostgreSQL when reachable), number of bank
processes and number of requests in flight (:func:`configurations`, or ``--config``), it prints
bank requests/s — a spend is one ``block`` and one ``settle`` — next to echo requests/s through
the same broker with the same concurrency and the very same request bytes, and the ratio; then the CPU one
request cost each process (:mod:`m2mpay.agents.bench.cpu`) and, on PostgreSQL, what the bank's
statements waited for (:mod:`m2mpay.agents.bench.pgwatch`). The echo is answered by its own process,
as the bank is. Withdrawals (coins/s, batches of 32) are printed beside OpenSSL's RSA-2048
signatures/s. Device-side work (sealing and signing the blocks, signing the settlements,
verifying every answer) is done before and after each timed wave, never during one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.link import open_link
from .coalesce import AnswerProperties, coalesce
from m2mpay.agents.mqtt import BankClient, connect, publish_nowait
from m2mpay.broker.launcher import Mosquitto
from m2mpay.protocol import wire
from m2mpay.protocol.errors import ProtocolError
from .cpu import CpuMeter, children, named
from .pgwatch import LockWatch
from .driver import BANK, BankDriver
from .lapse import lapse_rate
from m2mpay.protocol.messages import BlockAnswer, SettleAnswer, WithdrawAnswer
from m2mpay.protocol.rules import wallet

IN_FLIGHT = (1, 32)
ECHO_BANK = "echo"  # the echo answers as if it were a bank of this name, on that bank's topics
STOCK_ECHO_BANK = "stock-echo"  # the echo on the stock client, on its own topics
ROUNDS = 3


async def echo_server(url: str, ready: asyncio.Event) -> None:
    """Answer every request with its own bytes, over the bank's own MQTT client and as the bank
    sends (QoS 1, no wait for the PUBACK, what one turn of the loop queued in one write)."""
    async with open_link(url, "echo-server") as link:
        await link.subscribe(wire.request_filter(ECHO_BANK), qos=1)
        ready.set()
        while True:
            message = await link.next()
            if message.response_topic is not None:
                link.publish_nowait(message.response_topic, message.payload, correlation=message.correlation or b"")


async def stock_echo_server(url: str, ready: asyncio.Event) -> None:
    """The same echo on the stock client devices use (aiomqtt over paho), reading and writing in
    bulk and not waiting for PUBACKs: the baseline the bank's goals were first set against."""
    async with connect(url, "stock-echo-server", max_queued_incoming_messages=10_000) as client:
        coalesce(client)
        await client.subscribe(wire.request_filter(STOCK_ECHO_BANK), qos=1)
        ready.set()
        async for message in client.messages:
            reply = getattr(message.properties, "ResponseTopic", None)
            correlation = getattr(message.properties, "CorrelationData", b"")
            if reply is not None:
                publish_nowait(client, str(reply), bytes(message.payload), AnswerProperties(bytes(correlation)))


async def run_lanes(clients: list[BankClient], op: str, requests: list[bytes], in_flight: int,
                    owners: list[int] | None = None) -> list[bytes]:
    """Send ``requests`` with ``in_flight`` outstanding at a time; the answers in request order.

    ``owners[i]`` is the client that sends request ``i`` (by default any). A client receives every
    answer on the topics it subscribed to, and it subscribes to the answer topic of each signer it
    sends for: so each signer's requests go through one client, as each device has its own
    connection, or every answer would reach every client.
    """
    answers: list[bytes] = [b""] * len(requests)
    if owners is None:
        queues = [iter(range(len(requests)))] * len(clients)  # one queue, shared
    else:
        queues = [iter([i for i, o in enumerate(owners) if o % len(clients) == c]) for c in range(len(clients))]

    async def lane(c: int) -> None:
        for i in queues[c]:
            answers[i] = await clients[c].request(op, requests[i])

    async with asyncio.TaskGroup() as group:
        for i in range(in_flight):
            group.create_task(lane(i % len(clients)))
    return answers


async def serve_echo(url: str, stock: bool) -> None:
    ready = asyncio.Event()
    task = asyncio.create_task((stock_echo_server if stock else echo_server)(url, ready))
    await ready.wait()
    print("ready", flush=True)
    await task


@dataclass
class BankRun:
    """One configuration's figures: medians over the rounds, CPU summed over them."""

    rate: float
    echo: float  # the echo on the bank's own MQTT client
    stock_echo: float  # the echo on the stock client (aiomqtt over paho)
    withdraw_rate: float
    cpu: dict[str, float]  # ms of CPU per bank request, by process group
    echo_cpu: dict[str, float]  # the same for the echo's requests
    stock_echo_cpu: dict[str, float]
    busy: float  # the machine's busy share during the bank's waves
    queued: dict[str, float]  # ms per bank request each process group waited for a core
    locks: dict[str, Any] | None  # PostgreSQL: lock waits seen during the bank's waves


def _measure(cpu: CpuMeter, locks: LockWatch | None, start: bool) -> None:
    """Start or stop measuring the bank's wave: CPU by process, and lock waits on PostgreSQL."""
    for meter in (cpu, locks):
        if meter is None:
            continue
        if start:
            meter.start()
        else:
            meter.stop()


async def bank_rate(url: str, db_url: str, spends: int, in_flight: int, workers: int = 1,
                    broker_pid: int | None = None) -> BankRun:
    """Bank requests/s, echo requests/s and withdrawn coins/s for one database, with where the
    CPU went.

    Each echo is answered by its own process, as the bank is, through the same broker, with the
    same number of requests in flight, sent the bank's very requests in the same two waves: one on
    the bank's own MQTT client, one on the stock client.
    """
    work = Path(tempfile.mkdtemp(prefix="m2mpay-bench-"))
    world = BankDriver.create(work, db_url)
    keys, store = world.keys, world.store
    user = world.user("payer", deposit=10**9)
    vendors = [world.vendor(f"v{i}") for i in range(4)]
    async with open_link(url, f"bench-clear-{secrets.token_hex(3)}") as clear:  # forget an earlier run's keys
        await clear.publish(wire.keys_topic(BANK), b"", retain=True)
    # The bank runs as it is deployed: its own process, so it does not share a GIL with the load.
    # Popen only starts them (no wait): fine on the event loop.
    server = subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", "bank", "serve",  # noqa: ASYNC220 - starts, no wait
                               "--data", str(work / "bank"), "--broker", url, "--workers", str(workers)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    echo, stock = (subprocess.Popen([sys.executable, "-m", "m2mpay.agents.bench.bank",  # noqa: ASYNC220 - starts, no wait
                                     "--serve-echo", url, *extra], stdout=subprocess.PIPE)
                   for extra in ([], ["--stock"]))
    connections = range(min(in_flight, 4))
    clients = [BankClient(url, BANK, f"bench-{i}-{secrets.token_hex(3)}") for i in connections]
    echo_clients = [BankClient(url, ECHO_BANK, f"echo-{i}-{secrets.token_hex(3)}") for i in connections]
    stock_clients = [BankClient(url, STOCK_ECHO_BANK, f"stock-{i}-{secrets.token_hex(3)}") for i in connections]
    for c in clients + echo_clients + stock_clients:
        await c.__aenter__()
    groups = {"bank": lambda: children(server.pid), "load": lambda: [os.getpid()],
              "echo": lambda: [echo.pid], "broker": lambda: [] if broker_pid is None else [broker_pid],
              "postgres": lambda: named("postgres") if store.dialect == "postgresql" else []}
    bank_cpu, echo_cpu = CpuMeter(groups), CpuMeter(groups)
    stock_cpu = CpuMeter({**groups, "echo": lambda: [stock.pid]})
    locks = LockWatch(db_url) if store.dialect == "postgresql" else None
    try:
        for process in (echo, stock):
            out = process.stdout  # a pipe (stdout=PIPE above): None never happens
            if out is None or (await asyncio.to_thread(out.readline)).strip() != b"ready":
                raise SystemExit("the echo server did not start")
        await clients[0].keys(timeout=30)  # retained by the bank once it serves
        world.send = clients[0].request
        # Withdrawals of 32 coins each, several in flight (as several users would), so that every
        # worker process has a batch to sign.
        # Blinding before and unblinding after the clock runs: that is the devices' work.
        info, public = keys.keyring.keysets[world.keyset], keys.keyring.rsa_keys[world.keyset]
        pendings = [wallet.prepare_withdrawal(user.name, info, public, 32) for _ in range(0, spends, 32)]
        withdrawals = [user.sign(p.request, "withdraw") for p in pendings]
        raw_answers: list[bytes] = []
        lanes = 2 * workers
        start = time.perf_counter()
        for i in range(0, len(withdrawals), lanes):
            raw_answers += await asyncio.gather(*(clients[0].request("withdraw", s)
                                                  for s in withdrawals[i:i + lanes]))
        withdraw_rate = 32 * len(withdrawals) / (time.perf_counter() - start)
        coins = []
        for pending, request, raw in zip(pendings, withdrawals, raw_answers, strict=True):
            coins += wallet.complete_withdrawal(pending, world.open(raw, "withdraw", WithdrawAnswer, request=request),
                                               info, public)
        coins = coins[:spends]
        prepared = []
        for i, wc in enumerate(coins):
            vendor = vendors[i % len(vendors)]
            _, session, signed = world.session(vendor, wc)
            prepared.append((vendor, session, signed))
        # The spends go through the bank in two waves, every block and then every settle, so that
        # the load generator only sends, as it does for the echo: what the devices do (sign the
        # settlement, check the bank's signatures) happens between the waves and after them, on
        # the clock of nobody. A spend is still one block and one settle through the bank.
        # Bank and echo take turns, ROUNDS times, and the medians are compared: this machine's
        # speed drifts between seconds, and a drift should not land on one side only. Every
        # answer is verified; one that does not verify fails the run.
        bank_rates: list[float] = []
        echo_rates: list[float] = []
        stock_rates: list[float] = []
        failures = 0
        for r in range(ROUNDS):
            chunk = prepared[r::ROUNDS]
            blocks = [signed for _, _, signed in chunk]
            owners = [vendors.index(vendor) for vendor, _, _ in chunk]
            _measure(bank_cpu, locks, True)
            start = time.perf_counter()
            block_answers = await run_lanes(clients, "block", blocks, in_flight, owners)
            elapsed = time.perf_counter() - start
            _measure(bank_cpu, locks, False)
            settles, settled, settle_owners = [], [], []
            for (vendor, session, block), raw in zip(chunk, block_answers, strict=True):
                try:
                    session.blocked(world.open(raw, "block", BlockAnswer, request=block))
                except ProtocolError:  # counted: the run fails, after the echo's turn too
                    failures += 1
                    continue
                settles.append(vendor.sign(session.settle_request(os.urandom(16), keep_open=False), "settle"))
                settled.append(session)
                settle_owners.append(vendors.index(vendor))
            _measure(bank_cpu, locks, True)
            start = time.perf_counter()
            settle_answers = await run_lanes(clients, "settle", settles, in_flight, settle_owners)
            elapsed += time.perf_counter() - start
            _measure(bank_cpu, locks, False)
            bank_rates.append((len(blocks) + len(settles)) / elapsed)
            for session, settle, raw in zip(settled, settles, settle_answers, strict=True):
                try:
                    session.settled(world.open(raw, "settle", SettleAnswer, request=settle))
                except ProtocolError:
                    failures += 1
            # The echo gets the very bytes the bank got, in the same two waves: same sizes, same
            # topics' lengths, and its clients read the same signers from them.
            for meter, lane_clients, rates in ((echo_cpu, echo_clients, echo_rates),
                                               (stock_cpu, stock_clients, stock_rates)):
                meter.start()
                start = time.perf_counter()
                await run_lanes(lane_clients, "block", blocks, in_flight, owners)
                await run_lanes(lane_clients, "settle", settles, in_flight, settle_owners)
                rates.append((len(blocks) + len(settles)) / (time.perf_counter() - start))
                meter.stop()
        if failures:
            raise SystemExit(f"{failures} answers of the bank did not verify")
        report = admin.audit(store)
        if not report.ok:
            raise SystemExit(f"audit failed after the benchmark: {report.problems}")
        requests = 2 * len(prepared)  # over all rounds, as the CPU was summed
        return BankRun(statistics.median(bank_rates), statistics.median(echo_rates), statistics.median(stock_rates),
                       withdraw_rate, bank_cpu.per_request(requests), echo_cpu.per_request(requests),
                       stock_cpu.per_request(requests), bank_cpu.utilisation,
                       bank_cpu.queued_per_request(requests), None if locks is None else locks.summary())
    finally:
        if locks is not None:
            locks.close()
        for c in clients + echo_clients + stock_clients:
            await c.__aexit__(None, None, None)
        for process in (server, echo, stock):
            process.terminate()
            process.wait(10)
        store.close()


def openssl_rate(seconds: float = 1.0) -> float:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        key.sign(b"coin", pss, hashes.SHA384())
        count += 1
    return count / (time.perf_counter() - start)


def pg_database(admin_url: str) -> str | None:
    try:
        import psycopg

        name = f"m2mpay_bench_{secrets.token_hex(4)}"
        # SQL outside the bank's store on purpose: setting up a scratch database for the benchmark
        # is the operator's server, not the bank's schema (the name is ours: hex digits only).
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return urlunsplit(urlsplit(admin_url)._replace(path="/" + name))  # a ?host=/socket/dir stays
    except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
        print(f"  (PostgreSQL not reachable: {exc})")
        return None


def _shares(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {ms:.2f}" for name, ms in cpu.items() if ms >= 0.005)


def drop_database(admin_url: str, db_url: str) -> None:
    """Drop a scratch database :func:`pg_database` created (what it holds was audited)."""
    import psycopg

    name = urlsplit(db_url).path.lstrip("/")
    # SQL outside the bank's store on purpose: the benchmark's own set-up, undone (see pg_database).
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


PG_WORKERS = (1, 2, 4)
"""Bank processes on PostgreSQL: one, and more than this machine may have cores, to see the limit."""


def configurations(quick: bool, pg: bool, cores: int) -> list[tuple[str, int, int]]:
    """``(database, bank processes, requests in flight)`` to measure, in order.

    SQLite has one writer, so one process and one per core; PostgreSQL locks rows, so 1, 2 and 4
    processes (:data:`PG_WORKERS`), all with the most requests in flight.
    """
    most = IN_FLIGHT[-1]
    sqlite = [(1, 1), (1, most)] if quick else sorted({(1, 1), (1, most), (cores, most)})
    configs = [("sqlite", w, f) for w, f in sqlite]
    if pg and not quick:
        configs += [("postgresql", 1, 1)] + [("postgresql", w, most) for w in PG_WORKERS]
    return configs


async def run(spends: int, pg: str | None, *, quick: bool = False,
              only: list[tuple[str, int, int]] | None = None) -> dict[str, object]:
    """Every configuration of :func:`configurations` (PostgreSQL when ``pg`` is reachable), or
    those in ``only``; ``quick``: SQLite with one process only."""
    results: dict[str, object] = {}
    withdraw_rates: list[float] = []
    with Mosquitto(Path(tempfile.mkdtemp(prefix="m2mpay-broker-"))) as broker:
        print(f"broker {broker.url}; {spends} spends per run")
        cores = os.cpu_count() or 1
        print("echo: on the bank's own MQTT client; stock echo: on aiomqtt over paho (the devices' client)")
        print(f"{'db':10} {'workers':>7} {'in flight':>9} {'bank req/s':>11} {'echo req/s':>11} {'ratio':>6} "
              f"{'stock echo':>11} {'ratio':>6} {'spends/s':>9} {'withdraw coins/s':>16}")
        for db, workers, in_flight in only or configurations(quick, pg is not None, cores):
            db_url = (str(Path(tempfile.mkdtemp()) / "bank.sqlite3") if db == "sqlite"
                      else pg_database(pg or ""))
            if db_url is None:
                continue
            run = await bank_rate(broker.url, db_url, spends, in_flight, workers,
                                  broker.process.pid if broker.process else None)
            rate, echo, stock = run.rate, run.echo, run.stock_echo
            print(f"{db:10} {workers:7d} {in_flight:9d} {rate:11,.0f} {echo:11,.0f} {rate / echo:6.2f} "
                  f"{stock:11,.0f} {rate / stock:6.2f} {rate / 2:9,.0f} {run.withdraw_rate:16,.0f}")
            if run.cpu:
                print(f"{'':10} CPU ms per request: {_shares(run.cpu)}; machine busy {run.busy:.0%}"
                      f" (echo: {_shares(run.echo_cpu)}; stock echo: {_shares(run.stock_echo_cpu)})")
                print(f"{'':10} waiting for a core, ms per request: "
                      + (_shares(run.queued) if run.queued else "not measured (no schedstat in /proc)"))
            if run.locks is not None:
                doing = ", ".join(f"{k} {share:.0%}" for k, share in list(run.locks["doing"].items())[:4])
                print(f"{'':10} PostgreSQL: {run.locks['active_per_sample']:.1f} statements running per sample, "
                      f"{run.locks['lock_wait_share']:.1%} of them waiting for a lock"
                      + (f" ({doing})" if doing else ""))
            if db == "postgresql":
                drop_database(pg or "", db_url)
            withdraw_rates.append(run.withdraw_rate)
            results[f"{db}/{workers}w/{in_flight}"] = {
                "db": db, "workers": workers, "in_flight": in_flight, "bank_req_per_s": rate,
                "echo_req_per_s": echo, "ratio": rate / echo, "stock_echo_req_per_s": stock,
                "stock_ratio": rate / stock, "spends_per_s": rate / 2,
                "withdraw_coins_per_s": run.withdraw_rate, "cpu_ms_per_request": run.cpu,
                "echo_cpu_ms_per_request": run.echo_cpu, "stock_echo_cpu_ms_per_request": run.stock_echo_cpu,
                "machine_busy": run.busy, "queued_ms_per_request": run.queued, "locks": run.locks}
        lapses = {}
        for db in ("sqlite", "postgresql") if pg is not None else ("sqlite",):
            db_url = str(Path(tempfile.mkdtemp()) / "bank.sqlite3") if db == "sqlite" else pg_database(pg or "")
            if db_url is not None:
                lapses[db] = await lapse_rate(db_url)
                if db == "postgresql":
                    drop_database(pg or "", db_url)
        print("lapse sweep: " + ", ".join(f"{db} {rate:,.0f} coins/s" for db, rate in lapses.items()))
        openssl = openssl_rate()
        best = max(withdraw_rates)
        print(f"withdrawals through the bank: {best:,.0f} coins/s beside OpenSSL RSA-2048 {openssl:,.0f} sig/s "
              f"(ratio {best / openssl:.2f})")
        results["withdraw"] = {"coins_per_s": best, "openssl_sign_per_s": openssl, "ratio": best / openssl}
        results["lapse"] = {"coins_per_s": lapses}
    return results


def _config(text: str) -> tuple[str, int, int]:
    db, workers, in_flight = text.split(":")
    if db not in ("sqlite", "postgresql"):
        raise argparse.ArgumentTypeError(f"unknown database {db!r}")
    return db, int(workers), int(in_flight)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spends", type=int, default=400)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--config", action="append", type=_config, metavar="DB:WORKERS:IN_FLIGHT",
                        help="measure only this configuration, e.g. postgresql:2:32 (repeatable)")
    parser.add_argument("--serve-echo", metavar="URL", help=argparse.SUPPRESS)  # the baseline's own process
    parser.add_argument("--stock", action="store_true", help=argparse.SUPPRESS)  # ... on the stock client
    args = parser.parse_args()
    if args.serve_echo:
        asyncio.run(serve_echo(args.serve_echo, args.stock))
        return 0
    results = asyncio.run(run(args.spends, args.pg or None, only=args.config))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
