"""A vendor that skips the start check and names another service gains nothing: the wallet judges
the category its certificate carries, never the offer's ``service``."""

from __future__ import annotations

import uuid
from pathlib import Path

import aiocoap
import pytest

from m2mpay.agents.mqtt import BankClient
from m2mpay.agents.policy.config import PolicyConfig
from m2mpay.agents.user.agent import PolicyRefusal, UserAgent, UserCredentials
from tests.bank_world import BankWorld
from tests.user.hostile import Misbehaviour, hostile_vendor

pytestmark = [pytest.mark.asyncio, pytest.mark.network]


async def test_wallet_judges_the_certificate_not_the_service(served: BankWorld, mosquitto: str,
                                                             ctx: aiocoap.Context, tmp_path: Path) -> None:
    user = UserAgent(tmp_path / "wallet", PolicyConfig.from_dict({"categories": {"allow": ["ev"]}}),
                     clock=served.clock)
    try:
        served.user("alice")
        keyset = next(k for k, info in served.keys.keyring.keysets.items() if info.value == 100)
        async with BankClient(mosquitto, served.bank, f"alice-{uuid.uuid4().hex[:6]}") as bank:
            await user.withdraw(bank, UserCredentials.load(served.directory / "alice.json"), 1, keyset)
        # enrolled for parking, its offer says "ev" (the hostile vendor's service is its name)
        async with hostile_vendor(served, mosquitto, "ev", Misbehaviour.NONE, category="parking") as vendor:
            offer = await user.discover(ctx, vendor.url)
            assert (offer.service, user.offer_view(offer).category) == ("ev", "parking")
            with pytest.raises(PolicyRefusal) as refused:
                await user.pay(ctx, vendor.url, 1)
        assert (refused.value.decision.reason, refused.value.decision.message) == (
            "category_denied", "category parking is not allowed")
        assert sum(wc.remaining for wc, _ in user.store.coins()) == 100  # nothing left the wallet
    finally:
        user.close()
