"""A block's signature: verified once when the certificate names the enrolled key, twice otherwise."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.protocol import cose
from m2mpay.protocol.certificates import issue_certificate
from m2mpay.protocol.envelope import Refusal, request_aad
from m2mpay.protocol.errors import ErrorCode
from m2mpay.protocol.messages import BlockAnswer, CertificateBody
from tests.bank_world import NOW, BankWorld


@pytest.mark.asyncio
async def test_an_honest_block_is_verified_once(world: BankWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    user, vendor = world.user("payer"), world.vendor("meter")
    [wc] = await world.withdraw(user, 1)
    plain, aad, checks = cose.verify_sign1, request_aad(world.bank, "block"), []

    def counted(data: object, key: object, *, external_aad: bytes = b"") -> cose.Sign1:
        checks.append(external_aad == aad)
        return plain(data, key, external_aad=external_aad)  # type: ignore[arg-type]

    monkeypatch.setattr(cose, "verify_sign1", counted)
    _, _, signed = world.session(vendor, wc)
    answer = world.open(await world.send("block", signed), "block", BlockAnswer, request=signed)
    assert answer.tip == wc.coin.tip
    assert checks.count(True) == 1


@pytest.mark.asyncio
async def test_a_certificate_for_another_key_than_the_enrolled_one_is_refused(world: BankWorld) -> None:
    # The vendor signs with its enrolled key but shows a certificate, issued by the bank's CA under
    # its own name, for another key (one it had before a re-key, say): the request's signature
    # must still be checked against the certified key, and fails.
    user, vendor = world.user("payer"), world.vendor("meter")
    [wc] = await world.withdraw(user, 1)
    other = cose.public_key_bytes(Ed25519PrivateKey.generate().public_key())
    body = CertificateBody(bank=world.bank, vendor=vendor.name, account=vendor.account, name=vendor.name,
                           category="parking", key=other, nbf=NOW - 60, exp=NOW + 86400)
    shown = dataclasses.replace(vendor, cert=issue_certificate(body, world.keys.load_ca_key()))
    _, _, signed = world.session(shown, wc)
    with pytest.raises(Refusal) as refused:
        world.open(await world.send("block", signed), "block", BlockAnswer, request=signed)
    assert refused.value.code is ErrorCode.BAD_SIGNATURE
    assert world.store.run_sync(lambda tx: tx.coin(wc.coin.tip)) is None  # nothing was booked
