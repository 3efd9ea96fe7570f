"""A meeting over real UDP through the relay: one 3-screen and two 1-screen rooms do DTLS,
receive GSP, send libsrtp media with tail bytes and EKT; every packet a room receives
decrypts with libsrtp (keys only from EKT trailers), carries the right CSRC destination and
no tail byte, and the loud room is what the others see."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from ctms_media.sim.srtp_room import SenderStream
from ctms_media.wire.rtp import AudioTail, VideoTail

from .server_harness import running_relay
from .test_server import run


def test_three_rooms_secure_meeting(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("m", security="secure", switching="segment")
            rooms = await h.join_keyed("m", {"big": (3, 100), "one": (1, 200), "two": (1, 300)})
            sent: dict[tuple[int, int], bytes] = {}
            seen: dict[str, list[tuple[bytes, bytes | None]]] = {e: [] for e in rooms}
            for eid, r in rooms.items():
                r.on_media = lambda data, plain, eid=eid: seen[eid].append((data, plain))
            senders = {}
            for eid, r in rooms.items():
                group = r.groups[r.events.gsps[-1].spi]
                senders[eid] = [
                    SenderStream(
                        s["ssrc"], s["kind"], group, os.urandom(16), position=s["position"]
                    )
                    for s in r.streams  # type: ignore[attr-defined]
                ]
            for tick in range(100):  # 2 s at 50 packets/s per stream
                for eid, streams in senders.items():
                    for s in streams:
                        if s.kind == "audio":
                            loud = eid == "one"
                            tail = AudioTail(loud, 3 if loud else 110).encode()
                        else:
                            tail = VideoTail(tick % 10 == 0, True).encode()
                        seq = s.seq
                        packet, plain = s.rtp(os.urandom(60), tail, long=tick % 3 == 0)
                        sent[(s.ssrc, seq)] = plain
                        rooms[eid].send(packet)
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)

            for eid, r in rooms.items():
                assert r.receiver is not None and r.receiver.failed == 0, eid
                assert r.receiver.ok > 0, eid
                own = {s["ssrc"] for s in r.streams}  # type: ignore[attr-defined]
                for data, plain in seen[eid]:
                    if plain is None or 192 <= data[1] <= 223:
                        continue
                    ssrc = int.from_bytes(plain[8:12], "big")
                    assert ssrc not in own  # a room never gets its own media
                    original = sent[(ssrc, int.from_bytes(plain[2:4], "big"))]
                    assert plain[16:] == original[16:]  # payload intact, tail byte gone
                    dest = plain[15]
                    assert dest in ((2,) if eid != "big" else (1, 2, 3))
            _, state = await h.get("/v1/conferences/m")
            assert state["speakers"][0] == "one"
            assert state["displays"]["two"]["2"]["endpoint"] == "one"
            assert "one" in {d["endpoint"] for d in state["displays"]["big"].values()}
            assert h.relay.stats.dropped.get("auth", 0) == 0
            for r in rooms.values():
                r.close()

    run(scenario(), timeout=60)
