"""``ctms-media demo``: a secure multipoint meeting on loopback, end to end.

Rooms are real UDP sockets with libsrtp senders and EKT receivers; the relay verifies,
strips, re-tags and forwards without ever holding a media key. Until the DTLS negotiator
and the conference engine are wired in, group parameters are handed to the rooms directly
and every room receives every other room's streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import struct
import sys
import time
from dataclasses import dataclass, field

from ctms_media.conformance import implementations
from ctms_media.forward.verdict import Receiver
from ctms_media.server.media import MediaRelay
from ctms_media.sim.srtp_room import EktGroup, EktReceiver, SenderStream
from ctms_media.wire.rtp import AudioTail, VideoTail
from ctms_media.wire.srtp import DEFAULT_PROFILE

AUDIO_PPS = 50
VIDEO_FPS = 30
PACKETS_PER_FRAME = 3
IDR_EVERY_S = 3.0


@dataclass
class Room:
    """A synthetic room: 1 or 3 segments, one mic and one camera per segment."""

    id: str
    segments: int
    group: EktGroup
    streams: list[SenderStream] = field(default_factory=list)
    receiver: EktReceiver | None = None
    transport: asyncio.DatagramTransport | None = None
    relay_addr: tuple[str, int] | None = None
    latencies_ns: list[int] = field(default_factory=list)
    received: int = 0

    @property
    def positions(self) -> list[int]:
        return [2] if self.segments == 1 else [1, 2, 3]


class RoomProtocol(asyncio.DatagramProtocol):
    def __init__(self, room: Room) -> None:
        self.room = room

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        room = self.room
        room.received += 1
        assert room.receiver is not None
        rtcp = len(data) > 1 and 192 <= data[1] <= 223
        plain = room.receiver.receive(data, rtcp)
        if plain is not None and not rtcp and len(plain) >= 24:
            sent_ns = struct.unpack_from("!Q", plain, 16)[0]
            room.latencies_ns.append(time.perf_counter_ns() - sent_ns)


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return float(values[min(len(values) - 1, int(q * len(values)))])


async def _meeting(seconds: float, rooms_n: int, implementation: str) -> dict:
    rng = random.Random(7)
    profile = DEFAULT_PROFILE
    group = EktGroup(spi=0x1234, cipher=2, kek=os.urandom(16), salt=os.urandom(14), profile=profile)
    fwd = implementations()[implementation]("ctms")
    fwd.add_group(group.spi, group.cipher, group.kek, group.salt, profile)
    relay = MediaRelay(fwd)
    rooms: list[Room] = []
    ssrc = 0x10000
    for i in range(max(2, rooms_n)):
        room = Room(f"room{i + 1}", 3 if i == 0 else 1, group)
        for pos in room.positions:
            for kind in ("audio", "video"):
                ssrc += 1
                room.streams.append(
                    SenderStream(
                        ssrc, kind, group, os.urandom(16), position=pos, seq=rng.randrange(65536)
                    )
                )
        room.receiver = EktReceiver({group.spi: group})
        rooms.append(room)
    loop = asyncio.get_running_loop()
    for room in rooms:
        port = await relay.open_port(room.id)
        room.relay_addr = ("127.0.0.1", port.port)
        room.transport, _ = await loop.create_datagram_endpoint(
            lambda room=room: RoomProtocol(room), local_addr=("127.0.0.1", 0)
        )
        for s in room.streams:
            fwd.add_stream(s.ssrc, s.kind, profile)
    for room in rooms:  # everyone receives everyone else (the engine narrows this later)
        others = [r for r in rooms if r is not room]
        for s in room.streams:
            relay.set_route(
                s.ssrc,
                [Receiver(r.id, s.position if r.segments == 3 else 2, group.spi) for r in others],
            )

    start = time.perf_counter()
    tick = 1.0 / AUDIO_PPS
    n = 0
    next_idr = {s.ssrc: 0.0 for r in rooms for s in r.streams}
    while (now := time.perf_counter() - start) < seconds:
        speaker = rooms[int(now) % len(rooms)]  # the floor moves every second
        for room in rooms:
            for s in room.streams:
                stamp = struct.pack("!Q", time.perf_counter_ns()) + os.urandom(40)
                if s.kind == "audio":
                    loud = room is speaker
                    tail = AudioTail(loud, rng.randint(5, 20) if loud else 90).encode()
                    pkt, _ = s.rtp(stamp, tail, long=n % 3 == 0)
                    room.transport.sendto(pkt, room.relay_addr)
                elif n % 2 == 0:  # about 25-30 frames/s from a 50 Hz tick
                    idr = now >= next_idr[s.ssrc]
                    if idr:
                        next_idr[s.ssrc] = now + IDR_EVERY_S
                    for k in range(PACKETS_PER_FRAME):
                        tail = VideoTail(idr and k == 0, k == 0).encode()
                        pkt, _ = s.rtp(
                            stamp + os.urandom(900),
                            tail,
                            long=k == 0,
                            advance_ts=0 if k < PACKETS_PER_FRAME - 1 else 3000,
                        )
                        room.transport.sendto(pkt, room.relay_addr)
        n += 1
        if sys.stderr.isatty():
            print(
                f"\r  demo: {now:4.1f}/{seconds:.0f} s, forwarded {relay.stats.forwarded}",
                end="",
                file=sys.stderr,
            )
        await asyncio.sleep(max(0.0, start + n * tick - time.perf_counter()))
    await asyncio.sleep(0.2)  # let the last packets land
    if sys.stderr.isatty():
        print(file=sys.stderr)
    for room in rooms:
        room.transport.close()
    relay.close()
    lat = [x for r in rooms for x in r.latencies_ns]
    return {
        "implementation": implementation,
        "rooms": {
            r.id: {
                "segments": r.segments,
                "received": r.received,
                "decrypt_ok": r.receiver.ok,
                "decrypt_failed": r.receiver.failed,
            }
            for r in rooms
        },
        "received": relay.stats.received,
        "forwarded": relay.stats.forwarded,
        "drops": dict(relay.stats.dropped),
        "decrypt_ok": sum(r.receiver.ok for r in rooms),
        "decrypt_failed": sum(r.receiver.failed for r in rooms),
        "latency_us": {
            "p50": round(_percentile(lat, 0.5) / 1000, 1),
            "p99": round(_percentile(lat, 0.99) / 1000, 1),
            "mean": round(statistics.fmean(lat) / 1000, 1) if lat else 0.0,
        },
    }


def run_demo(
    seconds: float = 3.0, rooms: int = 4, as_json: bool = False, implementation: str | None = None
) -> int:
    impls = implementations()
    impl = implementation or ("cython" if "cython" in impls else "python")
    report = asyncio.run(_meeting(seconds, rooms, impl))
    if as_json:
        print(json.dumps(report))
    else:
        print(f"ctms-media demo: {len(report['rooms'])} rooms, {seconds:g} s, {impl} forwarder")
        for rid, r in report["rooms"].items():
            print(
                f"  {rid} ({r['segments']}-screen): received {r['received']}, "
                f"decrypted {r['decrypt_ok']}, failed {r['decrypt_failed']}"
            )
        print(
            f"  relay: received {report['received']}, forwarded {report['forwarded']}, "
            f"drops {report['drops'] or 'none'}"
        )
        print(
            f"  one-way latency through the relay: p50 {report['latency_us']['p50']} µs, "
            f"p99 {report['latency_us']['p99']} µs"
        )
    ok = report["decrypt_failed"] == 0 and report["forwarded"] > 0
    return 0 if ok else 1


def main(args: argparse.Namespace) -> int:
    return run_demo(seconds=args.seconds, rooms=args.rooms, as_json=args.json)
