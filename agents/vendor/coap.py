"""The vendor's CoAP site: small resources over :class:`~agents.vendor.agent.VendorAgent`.

Every body is CBOR (content-format 60). Bad input — wrong content-format, oversize or malformed
CBOR, unknown session, a wrong or late token — is answered with a 4.xx and a CBOR error body
``{code, message}``; anything unexpected becomes aiocoap's bare 5.00 (nothing internal leaks).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import aiocoap.error
import aiocoap.resource as resource
from aiocoap import interfaces
from aiocoap.numbers.codes import Code

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import Due, ErrorAnswer, Message, OpenSession, Pay

from .agent import VendorAgent

__all__ = ["CBOR", "CoapError", "build_site", "serve_coap"]

log = logging.getLogger(__name__)
CBOR = 60
_CODES = {"4.00": Code.BAD_REQUEST, "4.01": Code.UNAUTHORIZED, "4.03": Code.FORBIDDEN, "4.04": Code.NOT_FOUND,
          "4.09": Code.CONFLICT, "4.13": Code.REQUEST_ENTITY_TOO_LARGE, "5.00": Code.INTERNAL_SERVER_ERROR,
          "5.03": Code.SERVICE_UNAVAILABLE}
_MAX_BODY = 4096


class CoapError(aiocoap.error.RenderableError):
    """A protocol refusal, rendered as its CoAP code with a CBOR error body."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code, self.text = code, message

    def to_message(self) -> aiocoap.Message:
        body = ErrorAnswer(code=self.code.wire, message=self.text[:200]).encode()
        return aiocoap.Message(code=_CODES[self.code.coap], payload=body, content_format=CBOR)


def _reply(message: Message) -> aiocoap.Message:
    return aiocoap.Message(payload=message.encode(), content_format=CBOR)


def _decode(request: aiocoap.Message, kind: type[Any]) -> Any:
    if request.opt.content_format != CBOR:
        raise CoapError(ErrorCode.BAD_REQUEST, "content-format must be application/cbor (60)")
    if len(request.payload) > _MAX_BODY:
        raise CoapError(ErrorCode.TOO_LARGE, "body too large")
    try:
        return kind.decode(request.payload)
    except ProtocolError as exc:
        raise CoapError(exc.code, exc.message) from exc


async def _guard(coro: Any) -> Any:
    try:
        return await coro
    except ProtocolError as exc:
        raise CoapError(exc.code, exc.message) from exc


class OfferResource(resource.Resource):
    """``GET /offer``: a fresh offer."""

    rt = "m2mpay.offer"
    ct = CBOR

    def __init__(self, agent: VendorAgent) -> None:
        super().__init__()
        self.agent = agent

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return _reply(self.agent.offer())


class OpenResource(resource.Resource):
    """``POST /sessions``: open a session (the bank blocks the coin)."""

    rt = "m2mpay.sessions"
    ct = CBOR

    def __init__(self, agent: VendorAgent) -> None:
        super().__init__()
        self.agent = agent

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        opened = await _guard(self.agent.open(_decode(request, OpenSession)))
        return aiocoap.Message(code=Code.CREATED, payload=opened.encode(), content_format=CBOR)


class SessionResources(resource.ObservableResource, resource.PathCapable):
    """``/sessions/{id}/due`` (Observe), ``/sessions/{id}/pay``, ``/sessions/{id}/close``."""

    def __init__(self, agent: VendorAgent) -> None:
        super().__init__()
        self.agent = agent
        self.watchers: dict[bytes, set[Any]] = {}
        agent.on_due = self._notify

    async def render_to_pipe(self, pipe: Any) -> None:
        # Only an Observe request needs aiocoap's observation machinery; every token payment
        # takes the plain (cheaper) path.
        if pipe.request.opt.observe is not None:
            return await interfaces.ObservableResource._render_to_pipe(self, pipe)  # type: ignore[no-any-return]
        return await interfaces.Resource._render_to_pipe(self, pipe)  # type: ignore[no-any-return]

    def get_link_description(self) -> None:  # type: ignore[override]
        return None  # per-session paths are not listed in .well-known/core

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        # Bodies and answers here are a few dozen bytes. Blockwise handling copies every
        # request (deep copy) to key its caches: only pay for it when a peer asks for blocks.
        return request.opt.block1 is not None or request.opt.block2 is not None

    def _route(self, request: aiocoap.Message, path: tuple[str, ...] | None = None) -> tuple[bytes, str]:
        path = request.opt.uri_path if path is None else path
        if len(path) != 2 or path[1] not in ("due", "pay", "close"):
            raise CoapError(ErrorCode.UNKNOWN_SESSION, "no such resource")
        try:
            sid = bytes.fromhex(path[0])
        except ValueError:
            raise CoapError(ErrorCode.UNKNOWN_SESSION, "unknown session") from None
        return sid, path[1]

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        sid, leaf = self._route(request)
        if leaf != "due":
            return
        watchers = self.watchers.setdefault(sid, set())
        watchers.add(serverobservation)
        serverobservation.accept(lambda: watchers.discard(serverobservation))

    def _notify(self, sid: bytes, due: Due) -> None:
        # Non-confirmable: the meter sends a fresh "due" every interval, so a lost one is replaced
        # by the next; confirmable ones would queue behind every lost acknowledgement (CoAP lets
        # one confirmable message at a time be outstanding to a peer) and stall the payment.
        for observation in list(self.watchers.get(sid, ())):
            observation.trigger(aiocoap.Message(transport_tuning=aiocoap.Unreliable, code=Code.CONTENT,
                                                payload=due.encode(),
                                                content_format=CBOR))

    async def render(self, request: aiocoap.Message, path: tuple[str, ...] | None = None) -> aiocoap.Message:
        """Answer one request; ``path`` is the part after ``/sessions`` when the site did not strip it."""
        sid, leaf = self._route(request, path)
        try:
            if leaf == "due" and request.code == Code.GET:
                return aiocoap.Message(code=Code.CONTENT, payload=self.agent.current_due(sid).encode(),
                                       content_format=CBOR)
            if leaf == "pay" and request.code == Code.POST:
                receipt = self.agent.pay(sid, _decode(request, Pay))
                return aiocoap.Message(code=Code.CHANGED, payload=receipt.encode(), content_format=CBOR)
            if leaf == "close" and request.code == Code.POST:
                closed = await self.agent.close(sid)
                self.watchers.pop(sid, None)
                return aiocoap.Message(code=Code.CHANGED, payload=closed.encode(), content_format=CBOR)
        except ProtocolError as exc:
            raise CoapError(exc.code, exc.message) from exc
        raise aiocoap.error.UnallowedMethod()


class VendorSite(resource.Site):
    """aiocoap's Site, with a direct route for the per-token requests.

    The generic route copies each request to strip the path it has matched; a token payment is
    the one request that comes many times a second, so ``/sessions/{id}/{leaf}`` without Observe
    or block options goes straight to :class:`SessionResources` with the path as it came.
    """

    def __init__(self, sessions: SessionResources) -> None:
        super().__init__()
        self._sessions = sessions

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        path = request.opt.uri_path
        if (len(path) == 3 and path[0] == "sessions" and request.opt.observe is None
                and request.opt.block1 is None and request.opt.block2 is None
                and request.opt.uri_path_abbrev is None):
            pipe.add_response(await self._sessions.render(request, path[1:]), is_last=True)
            return
        await super().render_to_pipe(pipe)


def build_site(agent: VendorAgent) -> resource.Site:
    """The vendor's resources, with ``/.well-known/core``."""
    sessions = SessionResources(agent)
    site = VendorSite(sessions)
    site.add_resource([".well-known", "core"], resource.WKCResource(site.get_resources_as_linkheader))
    site.add_resource(["offer"], OfferResource(agent))
    site.add_resource(["sessions"], OpenResource(agent))
    site.add_resource(["sessions"], sessions)
    return site


@contextlib.asynccontextmanager
async def serve_coap(agent: VendorAgent, host: str = "::1", port: int = 5683) -> AsyncIterator[aiocoap.Context]:
    """One aiocoap server context for the process, shut down on exit."""
    context = await aiocoap.Context.create_server_context(build_site(agent), bind=(host, port))
    try:
        yield context
    finally:
        await context.shutdown()
