"""Money semantics owned by the core: prices in money, tokens owed by one rule, a signed final receipt.

A real vendor (:mod:`tests.user.hostile`) over CoAP and a real bank over Mosquitto with two keysets
whose tokens are worth 1 and 10 (:data:`tests.plugins.banks.SERVED_KEYSETS`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import aiocoap
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.agents.bank import admin
from m2mpay.agents.policy.config import PolicyConfig
from m2mpay.agents.user.agent import PolicyRefusal, UserAgent
from m2mpay.agents.user.outcome import Stop
from m2mpay.protocol import cose, wire
from m2mpay.protocol.certificates import verify_certificate
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.rules import wallet

from tests.bank_world import BankWorld
from .hostile import Misbehaviour, hostile_vendor
from .withdrawals import withdraw_coins

pytestmark = [pytest.mark.asyncio, pytest.mark.network]


TOKENS = {(3, 1): 12, (3, 10): 2, (5, 1): 20, (5, 10): 2}
"""Tokens owed for (units at 4 a unit, token value): the money rounded up to whole tokens."""


def _spent(agent: UserAgent) -> int:
    return sum(spend.amount for spend in agent.spending())


async def test_prices_in_money_two_keysets(served: BankWorld, mosquitto: str, ctx: aiocoap.Context,
                                           tmp_path: Path) -> None:
    """Policy limits hold in money for either coin; vendor credit = the wallet's log = price × units
    rounded up to whole tokens of the coin paid with, the blocking token included."""
    policy = PolicyConfig.from_dict({"price": {"max_per_unit": 4}, "budget": {"per_session": 20}})
    ones = UserAgent(tmp_path / "ones", policy, clock=served.clock)
    tens = UserAgent(tmp_path / "tens", policy, clock=served.clock)
    try:
        await withdraw_coins(served, mosquitto, ones, "alice", 1, value=100)
        await withdraw_coins(served, mosquitto, tens, "alice", 1, value=1000)
        async with hostile_vendor(served, mosquitto, "meter", Misbehaviour.NONE, price=4) as vendor:
            credited = 0
            for agent, token_value in ((ones, 1), (tens, 10)):
                result = await agent.pay(ctx, vendor.url, 3)  # 3 units at 4: 12 in money
                tokens = TOKENS[3, token_value]  # 12 tokens of 1, or 2 tokens of 10
                assert (result.stop, result.delivered) == (Stop.COMPLETE, 3), result
                assert (result.tokens, result.spent, result.credited) == (tokens, tokens * token_value,
                                                                           tokens * token_value)
                assert _spent(agent) == tokens * token_value  # the wallet's log
                credited += tokens * token_value
                assert admin.balance(served.store, "meter") == credited == vendor.kept()
            assert credited == 12 + 20

            for agent, total in ((ones, 24), (tens, 30)):  # 6 units: 24 in money, or 3 tokens of 10
                with pytest.raises(PolicyRefusal) as capped:
                    await agent.pay(ctx, vendor.url, 6)
                assert (capped.value.decision.reason, capped.value.decision.details["total"]) == ("session_cap",
                                                                                                   total)
            for agent, token_value in ((ones, 1), (tens, 10)):  # 5 units: 20 either way, within the cap
                result = await agent.pay(ctx, vendor.url, 5)
                assert (result.tokens, result.spent) == (TOKENS[5, token_value], 20)
            assert admin.balance(served.store, "meter") == credited + 40 == vendor.kept()
            ones.close()
            tens.close()

            strict = PolicyConfig.from_dict({"price": {"max_per_unit": 3}})  # 4 a unit is too dear with any coin
            for name in ("ones", "tens"):
                agent = UserAgent(tmp_path / name, strict, clock=served.clock)
                try:
                    with pytest.raises(PolicyRefusal) as dear:
                        await agent.pay(ctx, vendor.url, 1)
                    assert (dear.value.decision.reason, dear.value.decision.details["unit_price"]) == (
                        "price_too_high", 4)
                finally:
                    agent.close()
    finally:
        ones.close()
        tens.close()


async def test_blocking_token_counts_toward_what_is_owed(served: BankWorld, mosquitto: str,
                                                         ctx: aiocoap.Context, tmp_path: Path) -> None:
    """2 units at price 2 with tokens of 1: 4 tokens credited, not 5; 1 unit with a token of 10: the
    blocking token alone."""
    user = UserAgent(tmp_path / "wallet", clock=served.clock)
    try:
        await withdraw_coins(served, mosquitto, user, "alice", 1, value=100)
        async with hostile_vendor(served, mosquitto, "meter", Misbehaviour.NONE, price=2) as vendor:
            result = await user.pay(ctx, vendor.url, 2)
            assert (result.stop, result.tokens, result.credited) == (Stop.COMPLETE, 4, 4), result
            assert admin.balance(served.store, "meter") == 4 == vendor.kept() == _spent(user)
            await withdraw_coins(served, mosquitto, user, "alice", 1, value=1000)
            for wc, _ in user.store.coins():
                if wc.token_value == 1:  # the wallet must pay with the coin of tens
                    user.store.save(dataclasses.replace(wc, status=wallet.CoinStatus.SPENT))
            single = await user.pay(ctx, vendor.url, 1)
            assert (single.stop, single.tokens, single.spent, single.credited) == (Stop.COMPLETE, 1, 10, 10)
            assert admin.balance(served.store, "meter") == 14 == vendor.kept()
    finally:
        user.close()


async def test_final_receipt_signed_and_kept(served: BankWorld, mosquitto: str, ctx: aiocoap.Context,
                                             tmp_path: Path) -> None:
    """The close answers with a receipt the vendor's certified key signed; the wallet keeps it. A
    receipt that does not verify is refused: not kept, and the coin waits for its deadline."""
    from m2mpay.protocol.receipts import AAD_RECEIPT, verify_receipt

    user = UserAgent(tmp_path / "wallet", clock=served.clock)
    try:
        (coin,) = await withdraw_coins(served, mosquitto, user, "alice", 1, value=100)
        async with hostile_vendor(served, mosquitto, "meter", Misbehaviour.NONE, price=3) as vendor:
            result = await user.pay(ctx, vendor.url, 3)
            cert = verify_certificate(vendor.agent.credentials.cert, served.keys.keyring.ca_key, served.bank,
                                      served.clock.now)
        (kept,) = user.store.receipts()
        assert kept.cert == vendor.agent.credentials.cert
        receipt = verify_receipt(kept.signed, cert, tip=coin.coin.tip)
        assert receipt == kept.receipt
        assert (receipt.vendor, receipt.tip, receipt.tokens, receipt.credited, receipt.pending) == (
            "meter", coin.coin.tip, 9, 9, None)
        assert receipt.index == 100 - 9 and result.credited == receipt.credited

        signed = cose.decode_sign1(kept.signed)
        forged = [
            cose.sign1(dataclasses.replace(receipt, credited=900).encode(), Ed25519PrivateKey.generate(), b"meter",
                       AAD_RECEIPT),  # another key
            kept.signed[:-1] + bytes([kept.signed[-1] ^ 1]),  # a signature bit flipped
            cose.sign1(signed.payload, vendor.agent.credentials.key, b"meter", wire.request_aad("bank", "settle")),
        ]
        for bad in forged:
            with pytest.raises(RemoteProtocolError) as refused:
                verify_receipt(bad, cert, tip=coin.coin.tip)
            assert refused.value.code is ErrorCode.BAD_SIGNATURE
        with pytest.raises(RemoteProtocolError):
            verify_receipt(kept.signed, cert, tip=b"\x00" * 32)  # a receipt of another coin

        async with hostile_vendor(served, mosquitto, "forger", Misbehaviour.FORGES_RECEIPT, price=3) as vendor:
            forged_result = await user.pay(ctx, vendor.url, 2)
            assert forged_result.stop is Stop.COMPLETE and forged_result.credited is None  # unconfirmed
        assert [k.receipt.vendor for k in user.store.receipts()] == ["meter"]
        ((wc, _),) = user.store.coins()
        assert wc.status is wallet.CoinStatus.IN_SESSION  # not known to be closed: blocked until T
        assert admin.balance(served.store, "forger") == 6  # the vendor settled all the same
    finally:
        user.close()

