"""The withdrawal handler: debit under the account's lock, blind-sign outside any transaction.

Blind signing costs ~0.7 ms of RSA per coin, so it comes last and outside any transaction, in
two phases. The first transaction decides, under the account's lock: the stored answer; or the
checks (keyset and its phase as stored now, blinded messages, none signed before, balance), whose
refusal is signed and stored under ``(signer, req_id)`` at once, so that replaying a refused
request costs one lookup; or the debit, with its issuance record, the blinded messages it pays for
(``withdrawn_messages``) and an empty "pending" answer under the key. Only then are the blinded
messages signed, and a second transaction puts the answer in place of the pending one. So a
refused request never costs a signature, concurrent withdrawals of one account cost only the
signatures that were paid for, and no lock (on SQLite: the whole bank's write lock) is held
during the RSA work. A crash between the two leaves a paid, pending withdrawal: the honest retry
(same bytes) completes it, and since RSA signing is deterministic, whoever completes it produces
the same answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from m2mpay.protocol import envelope
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import WithdrawAnswer, WithdrawRequest
from m2mpay.protocol.rules import bank as rules
from m2mpay.protocol.rules.phases import Use, require

from .exchange_rows import lock_messages, put_withdrawn, signed_among
from .ledger import Atomic, Ledger, Steps, remembered

if TYPE_CHECKING:
    from .operations import Call, Context

__all__ = ["withdraw"]


def withdraw(ctx: Context, call: Call[WithdrawRequest]) -> Steps[bytes]:
    """The answer to a withdrawal (see the module's docstring for its two transactions)."""
    signer, request, digest, now = call.signer, call.request, call.digest, call.now
    if signer != request.account:
        raise RemoteProtocolError("request signed by another account", ErrorCode.BAD_SIGNATURE)
    stored: bytes | None = yield Atomic(lambda tx: remembered(tx, signer, request.req_id, digest))
    if stored:  # empty: pending, the retry completes it below
        return stored

    def reserve(tx: Ledger) -> tuple[bytes | None, int, RemoteProtocolError | None]:
        """The answer already stored; or ``None`` and the balance to report; or the refusal."""
        account = tx.account(signer, lock=True)  # lock first: a concurrent twin waits here
        lock_messages(tx, request.blinded)  # and an exchange with one of these messages
        again = remembered(tx, signer, request.req_id, digest)
        if again:
            return again, 0, None
        if again is not None:
            return None, tx.issued_balance(signer, request.req_id), None
        if account is None:
            raise RemoteProtocolError("unknown account", ErrorCode.UNKNOWN_ACCOUNT)
        try:
            info = ctx.keys.keyring.keyset(request.keyset)
            # The phase as the database has it now: a retirement counts at once in every bank
            # process, whatever keys it loaded. Checked here only: the honest retry of a paid
            # withdrawal is answered above, or signed below without checking again.
            require(info, tx.keyset_phase(info.id), now, Use.WITHDRAW)
            signer_key = ctx.keys.signers[info.id]
            modulus = signer_key.public_key.n
            if any(len(m) != signer_key.size or int.from_bytes(m, "big") >= modulus for m in request.blinded):
                raise RemoteProtocolError("a blinded message does not fit the keyset's key")
            # A message signed before (by a withdrawal or an exchange), or twice in this request,
            # would be paid for twice and give one coin: a restored wallet replaying a counter
            # fetches that signature with a restore request instead.
            if len(set(request.blinded)) != len(request.blinded) or signed_among(tx, request.blinded):
                raise RemoteProtocolError("a blinded message was signed before", ErrorCode.REPLAY)
            balance = rules.apply_withdraw(account.balance, info, len(request.blinded))
        except RemoteProtocolError as exc:
            refusal = ctx.refusal("withdraw", exc.code, exc.message, request.req_id, digest)
            tx.put_answer(signer, request.req_id, envelope.StoredAnswer(digest, refusal), now)
            return None, 0, exc
        debit = account.balance - balance
        tx.transfer(signer, "outstanding", debit, "withdraw", request.req_id, now, running=(signer,))
        tx.issue(signer, request.req_id, info.id, len(request.blinded), debit, balance, now)
        put_withdrawn(tx, account=signer, req_id=request.req_id, keyset=info.id, blinded=request.blinded)
        tx.put_answer(signer, request.req_id, envelope.StoredAnswer(digest, b""), now)
        return None, balance, None

    reserved: tuple[bytes | None, int, RemoteProtocolError | None] = yield Atomic(reserve)
    answer, balance, refused = reserved
    if refused is not None:
        # Stored; raised so the refusal is counted as one. The answer built from it is the
        # stored one, byte for byte: the same ErrorAnswer under a deterministic Ed25519 signature.
        raise refused
    if answer is not None:
        return answer
    signer_key = ctx.keys.signers[request.keyset]  # not re-checked: the debit is made
    blind_sigs = tuple(signer_key.sign(m) for m in request.blinded)
    final = ctx.sign(WithdrawAnswer(req_id=request.req_id, keyset=request.keyset, blind_sigs=blind_sigs,
                                    balance=balance), "withdraw", digest)
    filled: bytes = yield Atomic(lambda tx: tx.fill_answer(signer, request.req_id, final))
    return filled
