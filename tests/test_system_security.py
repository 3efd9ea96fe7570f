"""The non-secure and downgrade paths end to end over real UDP (wire.md §7, §8; the seed's
Table 7-1): a non-secure conference forwards plain RTP with the same switching; a best-effort
conference downgrades its secure rooms when a non-secure room joins; a secure room joining
a downgraded conference gets DOWNGRADE instead of GSP."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from pathlib import Path

import pytest

from ctms_media.sim.room_client import RoomClient
from ctms_media.sim.srtp_room import SenderStream
from ctms_media.wire.rtp import AudioTail, VideoTail, position_code

from .server_harness import Harness, running_relay
from .test_server import run, until

DOWNGRADE_LOG = (
    "will downgrade security from secure to non-secure. "
    "All existing endpoints will be downgraded to non-secure."
)


class PlainSender:
    """Plain RTP as a non-secure (or downgraded) room sends it: tail byte, no tag."""

    def __init__(self, ssrc: int, kind: str, position: int) -> None:
        self.ssrc, self.kind, self.position, self.seq = ssrc, kind, position, 1

    def rtp(self, payload: bytes, tail: int) -> bytes:
        header = struct.pack(
            "!BBHIII",
            0x81,
            96,
            self.seq,
            self.seq * 960,
            self.ssrc,
            position_code(self.position, 0),
        )
        self.seq += 1
        return header + payload + bytes([tail])


def _plain_senders(room: RoomClient) -> list[PlainSender]:
    return [PlainSender(s["ssrc"], s["kind"], s["position"]) for s in room.streams]  # type: ignore[attr-defined]


def _tail(sender: PlainSender | SenderStream, loud: bool, tick: int) -> int:
    if sender.kind == "audio":
        return AudioTail(loud, 3 if loud else 110).encode()
    return VideoTail(tick % 10 == 0, True).encode()


def _collect(rooms: dict[str, RoomClient]) -> dict[str, list[tuple[bytes, bytes | None]]]:
    seen: dict[str, list[tuple[bytes, bytes | None]]] = {e: [] for e in rooms}
    for eid, r in rooms.items():
        r.on_media = lambda data, plain, eid=eid: seen[eid].append((data, plain))
    return seen


async def _send_plain(
    rooms: dict[str, RoomClient], senders: dict[str, list[PlainSender]], loud: str, ticks: int
) -> dict[tuple[int, int], bytes]:
    sent = {}
    for tick in range(ticks):
        for eid, streams in senders.items():
            for s in streams:
                seq = s.seq
                payload = os.urandom(30)
                rooms[eid].send(s.rtp(payload, _tail(s, eid == loud, tick)))
                sent[(s.ssrc, seq)] = payload
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    return sent


def _check_plain(
    rooms: dict[str, RoomClient],
    seen: dict[str, list[tuple[bytes, bytes | None]]],
    sent: dict[tuple[int, int], bytes],
) -> None:
    """Every room got plain media from the others: tail byte gone, payload intact, CSRC
    destination set for it, never its own streams."""
    for eid, r in rooms.items():
        own = {s["ssrc"] for s in r.streams}  # type: ignore[attr-defined]
        plain_rtp = [d for d, _ in seen[eid] if not 192 <= d[1] <= 223]
        got = [
            d
            for d in plain_rtp
            if (int.from_bytes(d[8:12], "big"), int.from_bytes(d[2:4], "big")) in sent
        ]
        assert got, eid
        for d in got:
            ssrc, seq = int.from_bytes(d[8:12], "big"), int.from_bytes(d[2:4], "big")
            assert ssrc not in own
            assert d[16:] == sent[(ssrc, seq)]  # the tail byte is stripped, nothing else
            assert d[15] in ((2,) if len(r.streams) == 2 else (1, 2, 3))  # type: ignore[attr-defined]


def test_non_secure_conference_forwards_plain_rtp_with_the_same_switching(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("n", security="non-secure")
            rooms = {
                "big": await h.join("n", "big", segments=3, secure=False, ssrc_base=100),
                "one": await h.join("n", "one", secure=False, ssrc_base=200),
                "two": await h.join("n", "two", secure=False, ssrc_base=300),
            }
            seen = _collect(rooms)
            senders = {eid: _plain_senders(r) for eid, r in rooms.items()}
            sent = await _send_plain(rooms, senders, "two", 60)
            _check_plain(rooms, seen, sent)
            _, state = await h.get("/v1/conferences/n")
            assert state["security"] == "non-secure" and state["spi"] is None
            assert state["speakers"][0] == "two"
            assert state["displays"]["one"]["2"]["endpoint"] == "two"
            assert all(r.events.gsps == [] for r in rooms.values())
            for r in rooms.values():
                r.close()

    run(scenario(), timeout=60)


def _srtp_senders(rooms: dict[str, RoomClient]) -> dict[str, list[SenderStream]]:
    """libsrtp senders for every declared stream of keyed rooms, under their latest GSP."""
    return {
        eid: [
            SenderStream(
                s["ssrc"],
                s["kind"],
                r.groups[r.events.gsps[-1].spi],
                os.urandom(16),
                position=s["position"],
            )
            for s in r.streams  # type: ignore[attr-defined]
        ]
        for eid, r in rooms.items()
    }


async def _send_srtp(
    rooms: dict[str, RoomClient], senders: dict[str, list[SenderStream]], loud: str, ticks: int
) -> None:
    for tick in range(ticks):
        for eid, streams in senders.items():
            for s in streams:
                tail = _tail(s, eid == loud, tick)
                rooms[eid].send(s.rtp(os.urandom(30), tail, tick % 3 == 0)[0])
        await asyncio.sleep(0.02)


async def _secure_pair(h: Harness, conf: str) -> dict[str, RoomClient]:
    return await h.join_keyed(conf, {"big": (3, 100), "one": (1, 200)})


def test_best_effort_downgrades_when_a_non_secure_room_joins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("b", security="best-effort")
            rooms = await _secure_pair(h, "b")
            seen = _collect(rooms)
            senders = _srtp_senders(rooms)
            await _send_srtp(rooms, senders, "one", 30)  # secure first: SRTP that decrypts
            await until(lambda: all(r.receiver and r.receiver.ok > 0 for r in rooms.values()))
            _, state = await h.get("/v1/conferences/b")
            assert state["security"] == "best-effort"  # reads "non-secure" once downgraded

            with caplog.at_level(logging.INFO):
                rooms["plain"] = await h.join("b", "plain", secure=False, ssrc_base=300)
                await until(lambda: all(rooms[e].events.downgrades >= 3 for e in ("big", "one")))
            assert any(DOWNGRADE_LOG in rec.getMessage() for rec in caplog.records)
            assert all(not rooms[e].secure for e in ("big", "one"))
            _, state = await h.get("/v1/conferences/b")
            assert state["security"] == "non-secure"

            # A secure room joining now: DTLS completes, DOWNGRADE instead of GSP.
            rooms["late"] = await h.join("b", "late", ssrc_base=400)
            await until(lambda: rooms["late"].events.downgrades >= 1)
            assert rooms["late"].events.gsps == []

            await asyncio.sleep(1.1)  # the downgrade's grace second ends
            seen = _collect(rooms)
            plain = {eid: _plain_senders(r) for eid, r in rooms.items()}
            sent = await _send_plain(rooms, plain, "plain", 60)
            _check_plain(rooms, seen, sent)
            _, state = await h.get("/v1/conferences/b")
            assert state["speakers"][0] == "plain"
            assert state["displays"]["one"]["2"]["endpoint"] == "plain"
            for eid in ("big", "one"):
                assert rooms[eid].receiver.failed == 0, eid  # type: ignore[union-attr]
            for r in rooms.values():
                r.close()

    run(scenario(), timeout=60)


def test_best_effort_starting_non_secure_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("s", security="best-effort")
            with caplog.at_level(logging.INFO):
                first = await h.join("s", "first", secure=False, ssrc_base=100)
            assert any("will start as non-secure" in r.getMessage() for r in caplog.records)
            assert h.relay.conferences["s"].modes == (False, True)  # no grace: nothing was secure
            assert not any("SRTP accepted" in r.getMessage() for r in caplog.records)
            second = await h.join("s", "second", ssrc_base=200)  # secure: told to downgrade
            await until(lambda: second.events.downgrades >= 1)
            assert second.events.gsps == []
            rooms = {"first": first, "second": second}
            seen = _collect(rooms)
            sent = await _send_plain(
                rooms, {e: _plain_senders(r) for e, r in rooms.items()}, "first", 30
            )
            _check_plain(rooms, seen, sent)
            for r in rooms.values():
                r.close()

    run(scenario(), timeout=60)


def test_the_downgrade_second_still_carries_srtp_between_formerly_secure_rooms(
    tmp_path: Path,
) -> None:
    """wire.md §8: for 1 s after DOWNGRADE the relay still accepts SRTP from, and forwards it
    to, the rooms that were secure (with the SPI they held), and nothing of it reaches the
    non-secure room; then the groups go and only plain RTP is forwarded."""

    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("g", security="best-effort")
            rooms = await _secure_pair(h, "g")
            senders = _srtp_senders(rooms)
            await _send_srtp(rooms, senders, "one", 20)  # secure: routes and keys settle
            conf = h.relay.conferences["g"]
            spi = rooms["big"].events.gsps[-1].spi
            rooms["plain"] = await h.join("g", "plain", secure=False, ssrc_base=300)
            seen = _collect(rooms)
            assert conf.forwarder.groups, "groups must stay for the grace second"
            audio = next(s for s in senders["one"] if s.kind == "audio")
            sent = []
            for i in range(10):  # within the second: SRTP from "one", short and long trailers
                packet, _ = audio.rtp(os.urandom(30), AudioTail(True, 3).encode(), i % 3 == 0)
                rooms["one"].send(packet)
                sent.append(packet)
                await asyncio.sleep(0.02)
            await until(lambda: len([d for d, _ in seen["big"] if d[8:12] == packet[8:12]]) >= 10)
            got = [d for d, _ in seen["big"] if d[8:12] == packet[8:12]]
            receiver = rooms["big"].receiver
            assert receiver is not None and spi in receiver.groups
            assert all(receiver.receive(d) is not None for d in got)  # SRTP that decrypts
            assert not [d for d, _ in seen["plain"] if d[8:12] == packet[8:12]]
            await asyncio.sleep(1.1)
            assert not conf.forwarder.groups  # the second is over: keys gone
            for r in rooms.values():
                r.close()

    run(scenario(), timeout=60)


def test_a_non_secure_room_latched_by_rtcp_is_active_at_once(tmp_path: Path) -> None:
    """wire.md §8: a non-secure room latches on its first RTP *or RTCP* packet."""

    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("r", security="non-secure")
            room = await h.join("r", "room", secure=False, ssrc_base=100)
            rr = struct.pack("!BBHI", 0x80, 201, 1, 101)  # an empty receiver report
            room.send(rr)
            conf = h.relay.conferences["r"]
            await until(lambda: conf.endpoints["room"].peer is not None)
            assert conf.policy.endpoint_state("room") == "active"
            room.close()

    run(scenario(), timeout=30)
