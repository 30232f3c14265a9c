"""The vendor agent tells every registered listener; the CoAP site is one of them, not the only one."""

from __future__ import annotations

import pytest

from m2mpay.agents.mqtt import TransportError
from m2mpay.protocol.messages import Due
from tests.vendor_scene import Scene, open_session

pytestmark = [pytest.mark.asyncio, pytest.mark.network]


async def test_every_due_and_closed_listener_is_told(scene: Scene) -> None:
    world = scene.world
    (wc,) = await world.withdraw(world.user("alice"))
    wc, opened = await open_session(scene, wc)
    assert len(scene.agent.due_listeners) == len(scene.agent.closed_listeners) == 1  # the site's observers
    dues: list[tuple[bytes, Due]] = []
    closed: list[bytes] = []

    def lost(_sid: bytes, _due: Due) -> None:
        raise TransportError("notification lost")  # the network's loss, not the session's

    scene.agent.due_listeners[:0] = [lost]
    scene.agent.due_listeners.append(lambda sid, due: dues.append((sid, due)))
    scene.agent.closed_listeners.append(closed.append)
    due = scene.agent.due(opened.session, 2)
    assert dues == [(opened.session, due)]
    await scene.agent.close(opened.session)
    assert closed == [opened.session]
