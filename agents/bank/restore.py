"""The restore handler: the blind signatures the bank already issued on the messages a wallet asks
about, and nothing else.

The request is plain CBOR (:class:`~m2mpay.protocol.messages.exchange.RestoreRequest`), signed by
nobody, like an exchange: a restored wallet recomputes its blinded messages from its seed and asks
which of them the bank signed (docs/LIFECYCLE.md, "Restore"). Two steps:

1. one read transaction finds which asked ``(keyset, blinded)`` pairs a withdrawal
   (``withdrawn_messages``) or an exchange (``signed_messages``) had signed, for that very keyset;
   a message the bank signed for another keyset, or for a keyset it holds no key for now, is not
   found;
2. outside any transaction, those messages are signed again: RSA blind signing is deterministic,
   so each signature is the one the bank issued, and the answer gives the wallet nothing it had
   not paid for.

Nothing is written: a repeat gets an equal answer, and a refusal changes nothing. Signing again
costs ~1 ms of RSA per message found and the request names nobody to refuse, so each bank process
spends at most a budget of signatures per second on restores (:class:`SignatureBudget`); a request
that would exceed it is refused with ``unavailable`` (not final: the wallet retries later) before
any signing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages.exchange import RestoreAnswer, RestoreRequest

from .budget import Budget
from .exchange_rows import signed_keysets
from .ledger import Atomic, Steps

if TYPE_CHECKING:
    from .operations import Call, Context

__all__ = ["RESTORE_BURST", "RESTORE_SIGNATURES_PER_SECOND", "SignatureBudget", "restore"]

RESTORE_SIGNATURES_PER_SECOND = 256
"""Signatures a bank process spends on restores per second, at most: about a quarter of one core
(~1 ms of RSA each), so restores never starve the withdrawals, blocks and settlements beside them.
Four full restore requests (64 messages found each) per second."""

RESTORE_BURST = 640
"""Signatures a bank process may spend on restores at once, after a quiet spell: ten full requests,
so a wallet restoring several keysets is not held back by the rate."""


@dataclass
class SignatureBudget(Budget):
    """The restores' budget, in signatures (see :class:`~m2mpay.agents.bank.budget.Budget`)."""

    rate: float = RESTORE_SIGNATURES_PER_SECOND
    burst: float = RESTORE_BURST


def restore(ctx: Context, call: Call[RestoreRequest]) -> Steps[bytes]:
    """The answer to a restore (see the module's docstring for its two steps)."""
    request = call.request
    asked = [(o.keyset, o.blinded) for o in request.blinded]
    signed: set[tuple[bytes, str]] = yield Atomic(lambda tx: signed_keysets(tx, [b for _, b in asked]))
    found = tuple(i for i, (keyset, blinded) in enumerate(asked)
                  if (blinded, keyset) in signed and keyset in ctx.keys.signers)
    if not ctx.restore_budget.take(len(found), call.now):
        raise RemoteProtocolError("too many restores now, retry later", ErrorCode.UNAVAILABLE)
    sigs = tuple(ctx.keys.signers[asked[i][0]].sign(asked[i][1]) for i in found)
    return ctx.sign(RestoreAnswer(req_id=request.req_id, found=found, blind_sigs=sigs), "restore", call.digest)
