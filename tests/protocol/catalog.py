"""What the core decodes from peers, listed once for the tests that check it and the fuzzers that
attack it: every message class, and every other decoder of peer bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from m2mpay.protocol import certificates, cose, envelope, messages, sealing
from m2mpay.protocol.messages import BlockAnswer, Message

__all__ = ["ALL", "CA", "DECODERS", "SEAL"]

ALL: list[type[Message]] = [getattr(messages, name) for name in messages.__all__
                            if isinstance(getattr(messages, name), type)
                            and issubclass(getattr(messages, name), Message) and getattr(messages, name) is not Message]
"""Every message class the core exports."""

CA = Ed25519PrivateKey.generate()
"""The signing key the decoders below verify with (a test's CA, bank answer key and ``cose`` signer)."""
SEAL = X25519PrivateKey.generate()
"""The bank's sealing key the ``sealed`` decoder opens with."""

DECODERS: dict[str, Callable[[bytes], Any]] = {
    "cose": cose.decode_sign1,
    "certificate": lambda b: certificates.verify_certificate(b, CA.public_key(), "bank", 0),
    "announcement": lambda b: certificates.verify_announcement(b, "00" * 32, 0),
    "answer": lambda b: envelope.open_answer(b, CA.public_key(), "bank", "block", BlockAnswer, request=b"request"),
    "sealed": lambda b: sealing.open_sealed(b, SEAL, sealing.info_for_bank("bank")),
}
"""Every other decoder of peer bytes, by name, each taking the bytes alone."""
