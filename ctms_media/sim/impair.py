"""A lossy, reordering, duplicating UDP path between one room and its relay port.

The soak puts one of these in front of every room: the room talks to the link's near
socket, the link talks to the relay from its own far socket (so the relay latches the
link's address, as it would a NAT's), and both directions suffer the same faults. Every
fault is counted, so the soak can reconcile what the rooms sent, what the relay received
and what the relay dropped.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

Address = tuple[str, int]


@dataclass(frozen=True)
class Faults:
    loss: float = 0.05
    reorder: float = 0.05  # share of datagrams held back so later ones overtake them
    duplicate: float = 0.05
    hold_ms: tuple[float, float] = (5.0, 40.0)  # how long a reordered datagram is held


@dataclass
class LinkCounters:
    passed: int = 0
    lost: int = 0
    reordered: int = 0
    duplicated: int = 0

    def add(self, other: LinkCounters) -> None:
        self.passed += other.passed
        self.lost += other.lost
        self.reordered += other.reordered
        self.duplicated += other.duplicated


class _Side(asyncio.DatagramProtocol):
    def __init__(self, link: ImpairedLink, upstream: bool) -> None:
        self.link = link
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.link.arrived(data, addr, self.upstream)

    def error_received(self, exc: Exception) -> None:  # the far end went away: like loss
        pass


@dataclass
class ImpairedLink:
    """Near socket for the room, far socket towards ``relay``; faults both ways."""

    relay: Address
    faults: Faults = field(default_factory=Faults)
    rng: random.Random = field(default_factory=random.Random)
    up: LinkCounters = field(default_factory=LinkCounters)  # room -> relay
    down: LinkCounters = field(default_factory=LinkCounters)  # relay -> room
    near_addr: Address | None = None
    _near: _Side | None = None
    _far: _Side | None = None
    _room: Address | None = None

    async def open(self, host: str = "127.0.0.1") -> Address:
        loop = asyncio.get_running_loop()
        near = _Side(self, upstream=True)
        far = _Side(self, upstream=False)
        t1, _ = await loop.create_datagram_endpoint(lambda: near, local_addr=(host, 0))
        await loop.create_datagram_endpoint(lambda: far, local_addr=(host, 0))
        self._near, self._far = near, far
        self.near_addr = t1.get_extra_info("sockname")[:2]
        return self.near_addr

    def close(self) -> None:
        for side in (self._near, self._far):
            if side is not None and side.transport is not None:
                side.transport.close()

    def arrived(self, data: bytes, addr: Address, upstream: bool) -> None:
        if upstream:
            self._room = addr  # the room's socket: where the relay's answers go
            out, dest, counters = self._far, self.relay, self.up
        else:
            if addr != self.relay or self._room is None:
                return
            out, dest, counters = self._near, self._room, self.down
        if out is None or out.transport is None:
            return
        f, rng = self.faults, self.rng
        if rng.random() < f.loss:
            counters.lost += 1
            return
        copies = 2 if rng.random() < f.duplicate else 1
        counters.duplicated += copies - 1
        transport = out.transport
        if rng.random() < f.reorder:
            counters.reordered += 1
            delay = rng.uniform(*f.hold_ms) / 1000.0
            loop = asyncio.get_running_loop()
            for _ in range(copies):
                loop.call_later(delay, _send, transport, data, dest)
        else:
            for _ in range(copies):
                transport.sendto(data, dest)
        counters.passed += 1


def _send(transport: asyncio.DatagramTransport, data: bytes, dest: Address) -> None:
    if not transport.is_closing():
        transport.sendto(data, dest)
