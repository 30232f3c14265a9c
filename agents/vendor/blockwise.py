"""Block-wise transfers (RFC 7959) for the vendor's resources, holding a bounded amount of state.

aiocoap assembles Block1 bodies and keeps Block2 answers in per-resource tables that grow with
every distinct request (a new Uri-Query or source port is a new entry) and that learn the body's
size only once it is complete. Our resources say they need no block-wise assembly and call
:meth:`Blocks.handle` instead, which:

- refuses a Block1 block with 4.13 (and Size1) as soon as its offset plus its size passes
  ``max_body``, or a Size1 announcing more, before keeping any of it;
- keeps a few transfers per peer (a new one replaces that peer's oldest) and a fixed number in
  total (beyond which a new upload gets 5.03, and a new answer replaces the oldest one kept);
- forgets a transfer when it completes or after ``transfer_lifetime`` idle seconds.

Continue (2.31) and Request Entity Incomplete (4.08) are RFC 7959's own answers and carry no body.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

import aiocoap
from aiocoap.blockwise import ContinueException, IncompleteException
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import BlockOption

from m2mpay.protocol.errors import ErrorCode

from .limits import CoapError, CoapLimits, peer_of

__all__ = ["Blocks"]

Render = Callable[[aiocoap.Message], Awaitable[aiocoap.Message]]
_LARGEST_SZX = 6  # 1024-byte blocks; 7 (BERT) exists only on reliable transports


@dataclass
class _Transfer:
    peer: str
    message: aiocoap.Message
    """Block1: the body received so far (in ``payload``); Block2: the whole answer."""
    expires: float


class _Table:
    """Transfers in progress, least recently used first, bounded per peer and in total."""

    def __init__(self, per_peer: int, total: int, lifetime: float, clock: Callable[[], float]) -> None:
        self._per_peer, self._total, self._lifetime, self._clock = per_peer, total, lifetime, clock
        self._items: OrderedDict[Hashable, _Transfer] = OrderedDict()
        self._peers: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size(self) -> int:
        """Payload bytes held."""
        return sum(len(t.message.payload) for t in self._items.values())

    def _expire(self) -> None:
        now = self._clock()
        while self._items:
            key, oldest = next(iter(self._items.items()))
            # Touching a transfer moves it to the end with a fresh expiry: the first is the
            # one that expires first.
            if oldest.expires > now:
                return
            self.pop(key)

    def get(self, key: Hashable) -> _Transfer | None:
        self._expire()
        transfer = self._items.get(key)
        if transfer is not None:
            transfer.expires = self._clock() + self._lifetime
            self._items.move_to_end(key)
        return transfer

    def put(self, key: Hashable, peer: str, message: aiocoap.Message, *, evict_others: bool) -> None:
        """Keep a new transfer; refuse (5.03) when full, unless ``evict_others`` lets the oldest go."""
        self._expire()
        self.pop(key)  # a transfer started again replaces its earlier attempt
        if self._peers[peer] >= self._per_peer:
            self.pop(next(k for k, t in self._items.items() if t.peer == peer))  # the peer's own oldest
        if len(self._items) >= self._total:
            if not evict_others:
                raise CoapError(ErrorCode.UNAVAILABLE, "too many block-wise transfers in progress; retry later")
            self.pop(next(iter(self._items)))
        self._items[key] = _Transfer(peer, message, self._clock() + self._lifetime)
        self._peers[peer] += 1

    def pop(self, key: Hashable) -> _Transfer | None:
        transfer = self._items.pop(key, None)
        if transfer is not None:
            self._peers[transfer.peer] -= 1
            if not self._peers[transfer.peer]:
                del self._peers[transfer.peer]
        return transfer


def _key(request: aiocoap.Message) -> Hashable:
    # As aiocoap's: blocks of one transfer share the remote, the method and every option that is
    # part of the cache key except the block and observe options.
    return (request.remote.blockwise_key, request.code,
            request.get_cache_key([OptionNumber.BLOCK1, OptionNumber.BLOCK2, OptionNumber.OBSERVE]))


class Blocks:
    """Block1 reassembly and Block2 answers, shared by all of a site's resources."""

    def __init__(self, limits: CoapLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.uploads = _Table(limits.transfers_per_peer, limits.transfers_total, limits.transfer_lifetime, clock)
        self.downloads = _Table(limits.transfers_per_peer, limits.transfers_total, limits.transfer_lifetime, clock)

    async def handle(self, request: aiocoap.Message, render: Render) -> aiocoap.Message:
        """Answer ``request`` through ``render``, taking care of its block options."""
        whole = self._assemble(request)
        response = await self._answer(whole, render)
        if request.opt.block1 is not None:
            response.opt.block1 = request.opt.block1  # the last block's option, as RFC 7959 §2.3 wants
        return response

    def _assemble(self, request: aiocoap.Message) -> aiocoap.Message:
        block1 = request.opt.block1
        if block1 is None:
            return request
        if block1.size_exponent > _LARGEST_SZX:
            raise CoapError(ErrorCode.BAD_REQUEST, "BERT blocks are not supported over UDP")
        if block1.more and len(request.payload) != block1.size:
            raise CoapError(ErrorCode.BAD_REQUEST, "block payload does not match its Block1 size")
        key, limit = _key(request), self.limits.max_body
        announced = request.opt.size1 if block1.block_number == 0 else None
        if block1.start + len(request.payload) > limit or (announced is not None and announced > limit):
            self.uploads.pop(key)
            raise CoapError(ErrorCode.TOO_LARGE, "body too large", size1=limit)
        if block1.block_number == 0:
            partial = request.copy(payload=bytes(request.payload))
            self.uploads.put(key, peer_of(request.remote), partial, evict_others=False)
        else:
            transfer = self.uploads.get(key)
            if transfer is None or len(transfer.message.payload) != block1.start:
                self.uploads.pop(key)
                raise IncompleteException()
            partial = transfer.message
            partial.payload += request.payload
        if block1.more:
            raise ContinueException(block1)
        self.uploads.pop(key)
        return request.copy(payload=partial.payload)

    async def _answer(self, request: aiocoap.Message, render: Render) -> aiocoap.Message:
        block2 = request.opt.block2
        key = _key(request) if block2 is not None else None
        if block2 is not None and block2.block_number > 0:
            transfer = self.downloads.get(key)
            if transfer is None:
                raise IncompleteException()
            return self._slice(key, transfer.message, block2.block_number, block2.size_exponent)
        response = await render(request)
        szx = min(block2.size_exponent if block2 is not None else _LARGEST_SZX,
                  request.remote.maximum_block_size_exp, _LARGEST_SZX)
        if not response.code.is_successful() or len(response.payload) <= 2 ** (szx + 4):
            return response
        key = _key(request) if key is None else key
        # Kept until its last block is asked for; when full, the oldest answer kept goes (its
        # client starts over with block 0 and gets a fresh answer: nothing here is lost).
        self.downloads.put(key, peer_of(request.remote), response, evict_others=True)
        return self._slice(key, response, 0, szx)

    def _slice(self, key: Hashable, whole: aiocoap.Message, number: int, szx: int) -> aiocoap.Message:
        szx = min(szx, _LARGEST_SZX)
        size = 2 ** (szx + 4)
        start = number * size
        if start >= len(whole.payload):
            raise CoapError(ErrorCode.BAD_REQUEST, "block number out of range")
        end = min(start + size, len(whole.payload))
        if end == len(whole.payload):
            self.downloads.pop(key)
        part = whole.copy(payload=whole.payload[start:end], mid=None)
        part.opt.block2 = BlockOption.BlockwiseTuple(number, end < len(whole.payload), szx)
        return part
