"""The media edge: one UDP port per endpoint, RFC 7983 demultiplexing, address latching,
and the fan-out of a forwarder's verdicts to the receivers' ports.

The forwarder is sans-IO; this module is the only place that knows about sockets on the
media path, so drops for transport reasons (unknown address, not-yet-latched port, DTLS or
STUN before the negotiator exists) are counted here.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ctms_media.wire.rtp import classify

log = logging.getLogger("ctms_media.media")

Address = tuple[str, int]


@dataclass
class MediaStats:
    """Per-relay counters; every datagram in ends up in exactly one of these."""

    received: int = 0
    forwarded: int = 0  # datagrams sent to receivers
    dropped: Counter[str] = field(default_factory=Counter)
    tails: int = 0


class EndpointPort(asyncio.DatagramProtocol):
    """The relay's UDP port for one endpoint."""

    def __init__(self, relay: MediaRelay, endpoint_id: str) -> None:
        self.relay = relay
        self.endpoint_id = endpoint_id
        self.transport: asyncio.DatagramTransport | None = None
        self.peer: Address | None = None  # latched address
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay.datagram(self, data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable from a gone room
        log.debug("endpoint %s: socket error %s", self.endpoint_id, exc)

    def send(self, data: bytes) -> bool:
        if self.transport is None or self.peer is None:
            return False
        self.transport.sendto(data, self.peer)
        return True


class MediaRelay:
    """Binds endpoints' ports to one conference's forwarder and fans its verdicts out.

    ``latch_on_media`` latches an endpoint's address on its first authenticated packet
    (non-secure endpoints per wire.md §8, and the demo until the DTLS negotiator latches).
    """

    def __init__(
        self,
        forwarder: Any,
        host: str = "127.0.0.1",
        latch_on_media: bool = True,
        on_tail: Any = None,
    ) -> None:
        self.forwarder = forwarder
        self.host = host
        self.latch_on_media = latch_on_media
        self.ports: dict[str, EndpointPort] = {}
        self.stats = MediaStats()
        self.on_tail = on_tail  # callable(ssrc, tail) -> None, the policy's batch feed
        self.routes: dict[int, tuple[Any, ...]] = {}  # what the policy wants, latched or not

    def set_route(self, ssrc: int, receivers: Any) -> None:
        """Route a sender to receivers; only latched receivers reach the forwarder.

        The forwarder marks a key as sent when it emits a long trailer for a receiver, so a
        receiver that cannot be reached yet must not be in its route, or it would miss the
        upgrade and be unable to decrypt once it is reachable.
        """
        self.routes[ssrc] = tuple(receivers)
        self._install(ssrc)

    def _install(self, ssrc: int) -> None:
        self.forwarder.set_route(
            ssrc,
            [
                r
                for r in self.routes[ssrc]
                if (p := self.ports.get(r.id)) is not None and p.peer is not None
            ],
        )

    def latch(self, port: EndpointPort, addr: Address) -> None:
        port.peer = addr
        log.info("endpoint %s: address latched at %s:%d", port.endpoint_id, *addr)
        for ssrc in self.routes:
            self._install(ssrc)

    async def open_port(self, endpoint_id: str, port: int = 0) -> EndpointPort:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(
            lambda: EndpointPort(self, endpoint_id), local_addr=(self.host, port)
        )
        self.ports[endpoint_id] = proto
        return proto

    def close(self) -> None:
        for p in self.ports.values():
            if p.transport is not None:
                p.transport.close()
        self.ports.clear()

    def _drop(self, port: EndpointPort, reason: str, addr: Address) -> None:
        self.stats.dropped[reason] += 1
        if self.stats.dropped[reason] == 1 or reason == "address":
            log.info(
                "endpoint %s: dropped a datagram from %s:%d (%s)",
                port.endpoint_id,
                addr[0],
                addr[1],
                reason,
            )

    def datagram(self, port: EndpointPort, data: bytes, addr: Address) -> None:
        self.stats.received += 1
        kind = classify(data)
        if kind not in ("rtp", "rtcp"):
            self._drop(port, "dtls" if kind == "dtls" else "unknown_port", addr)
            return
        if port.peer is not None and addr != port.peer:
            self._drop(port, "address", addr)
            return
        verdict = self.forwarder.forward(data, kind == "rtcp")
        if verdict.drop is not None:
            self._drop(port, verdict.drop, addr)
            return
        if port.peer is None:
            if not self.latch_on_media:
                self._drop(port, "address", addr)
                return
            self.latch(port, addr)
        if verdict.tail is not None and self.on_tail is not None:
            self.on_tail(verdict.ssrc, verdict.tail)
        for out, receivers in verdict.outputs:
            for rid in receivers:
                rport = self.ports.get(rid)
                if rport is not None and rport.send(out):
                    self.stats.forwarded += 1
