"""Signed requests to the bank and its signed answers (DESIGN.md §3-§7).

A request is a COSE_Sign1 whose ``external_aad`` names the bank and the operation, so a request
signed for ``settle`` at bank A is worthless as anything else or anywhere else; the same holds
for answers. An answer's payload is either the operation's answer message or an
:class:`~m2mpay.protocol.messages.ErrorAnswer`. Every answer, refusals included, is also bound to the
SHA-256 digest of the exact request bytes it answers, so a signed answer (or refusal) of one
request is worthless as the answer to any other. The idempotency key of a request is
``(signer, req_id)``; its digest tells an honest retry (same bytes) from a replay under a used key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import cbor, cose, wire
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .messages import OPS, ErrorAnswer, Message

__all__ = [
    "Refusal",
    "StoredAnswer",
    "answer_aad",
    "check_replay",
    "open_answer",
    "request_aad",
    "request_digest",
    "sign_answer",
    "sign_request",
]

A = TypeVar("A", bound=Message)
_ENVELOPE_OVERHEAD = 512
"""COSE_Sign1 around an answer: protected header with the bank's name, signature, framing."""


def request_aad(bank: str, op: str) -> bytes:
    """What a request signature is bound to besides its payload."""
    return wire.request_aad(bank, op)


def answer_aad(bank: str, op: str, request_digest: bytes) -> bytes:
    """What an answer signature is bound to besides its payload: bank, operation and request.

    ``"m2mpay/resp/2/{bank}/{op}/"`` followed by the 32-byte SHA-256 of the request's bytes.
    """
    if len(request_digest) != 32:
        raise LocalProtocolError("a request digest is 32 bytes")
    return wire.answer_context(bank, op) + request_digest


def sign_request(message: Message, key: Ed25519PrivateKey, signer: str, bank: str, op: str) -> bytes:
    """A request to ``bank`` for ``op``, signed by ``signer`` (an account or vendor id)."""
    if op not in OPS or not isinstance(message, OPS[op][0]):
        raise ValueError(f"{type(message).__name__} is not a {op} request")
    return cose.sign1(message.encode(), key, kid=signer.encode(), external_aad=request_aad(bank, op))


class Refusal(RemoteProtocolError):
    """A refusal the bank signed over this very request. A :class:`RemoteProtocolError` that is
    not a ``Refusal`` means the answer could not be verified, and the request is still unanswered.

    :attr:`final` tells a refusal of the request itself (a retry of the same bytes gets the same
    refusal) from the bank's own trouble (``internal``, ``unavailable``): after those the request
    may have been carried out or not, and only a retry of the same bytes can tell.
    """

    @property
    def final(self) -> bool:
        """Whether the request itself was refused (not the bank's own trouble)."""
        return self.code not in (ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE)


def sign_answer(message: Message, key: Ed25519PrivateKey | cose.SigningKey, bank: str, op: str, *,
                request_digest: bytes) -> bytes:
    """The bank's signed answer (an answer message or an :class:`ErrorAnswer`) to the request
    whose bytes have ``request_digest`` (:func:`request_digest`)."""
    return cose.sign1(message.encode(), key, kid=bank.encode(),
                      external_aad=answer_aad(bank, op, request_digest))


def open_answer(data: bytes, answer_key: Ed25519PublicKey, bank: str, op: str, expected: type[A], *,
                request: bytes) -> A:
    """Verify the bank's answer to ``request`` (the exact bytes sent) and return it; a signed
    refusal raises its code.

    A forged or corrupted answer, or the bank's answer to another request, raises
    ``bad_signature``: a client must then treat the request as unanswered and retry it with the
    same bytes.
    """
    # The envelope may be as large as the answer it carries (64 blind signatures of a withdrawal
    # are 16 KiB on their own), plus the COSE header and signature.
    outer = cose.decode_sign1(data, max_size=expected.MAX_SIZE + _ENVELOPE_OVERHEAD)
    signed = cose.verify_sign1(outer, answer_key, external_aad=answer_aad(bank, op, request_digest(request)))
    obj = cbor.decode(signed.payload, max_size=expected.MAX_SIZE)
    if isinstance(obj, dict) and "code" in obj:
        refusal = ErrorAnswer.from_obj(obj)
        raise Refusal(refusal.message, refusal.error_code)
    return expected.from_obj(obj)


def request_digest(data: bytes) -> bytes:
    """The digest under which a request's bytes are remembered."""
    return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """What the bank keeps per ``(signer, req_id)``: the request digest and the answer bytes."""

    digest: bytes
    answer: bytes


def check_replay(stored: StoredAnswer | None, digest: bytes) -> bytes | None:
    """``None`` for a new request, the stored answer for an honest retry; ``replay`` otherwise."""
    if stored is None:
        return None
    if stored.digest != digest:
        raise RemoteProtocolError("request id already used for another request", ErrorCode.REPLAY)
    return stored.answer
