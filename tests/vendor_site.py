"""A vendor's CoAP site served on a port of its own, and bounded requests to it.

For tests that choose the site's limits (:class:`~m2mpay.agents.vendor.coap.CoapLimits`) or look at
what it holds, and for the fuzzers that send it hostile messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from m2mpay.agents.vendor.agent import VendorAgent
from m2mpay.agents.vendor.coap import CoapLimits, VendorSite, serve_coap
from m2mpay.broker.launcher import free_udp_port
from m2mpay.protocol.wire import CONTENT_FORMAT_CBOR as CBOR
from tests.vendor_scene import Scene

__all__ = ["WAIT", "Served", "observation_request", "request", "served", "upload_block"]

WAIT = 5.0
"""Seconds one CoAP exchange may take."""


@dataclass
class Served:
    """A vendor served on its own port: the scene pointed at it, and its CoAP site."""

    scene: Scene
    site: VendorSite


@contextlib.asynccontextmanager
async def served(scene: Scene, limits: CoapLimits | None = None, agent: VendorAgent | None = None,
                 ) -> AsyncIterator[Served]:
    """``agent`` (the scene's by default) served on a fresh loopback port with ``limits``."""
    agent = agent or scene.agent
    port = free_udp_port()
    async with serve_coap(agent, "::1", port, limits or CoapLimits()) as context:
        yield Served(dataclasses.replace(scene, agent=agent, base=f"coap://[::1]:{port}"), context.serversite)


async def request(scene: Scene, message: aiocoap.Message, *, blockwise: bool = False) -> aiocoap.Message:
    """One exchange, bounded; ``blockwise=False`` sends the message's own block options as they are."""
    async with asyncio.timeout(WAIT):
        return await scene.client.request(message, handle_blockwise=blockwise).response


def upload_block(scene: Scene, path: str, payload: bytes, number: int, more: bool, szx: int = 6,
                 query: tuple[str, ...] = ()) -> aiocoap.Message:
    """One Block1 block of a POST."""
    message = aiocoap.Message(code=Code.POST, uri=scene.base + path, payload=payload, content_format=CBOR)
    message.opt.block1 = BlockOption.BlockwiseTuple(number, more, szx)
    message.opt.uri_query = query
    return message


def observation_request(scene: Scene, sid: bytes) -> aiocoap.Message:
    """An Observe request of ``/sessions/{sid}/due``."""
    return aiocoap.Message(code=Code.GET, uri=f"{scene.base}/sessions/{sid.hex()}/due", observe=0)
