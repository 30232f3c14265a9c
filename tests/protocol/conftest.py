"""Fixtures of the core's tests: RSA keys made once per module, and a bank of two keysets whose
books every test leaves balanced."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from .world import LocalBank, make_keyset


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


@pytest.fixture
def bank(rsa_keys: list[rsa.RSAPrivateKey]) -> Iterator[LocalBank]:
    small = make_keyset(rsa_keys[0], value=100, n=100)
    big = make_keyset(rsa_keys[1], value=1000, n=1000)
    world = LocalBank(keysets={small.info.id: small, big.info.id: big})
    try:
        yield world
        world.audit()  # every test ends with the books balanced
    finally:
        world.close()
