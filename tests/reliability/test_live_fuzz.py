"""Fuzzing the live surfaces: CoAP resources of a serving vendor and the bank's MQTT topics.

Inputs are mutations of valid messages (bit flips, truncations, insertions, spliced bytes,
swapped CBOR items) and random bytes, from a seeded generator so a failure can be replayed. Every
input must get one of our protocol errors (a signed ErrorAnswer from the bank, a 4.xx with a CBOR
error body from the vendor); nothing may change state; the server must keep serving. The light
runs take a few hundred inputs per surface; the heavy ones (``make reliability``) 10,000.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest
from aiocoap.numbers.codes import Code

from agents.mqtt import BankClient
from protocol import cbor, envelope
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.messages import OPS, StatusAnswer, StatusRequest
from protocol.rules import wallet
from tests.bank.conftest import BANK, BankWorld
from tests.bank.test_mqtt import online  # noqa: F401  (fixture)
from tests.vendor.test_coap_payment import CBOR, Scene, _open, scene  # noqa: F401  (fixture)

from .faults import mutate

pytestmark = [pytest.mark.asyncio, pytest.mark.network]

WIRE_CODES = {code.wire for code in ErrorCode}


async def _fuzz_bank(world: BankWorld, client: BankClient, count: int) -> Counter[str]:
    user, vendor = world.user("alice"), world.vendor("meter")
    (wc,) = await world.withdraw(user)
    wc, session = await world.block(vendor, wc)
    seeds = {
        "withdraw": user.sign(wallet.prepare_withdrawal("alice", world.keys.keyring.keysets[world.keyset],
                                                        world.keys.keyring.rsa_keys[world.keyset], 2).request,
                              "withdraw"),
        "block": world.session(vendor, (await world.withdraw(user))[0])[2],
        "settle": vendor.sign(session.settle_request(os.urandom(16), keep_open=True), "settle"),
        "status": vendor.sign(StatusRequest(req_id=os.urandom(16), tip=wc.coin.tip), "status"),
    }
    for op, request in seeds.items():  # the genuine ones once: a copy of one is then only a replay
        envelope.open_answer(await client.request(op, request), world.keys.answer_key.public_key(), BANK, op,
                             OPS[op][1])
    session.settled(envelope.open_answer(await client.request("settle", seeds["settle"]),  # type: ignore[arg-type]
                                         world.keys.answer_key.public_key(), BANK, "settle", OPS["settle"][1]))
    before = world.audit()
    rng = random.Random(20261125)
    codes: Counter[str] = Counter()
    for i in range(count):
        op = rng.choice([*seeds, "nosuchop"])
        payload = mutate(rng, seeds.get(op, seeds["block"]))
        raw = await client.request(op, payload)
        try:
            envelope.open_answer(raw, world.keys.answer_key.public_key(), BANK, op if op in OPS else "error",
                                 OPS[op][1] if op in OPS else StatusAnswer)
        except RemoteProtocolError as refusal:
            codes[refusal.code.wire] += 1
        else:
            codes["accepted"] += 1
    after = world.audit()
    assert after.ok and (after.withdrawn, after.credited, after.outstanding) == (
        before.withdrawn, before.credited, before.outstanding), "a fuzz input moved money"
    # Still serving, and a genuine request still works.
    await world.settle(vendor, session)
    assert world.audit().ok
    return codes


async def test_bank_topics_fuzzed(online: tuple[BankWorld, BankClient]) -> None:  # noqa: F811
    codes = await _fuzz_bank(*online, count=400)
    assert sum(codes.values()) == 400 and codes["accepted"] == 0
    assert set(codes) <= WIRE_CODES


@pytest.mark.heavy
async def test_bank_topics_fuzzed_10000(online: tuple[BankWorld, BankClient]) -> None:  # noqa: F811
    codes = await _fuzz_bank(*online, count=10_000)
    print("bank fuzz:", dict(codes))
    assert codes["accepted"] == 0 and set(codes) <= WIRE_CODES


async def _fuzz_vendor(scene: Scene, count: int) -> Counter[str]:  # noqa: F811
    world = scene.world
    (wc,) = await world.withdraw(world.user("alice"))
    wc, opened = await _open(scene, wc)
    pay_path = f"/sessions/{opened.session.hex()}/pay"
    wc, pay = wallet.reveal(wc, 1)
    offer = (await scene.call(Code.GET, "/offer")).payload
    # (close takes no body: any POST to it closes the session, as it should)
    seeds = {pay_path: pay.encode(), "/sessions": offer}
    held = scene.agent.store.session(opened.session)
    rng = random.Random(1125)
    codes: Counter[str] = Counter()
    for _ in range(count):
        path = rng.choice(list(seeds) + [f"/sessions/{os.urandom(8).hex()}/pay", "/offer", "/nowhere"])
        body = mutate(rng, seeds.get(path, pay.encode()))
        method = rng.choice([Code.POST, Code.POST, Code.POST, Code.GET, Code.PUT])
        response = await scene.call(method, path, body, rng.choice([CBOR, CBOR, CBOR, 0, None]))
        if response.code.is_successful():
            assert (path, method) == ("/offer", Code.GET), (path, method, response.code)  # a body is ignored
            codes["ok"] += 1
            continue
        assert response.code.class_ == 4, (path, response.code, response.payload)
        if response.code in (Code.NOT_FOUND, Code.METHOD_NOT_ALLOWED) and not response.opt.content_format:
            codes[str(response.code)] += 1  # aiocoap's routing: no such path, or not this method
        else:
            error = cbor.decode(response.payload)
            assert error["code"] in WIRE_CODES
            codes[error["code"]] += 1
    # Nothing stored: the session holds what it held, and still takes the genuine token.
    assert scene.agent.store.session(opened.session) == held
    response = await scene.call(Code.POST, pay_path, pay.encode())
    assert response.code == Code.CHANGED  # the genuine token is still taken
    return codes


async def test_vendor_resources_fuzzed(scene: Scene) -> None:  # noqa: F811
    codes = await _fuzz_vendor(scene, 400)
    assert sum(codes.values()) == 400


@pytest.mark.heavy
async def test_vendor_resources_fuzzed_10000(scene: Scene) -> None:  # noqa: F811
    codes = await _fuzz_vendor(scene, 10_000)
    print("vendor fuzz:", dict(codes))
