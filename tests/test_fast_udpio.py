"""Batched UDP I/O (ctms_media._udpio) and the small relay loop, on loopback.

Both the recvmmsg/sendmmsg path and the plain fallback run on Linux, so both are tested.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading

import numpy as np
import pytest
from ctms_media._fastforward import FastForwarder
from ctms_media._udpio import (
    ADDR_SIZE,
    BatchedDatagramReader,
    DatagramReceiver,
    pack_address,
    pack_sockaddr,
    recv_batch,
    send_batch,
    send_datagrams,
    send_outputs,
    unpack_address,
)

from ctms_media.fastpath.loadgen import SyntheticGroup, SyntheticStream
from ctms_media.fastpath.relay import AddressBook, AsyncRelay, RelayStats, run_relay
from ctms_media.forward.forwarder import Forwarder
from ctms_media.forward.verdict import Receiver

MMSG = pytest.mark.parametrize("mmsg", [True, False], ids=["mmsg", "plain"])


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def drain(sock: socket.socket, want: int, arena: np.ndarray, lengths: np.ndarray, mmsg: bool):
    """Datagrams received into arena rows until ``want`` arrived (loopback is immediate, but
    a wakeup may split them)."""
    got = 0
    while got < want:
        wait_readable(sock)
        got += recv_batch(sock.fileno(), arena[got:], lengths[got:], None, None, -1, mmsg)
    return [arena[i, : lengths[i]].tobytes() for i in range(got)]


def wait_readable(sock: socket.socket) -> None:
    assert select.select([sock], [], [], 5)[0], "nothing arrived within 5 s"


def test_addresses_round_trip() -> None:
    raw = pack_address("127.0.0.1", 40000)
    assert unpack_address(np.frombuffer(raw, np.uint8)) == ("127.0.0.1", 40000)
    raw6 = pack_address("::1", 5004)
    assert len(raw6) <= ADDR_SIZE
    assert unpack_address(np.frombuffer(raw6, np.uint8)) == ("::1", 5004)
    with pytest.raises(ValueError):
        pack_address("example.org", 1)


@MMSG
def test_send_and_receive_batches_with_sources(mmsg: bool) -> None:
    a, b = udp(), udp()
    n_dgrams = 100  # well inside a default receive buffer: loopback drops nothing
    arena = np.zeros((n_dgrams, 256), np.uint8)
    lengths = np.zeros(n_dgrams, np.int32)
    for i in range(n_dgrams):
        data = bytes([i & 0xFF]) * (1 + 2 * i)
        arena[i, : len(data)] = np.frombuffer(data, np.uint8)
        lengths[i] = len(data)
    dest = pack_address(*b.getsockname())
    assert send_batch(a.fileno(), arena, lengths, n_dgrams, 0, dest, mmsg) == n_dgrams
    rx = np.zeros((400, 256), np.uint8)
    rx_len = np.zeros(400, np.int32)
    addrs = np.zeros((400, ADDR_SIZE), np.uint8)
    addrlens = np.zeros(400, np.int32)
    got = 0
    while got < n_dgrams:
        wait_readable(b)
        got += recv_batch(b.fileno(), rx[got:], rx_len[got:], addrs[got:], addrlens[got:], -1, mmsg)
    assert got == n_dgrams
    for i in range(n_dgrams):
        assert rx[i, : rx_len[i]].tobytes() == arena[i, : lengths[i]].tobytes()
        assert unpack_address(addrs[i, : addrlens[i]]) == a.getsockname()
    assert recv_batch(b.fileno(), rx, rx_len, None, None, -1, mmsg) == 0  # nothing waiting
    a.close()
    b.close()


@MMSG
def test_a_datagram_longer_than_a_row_is_never_cut_and_processed(mmsg: bool) -> None:
    a, b = udp(), udp()
    for data in (b"\x80" * 64, b"\x81" * 300, b"\x82" * 256):  # fits, too long, exactly fits
        a.sendto(data, b.getsockname())
    arena = np.zeros((8, 256), np.uint8)
    lengths = np.full(8, -1, np.int32)
    got = drain(b, 3, arena, lengths, mmsg)
    assert got == [b"\x80" * 64, b"", b"\x82" * 256]  # length 0: the forwarder's `malformed`
    fwd = FastForwarder()
    assert fwd.forward(b"").drop == "malformed"
    a.close()
    b.close()


@MMSG
def test_send_outputs_shares_a_variant_between_receivers(mmsg: bool) -> None:
    tx, r0, r1, r2 = udp(), udp(), udp(), udp()
    book = AddressBook(2)
    for slot, sock in enumerate((r0, r1, r2)):
        book.set(slot, *sock.getsockname())  # grows past its first capacity
    out = np.frombuffer(b"variant-A" + b"variant-B", np.uint8).copy()
    meta = np.array([[0, 9, 0, 2, 0], [9, 9, 2, 2, 0]], np.int64)
    receivers = np.array([0, 2, 1, 5], np.int32)  # slot 5 has no address: skipped
    sent, dropped = send_outputs(tx.fileno(), out, meta, 2, receivers, book.table, book.lens, mmsg)
    assert (sent, dropped) == (3, 1)
    arena = np.zeros((4, 64), np.uint8)
    lengths = np.zeros(4, np.int32)
    assert drain(r0, 1, arena, lengths, mmsg) == [b"variant-A"]
    assert drain(r2, 1, arena, lengths, mmsg) == [b"variant-A"]
    assert drain(r1, 1, arena, lengths, mmsg) == [b"variant-B"]
    for s in (tx, r0, r1, r2):
        s.close()


def meeting(fan_out: int = 3) -> tuple[SyntheticStream, list[bytes], list[Receiver]]:
    g = SyntheticGroup(7)
    s = SyntheticStream(0x4242, g, key_start=100)
    packets = [s.packet(100 + i, 120, 0x80, long=i % 10 == 0) for i in range(60)]
    receivers = [Receiver(f"r{i}", 1 + i % 2, 7) for i in range(fan_out)]
    return s, packets, receivers


def configured(factory, s: SyntheticStream, receivers: list[Receiver]):
    fwd = factory("ctms")
    fwd.add_group(*s.group.forwarder_args())
    fwd.add_stream(s.ssrc, "audio", s.group.profile)
    fwd.set_route(s.ssrc, receivers)
    return fwd


def expected_per_receiver(s, packets, receivers) -> dict[str, list[bytes]]:
    ref = configured(Forwarder, s, receivers)
    want: dict[str, list[bytes]] = {r.id: [] for r in receivers}
    for p in packets:
        for rid, data in ref.forward(p).by_receiver().items():
            want[rid].append(data)
    return want


@MMSG
@pytest.mark.parametrize("gso", [False, True], ids=["one-by-one", "gso"])
def test_relay_loop_forwards_over_loopback(mmsg: bool, gso: bool) -> None:
    s, packets, receivers = meeting()
    fwd = configured(FastForwarder, s, receivers)
    relay, sender = udp(), udp()
    rx = [udp() for _ in receivers]
    book = AddressBook()
    for r, sock in zip(receivers, rx, strict=True):
        book.set(fwd.receiver_slot(r.id), *sock.getsockname())
    stop = threading.Event()
    result: list[RelayStats] = []
    t = threading.Thread(
        target=lambda: result.append(run_relay(relay, fwd, book, stop.is_set, 16, 10, mmsg, gso))
    )
    t.start()
    try:
        for p in packets:
            sender.sendto(p, relay.getsockname())
        sender.sendto(b"\x80\x00junk", relay.getsockname())
        want = expected_per_receiver(s, packets, receivers)
        arena = np.zeros((len(packets), 2048), np.uint8)
        lengths = np.zeros(len(packets), np.int32)
        for r, sock in zip(receivers, rx, strict=True):
            assert drain(sock, len(packets), arena, lengths, mmsg) == want[r.id]
    finally:
        stop.set()
        t.join(5)
    stats = result[0]
    assert stats.received == len(packets) + 1 and stats.forwarded == len(packets)
    assert stats.dropped["malformed"] == 1 and stats.sent == len(packets) * len(receivers)
    for sock in (relay, sender, *rx):
        sock.close()


def test_asyncio_relay_drains_in_batches() -> None:
    s, packets, receivers = meeting(fan_out=2)
    fwd = configured(FastForwarder, s, receivers)
    want = expected_per_receiver(s, packets, receivers)

    async def main() -> tuple[dict[str, list[bytes]], AsyncRelay]:
        loop = asyncio.get_running_loop()
        relay_sock, sender = udp(), udp()
        rx = {r.id: udp() for r in receivers}
        book = AddressBook()
        for rid, sock in rx.items():
            book.set(fwd.receiver_slot(rid), *sock.getsockname())
        relay = AsyncRelay(relay_sock, fwd, book, capacity=8)
        relay.start()
        got: dict[str, list[bytes]] = {rid: [] for rid in rx}
        done = asyncio.Event()

        def collect(rid: str):
            def on_batch(reader: BatchedDatagramReader, n: int) -> None:
                got[rid].extend(reader.arena[i, : reader.lengths[i]].tobytes() for i in range(n))
                if all(len(v) == len(packets) for v in got.values()):
                    done.set()

            return on_batch

        readers = [BatchedDatagramReader(rx[rid], collect(rid), 8) for rid in rx]
        for r in readers:
            r.start()
        for p in packets:
            sender.sendto(p, relay_sock.getsockname())
        await asyncio.wait_for(done.wait(), 5)
        for r in readers:
            r.stop()
        relay.stop()
        for sock in (relay_sock, sender, *rx.values()):
            sock.close()
        assert loop.is_running()
        return got, relay

    got, relay = asyncio.run(main())
    assert got == want
    assert relay.stats.forwarded == len(packets) and relay.wakeups >= 1


@MMSG
def test_gso_sends_equal_datagrams_to_one_receiver_as_segments(mmsg: bool) -> None:
    tx, rx = udp(), udp()
    book = AddressBook()
    book.set(0, *rx.getsockname())
    datagrams = [bytes([i]) * 200 for i in range(70)] + [b"short", b"x" * 200]
    out = np.frombuffer(b"".join(datagrams), np.uint8).copy()
    offsets = np.cumsum([0] + [len(d) for d in datagrams])
    meta = np.array([[offsets[i], len(d), 0, 1, 0] for i, d in enumerate(datagrams)], np.int64)
    receivers = np.zeros(1, np.int32)
    sent, dropped = send_outputs(
        tx.fileno(), out, meta, len(datagrams), receivers, book.table, book.lens, mmsg, True
    )
    assert (sent, dropped) == (len(datagrams), 0)
    arena = np.zeros((len(datagrams), 256), np.uint8)
    lengths = np.zeros(len(datagrams), np.int32)
    assert drain(rx, len(datagrams), arena, lengths, mmsg) == datagrams
    tx.close()
    rx.close()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


FAMILIES = pytest.mark.parametrize(
    "family,host",
    [
        (socket.AF_INET, "127.0.0.1"),
        pytest.param(
            socket.AF_INET6,
            "::1",
            marks=pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback"),
        ),
    ],
    ids=["ipv4", "ipv6"],
)


@MMSG
@FAMILIES
def test_datagram_receiver_hands_out_what_recvfrom_would(
    mmsg: bool, family: int, host: str
) -> None:
    """Same bytes, same address tuple as socket.recvfrom (what asyncio hands a protocol);
    a datagram longer than a row comes as its size, never cut; at most ``capacity``."""
    a = socket.socket(family, socket.SOCK_DGRAM)
    b = socket.socket(family, socket.SOCK_DGRAM)
    c = socket.socket(family, socket.SOCK_DGRAM)
    for s in (a, b, c):
        s.bind((host, 0))
    b.setblocking(False)
    sent = [(a, b"one"), (a, bytes(1200)), (c, b"x" * 1201), (a, b""), (c, b"z" * 5000)]
    sent += [(a, bytes([i]) * 50) for i in range(8)]
    for src, data in sent:
        src.sendto(data, b.getsockname())
    wait_readable(b)
    rx = DatagramReceiver(8, 1200, mmsg)
    got = rx.receive(b.fileno())
    assert len(got) == 8
    got += rx.receive(b.fileno())
    assert rx.receive(b.fileno()) == []
    assert len(got) == len(sent)
    for (src, data), (item, addr) in zip(sent, got, strict=True):
        assert addr == src.getsockname()
        assert item == (len(data) if len(data) > 1200 else data)
    assert got[0][1] is got[1][1]  # one tuple for a run of one source
    for s in (a, b, c):
        s.close()


@MMSG
@pytest.mark.parametrize("gso", [False, True], ids=["plain", "gso"])
def test_send_datagrams_keeps_order_and_content(mmsg: bool, gso: bool) -> None:
    a, b = udp(), udp()
    b.settimeout(2)
    data = [bytes([i % 256]) * 100 for i in range(150)] + [b"short", b"L" * 1400, b"L" * 1400]
    data += [b"huge" * 400]  # above a GSO segment: a message of its own
    sent, err, gso_failed = send_datagrams(
        a.fileno(), data, 5, pack_sockaddr(b.getsockname()), gso, mmsg
    )
    assert (sent, err, gso_failed) == (len(data) - 5, 0, False)
    assert [b.recv(4096) for _ in range(len(data) - 5)] == data[5:]
    a.close()
    b.close()


def test_send_datagrams_stops_at_the_first_refusal() -> None:
    a = udp()
    six = pack_sockaddr(("::1", 9, 0, 0))  # an IPv6 destination for an IPv4 socket
    sent, err, gso_failed = send_datagrams(a.fileno(), [b"a", b"b"], 0, six, False)
    assert sent == 0 and err != 0 and not gso_failed
    with pytest.raises(TypeError):
        send_datagrams(a.fileno(), [b"a", bytearray(b"b")], 0, six, False)
    a.close()


def test_pack_sockaddr_takes_both_tuple_shapes() -> None:
    assert pack_sockaddr(("127.0.0.1", 5004)) == pack_address("127.0.0.1", 5004)
    assert pack_sockaddr(("::1", 5004, 0, 0)) == pack_address("::1", 5004)
    scoped = pack_sockaddr(("fe80::1", 5004, 7, 3))
    assert scoped != pack_address("fe80::1", 5004) and len(scoped) == 28
    with pytest.raises(ValueError):
        pack_sockaddr(("127.0.0.1", 5004, 0, 0))
