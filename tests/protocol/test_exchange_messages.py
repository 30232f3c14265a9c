"""Lifecycle messages: they round-trip, refuse bad peer data with our errors only, seal apart
from block authorizations, and docs/LIFECYCLE.md carries their CDDL as the code renders it.

To bring the document up to date after changing a message:
``M2MPAY_WRITE_DOCS=1 .venv/bin/python -m pytest tests/protocol/test_exchange_messages.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2mpay.protocol import cbor, sealing
from m2mpay.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from m2mpay.protocol.messages import Coin, Message, cddl
from m2mpay.protocol.messages import exchange as msgs
from m2mpay.protocol.messages.exchange import (
    ExchangeAnswer,
    ExchangeProof,
    ExchangeRequest,
    KeysetPhase,
    Output,
    RestoreAnswer,
    RestoreRequest,
)

from .strategies import for_message

ALL: list[type[Message]] = [cls for _, group in cddl.MESSAGES + cddl.LIFECYCLE for cls in group
                            if cls.__module__ == msgs.__name__]  # restore's CDDL is in LIFECYCLE.md
DOC = Path(__file__).resolve().parents[2] / "docs" / "LIFECYCLE.md"
_SECTION = re.compile(r"(<!-- cddl:begin -->\n)(.*?)(<!-- cddl:end -->)", re.S)


def test_lifecycle_doc_cddl_section_is_generated_from_the_code() -> None:
    text = DOC.read_text()
    found = _SECTION.search(text)
    assert found is not None, "docs/LIFECYCLE.md has no <!-- cddl:begin --> ... <!-- cddl:end --> section"
    generated = cddl.render(cddl.LIFECYCLE)
    if os.environ.get("M2MPAY_WRITE_DOCS") == "1":
        DOC.write_text(text[:found.start(2)] + generated + text[found.end(2):])
        return
    assert found.group(2) == generated, "the CDDL in docs/LIFECYCLE.md differs from the messages"


def test_every_lifecycle_message_is_in_the_schema() -> None:
    # KeysetPhase is re-exported from the keys announcement's module, which carries it (served).
    public = {obj for name in msgs.__all__ if isinstance(obj := getattr(msgs, name), type)
              and issubclass(obj, Message) and obj.__module__ == msgs.__name__}
    assert public == set(ALL)


@st.composite
def _phase(draw: st.DrawFn) -> KeysetPhase:
    withdraw_until = draw(st.integers(0, 1 << 39))
    retired = draw(st.none() | st.integers(withdraw_until, 1 << 40))
    return KeysetPhase(keyset=draw(st.sampled_from(["ks-a", "ks-0123456789abcdef"])),
                       phase=draw(st.sampled_from(msgs.PHASES)), withdraw_until=withdraw_until,
                       redeem_until=draw(st.integers(withdraw_until, 1 << 40)), retired=retired)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
          deadline=None)
@given(data=st.data())
def test_round_trip(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(_phase() if cls is KeysetPhase else for_message(cls))
    encoded = msg.encode()
    assert cls.decode(encoded) == msg
    assert cbor.encode(cbor.decode(encoded, max_size=cls.MAX_SIZE)) == encoded


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@settings(max_examples=100, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(["v", "keyset", "phase", "blinded", "outputs", "change", "found",
                                            "req_id", "change_used", "x"]),
                           st.none() | st.booleans() | st.integers(-5, 2**70) | st.binary(max_size=40)
                           | st.text(max_size=5) | st.lists(st.integers(0, 70), max_size=3), max_size=6))
def test_random_maps_raise_only_protocol_errors(cls: type[Message], obj: dict[str, object]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        cls.decode(cbor.encode(obj))


def _out(i: int, keyset: str = "ks-a") -> dict[str, object]:
    return {"keyset": keyset, "blinded": i.to_bytes(256, "big")}


def _coin() -> dict[str, object]:
    return Coin(keyset="ks-a", tip=b"t" * 32, prefix=b"p" * 32, sig=b"s" * 256).to_obj(versioned=False)


def _exchange_obj(**changes: object) -> bytes:
    obj: dict[str, object] = {"v": 1, "coin": _coin(), "sealed": b"x" * 100, "outputs": [_out(1), _out(2)],
                              "change": [_out(3)], "req_id": b"r" * 16}
    obj.update(changes)
    return cbor.encode(obj)


@pytest.mark.parametrize(
    ("blob", "code"),
    [
        (_exchange_obj(outputs=[], change=[]), ErrorCode.BAD_REQUEST),
        (_exchange_obj(change=[_out(1)]), ErrorCode.BAD_REQUEST),  # a blinded message twice
        (_exchange_obj(outputs=[_out(i) for i in range(1, 66)]), ErrorCode.BAD_REQUEST),
        (_exchange_obj(change=[_out(i) for i in range(10, 28)]), ErrorCode.BAD_REQUEST),
        (_exchange_obj(outputs=[{"keyset": "ks-a", "blinded": b"short"}]), ErrorCode.BAD_REQUEST),
        (_exchange_obj(outputs=[{**_out(1), "v": 1}]), ErrorCode.BAD_REQUEST),
        (_exchange_obj(account="alice"), ErrorCode.BAD_REQUEST),  # no account: the coin authorizes
        (_exchange_obj(v=2), ErrorCode.UNSUPPORTED_VERSION),
        (b"\xa1" + b"\x00" * (64 * 1024), ErrorCode.TOO_LARGE),
    ],
    ids=["no-outputs", "duplicate-blinded", "too-many-outputs", "too-much-change", "short-blinded",
         "versioned-output", "account-field", "future-version", "oversize"],
)
def test_exchange_request_refusals(blob: bytes, code: ErrorCode) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        ExchangeRequest.decode(blob)
    assert caught.value.code is code
    good = ExchangeRequest.decode(_exchange_obj())
    assert [o.blinded[-1] for o in good.outputs + good.change] == [1, 2, 3]


def test_largest_exchange_fits_its_bound() -> None:
    """64 outputs and 17 change slots of RSA-4096 with the longest keyset ids: under 64 KiB."""
    ks = "k" * 32
    request = ExchangeRequest(
        coin=Coin(keyset=ks, tip=b"t" * 32, prefix=b"p" * 32, sig=b"s" * 512), sealed=b"x" * 512,
        outputs=tuple(Output(keyset=ks, blinded=i.to_bytes(512, "big")) for i in range(1, 65)),
        change=tuple(Output(keyset=ks, blinded=i.to_bytes(512, "big")) for i in range(100, 117)), req_id=b"r" * 16)
    size = len(request.encode())
    assert size < ExchangeRequest.MAX_SIZE
    assert ExchangeRequest.decode(request.encode()) == request
    answer = ExchangeAnswer(req_id=b"r" * 16, tip=b"t" * 32, position=65536, blind_sigs=(b"s" * 512,) * 64,
                            change_used=tuple(range(17)), change_sigs=(b"s" * 512,) * 17)
    assert len(answer.encode()) < ExchangeAnswer.MAX_SIZE


def test_answers_check_their_indexes() -> None:
    sig = b"s" * 256
    with pytest.raises(LocalProtocolError):
        ExchangeAnswer(req_id=b"r" * 16, tip=b"t" * 32, position=3, blind_sigs=(sig,), change_used=(1,),
                       change_sigs=())
    with pytest.raises(LocalProtocolError):
        ExchangeAnswer(req_id=b"r" * 16, tip=b"t" * 32, position=3, blind_sigs=(sig,), change_used=(2, 1),
                       change_sigs=(sig, sig))
    with pytest.raises(LocalProtocolError):
        ExchangeAnswer(req_id=b"r" * 16, tip=b"t" * 32, position=3, blind_sigs=(), change_used=(), change_sigs=())
    with pytest.raises(LocalProtocolError):
        RestoreAnswer(req_id=b"r" * 16, found=(0, 0), blind_sigs=(sig, sig))
    with pytest.raises(LocalProtocolError):
        RestoreRequest(blinded=(Output(keyset="ks-a", blinded=sig),) * 2, req_id=b"r" * 16)
    assert RestoreAnswer(req_id=b"r" * 16, found=(), blind_sigs=()).encode()  # none found is an answer


def test_keyset_phase_checks_itself() -> None:
    good = KeysetPhase(keyset="ks-a", phase="spend-only", withdraw_until=10, redeem_until=30, retired=10)
    assert KeysetPhase.decode(good.encode()) == good
    for bad in ({"phase": "paused"}, {"redeem_until": 9}, {"retired": 5}):
        fields = {"keyset": "ks-a", "phase": "spend-only", "withdraw_until": 10, "redeem_until": 30, "retired": 10}
        fields.update(bad)
        with pytest.raises(LocalProtocolError):
            KeysetPhase(**fields)  # type: ignore[arg-type]


def test_exchange_proof_sealed_apart_from_authorizations() -> None:
    key = X25519PrivateKey.generate()
    proof = ExchangeProof(tip=b"t" * 32, token=b"s" * 32, outputs=b"o" * 32, req_id=b"r" * 16)
    blob = sealing.seal(proof.encode(), key.public_key(), msgs.exchange_sealing_info("bank-a"))
    assert ExchangeProof.decode(sealing.open_sealed(blob, key, msgs.exchange_sealing_info("bank-a"))) == proof
    for info in (sealing.info_for_bank("bank-a"), msgs.exchange_sealing_info("bank-b")):
        with pytest.raises(RemoteProtocolError) as caught:
            sealing.open_sealed(blob, key, info)
        assert caught.value.code is ErrorCode.BAD_SIGNATURE
    assert msgs.exchange_sealing_info("bank-a") == b"m2mpay/exchange/1/bank-a"
    assert len(blob) <= sealing.MAX_SEALED


def test_digest_binds_outputs_and_their_order() -> None:
    a, b = Output(keyset="ks-a", blinded=b"\x01" * 256), Output(keyset="ks-a", blinded=b"\x02" * 256)
    digests = {msgs.outputs_digest((a, b), ()), msgs.outputs_digest((b, a), ()), msgs.outputs_digest((a,), (b,)),
               msgs.outputs_digest((), (a, b))}
    assert len(digests) == 4
