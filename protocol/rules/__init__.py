"""The bank's, vendor's and wallet's rules as pure state machines.

Inputs include the current time; outputs are decisions and new state, never I/O.
"""
