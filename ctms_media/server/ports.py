"""UDP port allocation for endpoints (one port per endpoint, wire.md §1)."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

from ctms_media.errors import CtmsError


class PortsExhausted(CtmsError):
    """Every port of the configured range is in use."""


class PortsUnavailable(CtmsError):
    """A media port could not be bound for another reason (no descriptors, no address)."""


class PortAllocator:
    """Hands out ports of [low, high], lowest free first, and takes them back on leave.

    Binding is attempted here, because another process may hold a port of the range: such a
    port is skipped, not reported as ours.
    """

    def __init__(self, host: str, low: int, high: int) -> None:
        self.host = host
        self.low = low
        self.high = high
        self.in_use: set[int] = set()
        self._next = low

    async def bind(
        self, factory: Callable[[], asyncio.DatagramProtocol]
    ) -> tuple[asyncio.DatagramTransport, asyncio.DatagramProtocol, int]:
        loop = asyncio.get_running_loop()
        span = self.high - self.low + 1
        for i in range(span):
            port = self.low + (self._next - self.low + i) % span
            if port in self.in_use:
                continue
            try:
                transport, proto = await loop.create_datagram_endpoint(
                    factory, local_addr=(self.host, port)
                )
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            self.in_use.add(port)
            self._next = port + 1 if port < self.high else self.low
            return transport, proto, port  # type: ignore[return-value]
        raise PortsExhausted(f"no free UDP port in {self.low}-{self.high}")

    def release(self, port: int) -> None:
        self.in_use.discard(port)
