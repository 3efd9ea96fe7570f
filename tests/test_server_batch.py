"""The relay's endpoint ports read in batches (recvmmsg) and send each receiver's outputs in
batches (sendmmsg, UDP GSO): a burst must count, drop and forward exactly what the same
datagrams do one asyncio callback at a time, in the same order at each receiver."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ctms_media.server import udp
from ctms_media.server.relay import EndpointPort, Relay
from ctms_media.server.udp import PortSocket
from ctms_media.sim.room_client import RoomClient, open_room
from ctms_media.wire.rtp import AudioTail

from .server_harness import running_relay
from .test_server import run, until
from .test_system_security import PlainSender

LIMIT = 1200  # [limits] datagram_bytes for these relays: rows of the batch read are this long


def counters(relay: Relay) -> dict[str, Any]:
    s = relay.stats
    return {
        "received": s.received,
        "bytes_in": s.bytes_in,
        "forwarded": s.forwarded,
        "bytes_out": s.bytes_out,
        "dropped": Counter(s.dropped),
    }


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out = {k: after[k] - before[k] for k in ("received", "bytes_in", "forwarded", "bytes_out")}
    out["dropped"] = {r: n for r, n in (after["dropped"] - before["dropped"]).items() if n}
    return out


def mix(a: PlainSender, other_ssrc: int) -> list[tuple[str, bytes]]:
    """One of every way a datagram on room a's port can end, valid media in between; the
    sender is "a" (its latched address) or "stranger" (another address)."""
    loud = AudioTail(True, 3).encode()

    def media(size: int | None = None) -> bytes:
        packet = a.rtp(bytes(30), loud)
        return packet if size is None else packet[:-1] + bytes(size - len(packet)) + bytes([loud])

    rtp_header = struct.pack("!BBHIII", 0x81, 96, 7, 0, a.ssrc, 2 << 8)
    return [
        ("a", media()),
        ("a", media(LIMIT + 1)),  # oversize by one: `malformed`, never read whole
        ("a", media()),
        ("a", media(3000)),
        ("a", media(LIMIT)),  # at the limit: forwarded
        ("a", b""),
        ("a", b"\x00\x01\x00\x00" + bytes(16)),  # STUN
        ("a", b"\x16\xfe\xfd" + bytes(40)),  # DTLS on a non-secure port
        ("stranger", media()),  # `address`
        ("a", media()),
        ("a", struct.pack("!BBHIII", 0x80, 96, 9, 0, a.ssrc, 0) + bytes(20)),  # CC = 0
        ("a", rtp_header[:8] + other_ssrc.to_bytes(4, "big") + rtp_header[12:] + bytes(20)),
        ("a", b"\x81\xcc\x00\x02" + bytes(20)),  # hop control without hop keys
        ("a", b"\x40" + bytes(10)),  # no protocol of RFC 7983
        ("stranger", b"\x16\xfe\xfd" + bytes(40)),
        *[("a", media()) for _ in range(40)],  # a run for one GSO message per receiver
    ]


def test_a_burst_counts_as_the_same_datagrams_one_by_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path, max_datagram=LIMIT) as h:
            relay = h.relay
            await h.conference("n", security="non-secure")
            rooms = {
                eid: await h.join("n", eid, secure=False, ssrc_base=100 * (i + 1))
                for i, eid in enumerate("abc")
            }
            got: dict[str, list[bytes]] = {eid: [] for eid in rooms}
            for eid, room in rooms.items():
                room.on_media = lambda data, plain, eid=eid: got[eid].append(data)
            senders = {
                eid: PlainSender(r.streams[0]["ssrc"], "audio", 2) for eid, r in rooms.items()
            }  # type: ignore[attr-defined]
            for _ in range(10):  # every room latches and hears the others
                for eid, room in rooms.items():
                    room.send(senders[eid].rtp(bytes(30), AudioTail(True, 3).encode()))
                await asyncio.sleep(0.03)
            conf = relay.conferences["n"]
            await until(lambda: all(ep.peer is not None for ep in conf.endpoints.values()))
            await asyncio.sleep(0.1)
            a = conf.endpoints["a"]
            assert a.io is not None and a.io.read_fd >= 0, "the port is read in batches"
            assert not a.transport.is_reading()  # type: ignore[attr-defined]
            stranger = await open_room(RoomClient("stranger", rooms["a"].relay_addr, None))
            # Plain sockets on the same ports (asyncio's sendto would not send b"").
            sockets = {
                who: socket.socket(fileno=os.dup(room.transport.get_extra_info("socket").fileno()))  # type: ignore[union-attr]
                for who, room in (("a", rooms["a"]), ("stranger", stranger))
            }
            batches: list[int] = []
            real = relay.datagrams

            def spy(port: EndpointPort, batch: list[Any]) -> None:
                batches.append(len(batch))
                real(port, batch)

            relay.datagrams = spy  # type: ignore[method-assign]

            # The burst: every datagram is in the port's buffer before the relay reads any.
            burst = mix(senders["a"], senders["b"].ssrc)
            for b in got.values():
                b.clear()
            before = counters(relay)
            for who, data in burst:
                sockets[who].sendto(data, rooms["a"].relay_addr)
            await until(lambda: relay.stats.received - before["received"] == len(burst))
            batched = delta(before, counters(relay))
            assert max(batches) > 1
            await until(lambda: len(got["b"]) + len(got["c"]) == batched["forwarded"])
            for eid in "bc":  # in order at each receiver, one GSO message or not
                seqs = [int.from_bytes(d[2:4], "big") for d in got[eid]]
                assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), eid

            # The same datagrams (next sequence numbers) one callback at a time.
            relay.datagrams = real  # type: ignore[method-assign]
            port = a.transport.get_protocol()
            addrs = {"a": a.peer, "stranger": stranger.transport.get_extra_info("sockname")}  # type: ignore[union-attr]
            one_by_one_burst = mix(senders["a"], senders["b"].ssrc)
            before = counters(relay)
            for who, data in one_by_one_burst:
                port.datagram_received(data, addrs[who])  # type: ignore[attr-defined]
            one_by_one = delta(before, counters(relay))

            assert batched == one_by_one
            assert batched["dropped"] == {
                "malformed": 5,  # two oversize, the empty one, CC = 0, unknown first byte
                "stun": 1,
                "dtls": 2,
                "address": 1,
                "unknown_ssrc": 1,
                "control": 1,
            }
            assert batched["forwarded"] == 2 * 44  # to b and c
            for sock in sockets.values():
                sock.close()
            stranger.close()
            for room in rooms.values():
                room.close()

    run(scenario())


def test_without_batched_reads_the_transport_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the loop cannot watch the socket (no add_reader), asyncio's own per-datagram
    reading stays on and the relay serves as before."""
    monkeypatch.setattr(PortSocket, "start_reading", lambda self, callback: False)

    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("n", security="non-secure")
            rooms = {
                eid: await h.join("n", eid, secure=False, ssrc_base=100 * (i + 1))
                for i, eid in enumerate("ab")
            }
            got: list[bytes] = []
            rooms["b"].on_media = lambda data, plain: got.append(data)
            a = PlainSender(rooms["a"].streams[0]["ssrc"], "audio", 2)  # type: ignore[attr-defined]
            b = PlainSender(rooms["b"].streams[0]["ssrc"], "audio", 2)  # type: ignore[attr-defined]
            ep = h.relay.conferences["n"].endpoints["a"]
            assert ep.io is not None and ep.io.read_fd == -1
            assert ep.transport.is_reading()  # type: ignore[attr-defined]
            for _ in range(20):
                rooms["a"].send(a.rtp(bytes(30), AudioTail(True, 3).encode()))
                rooms["b"].send(b.rtp(bytes(30), AudioTail(True, 3).encode()))
                await asyncio.sleep(0.02)
            await until(lambda: bool(got))
            rooms["a"].send(bytes(LIMIT * 2))
            await until(lambda: h.relay.stats.dropped["malformed"] == 1)
            for room in rooms.values():
                room.close()

    run(scenario())


class FakeTransport:
    """The parts of an asyncio datagram transport PortSocket uses, recording sendto."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent: list[bytes] = []
        self.errors: list[OSError] = []
        self.buffered = 0

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return False

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append(data)

    def get_protocol(self) -> Any:
        return self

    def error_received(self, exc: OSError) -> None:
        self.errors.append(exc)


@pytest.fixture
def pair() -> Any:
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.bind(("127.0.0.1", 0))
    into = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    into.bind(("127.0.0.1", 0))
    into.settimeout(2)
    yield out, into
    out.close()
    into.close()


def received(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(4096) for _ in range(count)]


def test_port_socket_sends_in_order_with_and_without_gso(pair: Any) -> None:
    out, into = pair
    for gso in (False, True):
        io = PortSocket(FakeTransport(out))  # type: ignore[arg-type]
        io.gso = io.gso and gso
        data = [bytes([i]) * 200 for i in range(70)] + [b"s" * 120, b"l" * 300]
        io.send(data, into.getsockname())
        assert received(into, len(data)) == data


def test_port_socket_hands_the_rest_to_the_transport_when_full(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full buffer: the transport queues the rest, in order (what its sendto does)."""
    out, into = pair
    transport = FakeTransport(out)
    io = PortSocket(transport)  # type: ignore[arg-type]
    monkeypatch.setattr(udp, "send_datagrams", lambda *a: (3, errno.EAGAIN, False))
    data = [bytes([i]) * 10 for i in range(8)]
    io.send(data, into.getsockname())
    assert transport.sent == data[3:] and not transport.errors


def test_port_socket_reports_a_refused_datagram_and_goes_on(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any other refusal costs that one datagram and reaches error_received, as asyncio's
    sendto reports it; a refused GSO message is sent again without GSO."""
    out, into = pair
    transport = FakeTransport(out)
    io = PortSocket(transport)  # type: ignore[arg-type]
    io.gso = True
    calls: list[tuple[int, bool]] = []
    answers = iter([(2, errno.EIO, True), (1, errno.ECONNREFUSED, False), (5, 0, False)])

    def fake(fd: int, datagrams: list[bytes], start: int, raw: bytes, gso: bool) -> tuple:
        calls.append((start, gso))
        return next(answers)

    monkeypatch.setattr(udp, "send_datagrams", fake)
    io.send([bytes([i]) for i in range(9)], into.getsockname())
    assert calls == [(0, True), (2, False), (4, False)]
    assert not io.gso
    assert [e.errno for e in transport.errors] == [errno.ECONNREFUSED]
    assert transport.sent == []


def test_port_socket_queues_behind_the_transport_buffer(pair: Any) -> None:
    out, into = pair
    transport = FakeTransport(out)
    transport.buffered = 100  # the transport already holds datagrams for a writable socket
    io = PortSocket(transport)  # type: ignore[arg-type]
    io.send([b"x", b"y"], into.getsockname())
    assert transport.sent == [b"x", b"y"]
