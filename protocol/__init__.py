"""The m2mpay protocol core: sans-I/O, deterministic, typed.

Modules: :mod:`~protocol.errors` (the error hierarchy and wire codes), :mod:`~protocol.cbor`
(strict deterministic CBOR), :mod:`~protocol.hashchain` (hash chains and their traversal),
:mod:`~protocol.blindrsa` (RFC 9474 blind signatures), :mod:`~protocol.sealing` (HPKE),
:mod:`~protocol.cose` (COSE_Sign1), :mod:`~protocol.messages` (every message), and
:mod:`~protocol.rules` (the bank's, vendor's and wallet's rules as pure state machines).

Nothing here opens a socket, reads a clock or sleeps: time and randomness are passed in.
"""

__version__ = "0.1.0"
