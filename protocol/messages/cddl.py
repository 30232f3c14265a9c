"""The wire schema of every message in CDDL (RFC 8610), generated from the messages themselves.

docs/PROTOCOL.md carries the output of :func:`render` between two markers, and a test fails when
the two differ: the document cannot drift from the code. Each field's meaning and unit comes from
:data:`NOTES`; a field without one is an error, so a new field cannot go undocumented.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from .. import wire
from . import bank, coins, exchange, payment
from ._schema import VERSION, Bool, Bytes, Kind, ListOf, Message, Nested, Optional, Text, UInt

__all__ = ["LIFECYCLE", "MESSAGES", "NOTES", "render"]

MESSAGES: tuple[tuple[str, tuple[type[Message], ...]], ...] = (
    ("Coins and keys", (coins.KeysetInfo, coins.KeysetPhase, coins.Coin, coins.KeyDelegation,
                        coins.KeysAnnouncement, coins.CertificateBody, coins.Authorization)),
    ("Bank requests and answers (MQTT, inside COSE_Sign1)", (
        bank.WithdrawRequest, bank.WithdrawAnswer, bank.BlockRequest, bank.BlockAnswer, bank.SettleRequest,
        bank.SettleAnswer, bank.StatusRequest, bank.StatusAnswer, bank.ErrorAnswer)),
    (f"Vendor resources (CoAP, content-format {wire.CONTENT_FORMAT_CBOR})", (
        payment.Offer, payment.OpenSession, payment.SessionOpened, payment.Due, payment.Pay, payment.Receipt,
        payment.FinalReceipt)),
    ("Exchange (MQTT, plain CBOR: no account signs it)", (
        exchange.Output, exchange.ExchangeProof, exchange.ExchangeRequest, exchange.ExchangeAnswer)),
)
"""Every message, grouped as the document presents them."""

LIFECYCLE: tuple[tuple[str, tuple[type[Message], ...]], ...] = (
    ("Restore (MQTT, plain CBOR: no account signs it)", (exchange.RestoreRequest, exchange.RestoreAnswer)),
)
"""The coin-lifecycle messages rendered into docs/LIFECYCLE.md: restore, served (docs/PROTOCOL.md
specifies the operation and refers to this schema)."""

_TIME = "Unix time, seconds"
_MONEY = "money, minor units of the keyset's currency"
_TOKENS = "a count of tokens, not money"
_INDEX = "chain position (0..n)"
NOTES: dict[str, str] = {
    # by field name; "Message.field" overrides for a field whose meaning differs in one message
    "account": "user account name",
    "CertificateBody.account": "the vendor's account at the bank, which its settlements credit",
    "answer_key": "Ed25519 public key (raw 32 bytes) that signs the bank's answers",
    "balance": "account balance after the withdrawal; " + _MONEY,
    "bank": "bank id",
    "blind_sigs": "RFC 9474 blind signatures, one per blinded message, in order",
    "blinded": "RFC 9474 blinded messages (each the modulus' length)",
    "blocked_until": "the block's deadline T; " + _TIME,
    "ca_key": "the CA's Ed25519 public key (raw); hex SHA-256 of it is the fingerprint devices are provisioned with",
    "category": "vendor category (parking, ev, ...)",
    "cert": "a vendor certificate: COSE_Sign1 of CertificateBody by the CA",
    "Authorization.cert": "SHA-256 of the vendor certificate the authorization is for",
    "code": "stable error code (see Errors)",
    "coin": "the coin being blocked",
    "credited": "credited to the vendor by this settlement; " + _MONEY,
    "FinalReceipt.credited": "credited to the vendor for the session (so far, while pending); " + _MONEY,
    "currency": "ISO 4217 code of the keyset's money",
    "deadline": "the block's deadline T; " + _TIME,
    "delegation": "COSE_Sign1 of KeyDelegation by the CA: the key that signs this announcement",
    "exp": "end of validity (exclusive); " + _TIME,
    "id": f"keyset id: \"ks-\" + first 16 hex digits of SHA-256(CBOR([\"{wire.KEYSET_DOMAIN}\", value, n, "
          "currency, withdraw_until, spend_until, public_key]))",
    "index": _INDEX + " of the token",
    "Receipt.index": "position of the last token the vendor holds",
    "FinalReceipt.index": "position the session was settled at",
    "FinalReceipt.pending": "true while the bank has not answered the final settlement (the vendor keeps sending "
                            "it); absent once settled",
    "issued": "when the announcement was signed; " + _TIME,
    "keep_open": "true: a checkpoint (the block stays); false: the final settlement",
    "key": "Ed25519 public key, raw 32 bytes",
    "keyset": "keyset id",
    "keysets": "keysets in force",
    "Offer.keysets": "keyset ids the vendor accepts",
    "known": "whether the bank has seen the coin (for a coin the asking vendor did not block last: false)",
    "last": "the token at the coin's position, H^position(S)",
    "message": "human-readable reason, never secret; at most 200 characters",
    "n": "tokens per coin (chain length), at most 65,536; a token is worth value / n",
    "name": "the vendor's display name",
    "nbf": "start of validity; " + _TIME,
    "nonce": "the offer's nonce (16 bytes), binding an authorization to one offer",
    "open": "whether the block is still open after this settlement",
    "position": _INDEX + ": tokens left on the coin",
    "prefix": "RFC 9474 message randomizer (32 bytes)",
    "price": "price of one unit of service; " + _MONEY + " (tokens owed: max(1, ceil(units × price / token "
             "value)), the blocking token included)",
    "public_key": "RSA public key, SubjectPublicKeyInfo DER (e = 65537, 2048 bits or more)",
    "purpose": "what the delegated key may sign: announce",
    "reason": "why the vendor asks (a few words)",
    "remaining": "value left on the coin; " + _MONEY,
    "req_id": "16 random bytes: the idempotency key, with the signer",
    "ErrorAnswer.req_id": "the refused request's req_id, when it could be read",
    "revoked": "vendor ids the bank has revoked (certificates still unexpired)",
    "sealed": "HPKE (RFC 9180) enc || ct of the Authorization, for the bank's sealing key",
    "sealing_key": "X25519 public key (raw) that opens sealed authorizations",
    "seq": "notification sequence number",
    "service": "what the vendor sells",
    "session": "session id (16 bytes)",
    "sig": f"RSA-PSS (SHA-384, salt 48) signature on prefix || CBOR([\"{wire.COIN_DOMAIN}\", keyset, tip])",
    "spend_until": "last time coins of the keyset may be spent; " + _TIME,
    "spent": "whether every token of the coin is revealed and no block is open",
    "start": "position up to which the session is credited",
    "tip": "the coin's chain tip H^n(S), its identity",
    "token": "the token H^index(S) (32 bytes)",
    "tokens": "tokens the vendor asks for now; " + _TOKENS,
    "Receipt.tokens": "tokens received in the session so far, the blocking token included; " + _TOKENS,
    "FinalReceipt.tokens": "tokens the vendor holds from the session, the blocking token included; " + _TOKENS,
    "ts": "when the vendor signed the receipt; " + _TIME,
    "unit": "unit of service the price is per",
    "value": "coin value M; " + _MONEY,
    "vendor": "vendor id",
    "FinalReceipt.vendor": "vendor id: the certificate whose key signed the receipt names it",
    "withdraw_until": "last time coins of the keyset may be withdrawn; " + _TIME,
    # coin lifecycle (LIFECYCLE)
    "KeysetPhase.keyset": "keyset id the phase is of",
    "KeysAnnouncement.phases": "phase records, at most one per listed keyset; left out when none (a keyset "
                               "without one is active by its dates)",
    "phase": "active, spend-only, exchange-only or closed: the phase as announced (dates may move it on)",
    "KeysetPhase.withdraw_until": "withdrawals end: the keyset's own date, or its retirement if earlier; " + _TIME,
    "redeem_until": "last time coins of the keyset may be exchanged (not before spend_until); " + _TIME,
    "retired": "when the keyset was retired; " + _TIME,
    "Output.keyset": "keyset id of the coin to be (its value is the keyset's)",
    "Output.blinded": "RFC 9474 blinded message for the keyset's key (the modulus' length)",
    "ExchangeProof.token": "the coin's deepest preimage H^0(S): spends its whole remainder",
    "ExchangeProof.outputs": "SHA-256 of CBOR([outputs, change]) of the request",
    "ExchangeRequest.coin": "the coin exchanged",
    "ExchangeRequest.sealed": "HPKE (RFC 9180) enc || ct of the ExchangeProof, for the bank's sealing key",
    "outputs": "coins to be, all signed: their keysets' values (" + _MONEY + ") add up to at most the remainder",
    "ExchangeRequest.req_id": "16 random bytes: the idempotency key, with the coin's tip",
    "ExchangeProof.req_id": "the request's req_id, bound under the seal",
    "ExchangeAnswer.req_id": "the request's req_id",
    "RestoreRequest.req_id": "16 random bytes: the idempotency key",
    "RestoreAnswer.req_id": "the request's req_id",
    "change": "further coins to be, signed only as far as they cover the rest of the remainder",
    "ExchangeAnswer.position": "the coin's remainder the exchange spent; " + _TOKENS,
    "ExchangeAnswer.blind_sigs": "RFC 9474 blind signatures, one per output, in order",
    "change_used": "indexes of the change slots signed, increasing",
    "change_sigs": "RFC 9474 blind signatures of the change slots used, in order",
    "RestoreRequest.blinded": "blinded messages the wallet recomputed from its seed",
    "found": "indexes of the asked messages the bank has signed, increasing",
    "RestoreAnswer.blind_sigs": "the blind signatures the bank issued on them, in order",
}


def _rule(cls: type[Message]) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", cls.__name__).lower()


def _range(low: int, high: int) -> str:
    return str(low) if low == high else f"({low}..{high})"


def _type(kind: Kind[Any]) -> str:
    if isinstance(kind, Bytes):
        return f"bstr .size {_range(kind.min_len, kind.max_len)}"
    if isinstance(kind, Text):
        if kind.ident:
            return f"name{kind.max_len}"
        return f"tstr .size {_range(kind.min_len, kind.max_len)}"
    if isinstance(kind, UInt):
        return f"uint .le {kind.maximum}" if kind.minimum == 0 else f"{kind.minimum}..{kind.maximum}"
    if isinstance(kind, Bool):
        return "bool"
    if isinstance(kind, Nested):
        return _rule(kind.cls)
    if isinstance(kind, ListOf):
        return f"[{kind.min_items}*{kind.max_items} {_type(kind.inner)}]"
    raise TypeError(f"no CDDL for {type(kind).__name__}")


def _note(cls: type[Message], name: str) -> str:
    note = NOTES.get(f"{cls.__name__}.{name}") or NOTES.get(name)
    if note is None:
        raise KeyError(f"{cls.__name__}.{name} has no note in protocol.messages.cddl.NOTES")
    return note


def _message(cls: type[Message], *, versioned: bool) -> list[str]:
    lines = [f"{_rule(cls)} = {{"]
    if versioned:
        lines.append(f"  v: {VERSION},")
    fields = dataclasses.fields(cls)
    for i, f in enumerate(fields):
        kind = f.metadata["kind"]
        optional = isinstance(kind, Optional)
        entry = f"  {'? ' if optional else ''}{f.name}: {_type(kind.inner if optional else kind)}"
        comma = "," if i < len(fields) - 1 else ""
        lines.append(f"{entry}{comma}".ljust(48) + f" ; {_note(cls, f.name)}")
    lines.append("}")
    return lines


def _nested(groups: tuple[tuple[str, tuple[type[Message], ...]], ...]) -> set[type[Message]]:
    """Messages carried inside another (without their own ``v``)."""
    found: set[type[Message]] = set()
    for _, group in groups:
        for cls in group:
            for f in dataclasses.fields(cls):
                kind = f.metadata["kind"]
                while isinstance(kind, (ListOf, Optional)):
                    kind = kind.inner
                if isinstance(kind, Nested):
                    found.add(kind.cls)
    return found


def render(groups: tuple[tuple[str, tuple[type[Message], ...]], ...] = MESSAGES, *,
           inside: frozenset[type[Message]] = frozenset()) -> str:
    """The CDDL of ``groups`` (every served message by default), as the Markdown that
    docs/PROTOCOL.md carries; ``inside`` adds messages to be carried inside another."""
    nested = _nested(groups) | inside
    out = ["```cddl",
           "; A name: 1 to N characters of [a-z0-9-_.].",
           *(f'name{n} = tstr .regexp "[a-z0-9_.-]{{1,{n}}}"' for n in (32,)),
           "```"]
    for title, group in groups:
        out += ["", f"**{title}**", "", "```cddl"]
        for cls in group:
            carried = " (carried inside another message: no v)" if cls in nested else ""
            out.append(f"; {cls.__name__}: at most {cls.MAX_SIZE:,} bytes{carried}")
            out += _message(cls, versioned=cls not in nested)
            out.append("")
        out[-1] = "```"
    return "\n".join(out) + "\n"
