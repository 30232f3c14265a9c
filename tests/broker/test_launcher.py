"""The broker launcher and generated ACL, against a real Mosquitto on loopback."""

from __future__ import annotations

import queue
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from m2mpay.broker.launcher import Mosquitto
from m2mpay.protocol import wire

pytestmark = pytest.mark.network


def _client(broker: Mosquitto, user: str) -> tuple[mqtt.Client, queue.Queue[tuple[str, bytes]]]:
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
    client.username_pw_set(user)
    client.on_message = lambda _c, _u, msg: inbox.put((msg.topic, bytes(msg.payload)))
    acks: queue.Queue[int] = queue.Queue()
    client.on_subscribe = lambda _c, _u, mid, _codes, _props: acks.put(mid)
    client.user_data_set(acks)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client, inbox


def _subscribe(client: mqtt.Client, topic: str) -> None:
    """Subscribe and wait for the broker's SUBACK (granted or refused)."""
    _, mid = client.subscribe(topic, qos=1)
    acks: queue.Queue[int] = client.user_data_get()
    assert acks.get(timeout=5) == mid


def test_starts_on_a_free_port_and_stops(tmp_path: Path) -> None:
    with Mosquitto(tmp_path) as broker:
        assert broker.port > 0 and broker.process is not None
        conf = (tmp_path / "mosquitto.conf").read_text()
        assert f"listener {broker.port} 127.0.0.1" in conf and "set_tcp_nodelay true" in conf
        client, inbox = _client(broker, "probe")
        _subscribe(client, "t/#")
        _wait_subscribed(client, inbox)
        client.disconnect()
        client.loop_stop()
    assert broker.process.poll() is not None


def _wait_subscribed(client: mqtt.Client, inbox: queue.Queue[tuple[str, bytes]]) -> None:
    client.publish("t/x", b"ping", qos=1).wait_for_publish(5)
    assert inbox.get(timeout=5) == ("t/x", b"ping")


def test_acl_keeps_answers_private(tmp_path: Path) -> None:
    """The ACL's rules, here without TLS: usernames are only claimed, so this protects nothing in
    earnest (``insecure_acl``); with certificates see test_tls.py and tests/security."""
    withdraw, to_alice, to_mallory = (wire.request_topic("b1", "withdraw"), wire.response_topic("b1", "alice"),
                                      wire.response_topic("b1", "mallory"))
    with Mosquitto(tmp_path, bank="b1", insecure_acl=True) as broker:
        bank, bank_inbox = _client(broker, "bank")
        alice, alice_inbox = _client(broker, "alice")
        mallory, mallory_inbox = _client(broker, "mallory")
        _subscribe(bank, wire.shared_request_filter("b1"))
        _subscribe(alice, to_alice)
        _subscribe(mallory, to_alice)  # granted, but the ACL filters every message
        _subscribe(mallory, to_mallory)
        alice.publish(withdraw, b"req", qos=1).wait_for_publish(5)
        assert bank_inbox.get(timeout=5) == (withdraw, b"req")
        mallory.publish(to_alice, b"forged", qos=1).wait_for_publish(5)  # dropped
        bank.publish(to_alice, b"answer", qos=1).wait_for_publish(5)
        assert alice_inbox.get(timeout=5) == (to_alice, b"answer")
        bank.publish(to_mallory, b"yours", qos=1).wait_for_publish(5)
        assert mallory_inbox.get(timeout=5) == (to_mallory, b"yours")  # and nothing before it
        assert alice_inbox.empty()
        for c in (bank, alice, mallory):
            c.disconnect()
            c.loop_stop()
