"""What an exchange shows the bank: no account, and nothing that links the coin exchanged to the
fresh coins it gave, nor those to their spending."""

from __future__ import annotations

import gmpy2
import pytest

from m2mpay.agents.bank.exchange_rows import exchanges
from m2mpay.protocol import cbor
from tests.bank_world import BankWorld

from .exchange_world import exchange, exchanging, withdraw

pytestmark = pytest.mark.asyncio


def _blobs(value: object) -> list[bytes]:
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value)] if len(value) >= 16 else []
    if isinstance(value, dict):
        return [b for v in value.values() for b in _blobs(v)]
    if isinstance(value, (list, tuple)):
        return [b for v in value for b in _blobs(v)]
    return []


async def test_the_bank_cannot_link_an_exchange_to_the_coins_it_gave(world: BankWorld) -> None:
    with exchanging(world) as keyset:
        user, vendor = world.user("alice"), world.vendor("meter")
        old = await withdraw(world, user, keyset, 2)
        fresh = [c for wc in old for c in await exchange(world, wc)]
        for wc in fresh:  # every fresh coin spent at a vendor
            wc, session = await world.block(vendor, wc)
            await world.settle(vendor, session)
        rows = world.store.run_sync(exchanges)
        assert len(rows) == 2
        # No account anywhere in what the bank keeps of an exchange.
        kept = world.store.run_sync(lambda tx: tx.all("SELECT * FROM exchanges") + tx.all("SELECT * FROM "
                                                                                         "exchange_outputs"))
        assert not any(isinstance(v, str) and "alice" in v for row in kept for v in row)
        assert not any(isinstance(v, (bytes, memoryview)) and b"alice" in bytes(v) for row in kept for v in row)
        # What it saw at the exchanges against what it sees when the fresh coins are spent.
        seen_at_exchange: set[bytes] = set()
        for row in rows:
            seen_at_exchange |= {row.tip, row.req_id, row.request_hash}
            seen_at_exchange |= set(_blobs(cbor.decode(cbor.decode(row.answer)[2])))
        seen_at_exchange |= {bytes(r[0]) for r in world.store.run_sync(
            lambda tx: tx.all("SELECT blinded FROM signed_messages"))}
        spent = {wc.coin.tip for wc in fresh} | {wc.coin.sig for wc in fresh}
        spent |= {r.last for r in world.store.run_sync(lambda tx: tx.coins()) if r.tip in {c.coin.tip for c in fresh}}
        assert len(seen_at_exchange) > 10 and len(spent) > 10
        assert not seen_at_exchange & spent
        # The bank's best linking test: each fresh coin's signature to the e is its PSS encoding;
        # the blinded messages it signed are that encoding times r^e. They never match.
        blinded = {int.from_bytes(bytes(r[0]), "big") for r in world.store.run_sync(
            lambda tx: tx.all("SELECT blinded FROM signed_messages"))}
        for wc in fresh:
            public = world.keys.keyring.rsa_keys[wc.coin.keyset]
            assert int(gmpy2.powmod(int.from_bytes(wc.coin.sig, "big"), public.e, public.n)) not in blinded
        assert world.audit().ok



