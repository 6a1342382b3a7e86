"""Device-side behaviours checked with paho-mqtt (PyPI), an independent MQTT client.

Run by tests/paho_clients.rs against a running edgebridge:
    python3 tests/paho/device_checks.py --port PORT
Each check prints "ok <name>" or "FAIL <name>: <why>"; the exit status is the number
of failed checks. Every wait has a deadline (WAIT seconds), so nothing hangs.
"""

import argparse
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

WAIT = 15.0


class Device:
    """One paho client with its events recorded."""

    def __init__(self, port, client_id, v5=True, clean=True, session_expiry=None):
        self.v5 = v5
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else clean,
        )
        self.cond = threading.Condition()
        self.messages = []
        self.connack = None
        self.disconnect_reason = None
        self.subacks = 0
        self.acked = set()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        # No automatic reconnect during a check (a taken-over client would take the
        # session back).
        self.client.reconnect_delay_set(min_delay=60, max_delay=120)
        self.disconnects = []
        props = None
        if v5 and session_expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
        kwargs = {"clean_start": clean} if v5 else {}
        self.client.connect("127.0.0.1", port, keepalive=30, properties=props, **kwargs)
        self.client.loop_start()
        self.wait(lambda: self.connack is not None, "CONNACK")

    def _notify(self, change):
        with self.cond:
            change()
            self.cond.notify_all()

    def _on_connect(self, _c, _u, flags, reason, _props):
        self._notify(lambda: setattr(self, "connack", (flags.session_present, reason.value)))

    def _on_message(self, _c, _u, msg):
        self._notify(lambda: self.messages.append((msg.topic, msg.qos, msg.retain, bytes(msg.payload))))

    def _on_subscribe(self, _c, _u, _mid, _codes, _props):
        self._notify(lambda: setattr(self, "subacks", self.subacks + 1))

    def _on_publish(self, _c, _u, mid, _reason, _props):
        self._notify(lambda: self.acked.add(mid))

    def _on_disconnect(self, _c, _u, _flags, reason, _props):
        self._notify(lambda: (setattr(self, "disconnect_reason", reason.value), self.disconnects.append((reason.value, str(reason), _flags.is_disconnect_packet_from_server))))

    def wait(self, predicate, what):
        with self.cond:
            if not self.cond.wait_for(predicate, timeout=WAIT):
                raise AssertionError(f"no {what} within {WAIT:.0f} s")

    def subscribe(self, topic, qos=1, **options):
        before = self.subacks
        if self.v5:
            self.client.subscribe(topic, options=SubscribeOptions(qos=qos, **options))
        else:
            self.client.subscribe(topic, qos)
        self.wait(lambda: self.subacks > before, f"SUBACK for {topic}")

    def publish(self, topic, payload, qos=1, retain=False):
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            self.wait(lambda: info.mid in self.acked, f"ack of {topic}")

    def received(self, count, what):
        self.wait(lambda: len(self.messages) >= count, what)
        return list(self.messages)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def check_qos2_exactly_once_in_order(port):
    sub = Device(port, unique("q2-sub"), v5=False)
    sub.subscribe("paho/q2", qos=2)
    pub = Device(port, unique("q2-pub"), v5=False)
    for i in range(20):
        pub.publish("paho/q2", str(i).encode(), qos=2)
    pub.publish("paho/q2", b"end", qos=2)
    got = sub.received(21, "21 QoS 2 messages")
    time.sleep(0.5)  # a duplicate would come right behind
    got = list(sub.messages)
    payloads = [m[3] for m in got]
    want = [str(i).encode() for i in range(20)] + [b"end"]
    assert payloads == want, f"got {payloads}"
    assert all(m[1] == 2 for m in got), f"QoS {[m[1] for m in got]}"
    sub.close()
    pub.close()


def check_delivered_qos_is_the_minimum(port):
    sub = Device(port, unique("min-sub"), v5=False)
    sub.subscribe("paho/min/#", qos=2)
    pub = Device(port, unique("min-pub"), v5=False)
    pub.publish("paho/min/0", b"a", qos=0)
    pub.publish("paho/min/1", b"b", qos=1)
    pub.publish("paho/min/2", b"c", qos=2)
    got = sub.received(3, "3 messages")
    assert sorted((m[0], m[1]) for m in got) == [
        ("paho/min/0", 0),
        ("paho/min/1", 1),
        ("paho/min/2", 2),
    ], f"got {got}"
    sub.close()
    pub.close()


def check_mqtt5_subscription_options(port):
    other = Device(port, unique("opt-other"))
    other.publish("paho/opt/kept", b"kept", qos=1, retain=True)
    dev = Device(port, unique("opt-dev"))
    dev.subscribe("paho/opt/own", noLocal=True)
    dev.subscribe("paho/opt/kept", retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
    dev.subscribe("paho/opt/rap", retainAsPublished=True)
    dev.subscribe("paho/opt/end")
    dev.publish("paho/opt/own", b"mine")
    other.publish("paho/opt/own", b"theirs")
    other.publish("paho/opt/rap", b"flag", retain=True)
    other.publish("paho/opt/end", b"end")
    dev.wait(lambda: any(m[0] == "paho/opt/end" for m in dev.messages), "the end marker")
    got = [(m[0], m[2], m[3]) for m in dev.messages]
    assert got == [
        ("paho/opt/own", False, b"theirs"),
        ("paho/opt/rap", True, b"flag"),
        ("paho/opt/end", False, b"end"),
    ], f"got {got}"
    # Clean up the retained messages for later runs against the same gateway.
    other.publish("paho/opt/kept", b"", retain=True)
    other.publish("paho/opt/rap", b"", retain=True)
    dev.close()
    other.close()


def check_takeover_tells_the_old_connection(port):
    client_id = unique("taken")
    first = Device(port, client_id)
    second = Device(port, client_id)
    first.wait(lambda: first.disconnect_reason is not None, "the old connection's end")
    told = [d for d in first.disconnects if d[2]]
    assert told and told[0][0] == 0x8E, f"reason {first.disconnect_reason:#x} {first.disconnects}"
    second.subscribe("paho/takeover")  # the new one is served
    second.close()
    first.client.loop_stop()


def check_offline_qos1_kept_for_a_persistent_session(port):
    client_id = unique("persist")
    dev = Device(port, client_id, v5=False, clean=False)
    dev.subscribe("paho/offline", qos=1)
    dev.close()
    pub = Device(port, unique("offline-pub"), v5=False)
    pub.publish("paho/offline", b"while away", qos=1)
    back = Device(port, client_id, v5=False, clean=False)
    assert back.connack[0], "session present"
    got = back.received(1, "the message kept while away")
    assert got[0][0] == "paho/offline" and got[0][3] == b"while away", f"got {got}"
    back.close()
    pub.close()


CHECKS = [
    check_qos2_exactly_once_in_order,
    check_delivered_qos_is_the_minimum,
    check_mqtt5_subscription_options,
    check_takeover_tells_the_old_connection,
    check_offline_qos1_kept_for_a_persistent_session,
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    failed = 0
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            check(args.port)
            print(f"ok {name}", flush=True)
        except Exception as e:  # report every check, not only the first failure
            failed += 1
            print(f"FAIL {name}: {e!r}", flush=True)
    sys.exit(failed)


if __name__ == "__main__":
    main()
