"""HPKE sealing: opens only with the right key and info; any change is refused."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from m2mpay.protocol import sealing
from m2mpay.protocol.errors import RemoteProtocolError

KEY = X25519PrivateKey.generate()
INFO = sealing.info_for_bank("bank-a")


def test_round_trip() -> None:
    blob = sealing.seal(b"authorization", KEY.public_key(), INFO)
    assert len(blob) == len(b"authorization") + sealing.SEAL_OVERHEAD
    assert sealing.open_sealed(blob, KEY, INFO) == b"authorization"


def test_fresh_randomness_each_time() -> None:
    assert sealing.seal(b"x" * 10, KEY.public_key(), INFO) != sealing.seal(b"x" * 10, KEY.public_key(), INFO)


@pytest.mark.parametrize("position", [0, 31, 32, 40, -1])
def test_any_flipped_bit_is_refused(position: int) -> None:
    blob = bytearray(sealing.seal(b"authorization", KEY.public_key(), INFO))
    blob[position] ^= 0x01
    with pytest.raises(RemoteProtocolError):
        sealing.open_sealed(bytes(blob), KEY, INFO)


def test_other_bank_or_key_is_refused() -> None:
    blob = sealing.seal(b"authorization", KEY.public_key(), INFO)
    with pytest.raises(RemoteProtocolError):
        sealing.open_sealed(blob, KEY, sealing.info_for_bank("bank-b"))
    with pytest.raises(RemoteProtocolError):
        sealing.open_sealed(blob, X25519PrivateKey.generate(), INFO)


@pytest.mark.parametrize("size", [0, 48, 513])
def test_wrong_sizes_refused(size: int) -> None:
    with pytest.raises(RemoteProtocolError):
        sealing.open_sealed(b"\x00" * size, KEY, INFO)
