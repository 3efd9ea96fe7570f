"""The socket side of one endpoint port: batched reads and batched sends beside asyncio.

asyncio's datagram transport makes one event-loop callback and one ``recvfrom`` per datagram
and one Python ``sendto`` call per output; at a few hundred thousand datagrams a second those
cost more than the forwarder's work. :class:`PortSocket` keeps the transport (it still binds,
owns and closes the socket, sends what the relay originates, and buffers when the kernel
says "full") and adds two things next to it:

- reading: ``recvmmsg`` of up to a batch of datagrams per wakeup (``_udpio.DatagramReceiver``)
  from a reader on a *duplicate* of the socket's descriptor. asyncio refuses a reader on a
  descriptor one of its transports owns, and the duplicate names the same socket, so this is
  the same port read another way (at the price of a second descriptor per port); the
  transport's own reading is paused for good.
- sending: a receiver's outputs of one batch in one ``sendmmsg`` (``_udpio.send_datagrams``),
  runs of equal-length datagrams as one UDP_SEGMENT (GSO) message where the kernel offers
  it. A refusal is handled as the transport handles one: a full buffer hands the rest to the
  transport (which queues it and sends it when the socket is writable), any other error goes
  to the protocol's ``error_received`` and costs that one datagram.

Every datagram still leaves through the endpoint's own socket. Where the loop has no
``add_reader`` (not a selector loop) the transport keeps reading one datagram per callback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from ctms_media._udpio import gso_supported, pack_sockaddr, send_datagrams

log = logging.getLogger("ctms_media.relay")

Address = tuple[Any, ...]

_FULL = (errno.EAGAIN, errno.EWOULDBLOCK)  # what asyncio's sendto takes for a full buffer


class PortSocket:
    """One endpoint port's socket, read in batches and written in batches (module doc)."""

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self.fd: int = sock.fileno()  # sends go out of the transport's own descriptor
        self.gso = gso_supported(sock)
        self.read_fd = -1  # the duplicate a reader watches; -1 while asyncio reads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peer: Address | None = None
        self._peer_raw = b""

    # -- reading -------------------------------------------------------------------------

    def start_reading(self, callback: Callable[[], None]) -> bool:
        """Call ``callback`` whenever the socket is readable, instead of the transport's
        per-datagram callback. False (and nothing changed) where the loop cannot do it."""
        loop = asyncio.get_running_loop()
        pause = getattr(self.transport, "pause_reading", None)
        if pause is None:
            return False
        fd = os.dup(self.fd)
        try:
            loop.add_reader(fd, callback)
        except (NotImplementedError, RuntimeError):
            os.close(fd)
            return False
        pause()
        self.read_fd, self._loop = fd, loop
        return True

    def stop_reading(self) -> None:
        """No more reads (the port is closing: what waits in it stays unread, as asyncio
        leaves it) and the duplicate descriptor closed. Idempotent."""
        fd, self.read_fd = self.read_fd, -1
        if fd < 0:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.remove_reader(fd)
        os.close(fd)

    # -- sending -------------------------------------------------------------------------

    def send(self, datagrams: list[bytes], peer: Address) -> None:
        """Send ``datagrams`` to ``peer`` in order, as ``transport.sendto`` one by one would
        (same order, same outcome for each), in as few system calls as the kernel takes."""
        transport = self.transport
        if transport.get_write_buffer_size() or transport.is_closing():
            # Something is queued behind a full buffer: these go behind it, not past it.
            for data in datagrams:
                transport.sendto(data, peer)
            return
        if peer is not self._peer:
            try:
                self._peer_raw = pack_sockaddr(peer)
            except (ValueError, TypeError):  # not an IP literal: let the socket module resolve
                for data in datagrams:
                    transport.sendto(data, peer)
                return
            self._peer = peer
        start, count = 0, len(datagrams)
        while start < count:
            sent, err, gso_failed = send_datagrams(
                self.fd, datagrams, start, self._peer_raw, self.gso
            )
            start += sent
            if not err:
                return
            if gso_failed:  # this path or device cannot segment: plain messages from now on
                self.gso = False
                log.info("UDP segmentation refused (%s); sending without it", os.strerror(err))
                continue
            if err in _FULL:  # the transport queues the rest and sends it when writable
                for data in datagrams[start:]:
                    transport.sendto(data, peer)
                return
            protocol = transport.get_protocol()
            protocol.error_received(OSError(err, os.strerror(err)))
            start += 1  # that datagram is lost, as the transport would lose it
