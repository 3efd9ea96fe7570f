"""A minimal relay: one UDP socket, a FastForwarder, batched receive/forward/send.

Small on purpose and reusable: the benchmark's relay process runs it, and the real server can
drive :class:`Relay` from its own loop (``step``/``drain``) or through asyncio
(:class:`AsyncRelay`). Receivers are the forwarder's interned slots; an :class:`AddressBook`
says where each slot's datagrams go. Source-address latching and DTLS/STUN demultiplexing are
the server's job, not this loop's: every datagram read here goes to the forwarder.

Per batch only integers cross between Python and C: the arrays are bound once to the
forwarder (``bind``) and to the socket (``BatchSocket``).
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctms_media._udpio import ADDR_SIZE, BatchSocket, gso_supported, pack_address
from ctms_media.fastpath.batch import Batch
from ctms_media.forward.verdict import DROP_REASONS


class AddressBook:
    """Receiver slot -> destination sockaddr, as rows ``send_outputs`` reads directly."""

    def __init__(self, capacity: int = 64) -> None:
        self.table = np.zeros((capacity, ADDR_SIZE), np.uint8)
        self.lens = np.zeros(capacity, np.int32)
        self.version = 0  # bumped when the arrays are replaced (grown)

    def set(self, slot: int, host: str, port: int) -> None:
        self.set_raw(slot, pack_address(host, port))

    def set_raw(self, slot: int, raw: bytes) -> None:
        if slot >= len(self.lens):
            grown = max(2 * len(self.lens), slot + 1)
            table = np.zeros((grown, ADDR_SIZE), np.uint8)
            lens = np.zeros(grown, np.int32)
            table[: len(self.lens)] = self.table
            lens[: len(self.lens)] = self.lens
            self.table, self.lens = table, lens
            self.version += 1
        self.table[slot, :] = 0
        self.table[slot, : len(raw)] = np.frombuffer(raw, np.uint8)
        self.lens[slot] = len(raw)

    def forget(self, slot: int) -> None:
        if slot < len(self.lens):
            self.lens[slot] = 0


@dataclass
class RelayStats:
    """What the loop did; every datagram read ends up forwarded or in ``dropped``."""

    received: int = 0
    forwarded: int = 0  # inbound datagrams accepted
    sent: int = 0  # datagrams sent to receivers
    send_failed: int = 0
    batches: int = 0
    errors: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


class Relay:
    """A forwarder over one socket. ``step`` moves one batch; nothing raises on socket errors
    (they are counted), so the loop around it never dies on a bad datagram or peer."""

    def __init__(
        self,
        sock: socket.socket,
        fwd: Any,
        book: AddressBook,
        capacity: int = 64,
        slot: int = 2048,
        fan_out: int = 4,
        mmsg: bool = True,
        gso: bool | None = None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fwd = fwd
        self.book = book
        self.gso = gso_supported(sock) if gso is None else gso
        self.batch = b = Batch(capacity, slot, fan_out)
        fwd.bind(b.arena, b.lengths, b.results, b.out_arena, b.out_meta, b.out_receivers)
        self.io = BatchSocket(
            sock.fileno(),
            b.arena,
            b.lengths,
            b.out_arena,
            b.out_meta,
            b.out_receivers,
            book.table,
            book.lens,
            mmsg,
            self.gso,
        )
        self._book_version = book.version
        self._counts0 = fwd.verdict_counts()
        self._stats = RelayStats()

    @property
    def capacity(self) -> int:
        return self.batch.capacity

    def step(self) -> int:
        """Receive what is waiting (up to one batch), forward it, send the outputs; returns
        the number of datagrams received (0: nothing was waiting)."""
        st = self._stats
        try:
            n = self.io.recv()
        except OSError:
            st.errors += 1
            return 0
        if not n:
            return 0
        if self.book.version != self._book_version:
            self.io.set_addresses(self.book.table, self.book.lens)
            self._book_version = self.book.version
        start = 0
        try:
            while start < n:
                done, n_out, _, _ = self.fwd.run_bound(n, start)
                sent, failed = self.io.send(n_out)
                st.sent += sent
                st.send_failed += failed
                start = done
        except OSError:
            st.errors += 1
        st.received += n
        st.batches += 1
        return n

    def drain(self, max_batches: int = 1 << 30) -> int:
        """Steps while full batches keep coming; returns datagrams received."""
        total = 0
        for _ in range(max_batches):
            n = self.step()
            total += n
            if n < self.capacity:
                break
        return total

    @property
    def stats(self) -> RelayStats:
        """Counters so far (verdict counts come from the forwarder's C tallies)."""
        st = self._stats
        counts = self.fwd.verdict_counts()
        st.forwarded = counts[0] - self._counts0[0]
        st.dropped = {
            reason: counts[i] - self._counts0[i] for i, reason in enumerate(DROP_REASONS, 1)
        }
        return st


def run_relay(
    sock: socket.socket,
    fwd: Any,
    book: AddressBook,
    stop: Callable[[], bool],
    capacity: int = 64,
    poll_ms: int = 50,
    mmsg: bool = True,
    gso: bool | None = None,
) -> RelayStats:
    """Relay until ``stop()`` is true (checked at least every ``poll_ms``): wait for the
    socket, then drain it batch by batch. ``gso`` None: use UDP GSO where the kernel has it."""
    relay = Relay(sock, fwd, book, capacity, mmsg=mmsg, gso=gso)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while not stop():
        if poller.poll(poll_ms):
            relay.drain()
    return relay.stats


class AsyncRelay:
    """The same loop on asyncio: the socket's reader callback drains it in batches (at most
    ``max_batches`` per wakeup, so one busy socket cannot starve the event loop)."""

    def __init__(
        self,
        sock: socket.socket,
        fwd: Any,
        book: AddressBook,
        capacity: int = 64,
        max_batches: int = 16,
        mmsg: bool = True,
        gso: bool | None = None,
    ) -> None:
        self.relay = Relay(sock, fwd, book, capacity, mmsg=mmsg, gso=gso)
        self.max_batches = max_batches
        self.wakeups = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def stats(self) -> RelayStats:
        return self.relay.stats

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.relay.sock.fileno(), self._readable)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.relay.sock.fileno())
            self._loop = None

    def _readable(self) -> None:
        self.wakeups += 1
        self.relay.drain(self.max_batches)
