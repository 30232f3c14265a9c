"""An in-memory m2mpay world: a bank, vendors and wallets built from the pure core only.

``MemoryBank`` is what the bank agent does minus the database and MQTT: decode the signed
request, remember answers by ``(signer, req_id)``, run the rules, book credits, sign the answer.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from m2mpay.protocol import blindrsa, cose, envelope, hashchain
from m2mpay.protocol.certificates import (
    ca_fingerprint,
    issue_certificate,
    issue_delegation,
    sign_announcement,
    verify_announcement,
)
from m2mpay.protocol.errors import RemoteProtocolError
from m2mpay.protocol.messages import (
    OPS,
    BlockAnswer,
    CertificateBody,
    ErrorAnswer,
    KeyDelegation,
    KeysAnnouncement,
    KeysetInfo,
    Message,
    SettleAnswer,
    SettleRequest,
    StatusAnswer,
    StatusRequest,
    WithdrawAnswer,
    WithdrawRequest,
    keyset_id,
)
from m2mpay.protocol.rules import bank as rules
from m2mpay.protocol.rules.keyring import Keyring
from m2mpay.protocol.rules.requests import BlockWindow, verify_block, verify_signed

NOW = 1_800_000_000
BANK = "bank-a"


def det_rng(seed: int) -> Callable[[int], bytes]:
    """A deterministic RNG callable for reproducible tests."""
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


@dataclass
class Keyset:
    info: KeysetInfo
    signer: blindrsa.BlindSigner
    public: blindrsa.PublicKey


def make_keyset(private: rsa.RSAPrivateKey, value: int, n: int, *, withdraw_until: int = NOW + 86400 * 30,
                spend_until: int = NOW + 86400 * 60) -> Keyset:
    public = blindrsa.PublicKey.from_cryptography(private.public_key())
    der = public.to_der()
    info = KeysetInfo(id=keyset_id(value, n, "EUR", withdraw_until, spend_until, der), value=value, n=n,
                      currency="EUR", withdraw_until=withdraw_until, spend_until=spend_until, public_key=der)
    return Keyset(info=info, signer=blindrsa.BlindSigner.from_private_key(private), public=public)


@dataclass
class Vendor:
    name: str
    account: str
    key: Ed25519PrivateKey
    cert: bytes

    @property
    def cert_hash(self) -> bytes:
        return hashlib.sha256(self.cert).digest()

    def sign(self, message: Message, op: str) -> bytes:
        return envelope.sign_request(message, self.key, self.name, BANK, op)


@dataclass
class MemoryBank:
    """The bank's behaviour over dicts instead of a database."""

    keysets: dict[str, Keyset]
    ca: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    online: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)  # signs the announcement
    answer_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    sealing: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    window: BlockWindow = field(default_factory=BlockWindow)
    coins: dict[bytes, rules.CoinRecord] = field(default_factory=dict)
    balances: dict[str, int] = field(default_factory=dict)
    account_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    vendor_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    answers: dict[tuple[str, bytes], envelope.StoredAnswer] = field(default_factory=dict)
    credits: list[rules.Credit] = field(default_factory=list)
    withdrawn: int = 0
    sessions: int = 0

    def announcement(self) -> bytes:
        delegation = issue_delegation(KeyDelegation(
            bank=BANK, key=cose.public_key_bytes(self.online.public_key()), purpose="announce", nbf=NOW - 3600,
            exp=NOW + 365 * 86400), self.ca)
        ann = KeysAnnouncement(
            bank=BANK, issued=NOW, ca_key=cose.public_key_bytes(self.ca.public_key()), delegation=delegation,
            answer_key=cose.public_key_bytes(self.answer_key.public_key()),
            sealing_key=self.sealing.public_key().public_bytes_raw(),
            keysets=tuple(k.info for k in self.keysets.values()), revoked=())
        return sign_announcement(ann, self.online)

    @property
    def fingerprint(self) -> str:
        return ca_fingerprint(cose.public_key_bytes(self.ca.public_key()))

    def keyring(self) -> Keyring:
        return Keyring.from_announcement(verify_announcement(self.announcement(), self.fingerprint, NOW))

    def open_account(self, name: str, balance: int) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        self.account_keys[name], self.balances[name] = key.public_key(), balance
        return key

    def enroll(self, name: str, category: str, *, nbf: int = NOW - 10, exp: int = NOW + 86400) -> Vendor:
        key = Ed25519PrivateKey.generate()
        body = CertificateBody(bank=BANK, vendor=name, account=f"acct-{name}", name=name.title(),
                               category=category, key=cose.public_key_bytes(key.public_key()), nbf=nbf, exp=exp)
        self.vendor_keys[name] = key.public_key()
        self.balances[body.account] = 0
        return Vendor(name=name, account=body.account, key=key, cert=issue_certificate(body, self.ca))

    # --- the request path -------------------------------------------------------------------
    def handle(self, op: str, data: bytes, now: int = NOW) -> bytes:
        """Answer one signed request, as bytes signed by the bank; never raises for bad input."""
        req_id = None
        try:
            signed = cose.decode_sign1(data, max_size=OPS[op][0].MAX_SIZE)
            request = OPS[op][0].decode(signed.payload)
            req_id = getattr(request, "req_id", None)
            key = (signed.kid.decode("ascii", "replace"), req_id)
            digest = envelope.request_digest(data)
            stored = envelope.check_replay(self.answers.get(key), digest)  # type: ignore[arg-type]
            if stored is not None:
                return stored
            answer = self._dispatch(op, signed, request, now)
            encoded = envelope.sign_answer(answer, self.answer_key, BANK, op, request_digest=digest)
            self.answers[key] = envelope.StoredAnswer(digest, encoded)  # type: ignore[index]
            return encoded
        except RemoteProtocolError as exc:
            error = ErrorAnswer(code=exc.code.wire, message=exc.message[:200], req_id=req_id)
            return envelope.sign_answer(error, self.answer_key, BANK, op, request_digest=envelope.request_digest(data))

    def _dispatch(self, op: str, signed: cose.Sign1, request: Message, now: int) -> Message:
        keyring = self.keyring()
        if op == "withdraw":
            assert isinstance(request, WithdrawRequest)
            signer = verify_signed(signed, BANK, op, self.account_keys.get)
            if signer != request.account:
                raise RemoteProtocolError("signed by another account")
            ks = self.keysets[keyring.withdrawable(request.keyset, now).id]
            balance = rules.apply_withdraw(self.balances[signer], ks.info, len(request.blinded))
            sigs = tuple(ks.signer.sign(m) for m in request.blinded)
            self.balances[signer] = balance
            self.withdrawn += ks.info.value * len(sigs)
            return WithdrawAnswer(req_id=request.req_id, keyset=ks.info.id, blind_sigs=sigs, balance=balance)
        if op == "block":
            intent = verify_block(signed, keyring, self.sealing, now, self.window)
            self.sessions += 1
            session = hashlib.sha256(b"session%d" % self.sessions).digest()[:16]
            outcome = rules.apply_block(self.coins.get(intent.auth.tip), keyset=intent.keyset, auth=intent.auth,
                                        vendor=intent.cert.vendor, account=intent.cert.account,
                                        session=session, now=now)
            self._commit(outcome)
            rec = outcome.record
            return BlockAnswer(req_id=intent.request.req_id, session=session, tip=rec.tip, start=rec.start,
                               position=rec.position, last=rec.last, remaining=rec.position * rec.token_value,
                               deadline=rec.deadline)
        if op == "settle":
            assert isinstance(request, SettleRequest)
            vendor = verify_signed(signed, BANK, op, self.vendor_keys.get)
            outcome = rules.apply_settle(self.coins.get(request.tip), vendor=vendor, session=request.session,
                                         index=request.index, token=request.token,
                                         keep_open=request.keep_open, now=now)
            self._commit(outcome)
            rec = outcome.record
            return SettleAnswer(req_id=request.req_id, session=request.session,
                                credited=sum(c.amount for c in outcome.credits if c.session == request.session),
                                position=rec.position, spent=rec.spent,
                                open=rec.status is rules.BlockStatus.OPEN)
        if op == "status":
            assert isinstance(request, StatusRequest)
            vendor = verify_signed(signed, BANK, op, self.vendor_keys.get)
            found = self.coins.get(request.tip)
            if found is not None:
                lapsed = rules.apply_lapse(found, now)
                self._commit(lapsed)
                found = lapsed.record
            if found is not None and found.vendor != vendor:
                found = None  # as the bank: a vendor learns only about coins it blocked last
            state = rules.coin_state(found, now)
            return StatusAnswer(req_id=request.req_id, tip=request.tip, known=found is not None,
                                position=None if found is None else found.position, spent=state == "spent",
                                blocked_until=found.deadline if found and state == "blocked" else None,
                                session=found.session if found is not None else None)
        raise AssertionError(op)

    def _commit(self, outcome: rules.Outcome) -> None:
        self.coins[outcome.record.tip] = outcome.record
        for credit in outcome.credits:
            self.balances[credit.account] += credit.amount
            self.credits.append(credit)

    def sweep(self, now: int) -> None:
        """The periodic lapse sweep."""
        for record in list(self.coins.values()):
            self._commit(rules.apply_lapse(record, now))

    def audit(self) -> None:
        """Money conserved, no coin over-credited, every last token hashes up to its tip."""
        assert sum(c.amount for c in self.credits) <= self.withdrawn
        for rec in self.coins.values():
            assert 0 <= rec.credited <= rec.n
            assert rec.credited * rec.token_value == sum(c.amount for c in self.credits if c.tip == rec.tip)
            assert hashchain.iterate(rec.last, rec.n - rec.position) == rec.tip
