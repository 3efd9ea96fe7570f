"""End-to-end SRTCP over real UDP through the relay: SDES reaches every other room, feedback
(PLI, NACK) from a receiver reaches the room it is about, BYE moves the displays on. Rooms do
DTLS and GSP; every packet checked here is decrypted by the receiving room with keys it only
learnt from EKT trailers."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

from ctms_media.sim.srtp_room import SenderStream, sdes_packet
from ctms_media.wire.control import encode_pli
from ctms_media.wire.rtp import AudioTail, VideoTail

from .server_harness import Harness, running_relay
from .test_server import run, until


def _bye(ssrc: int) -> bytes:
    return struct.pack("!BBHI", 0x81, 203, 1, ssrc)


def _nack(sender: int, media: int, pid: int) -> bytes:
    return struct.pack("!BBHIIHH", 0x81, 205, 3, sender, media, pid, 0)


async def _meeting(h: Harness):
    await h.conference("m", security="secure", switching="segment")
    rooms = await h.join_keyed("m", {"big": (3, 100), "one": (1, 200), "two": (1, 300)})
    rtcp_in: dict[str, list[bytes | None]] = {e: [] for e in rooms}
    for eid, r in rooms.items():

        def record(data: bytes, plain: bytes | None, eid: str = eid) -> None:
            if 192 <= data[1] <= 223:
                rtcp_in[eid].append(plain)

        r.on_media = record
    senders: dict[str, dict[int, SenderStream]] = {}
    for eid, r in rooms.items():
        group = r.groups[r.events.gsps[-1].spi]
        senders[eid] = {
            s["ssrc"]: SenderStream(
                s["ssrc"], s["kind"], group, os.urandom(16), position=s["position"]
            )
            for s in r.streams  # type: ignore[attr-defined]
        }
    return rooms, senders, rtcp_in


async def _talk(rooms, senders, loud: str, ticks: int, mute: set[int] = frozenset()) -> None:
    for tick in range(ticks):
        for eid, streams in senders.items():
            for s in streams.values():
                if s.ssrc in mute:
                    continue
                if s.kind == "audio":
                    tail = AudioTail(eid == loud, 3 if eid == loud else 110).encode()
                else:
                    tail = VideoTail(tick % 10 == 0, True).encode()
                packet, _ = s.rtp(os.urandom(40), tail, long=tick % 3 == 0)
                rooms[eid].send(packet)
        await asyncio.sleep(0.02)


def test_sdes_reaches_every_room_and_feedback_reaches_the_source(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            rooms, senders, rtcp_in = await _meeting(h)
            await _talk(rooms, senders, "one", 50)
            _, state = await h.get("/v1/conferences/m")
            assert state["displays"]["two"]["2"]["endpoint"] == "one"
            assert state["displays"]["one"]["2"]["endpoint"] == "big"

            # SDES (long EKT trailer) of two's camera, which one does not see: it still
            # reaches one (and big), so either can decrypt two's feedback later.
            two_video = senders["two"][302]
            sdes = sdes_packet(302, b"two")
            rooms["two"].send(two_video.rtcp(sdes, long=True))
            await until(lambda: all(sdes in rtcp_in[e] for e in ("big", "one")))
            assert sdes not in rtcp_in["two"]

            # PLI from two about the camera it shows (one's): to one only.
            pli = encode_pli(302, 202)
            rooms["two"].send(two_video.rtcp(pli, long=False))
            await until(lambda: pli in rtcp_in["one"])
            # NACK from two: to every room two receives from (one's video, the audio).
            nack = _nack(302, 202, 77)
            rooms["two"].send(two_video.rtcp(nack, long=False))
            await until(lambda: nack in rtcp_in["one"])
            heard_from_big = h.relay.conferences["m"].policy.feedback_targets("two")
            await asyncio.sleep(0.2)
            assert pli not in rtcp_in["big"]  # big's cameras are not on two's display
            assert (nack in rtcp_in["big"]) == ("big" in heard_from_big)
            for eid in rooms:
                assert pli not in rtcp_in["two"] and nack not in rtcp_in["two"]
                assert rooms[eid].receiver.failed == 0, eid  # type: ignore[union-attr]
            for r in rooms.values():
                r.close()

    run(scenario(), timeout=60)


def test_bye_moves_the_displays_off_a_stopped_camera(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            rooms, senders, rtcp_in = await _meeting(h)
            await _talk(rooms, senders, "one", 50)
            _, state = await h.get("/v1/conferences/m")
            assert state["displays"]["two"]["2"]["endpoint"] == "one"
            one_video = senders["one"][202]
            bye = _bye(202)
            rooms["one"].send(one_video.rtcp(bye, long=False))
            await until(lambda: all(bye in rtcp_in[e] for e in ("big", "two")))
            # one goes on talking, but its camera is off: the others move to big's.
            await _talk(rooms, senders, "one", 40, mute={202})
            _, state = await h.get("/v1/conferences/m")
            assert state["displays"]["two"]["2"]["endpoint"] == "big"
            assert all(d["endpoint"] != "one" for d in state["displays"]["big"].values())
            assert state["speakers"][0] == "one"
            # The camera comes back: media again makes it a candidate, one is loudest.
            await _talk(rooms, senders, "one", 40)
            _, state = await h.get("/v1/conferences/m")
            assert state["displays"]["two"]["2"]["endpoint"] == "one"
            for eid, r in rooms.items():
                assert r.receiver.failed == 0, eid  # type: ignore[union-attr]
                r.close()

    run(scenario(), timeout=60)
