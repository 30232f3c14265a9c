"""The vendor's CoAP site: small resources over :class:`~m2mpay.agents.vendor.agent.VendorAgent`.

Every body is CBOR (content-format 60, :data:`~m2mpay.protocol.wire.CONTENT_FORMAT_CBOR`); the
resource paths are :mod:`m2mpay.protocol.wire`'s. Bad input — wrong content-format, oversize or
malformed CBOR, unknown session, a wrong or late token — is answered with a 4.xx and a CBOR error body
``{code, message}``; anything unexpected becomes aiocoap's bare 5.00 (nothing internal leaks).

What a peer can make the vendor hold is bounded (:class:`~m2mpay.agents.vendor.limits.CoapLimits`):
observers (:mod:`.watchers`), block-wise transfers (:mod:`.blockwise`) and requests waiting for
the bank (:class:`~m2mpay.agents.vendor.limits.Gate`); offers hold nothing (:mod:`.offers`).
:meth:`VendorSite.held` says how much is held right now.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiocoap
import aiocoap.error
import aiocoap.resource as resource
from aiocoap import interfaces
from aiocoap.numbers.codes import Code

from m2mpay.protocol import wire
from m2mpay.protocol.errors import ErrorCode, ProtocolError
from m2mpay.protocol.messages import Message, OpenSession, Pay

from .agent import VendorAgent
from .blockwise import Blocks
from .limits import CoapError, CoapLimits, Gate, peer_of
from .transport import coap_seam
from .watchers import Watchers

__all__ = ["CoapError", "CoapLimits", "Held", "VendorSite", "build_site", "serve_coap"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Held:
    """What the vendor holds for its CoAP peers at one moment."""

    watchers: int
    """Observations of ``/sessions/{id}/due``."""
    watched_sessions: int
    uploads: int
    """Block1 bodies being reassembled, and their bytes."""
    upload_bytes: int
    downloads: int
    """Answers kept for their next Block2 block, and their bytes."""
    download_bytes: int
    waiting: int
    """Requests waiting for the bank."""
    offers: int
    """Offers remembered (only those being opened or opened, until they expire)."""


@dataclass
class _Surface:
    """The bounded state that the resources of one site share."""

    agent: VendorAgent
    limits: CoapLimits
    blocks: Blocks
    watchers: Watchers
    gate: Gate

    def decode(self, request: aiocoap.Message, kind: type[Any]) -> Any:
        if request.opt.content_format != wire.CONTENT_FORMAT_CBOR:
            raise CoapError(ErrorCode.BAD_REQUEST,
                            f"content-format must be application/cbor ({wire.CONTENT_FORMAT_CBOR})")
        if len(request.payload) > self.limits.max_body:
            raise CoapError(ErrorCode.TOO_LARGE, "body too large", size1=self.limits.max_body)
        try:
            return kind.decode(request.payload)
        except ProtocolError as exc:
            raise CoapError(exc.code, exc.message) from exc


def _reply(message: Message, code: Code = Code.CONTENT) -> aiocoap.Message:
    return aiocoap.Message(code=code, payload=message.encode(), content_format=wire.CONTENT_FORMAT_CBOR)


async def _guard(coro: Any) -> Any:
    try:
        return await coro
    except ProtocolError as exc:
        raise CoapError(exc.code, exc.message) from exc


class _BlockwiseResource(resource.Resource):
    """A resource whose block options go through the site's bounded :class:`Blocks`."""

    def __init__(self, surface: _Surface) -> None:
        super().__init__()
        self.surface = surface

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False  # aiocoap's own tables are unbounded: Blocks does it (see render)

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self.surface.blocks.handle(request, super().render)


class OfferResource(_BlockwiseResource):
    """``GET /offer``: a fresh offer (nothing is kept: its nonce is a MAC over its terms)."""

    rt = wire.RT_OFFER
    ct = wire.CONTENT_FORMAT_CBOR

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return _reply(self.surface.agent.offer())


class OpenResource(_BlockwiseResource):
    """``POST /sessions``: open a session (the bank blocks the coin)."""

    rt = wire.RT_SESSIONS
    ct = wire.CONTENT_FORMAT_CBOR

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        opening = self.surface.decode(request, OpenSession)
        with self.surface.gate.hold(peer_of(request.remote)):
            opened = await _guard(self.surface.agent.open(opening))
        return _reply(opened, Code.CREATED)


class _WellKnownCore(resource.WKCResource):
    """``/.well-known/core``, its block options through the site's bounded :class:`Blocks`."""

    def __init__(self, listgenerator: Any, surface: _Surface) -> None:
        super().__init__(listgenerator)
        self.surface = surface

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self.surface.blocks.handle(request, super().render)


class SessionResources(resource.ObservableResource, resource.PathCapable):
    """``/sessions/{id}/due`` (Observe), ``/sessions/{id}/pay``, ``/sessions/{id}/close``."""

    def __init__(self, surface: _Surface) -> None:
        super().__init__()
        self.surface = surface
        surface.agent.due_listeners.append(surface.watchers.notify)
        surface.agent.closed_listeners.append(surface.watchers.close)

    async def render_to_pipe(self, pipe: Any) -> None:
        # Only an Observe of "due" needs aiocoap's observation machinery; every token payment
        # takes the plain (cheaper) path.
        request = pipe.request
        path = request.opt.uri_path
        if request.opt.observe is not None and request.code == Code.GET and len(path) == 2 and path[1] == wire.DUE:
            # aiocoap offers no public way to choose the observable path per request
            return await interfaces.ObservableResource._render_to_pipe(self, pipe)  # type: ignore[no-any-return]  # noqa: SLF001
        return await interfaces.Resource._render_to_pipe(self, pipe)  # type: ignore[no-any-return]  # noqa: SLF001

    def get_link_description(self) -> None:
        return None  # per-session paths are not listed in .well-known/core

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False  # see render

    def _route(self, request: aiocoap.Message, path: tuple[str, ...] | None = None) -> tuple[bytes, str]:
        route = wire.session_leaf(request.opt.uri_path if path is None else path)
        if route is None:
            raise CoapError(ErrorCode.UNKNOWN_SESSION, "no such resource")
        try:
            sid = bytes.fromhex(route[0])
        except ValueError:
            raise CoapError(ErrorCode.UNKNOWN_SESSION, "unknown session") from None
        return sid, route[1]

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        sid, _ = self._route(request)
        try:
            self.surface.agent.current_due(sid)  # only an open session can be observed
        except ProtocolError as exc:
            raise CoapError(exc.code, exc.message) from exc
        self.surface.watchers.add(sid, peer_of(request.remote), serverobservation)

    async def render(self, request: aiocoap.Message, path: tuple[str, ...] | None = None) -> aiocoap.Message:
        """Answer one request; ``path`` is the part after ``/sessions`` when the site did not strip it."""
        if request.opt.block1 is not None or request.opt.block2 is not None:
            return await self.surface.blocks.handle(request, lambda whole: self._answer(whole, path))
        return await self._answer(request, path)

    async def _answer(self, request: aiocoap.Message, path: tuple[str, ...] | None) -> aiocoap.Message:
        sid, leaf = self._route(request, path)
        agent = self.surface.agent
        try:
            if leaf == wire.DUE and request.code == Code.GET:
                return _reply(agent.current_due(sid))
            if leaf == wire.PAY and request.code == Code.POST:
                return _reply(agent.pay(sid, self.surface.decode(request, Pay)), Code.CHANGED)
            if leaf == wire.CLOSE and request.code == Code.POST:
                with self.surface.gate.hold(peer_of(request.remote)):
                    receipt = await agent.close(sid)  # its observers are let go
                # The signed receipt (a COSE_Sign1, CBOR too) is the whole answer.
                return aiocoap.Message(code=Code.CHANGED, payload=receipt, content_format=wire.CONTENT_FORMAT_CBOR)
        except ProtocolError as exc:
            raise CoapError(exc.code, exc.message) from exc
        raise aiocoap.error.UnallowedMethod()


class VendorSite(resource.Site):
    """aiocoap's Site, with a direct route for the per-token requests.

    The generic route copies each request to strip the path it has matched; a token payment is
    the one request that comes many times a second, so ``/sessions/{id}/{leaf}`` without Observe
    or block options goes straight to :class:`SessionResources` with the path as it came.
    """

    def __init__(self, surface: _Surface, sessions: SessionResources) -> None:
        super().__init__()
        self._surface = surface
        self._sessions = sessions

    def held(self) -> Held:
        """How much the vendor holds for its peers right now."""
        s = self._surface
        return Held(watchers=len(s.watchers), watched_sessions=s.watchers.sessions,
                    uploads=len(s.blocks.uploads), upload_bytes=s.blocks.uploads.size,
                    downloads=len(s.blocks.downloads), download_bytes=s.blocks.downloads.size,
                    waiting=len(s.gate), offers=len(s.agent.offers))

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        path = request.opt.uri_path
        if (len(path) == 3 and path[:1] == wire.SESSIONS_PATH and request.opt.observe is None
                and request.opt.block1 is None and request.opt.block2 is None
                and request.opt.uri_path_abbrev is None):
            pipe.add_response(await self._sessions.render(request, path[1:]), is_last=True)
            return
        await super().render_to_pipe(pipe)


def build_site(agent: VendorAgent, limits: CoapLimits | None = None) -> VendorSite:
    """The vendor's resources, with ``/.well-known/core``, holding at most what ``limits`` allow."""
    limits = limits or CoapLimits()
    surface = _Surface(agent, limits, Blocks(limits), Watchers(limits),
                       Gate(limits.waiting_per_peer, limits.waiting_total))
    sessions = SessionResources(surface)
    site = VendorSite(surface, sessions)
    site.add_resource(wire.WELL_KNOWN_CORE_PATH, _WellKnownCore(site.get_resources_as_linkheader, surface))
    site.add_resource(wire.OFFER_PATH, OfferResource(surface))
    site.add_resource(wire.SESSIONS_PATH, OpenResource(surface))
    site.add_resource(wire.SESSIONS_PATH, sessions)
    return site


@contextlib.asynccontextmanager
async def serve_coap(agent: VendorAgent, host: str = "::1", port: int = 5683,
                     limits: CoapLimits | None = None) -> AsyncIterator[aiocoap.Context]:
    """One aiocoap server context for the process, shut down on exit.

    A port that cannot be bound (or a failing shutdown) raises :class:`~m2mpay.agents.mqtt.TransportError`.
    """
    site = build_site(agent, limits)
    with coap_seam(f"CoAP server on [{host}]:{port}"):
        context = await aiocoap.Context.create_server_context(site, bind=(host, port))
    try:
        yield context
    finally:
        with coap_seam("CoAP server shutdown"):
            await context.shutdown()
