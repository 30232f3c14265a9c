"""Protocol-core benchmarks, each beside a baseline measured in the same run.

    m2mpay bench --only protocol   (or: python -m m2mpay.agents.bench.protocol) [--quick] [--json FILE]

- hash-chain traversal: stored values and worst hashes per token, n = 2^10 … 2^20;
- blind signatures/s beside OpenSSL's RSA-2048 PSS signatures/s (the ratio);
- HPKE opens/s and Ed25519 verifications/s (and COSE_Sign1 verifications/s around them).

This is not a test: it asserts nothing and prints figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from m2mpay.protocol import blindrsa, cose, hashchain, sealing
from m2mpay.protocol.rules.keyring import COIN_VARIANT


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    fn()
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(10):
            fn()
        count += 10
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def traversal(exponents: list[int]) -> list[dict[str, int]]:
    rows = []
    for e in exponents:
        n = 1 << e
        walker = hashchain.PebbleTraversal(os.urandom(32), n, n)
        max_stored, worst, before = walker.stored, 0, walker.hashes
        t0 = time.perf_counter()
        for _ in range(n):
            walker.next()
            worst = max(worst, walker.hashes - before)
            before = walker.hashes
            max_stored = max(max_stored, walker.stored)
        elapsed = time.perf_counter() - t0
        rows.append({"n": n, "stored_max": max_stored, "hashes_worst": worst,
                     "bound": math.ceil(e / 2), "tokens_per_s": int(n / elapsed)})
        print(f"  n=2^{e:<2}  stored ≤ {max_stored:2d}  worst hashes/token {worst:2d} "
              f"(bound ⌈log2 n / 2⌉ = {math.ceil(e / 2)})  {n / elapsed:,.0f} tokens/s")
    return rows


def signing(seconds: float) -> dict[str, float]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signer = blindrsa.BlindSigner.from_private_key(key)
    public = blindrsa.PublicKey.from_cryptography(key.public_key())
    _, msg = blindrsa.prepare(b"coin", COIN_VARIANT)
    blinded, _secret = blindrsa.blind(public, msg, COIN_VARIANT)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    openssl = rate(lambda: key.sign(b"coin", pss, hashes.SHA384()), seconds)
    ours = rate(lambda: signer.sign(blinded), seconds)
    print(f"  OpenSSL RSA-2048 PSS sign: {openssl:8,.0f}/s")
    print(f"  blind_sign (gmpy2 CRT):    {ours:8,.0f}/s   ratio {ours / openssl:.2f}× (goal ≥ 0.33×)")
    return {"openssl_sign_per_s": openssl, "blind_sign_per_s": ours, "ratio": ours / openssl}


def opening(seconds: float) -> dict[str, float]:
    sk = X25519PrivateKey.generate()
    info = sealing.info_for_bank("bank")
    blob = sealing.seal(os.urandom(150), sk.public_key(), info)
    ed = Ed25519PrivateKey.generate()
    msg = os.urandom(200)
    sig = ed.sign(msg)
    signed = cose.sign1(msg, ed, kid=b"vendor")
    pub = ed.public_key()
    result = {
        "hpke_open_per_s": rate(lambda: sealing.open_sealed(blob, sk, info), seconds),
        "ed25519_verify_per_s": rate(lambda: pub.verify(sig, msg), seconds),
        "cose_sign1_verify_per_s": rate(lambda: cose.verify_sign1(signed, pub), seconds),
    }
    for name, value in result.items():
        print(f"  {name:26s} {value:10,.0f}/s")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, n up to 2^14")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else 2.0
    exponents = list(range(10, 15 if args.quick else 21, 2))
    print("hash-chain traversal (PebbleTraversal, whole chain)")
    report: dict[str, object] = {"traversal": traversal(exponents)}
    print("blind signatures vs OpenSSL, one core")
    report["signing"] = signing(seconds)
    print("bank-side verification")
    report["verification"] = opening(seconds)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
