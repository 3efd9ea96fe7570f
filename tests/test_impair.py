"""The soak's fault injector over real UDP: what it does is what it counts."""

from __future__ import annotations

import asyncio
import random

from ctms_media.sim.impair import Faults, ImpairedLink

from .test_server import run, until


class _Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.append(data)
        if data.startswith(b"echo"):
            assert self.transport is not None
            self.transport.sendto(b"back" + data[4:], addr)


async def _pair(faults: Faults, seed: int = 1):
    loop = asyncio.get_running_loop()
    relay, room = _Sink(), _Sink()
    rt, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
    link = ImpairedLink(rt.get_extra_info("sockname")[:2], faults, random.Random(seed))
    near = await link.open()
    mt, _ = await loop.create_datagram_endpoint(lambda: room, local_addr=("127.0.0.1", 0))
    return link, relay, room, mt, near


def test_counts_match_what_arrives_both_ways() -> None:
    async def scenario() -> None:
        link, relay, room, mt, near = await _pair(Faults(0.1, 0.2, 0.1, (1.0, 5.0)))
        for i in range(2000):
            mt.sendto(b"echo%05d" % i, near)
            if i % 20 == 19:  # paced by the link itself: no socket buffer may overflow
                await until(lambda n=i + 1: link.up.passed + link.up.lost == n)
        await asyncio.sleep(0.2)
        up, down = link.up, link.down
        assert len(relay.got) == up.passed + up.duplicated
        assert len(room.got) == down.passed + down.duplicated
        assert up.passed + up.lost == 2000
        assert down.passed + down.lost == len(relay.got)  # the relay answered each copy
        assert 100 < up.lost < 300 and up.reordered > 200 and up.duplicated > 100
        seqs = [int(d[4:]) for d in relay.got]
        assert seqs != sorted(seqs)  # reordered for real
        link.close()

    run(scenario(), timeout=20)


def test_no_faults_is_a_plain_wire() -> None:
    async def scenario() -> None:
        link, relay, room, mt, near = await _pair(Faults(0.0, 0.0, 0.0))
        for i in range(200):
            mt.sendto(b"echo%05d" % i, near)
        await until(lambda: len(room.got) == 200)
        assert [int(d[4:]) for d in relay.got] == list(range(200))
        link.close()

    run(scenario(), timeout=20)
