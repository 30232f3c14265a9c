"""Coins for a user agent from the served test bank, through the broker as a device gets them."""

from __future__ import annotations

import uuid

from m2mpay.agents.mqtt import BankClient
from m2mpay.agents.user.agent import UserAgent, UserCredentials
from m2mpay.protocol.rules import wallet
from tests.bank_world import BankWorld

__all__ = ["withdraw_coins"]


async def withdraw_coins(world: BankWorld, mosquitto: str, user: UserAgent, name: str, count: int,
                         value: int = 100) -> list[wallet.WalletCoin]:
    """``count`` coins of the keyset worth ``value`` each, for ``name`` (opened with 10,000 if new)."""
    if not (world.directory / f"{name}.json").exists():
        world.user(name)
    keyset = next(k for k, info in world.keys.keyring.keysets.items() if info.value == value)
    async with BankClient(mosquitto, world.bank, f"{name}-{uuid.uuid4().hex[:6]}") as bank:
        return await user.withdraw(bank, UserCredentials.load(world.directory / f"{name}.json"), count, keyset)
