"""Field kinds shared by many messages: one definition of each bound."""

from __future__ import annotations

from ._schema import Bytes, Text, UInt

__all__ = [
    "AMOUNT",
    "COSE_BLOB",
    "IDENT",
    "MAX_TOKENS",
    "NONCE",
    "POSITION",
    "REQ_ID",
    "RSA_SIG",
    "SESSION_ID",
    "TIME",
    "TOKEN",
]

MAX_TOKENS = 1 << 16
"""Largest chain length a keyset may have.

Checking a token at position ``i`` against a coin last seen at ``j`` costs ``j - i`` hashes, on
the bank's event loop and inside its database lock: the cap bounds one settlement to 65,536
SHA-256 (about 30 ms here). The traversal itself is measured up to 2^20."""

TOKEN = Bytes(size=32)
NONCE = Bytes(size=16)
REQ_ID = Bytes(size=16)
SESSION_ID = Bytes(size=16)
IDENT = Text(32, ident=True)
TIME = UInt(1 << 40)
POSITION = UInt(MAX_TOKENS)
AMOUNT = UInt(1 << 53)
RSA_SIG = Bytes(256, 512)
COSE_BLOB = Bytes(64, 2048)
