"""Asyncio glue for one :class:`DtlsServer`: a timer and a send callback, nothing more.

The UDP server owns the socket and the demultiplexer; it hands DTLS datagrams here. Keeping
this layer this thin is what keeps everything that can go wrong in the handshake inside the
sans-IO state machine, where tests reach it without a network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable

from ctms_media.dtls.negotiator import DtlsEvent, DtlsServer

__all__ = ["DtlsDriver"]

SendFn = Callable[[bytes, Hashable], None]
EventFn = Callable[[DtlsEvent], None]


class DtlsDriver:
    """Runs a :class:`DtlsServer` on the event loop's clock.

    ``send(datagram, addr)`` is called synchronously (a ``DatagramTransport.sendto`` fits);
    ``on_event`` gets :class:`HandshakeComplete`, :class:`HandshakeFailed` and
    :class:`PeerClosed` as they happen.
    """

    def __init__(
        self,
        server: DtlsServer,
        send: SendFn,
        on_event: EventFn | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.server = server
        self._send = send
        self._on_event = on_event
        self._loop = loop or asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def datagram_received(self, data: bytes, addr: Hashable) -> None:
        """Feed a DTLS datagram from ``addr``; replies go back to ``addr``.

        Replies go to the sender, not to the latched peer, because before the cookie verifies
        the only reply is a HelloVerifyRequest, which must reach whoever asked.
        """
        if self._closed:
            return
        for datagram in self.server.receive(data, self._loop.time(), addr):
            self._send(datagram, addr)
        self._after()

    def close(self) -> None:
        """Stop the timer; the server object is left as it is for inspection."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        out = self.server.handle_timeout(self._loop.time())
        peer = self.server.peer_address
        if peer is not None:
            for datagram in out:
                self._send(datagram, peer)
        self._after()

    def _after(self) -> None:
        if self._on_event is not None:
            for event in self.server.pop_events():
                self._on_event(event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.server.next_timeout()
        if deadline is not None and not self._closed:
            self._timer = self._loop.call_at(deadline, self._on_timer)
