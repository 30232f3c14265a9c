"""The bank's own MQTT client: its packets' framing and properties read byte for byte, and the
client against a real Mosquitto and paho on the other side."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from m2mpay.agents import mqtt_packets as packets
from m2mpay.agents.bank.link import open_link
from m2mpay.agents.mqtt_packets import Incoming, LinkError
from m2mpay.agents.mqtt import broker_address
from m2mpay.broker.launcher import Mosquitto, free_port


def _publish_body(topic: str, packet_id: int, properties: bytes, payload: bytes) -> bytes:
    return packets.text(topic) + packet_id.to_bytes(2, "big") + packets.varint(len(properties)) + properties + payload


# Every kind of property a PUBLISH may carry (MQTT v5 §3.3.2.3), in one packet.
_EVERY_KIND = (b"\x01\x01"  # payload format indicator, a byte
               + b"\x02\x00\x00\x0e\x10"  # message expiry interval, four bytes
               + b"\x03" + packets.text("application/cbor")  # content type, a string
               + b"\x08" + packets.text("m2mpay/bank-a/resp/meter-1")  # response topic
               + b"\x09\x00\x03abc"  # correlation data, binary
               + b"\x26" + packets.text("k") + packets.text("v")  # a user property, a pair of strings
               + b"\x26" + packets.text("k2") + packets.text("")
               + b"\x0b\x81\x01")  # subscription identifier, a variable byte integer (129)


def test_every_property_kind_is_read_or_stepped_over() -> None:
    topic = "m2mpay/bank-a/req/block"
    body = _publish_body(topic, 7, _EVERY_KIND, b"\xa1\x01\x02")
    message = packets.incoming(body, 0x32, len(topic), 2 + len(topic) + 2)
    assert message == Incoming(topic, b"\xa1\x01\x02", False, "m2mpay/bank-a/resp/meter-1", b"abc")
    whole, _ = packets.properties(packets.varint(len(_EVERY_KIND)) + _EVERY_KIND, 0, len(_EVERY_KIND) + 1)
    assert (whole[0x08], whole[0x09], whole[0x0B], whole[0x02]) == (b"m2mpay/bank-a/resp/meter-1", b"abc", 129, 3600)
    for cut in range(1, len(_EVERY_KIND)):  # properties cut short: an error, or the whole ones before the cut
        short = packets.varint(cut) + _EVERY_KIND[:cut]
        try:
            found, end = packets.properties(short, 0, len(short))
        except (LinkError, IndexError):
            continue
        assert end == len(short) and len(found) < len(whole)
        assert all(whole[key] == value for key, value in found.items() if key != 0x26)
    with pytest.raises(LinkError, match="unknown property 0x7f"):
        packets.properties(b"\x02\x7f\x00", 0, 3)


def test_a_packet_split_anywhere_waits_for_its_end() -> None:
    packet = bytes([0x32]) + packets.varint(300) + bytes(300)  # a two-byte remaining length
    stream = bytearray(packet + b"\xd0\x00")  # and a PINGRESP after it
    for size in range(len(packet)):
        assert packets.frame(stream, 0, size) is None
    assert packets.frame(stream, 0, len(packet)) == (3, len(packet))
    assert packets.frame(stream, len(packet), len(stream)) == (len(packet) + 2, len(stream))
    with pytest.raises(LinkError, match="at most"):
        packets.frame(bytearray(b"\x30" + packets.varint(packets.MAX_PACKET + 1)), 0, 5)
    with pytest.raises(LinkError, match="four bytes"):
        packets.frame(bytearray(b"\x30\xff\xff\xff\xff\x01"), 0, 6)


def _paho(url: str, name: str) -> mqtt.Client:
    host, port = broker_address(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.username_pw_set(name)
    client.connect(host, port)
    client.loop_start()
    return client


@pytest.mark.asyncio
@pytest.mark.network
async def test_requests_in_and_answers_out_through_mosquitto(mosquitto: str) -> None:
    """paho publishes requests with every property; the link reads them and answers 200 times
    without waiting, past the broker's Receive Maximum; paho gets every answer, in order."""
    base = f"t-link-{os.urandom(4).hex()}"
    received: list[mqtt.MQTTMessage] = []
    done = threading.Event()

    def on_message(_client: mqtt.Client, _data: object, message: mqtt.MQTTMessage) -> None:
        received.append(message)
        if len(received) == 200:
            done.set()

    device = _paho(mosquitto, f"{base}-device")
    device.on_message = on_message
    device.subscribe(f"{base}/resp", qos=1)
    async with open_link(mosquitto, f"{base}-bank") as bank:
        await bank.subscribe(f"{base}/req/+", qos=1, retain_handling=2)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic, props.CorrelationData = f"{base}/resp", b"\x00corr"
        props.UserProperty = [("a", "b"), ("c", "")]
        props.ContentType, props.MessageExpiryInterval, props.PayloadFormatIndicator = "x/y", 60, 0
        device.publish(f"{base}/req/block", b"request", qos=1, properties=props).wait_for_publish(5)
        request = await asyncio.wait_for(bank.next(), 5)
        assert request == Incoming(f"{base}/req/block", b"request", False, f"{base}/resp", b"\x00corr")
        for i in range(200):
            bank.publish_nowait(f"{base}/resp", b"answer %d" % i, correlation=b"c%d" % i)
        assert await asyncio.to_thread(done.wait, 10), f"{len(received)} of 200 answers arrived"
        assert [m.payload for m in received] == [b"answer %d" % i for i in range(200)]
        assert [m.properties.CorrelationData for m in received] == [b"c%d" % i for i in range(200)]  # type: ignore[union-attr]
        assert [m.qos for m in received[:3]] == [1, 1, 1]
        assert bank._receive_maximum == 20  # Mosquitto's max_inflight_messages: 180 answers waited their turn
    device.loop_stop()
    device.disconnect()


@pytest.mark.asyncio
@pytest.mark.network
async def test_a_broker_that_goes_away_ends_the_link_and_nothing_waits_forever(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        async with open_link(broker.url, "t-link-gone", keepalive=5) as bank:
            await bank.subscribe("t-link-gone/#")
            waiting = asyncio.create_task(bank.next())
            await asyncio.sleep(0.1)
            broker.stop()
            with pytest.raises(LinkError):
                await asyncio.wait_for(waiting, 5)
            with pytest.raises(LinkError):
                bank.publish_nowait("t-link-gone/x", b"late")
            with pytest.raises(LinkError):
                await bank.publish("t-link-gone/x", b"late", timeout=1)


@pytest.mark.asyncio
@pytest.mark.network
async def test_no_broker_is_one_error() -> None:
    with pytest.raises(LinkError, match="cannot connect"):
        async with open_link(f"mqtt://127.0.0.1:{free_port()}", "t-link-none", timeout=2):
            pass  # pragma: no cover - never reached
