"""Exchange rules: value conserved exactly, every refusal with its code, and exactly one of an
exchange and a concurrent block wins."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2mpay.protocol import blindrsa, hashchain, seed
from m2mpay.protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from m2mpay.protocol.messages import Authorization, Coin, KeysetInfo, coin_message, keyset_id
from m2mpay.protocol.messages.exchange import ExchangeAnswer, ExchangeProof, ExchangeRequest, KeysetPhase, Output
from m2mpay.protocol.rules import bank
from m2mpay.protocol.rules import exchange as rules
from m2mpay.protocol.rules.keyring import COIN_VARIANT, Keyring

NOW = 1_800_000_000
DAY = 86400
WALLET = seed.WalletSeed(bytes(range(16)))


@dataclasses.dataclass
class Bank:
    keyring: Keyring
    signers: dict[str, blindrsa.BlindSigner]
    old: KeysetInfo
    """The coins' keyset: 100 tokens of 1 cent; not a power of two."""
    family: dict[int, KeysetInfo]
    """Current keysets by coin value: 1, 2, 4, ..., 64 tokens of 1 cent."""


def _keyset(private: rsa.RSAPrivateKey, value: int, n: int, currency: str = "EUR",
            withdraw_until: int = NOW + 30 * DAY, spend_until: int = NOW + 60 * DAY) -> KeysetInfo:
    der = blindrsa.PublicKey.from_cryptography(private.public_key()).to_der()
    return KeysetInfo(id=keyset_id(value, n, currency, withdraw_until, spend_until, der), value=value, n=n,
                      currency=currency, withdraw_until=withdraw_until, spend_until=spend_until, public_key=der)


@pytest.fixture(scope="module")
def world() -> Bank:
    # Two RSA keys for nine keysets: a deployment gives every keyset its own key; the rules only
    # look a key up by keyset id, and two keys keep the tests quick.
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]
    old = _keyset(keys[0], 100, 100, withdraw_until=NOW + 5 * DAY, spend_until=NOW + 10 * DAY)
    family = {1 << i: _keyset(keys[1], 1 << i, 1 << i) for i in range(7)}
    dollars = _keyset(keys[1], 4, 4, currency="USD")
    infos = [old, dollars, *family.values()]
    signers = {k.id: blindrsa.BlindSigner.from_private_key(keys[0] if k is old else keys[1]) for k in infos}
    keyring = Keyring(
        bank="bank-a", ca_key=Ed25519PrivateKey.generate().public_key(),
        answer_key=Ed25519PrivateKey.generate().public_key(),
        sealing_key=X25519PrivateKey.generate().public_key(),
        keysets={k.id: k for k in infos}, rsa_keys={k.id: signers[k.id].public_key for k in infos})
    return Bank(keyring=keyring, signers=signers, old=old, family=family)


@dataclasses.dataclass
class Held:
    coin: Coin
    secret: bytes


def _coin(world: Bank, counter: int = 0) -> Held:
    info = world.old
    public = world.keyring.rsa_keys[info.id]
    derived = seed.derive_coin(WALLET, info, public, counter)
    sig = blindrsa.finalize(public, derived.input_msg, world.signers[info.id].sign(derived.blinded), derived.inv,
                            COIN_VARIANT)
    return Held(Coin(keyset=info.id, tip=derived.tip, prefix=derived.prefix, sig=sig), derived.secret)


def _derived(world: Bank, infos: tuple[KeysetInfo, ...], start: int) -> list[seed.DerivedCoin]:
    return [seed.derive_coin(WALLET, k, world.keyring.rsa_keys[k.id], start + i) for i, k in enumerate(infos)]


def _outputs(world: Bank, infos: tuple[KeysetInfo, ...], start: int) -> tuple[Output, ...]:
    return tuple(Output(keyset=d.keyset, blinded=d.blinded) for d in _derived(world, infos, start))


def _request(held: Held, outputs: tuple[Output, ...], change: tuple[Output, ...] = (),
             token: bytes | None = None) -> tuple[ExchangeRequest, ExchangeProof]:
    request = ExchangeRequest(coin=held.coin, sealed=bytes(80), outputs=outputs, change=change,
                              req_id=hashlib.sha256(held.coin.tip).digest()[:16])
    proof = ExchangeProof(tip=held.coin.tip, token=held.secret if token is None else token,
                          outputs=request.digest, req_id=request.req_id)
    return request, proof


def _at(world: Bank, held: Held, position: int) -> bank.CoinRecord:
    """The bank's record of ``held`` after ``100 - position`` tokens were settled."""
    fresh = bank.CoinRecord.register(held.coin.tip, world.old)
    return dataclasses.replace(fresh, position=position, last=hashchain.iterate(held.secret, position), start=position)


def _exchange(world: Bank, record: bank.CoinRecord | None, request: ExchangeRequest, proof: ExchangeProof, *,
              phases: dict[str, KeysetPhase] | None = None, signed: frozenset[bytes] = frozenset(),
              now: int = NOW) -> rules.ExchangeOutcome:
    return rules.apply_exchange(record, request=request, proof=proof, keyring=world.keyring, phases=phases or {},
                                signed_before=signed, now=now)


def _code(world: Bank, record: bank.CoinRecord | None, request: ExchangeRequest, proof: ExchangeProof,
          **kwargs: object) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as caught:
        _exchange(world, record, request, proof, **kwargs)  # type: ignore[arg-type]
    return caught.value.code


def _value(world: Bank, outputs: tuple[Output, ...]) -> int:
    return sum(world.keyring.keysets[o.keyset].value for o in outputs)


def test_fresh_coin_exchanged_whole_into_powers_of_two(world: Bank) -> None:
    held = _coin(world)
    plan = rules.decompose(100, world.family.values())
    assert [k.value for k in plan] == [64, 32, 4]
    request, proof = _request(held, _outputs(world, plan, 0))
    outcome = _exchange(world, None, request, proof)
    assert (outcome.tokens, outcome.value, outcome.change_used, outcome.credits) == (100, 100, (), ())
    assert outcome.sign == request.outputs
    assert outcome.record.position == 0 and outcome.record.spent and outcome.record.last == held.secret


def test_full_round_trip_signs_finalizes_and_conserves(world: Bank) -> None:
    """Wallet believes 35 tokens left, the bank saw 37 (two written ahead never left): change."""
    held = _coin(world, 1)
    slots = rules.change_slots(1, 7, world.family.values())
    assert [k.value for k in slots] == [1, 2, 4]
    derived = _derived(world, rules.decompose(35, world.family.values()), 10) + _derived(world, slots, 20)
    outputs = tuple(Output(keyset=d.keyset, blinded=d.blinded) for d in derived)
    request, proof = _request(held, outputs[:-3], outputs[-3:])
    outcome = _exchange(world, _at(world, held, 37), request, proof)
    assert (outcome.tokens, outcome.value, outcome.change_used) == (37, 37, (1,))
    sigs = [world.signers[o.keyset].sign(o.blinded) for o in outcome.sign]
    answer = ExchangeAnswer.decode(outcome.answer(request.req_id, sigs).encode())
    pairs = rules.check_answer(request, answer, 1, world.keyring.keysets)
    assert _value(world, tuple(o for o, _ in pairs)) == 37
    by_blinded = {d.blinded: d for d in derived}
    for out, blind_sig in pairs:
        coin = by_blinded[out.blinded]
        public = world.keyring.rsa_keys[out.keyset]
        sig = blindrsa.finalize(public, coin.input_msg, blind_sig, coin.inv, COIN_VARIANT)
        assert coin.input_msg == coin.prefix + coin_message(out.keyset, coin.tip)
        assert blindrsa.is_valid(public, coin.input_msg, sig, COIN_VARIANT)


def test_wallet_refuses_answer_that_skims_change(world: Bank) -> None:
    held = _coin(world, 2)
    outputs = _outputs(world, rules.decompose(30, world.family.values()), 30)
    request, proof = _request(held, outputs, _outputs(world, rules.change_slots(1, 7, world.family.values()), 40))
    outcome = _exchange(world, _at(world, held, 36), request, proof)
    assert outcome.change_used == (1, 2)
    sigs = [world.signers[o.keyset].sign(o.blinded) for o in outcome.sign]
    honest = outcome.answer(request.req_id, sigs)
    skimmed = dataclasses.replace(honest, change_used=(2,), change_sigs=honest.change_sigs[1:])
    with pytest.raises(RemoteProtocolError) as caught:
        rules.check_answer(request, skimmed, 1, world.keyring.keysets)
    assert caught.value.code is ErrorCode.VALUE_MISMATCH
    lied = dataclasses.replace(honest, position=35)  # claims fewer tokens than it took
    with pytest.raises(RemoteProtocolError) as caught:
        rules.check_answer(request, lied, 1, world.keyring.keysets)
    assert caught.value.code is ErrorCode.VALUE_MISMATCH


def test_value_refusals(world: Bank) -> None:
    held = _coin(world, 3)
    over, proof = _request(held, _outputs(world, rules.decompose(40, world.family.values()), 50))
    assert _code(world, _at(world, held, 37), over, proof) is ErrorCode.VALUE_MISMATCH
    short, proof = _request(held, _outputs(world, rules.decompose(36, world.family.values()), 50))
    assert _code(world, _at(world, held, 37), short, proof) is ErrorCode.VALUE_MISMATCH
    dollars = next(k for k in world.keyring.keysets.values() if k.currency == "USD")
    foreign, proof = _request(held, _outputs(world, (dollars,), 60))
    assert _code(world, _at(world, held, 4), foreign, proof) is ErrorCode.VALUE_MISMATCH


def test_state_refusals(world: Bank) -> None:
    held = _coin(world, 4)
    request, proof = _request(held, _outputs(world, rules.decompose(37, world.family.values()), 70))
    record = _at(world, held, 37)
    blocked = dataclasses.replace(record, status=bank.BlockStatus.OPEN, deadline=NOW + 60, session=bytes(16),
                                  vendor="v", account="va", position=36, last=hashchain.iterate(held.secret, 36))
    assert _code(world, blocked, request, proof) is ErrorCode.COIN_BLOCKED
    spent = dataclasses.replace(record, position=0, last=held.secret, start=0)
    assert _code(world, spent, request, proof) is ErrorCode.COIN_SPENT
    wrong, proof_wrong = _request(held, request.outputs, token=hashchain.h(held.secret))  # H^1(S), not H^0(S)
    assert _code(world, record, wrong, proof_wrong) is ErrorCode.CHAIN_MISMATCH


def test_lapsed_block_is_credited_then_exchanged(world: Bank) -> None:
    held = _coin(world, 5)
    record = dataclasses.replace(_at(world, held, 40), status=bank.BlockStatus.OPEN, deadline=NOW - 1,
                                 session=bytes(16), vendor="v", account="va", position=37,
                                 last=hashchain.iterate(held.secret, 37))
    request, proof = _request(held, _outputs(world, rules.decompose(37, world.family.values()), 80))
    outcome = _exchange(world, record, request, proof)
    assert [(c.vendor, c.tokens, c.amount, c.reason) for c in outcome.credits] == [("v", 3, 3, "lapse")]
    assert outcome.value == 37
    # The vendor's late settlement finds the coin gone: exactly one of them has the tokens.
    with pytest.raises(RemoteProtocolError) as caught:
        bank.apply_settle(outcome.record, vendor="v", session=bytes(16), index=30,
                          token=hashchain.iterate(held.secret, 30), keep_open=False, now=NOW)
    assert caught.value.code is ErrorCode.SESSION_CLOSED


def test_proof_must_be_for_this_request(world: Bank) -> None:
    held = _coin(world, 6)
    request, proof = _request(held, _outputs(world, rules.decompose(100, world.family.values()), 90))
    swapped = dataclasses.replace(request, outputs=_outputs(world, rules.decompose(100, world.family.values()), 95))
    assert _code(world, None, swapped, proof) is ErrorCode.BAD_SIGNATURE
    assert _code(world, None, request, dataclasses.replace(proof, req_id=bytes(16))) is ErrorCode.BAD_SIGNATURE
    assert _code(world, None, request, dataclasses.replace(proof, tip=bytes(32))) is ErrorCode.BAD_SIGNATURE


def test_coin_and_keyset_refusals(world: Bank) -> None:
    held = _coin(world, 7)
    outputs = _outputs(world, rules.decompose(100, world.family.values()), 100)
    forged = Held(dataclasses.replace(held.coin, sig=bytes([1]) + held.coin.sig[1:]), held.secret)
    assert _code(world, None, *_request(forged, outputs)) is ErrorCode.BAD_SIGNATURE
    unknown = Held(dataclasses.replace(held.coin, keyset="ks-unknown"), held.secret)
    assert _code(world, None, *_request(unknown, outputs)) is ErrorCode.UNKNOWN_KEYSET
    elsewhere = dataclasses.replace(_at(world, held, 100), keyset=world.family[64].id)
    assert _code(world, elsewhere, *_request(held, outputs)) is ErrorCode.BAD_REQUEST
    request, proof = _request(held, outputs)
    # Past spend_until the coin's keyset is exchange-only: exchanges go on; past redeem_until, closed.
    old = world.old
    record = rules.retire(old, None, NOW - DAY)
    assert _exchange(world, None, request, proof, phases={old.id: record}, now=old.spend_until + 1).value == 100
    assert _code(world, None, request, proof, phases={old.id: record},
                 now=record.redeem_until + 1) is ErrorCode.KEYSET_EXPIRED
    assert _code(world, None, request, proof, now=old.spend_until + 1) is ErrorCode.KEYSET_EXPIRED  # no record
    # Outputs only in a keyset that issues: a retired one does not.
    k64 = world.family[64]
    assert _code(world, None, request, proof, phases={k64.id: rules.retire(k64, None, NOW - 1)}) is (
        ErrorCode.KEYSET_EXPIRED)


def test_blinded_message_refusals(world: Bank) -> None:
    held = _coin(world, 8)
    request, proof = _request(held, _outputs(world, rules.decompose(100, world.family.values()), 110))
    assert _code(world, None, request, proof, signed=frozenset({request.outputs[1].blinded})) is ErrorCode.REPLAY
    n = world.keyring.rsa_keys[world.family[64].id].n
    for blinded in (n.to_bytes(256, "big"), b"\x01" * 300):
        bad = (Output(keyset=world.family[64].id, blinded=blinded), *request.outputs[1:])
        assert _code(world, None, *_request(held, bad)) is ErrorCode.BAD_REQUEST


def _authorization(held: Held, index: int) -> Authorization:
    return Authorization(tip=held.coin.tip, index=index, token=hashchain.iterate(held.secret, index),
                         deadline=NOW + 60, cert=bytes(32), nonce=bytes(16))


def test_exchange_and_block_exactly_one_wins(world: Bank) -> None:
    """Both lock the coin's row; whichever runs second sees the first's record and is refused."""
    held = _coin(world, 9)
    record = _at(world, held, 37)
    request, proof = _request(held, _outputs(world, rules.decompose(37, world.family.values()), 120))
    blocked = bank.apply_block(record, keyset=world.old, auth=_authorization(held, 36), vendor="v", account="va",
                               session=bytes(16), now=NOW)
    assert _code(world, blocked.record, request, proof) is ErrorCode.COIN_BLOCKED
    exchanged = _exchange(world, record, request, proof)
    with pytest.raises(RemoteProtocolError) as caught:
        bank.apply_block(exchanged.record, keyset=world.old, auth=_authorization(held, 36), vendor="v",
                         account="va", session=bytes(16), now=NOW)
    assert caught.value.code is ErrorCode.COIN_SPENT
    assert _code(world, exchanged.record, request, proof) is ErrorCode.COIN_SPENT  # and never twice


def test_retry_gets_the_stored_answer_and_nothing_else(world: Bank) -> None:
    stored = rules.StoredExchange(req_id=b"r" * 16, request_hash=hashlib.sha256(b"request").digest(), answer=b"answer")
    assert rules.stored_answer(None, b"request", b"r" * 16) is None
    assert rules.stored_answer(stored, b"request", b"r" * 16) == b"answer"
    for req_id, code in ((b"r" * 16, ErrorCode.REPLAY), (b"s" * 16, ErrorCode.COIN_SPENT)):
        with pytest.raises(RemoteProtocolError) as caught:
            rules.stored_answer(stored, b"other request", req_id)
        assert caught.value.code is code


# --- decomposition and change: properties ---------------------------------------------------

def _fake(value: int, n: int, currency: str = "EUR", spend_until: int = 10) -> KeysetInfo:
    key = hashlib.sha256(f"{value}/{n}".encode()).digest() * 7
    return KeysetInfo(id=keyset_id(value, n, currency, 0, spend_until, key), value=value, n=n, currency=currency,
                      withdraw_until=0, spend_until=spend_until, public_key=key)


@settings(max_examples=300)
@given(token_value=st.integers(1, 1000), powers=st.sets(st.integers(1, 16), max_size=16),
       tokens=st.integers(1, (1 << 17) - 1))
def test_decomposition_conserves_value_exactly(token_value: int, powers: set[int], tokens: int) -> None:
    offered = [_fake(token_value << p, 1 << p) for p in {0, *powers}]
    plan = rules.decompose(tokens * token_value, offered, max_outputs=1 << 17)
    assert sum(k.value for k in plan) == tokens * token_value
    assert all(k.n & (k.n - 1) == 0 for k in plan)
    if {0, *powers} == set(range(17)):
        assert len(plan) == (tokens >> 16) + bin(tokens & 0xFFFF).count("1")  # binary: the fewest


def test_decomposition_with_every_power_fits_any_coin_in_17_outputs() -> None:
    offered = [_fake(3 << p, 1 << p) for p in range(17)]
    for tokens in (1, 2, 3, 65535, 65536, 12345):
        plan = rules.decompose(3 * tokens, offered)
        assert sum(k.value for k in plan) == 3 * tokens and len(plan) <= 17


def test_decomposition_refusals() -> None:
    offered = [_fake(2, 1), _fake(4, 2)]  # token value 2 only
    with pytest.raises(ProtocolError) as caught:
        rules.decompose(3, offered)
    assert caught.value.code is ErrorCode.VALUE_MISMATCH
    with pytest.raises(ProtocolError):
        rules.decompose(200, [_fake(2, 1)], max_outputs=64)  # 100 coins: too many
    assert [k.value for k in rules.decompose(12, [_fake(2, 1), _fake(4, 2), _fake(3, 1), _fake(12, 4)])] == [12]
    with pytest.raises(ProtocolError):
        rules.decompose(0, offered)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.sampled_from([1, 2, 4, 8, 16, 32]), max_size=17), gap=st.integers(0, 200))
def test_plan_change_is_exact_or_refused(values: list[int], gap: int) -> None:
    try:
        used = rules.plan_change(gap, values)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.VALUE_MISMATCH
        # Powers of two: greedy misses no exact subset, so none exists.
        sums = {0}
        for v in values:
            sums |= {s + v for s in sums}
        assert gap not in sums
        return
    assert sum(values[i] for i in used) == gap and list(used) == sorted(set(used))


@settings(max_examples=60, deadline=None)
@given(position=st.integers(1, 100), gap=st.integers(0, 63), data=st.data())
def test_exchange_conserves_value(world: Bank, position: int, gap: int, data: st.DataObject) -> None:
    """Whatever the wallet believes (``position - gap`` tokens left), the signed outputs are worth
    exactly what the bank's record says is left: no more, no less."""
    held = _coin(world, 200)
    believed = max(position - gap, 0)
    plan = rules.decompose(believed, world.family.values()) if believed else ()
    slots = rules.change_slots(1, 63, world.family.values())
    blinded = iter(i.to_bytes(256, "big") for i in range(1, 100))
    request, proof = _request(held, tuple(Output(keyset=k.id, blinded=next(blinded)) for k in plan),
                              tuple(Output(keyset=k.id, blinded=next(blinded)) for k in slots))
    outcome = _exchange(world, _at(world, held, position), request, proof)
    assert outcome.value == position == _value(world, outcome.sign)
    assert outcome.sign[:len(plan)] == request.outputs
    assert outcome.record.position == 0 and outcome.record.credited == 0

