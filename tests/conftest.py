"""Test-run wide rules: the shared fixtures' plugins, and what the ``network`` marker means.

A test is ``network`` when it starts or talks to a server: Mosquitto, PostgreSQL, a CoAP socket, an
agent in another process. Tests that reach a server through the shared fixtures
(:data:`tests.plugins.servers.SERVER_FIXTURES`, directly or through other fixtures) are marked here
at collection; a server fixture requested at run time by a test without the marker fails that test.
Tests that start their own servers carry the marker in their module. ``-m "not network"`` thus runs
with no Mosquitto binary and no PostgreSQL reachable.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

pytest_plugins = ["tests.plugins.servers", "tests.plugins.banks", "tests.plugins.vendors"]


def pytest_configure(config: pytest.Config) -> None:
    """Let the agents the tests start hear Ctrl-C even when the run itself was started in the
    background of a script, where the shell hands every process SIGINT ignored: an ignored signal
    is inherited across exec, a handled one is reset to the default, which Python turns into
    KeyboardInterrupt. The tests stop agents with SIGINT, as a user at a terminal does."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

_running: list[pytest.Item] = []
"""The test being run (pytest runs one test at a time): its setup, call and teardown."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``network`` every test whose fixtures include a server."""
    from tests.plugins.servers import SERVER_FIXTURES  # loaded (and assertion-rewritten) as a plugin by now

    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.network)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[object]) -> None:
    """Fail a test that reaches a server fixture at run time (``request.getfixturevalue``) without
    the ``network`` marker: ``-m "not network"`` would not keep it away from servers."""
    from tests.plugins.servers import SERVER_FIXTURES

    if fixturedef.argname in SERVER_FIXTURES and _running and _running[-1].get_closest_marker("network") is None:
        pytest.fail(f"{_running[-1].nodeid} uses the server fixture {fixturedef.argname!r} without the "
                    "network marker", pytrace=False)
