"""Payment tokens over CoAP on loopback, beside a bare aiocoap echo measured in the same run.

    m2mpay bench --only pay    (or: python -m m2mpay.agents.bench.coap) [--tokens N]

One session, one token per ``POST /sessions/{id}/pay`` round trip, each token checked and
on disk in the vendor's token log (one fdatasync) before its receipt is sent. The
baseline is an aiocoap resource that echoes a body of the same size. Tokens are computed before
timing, so the figure is the vendor's and the transport's, not the wallet's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiocoap
import aiocoap.resource as resource
from aiocoap.numbers.codes import Code

from m2mpay.agents.bank.keys import init_bank, load_bank
from m2mpay.agents.bank.server import serve
from m2mpay.agents.bank.service import BankService
from m2mpay.agents.mqtt import BankClient
from m2mpay.agents.vendor.agent import Credentials, VendorAgent
from m2mpay.agents.vendor.coap import serve_coap
from m2mpay.agents.vendor.store import VendorStore
from m2mpay.broker.launcher import Mosquitto, free_udp_port
from m2mpay.protocol import sealing, wire
from m2mpay.protocol.certificates import cert_hash
from m2mpay.protocol.messages import Offer, OpenSession, SessionOpened
from m2mpay.protocol.rules import wallet
from .driver import BANK, BankDriver, Clock


class Echo(resource.Resource):
    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=Code.CHANGED, payload=request.payload, content_format=wire.CONTENT_FORMAT_CBOR)


async def timed(client: aiocoap.Context, uri: str, bodies: list[bytes]) -> list[float]:
    latencies = []
    for body in bodies:
        start = time.perf_counter()
        response = await client.request(aiocoap.Message(code=Code.POST, uri=uri, payload=body,
                                                        content_format=wire.CONTENT_FORMAT_CBOR)).response
        latencies.append(time.perf_counter() - start)
        if not response.code.is_successful():
            raise SystemExit(f"request refused: {response.code} {response.payload!r}")
    return latencies


def describe(name: str, latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    rate = len(ordered) / sum(ordered)
    p50, p99 = statistics.median(ordered), ordered[int(0.99 * (len(ordered) - 1))]
    print(f"  {name:28s} {rate:8,.0f}/s   p50 {p50 * 1e3:6.3f} ms   p99 {p99 * 1e3:6.3f} ms")
    return {"per_s": rate, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3}


ROUNDS = 3


async def main_async(tokens: int) -> dict[str, object]:
    results: dict[str, object] = {}
    work = Path(tempfile.mkdtemp(prefix="m2mpay-coap-bench-"))
    clock = Clock(int(time.time()))
    init_bank(work / "bank", BANK, None, clock.now, keysets=((tokens + 10, tokens + 10),))
    keys, store = load_bank(work / "bank", clock.now)
    service = BankService(keys, store, clock=clock)
    world = BankDriver(keys=keys, store=store, service=service, clock=clock, directory=work)
    vendor = world.vendor("meter")
    credentials = Credentials(vendor="meter", account=vendor.account, key=vendor.key, cert=vendor.cert, bank=BANK,
                              ca_fingerprint=keys.fingerprint)
    with Mosquitto(work / "mq") as broker:
        ready = asyncio.Event()
        bank_task = asyncio.create_task(serve(keys, service, broker.url, ready=ready))
        await ready.wait()
        vendor_port, echo_port = free_udp_port(), free_udp_port()
        echo_site = resource.Site()
        echo_site.add_resource(["echo"], Echo())
        echo_ctx = await aiocoap.Context.create_server_context(echo_site, bind=("::1", echo_port))
        async with BankClient(broker.url, BANK, f"meter-{uuid.uuid4().hex[:6]}") as bank:
            world.send = bank.request
            (wc,) = await world.withdraw(world.user("payer"))
            agent = VendorAgent(credentials, keys.keyring, bank, VendorStore(work / "vendor.sqlite3"), clock=clock)
            async with serve_coap(agent, "::1", vendor_port):
                client = await aiocoap.Context.create_client_context()
                base = f"coap://[::1]:{vendor_port}"
                offer_uri = wire.uri(base, wire.OFFER_PATH)
                offer = Offer.decode((await client.request(aiocoap.Message(code=Code.GET, uri=offer_uri))
                                      .response).payload)
                wc, auth = wallet.authorize(wc, deadline=offer.deadline, nonce=offer.nonce,
                                            cert_hash=cert_hash(offer.cert), now=clock.now)
                sealed = sealing.seal(auth.encode(), keys.keyring.sealing_key, sealing.info_for_bank(BANK))
                opened = SessionOpened.decode((await client.request(aiocoap.Message(
                    code=Code.POST, uri=wire.uri(base, wire.SESSIONS_PATH), content_format=wire.CONTENT_FORMAT_CBOR,
                    payload=OpenSession(coin=wc.coin, sealed=sealed, deadline=offer.deadline,
                                        nonce=offer.nonce).encode())).response).payload)
                bodies: list[bytes] = []
                for _ in range(tokens):
                    wc, pay = wallet.reveal(wc, 1)
                    bodies.append(pay.encode())
                print(f"one CoAP session on loopback, {tokens} tokens, body {len(bodies[0])} bytes; "
                      f"echo and pay take turns {ROUNDS} times")
                # Turns, so that a drift of this machine's speed does not land on one side only.
                echo_latencies: list[float] = []
                pay_latencies: list[float] = []
                share = len(bodies) // ROUNDS
                for r in range(ROUNDS):
                    chunk = bodies[r * share:(r + 1) * share if r < ROUNDS - 1 else len(bodies)]
                    echo_latencies += await timed(client, f"coap://[::1]:{echo_port}/echo",
                                                  [b"\x00" * len(bodies[0])] * len(chunk))
                    pay_latencies += await timed(client, wire.uri(base, wire.session_path(opened.session, wire.PAY)),
                                                 chunk)
                echo = describe("bare aiocoap echo", echo_latencies)
                paid = describe("pay (checked, kept durably)", pay_latencies)
                print(f"  ratio {paid['per_s'] / echo['per_s']:.2f} (goal ≥ 0.70)")
                results.update(echo=echo, pay=paid, ratio=paid["per_s"] / echo["per_s"])
                await client.shutdown()
            agent.store.close()
        await echo_ctx.shutdown()
        bank_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bank_task
    store.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = asyncio.run(main_async(args.tokens))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
