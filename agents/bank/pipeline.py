"""The bank's request pipeline, built once and without I/O: decode → verify → handler → answer.

:meth:`Pipeline.handle` turns the bytes of one request into the signed answer, never an
exception: the operation is looked up in :data:`~m2mpay.agents.bank.operations.OPERATIONS` (an
unknown one is refused as ``unknown_op``), the COSE envelope and the body are decoded as that
operation's request type (a body of another type is ``bad_request``), and the signature is
verified with the key of the signer its ``kid`` names *before* anything is looked up under that
name: stored answers are keyed by the verified signer, so a forged ``kid`` learns nothing. The
handler then does the idempotency lookup, the rules and the booking (see
:mod:`~m2mpay.agents.bank.operations`). Every answer, refusals included, is signed over the
request's digest.

The bank's service drives it on its store; tests drive the same pipeline on SQLite in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from m2mpay.protocol import cose, envelope
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.rules.requests import BlockWindow, verify_signed

from .keys import BankKeys
from .ledger import Atomic, SignerKind, Steps
from .operations import OPERATIONS, Call, Context

__all__ = ["Pipeline", "Reply"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reply:
    """A signed answer; who it is for (the verified signer, or ``None`` when the request was
    refused before its signature could be verified: it then goes back where it came from); and
    ``result``, ``ok`` or the refusal's wire code."""

    answer: bytes
    signer: str | None
    result: str = "ok"


@dataclass
class Pipeline:
    """Answers the operations of DESIGN.md §3-§4 for one bank."""

    keys: BankKeys
    window: BlockWindow = field(default_factory=BlockWindow)
    context: Context = field(init=False)
    _signer_keys: dict[tuple[SignerKind, str], tuple[Ed25519PublicKey, bytes]] = field(default_factory=dict,
                                                                                       init=False)

    def __post_init__(self) -> None:
        self.context = Context(self.keys, self.window)

    def handle(self, op: str, data: bytes, now: int) -> Steps[Reply]:
        """The steps that answer one request at ``now``; they return the :class:`Reply`."""
        req_id: bytes | None = None
        signer: str | None = None
        digest = envelope.request_digest(data)
        try:
            operation = OPERATIONS.get(op)
            if operation is None:
                raise RemoteProtocolError(f"unknown operation {op[:32]!r}", ErrorCode.UNKNOWN_OP)
            if operation.signer is None:  # nobody signs it (an exchange): plain CBOR, answered where it came from
                unsigned = operation.request.decode(data)
                req_id = unsigned.req_id
                bare = cose.Sign1(protected=b"", kid=b"", payload=data, signature=b"")  # no kid: never verified
                answer = yield from operation.handler(self.context, Call(bare, unsigned, "", digest, now, data=data))
                return Reply(answer, None)
            signed = cose.decode_sign1(data, max_size=operation.request.MAX_SIZE)
            request = operation.request.decode(signed.payload)
            req_id = request.req_id
            key, raw = (yield from self._signer_key(operation.signer, signed.kid)) or (None, None)
            signer = verify_signed(signed, self.keys.bank, op, lambda _name: key)
            answer = yield from operation.handler(self.context, Call(signed, request, signer, digest, now, raw))
            return Reply(answer, signer)
        except RemoteProtocolError as exc:
            log.info("refused %s: %s (%s)", op[:32], exc.code.wire, exc.message)
            return Reply(self.context.refusal(op, exc.code, exc.message, req_id, digest), signer, exc.code.wire)
        except Exception:
            log.exception("internal error handling %s", op[:32])
            return Reply(self.context.refusal(op, ErrorCode.INTERNAL, "internal error", req_id, digest), signer,
                         ErrorCode.INTERNAL.wire)

    def _signer_key(self, kind: SignerKind, kid: bytes) -> Steps[tuple[Ed25519PublicKey, bytes] | None]:
        """The key of the signer ``kid`` names, as an object and raw (read once, then cached),
        ``None`` if there is none."""
        name = kid.decode("ascii", "replace")
        cached = self._signer_keys.get((kind, name))
        if cached is None:
            raw: bytes | None = yield Atomic(lambda tx: tx.signer_key(kind, name))
            if raw is None:
                return None
            cached = self._signer_keys[kind, name] = (Ed25519PublicKey.from_public_bytes(raw), raw)
        return cached
