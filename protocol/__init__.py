"""The m2mpay protocol core: sans-I/O, deterministic, typed.

Modules: :mod:`~m2mpay.protocol.errors` (the error hierarchy and wire codes), :mod:`~m2mpay.protocol.cbor`
(strict deterministic CBOR), :mod:`~m2mpay.protocol.hashchain` (hash chains and their traversal),
:mod:`~m2mpay.protocol.blindrsa` (RFC 9474 blind signatures), :mod:`~m2mpay.protocol.sealing` (HPKE),
:mod:`~m2mpay.protocol.cose` (COSE_Sign1), :mod:`~m2mpay.protocol.messages` (every message), and
:mod:`~m2mpay.protocol.rules` (the bank's, vendor's and wallet's rules as pure state machines).

Nothing here opens a socket, reads a clock or sleeps: time and randomness are passed in.
"""

__version__ = "0.1.0"
