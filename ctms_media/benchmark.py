"""``ctms-media bench``: the forwarder against the physical floor and the alternatives, in one run.

What it measures, all in this process and run, so the ratios compare like with like:

(a) the floor: OpenSSL HMAC-SHA1 over the same packets, twice per forwarded packet (verify over
    the authenticated portion, re-tag over it less the tail byte), with the same precomputed
    key state the forwarder uses — the cheapest way to compute those two tags;
(b) the Cython forwarder in memory (``forward_batch``, batches of 256, fan-out 1);
(c) the pure-Python reference (``Forwarder.forward``);
(d) what a user would otherwise build: terminate SRTP with libsrtp (pylibsrtp), unprotect once
    and protect once per receiver (each receiver has its own keys);
(e) end to end over UDP on loopback: sender processes -> relay process -> receiver process.
    Capacity is inbound packets forwarded per second of the relay process's own CPU time (its
    getrusage), so load generators sharing the machine do not distort it; latency is the
    one-way time through the relay minus a direct loopback send of the same sender in the
    same run, at half of that capacity.

Sizes are RTP payload bytes: "160" is a 20 ms G.711 audio packet, "1200" a video packet; on
the wire each carries a 16-byte header (one CSRC), the tail byte, a 10-byte tag and a short
EKT trailer. Per-packet figures are medians over repetitions, in microseconds.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import select
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctms_media.forward.verdict import Receiver

SIZES = (160, 1200)
FANOUTS = (1, 8, 32)
PLOT_FANOUTS = (1, 2, 4, 8, 16, 32)
BATCH = 256
ID_OFFSET = 16  # latency runs write a packet id into the first payload bytes
TARGETS = {
    "floor_ratio_1200": 1.3,
    "audio_pps_per_core": 1_000_000,
    "vs_sfu_fanout8": 10.0,
    "vs_python": 50.0,
    "udp_pps_per_core": 250_000,
    "udp_p99_us": 1000.0,
}


def added_latency(
    relay_us: np.ndarray, relay_sent: np.ndarray, direct_us: np.ndarray, direct_sent: np.ndarray
) -> np.ndarray:
    """Per-packet added latency: each relayed packet's one-way time minus that of the direct
    packet sent closest to it (the sender interleaves them), so the kernel and scheduler
    noise of that moment cancels. Percentiles of this distribution are what the relay adds;
    a difference of two percentiles is not (it can even come out negative)."""
    if not len(relay_us) or not len(direct_us):
        return np.zeros(0)
    order = np.argsort(direct_sent)
    ds, dl = direct_sent[order], direct_us[order]
    pos = np.clip(np.searchsorted(ds, relay_sent), 1, len(ds) - 1) if len(ds) > 1 else None
    if pos is None:
        nearest = np.zeros(len(relay_sent), dtype=np.int64)
    else:
        left_closer = np.abs(relay_sent - ds[pos - 1]) <= np.abs(ds[pos] - relay_sent)
        nearest = np.where(left_closer, pos - 1, pos)
    return relay_us - dl[nearest]


@dataclass
class Plan:
    """How much work each measurement does: --quick trades precision for time."""

    reps: int
    py_packets: int
    sfu_packets: int
    capacity_s: float
    latency_s: float
    warmup_s: float
    senders: int
    fanouts: tuple[int, ...] = FANOUTS

    @classmethod
    def make(cls, quick: bool, plot: bool) -> Plan:
        fanouts = PLOT_FANOUTS if plot else FANOUTS
        if quick:
            return cls(15, 300, 400, 2.0, 2.0, 0.4, 2, fanouts)
        return cls(60, 1500, 2000, 5.0, 5.0, 0.5, 2, fanouts)


@dataclass
class Results:
    cpu: str = ""
    floor_us: dict[str, float] = field(default_factory=dict)
    fast_us: dict[str, float] = field(default_factory=dict)
    py_us: dict[str, float] = field(default_factory=dict)
    sfu_us_fanout8: dict[str, float] = field(default_factory=dict)
    fast_us_fanout8: dict[str, float] = field(default_factory=dict)
    udp_pps_per_core: float = 0.0
    udp_latency_us: dict[str, float] = field(default_factory=dict)
    # beside the JSON: what the table and the plot show too
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "floor_us": self.floor_us,
            "fast_us": self.fast_us,
            "py_us": self.py_us,
            "sfu_us_fanout8": self.sfu_us_fanout8,
            "fast_us_fanout8": self.fast_us_fanout8,
            "udp_pps_per_core": self.udp_pps_per_core,
            "udp_latency_us": self.udp_latency_us,
        }


def cpu_name() -> str:
    """The CPU model and core count (and SHA extensions, which set the HMAC floor)."""
    model, sha = platform.processor() or platform.machine(), False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and " sha_ni" in line:
                    sha = True
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores" + (", SHA-NI" if sha else "")


# -- in-memory measurements ---------------------------------------------------------------------


def _median_us(run: Callable[[], Any], packets: int, reps: int, prepare: Callable[[], Any]):
    """Median and best per-packet time of ``run`` over ``reps`` repetitions (µs)."""
    samples = []
    for _ in range(reps):
        prepare()
        t0 = time.perf_counter_ns()
        run()
        samples.append((time.perf_counter_ns() - t0) / packets / 1000)
    return statistics.median(samples), min(samples)


class Scene:
    """One sender SSRC, ``fan_out`` receivers at one position, packets of ``size`` payload
    bytes in a batch arena restamped with fresh indices before every repetition."""

    def __init__(self, size: int, fan_out: int, factory: Any, spi: int = 1) -> None:
        from ctms_media.fastpath.batch import Batch
        from ctms_media.fastpath.loadgen import SyntheticGroup, SyntheticStream

        self.group = SyntheticGroup(spi)
        self.stream = SyntheticStream(0x5EED0000 + size, self.group, key_start=0)
        self.size = size
        self.fwd = factory("ctms")
        self.fwd.add_group(*self.group.forwarder_args())
        self.fwd.add_stream(self.stream.ssrc, "video", self.group.profile)
        self.fwd.set_route(self.stream.ssrc, [Receiver(f"r{i}", 2, spi) for i in range(fan_out)])
        first = self.fwd.forward(self.stream.packet(0, size, long=True))
        assert first.drop is None, first
        self.batch = Batch(BATCH, fan_out=1)
        self.batch.out_receivers = np.zeros(BATCH * fan_out, np.int32)
        self.next = 1
        self.indices = np.arange(1, BATCH + 1, dtype=np.int64)
        self.stream.fill(self.batch.arena, self.batch.lengths, self.indices, size)
        self.batch.count = BATCH

    def restamp(self) -> None:
        self.indices = np.arange(self.next, self.next + BATCH, dtype=np.int64)
        self.next += BATCH
        self.stream.restamp(self.batch.arena, self.batch.lengths, self.indices)

    def run_batch(self) -> None:
        if self.batch.run(self.fwd) != BATCH:
            raise RuntimeError("batch did not complete")

    def check(self) -> None:
        codes = self.batch.results[:BATCH, 0]
        if codes.any():
            raise RuntimeError(f"benchmark packets dropped: codes {np.unique(codes)}")

    def packets(self, n: int) -> list[bytes]:
        """``n`` fresh packets as bytes (for the per-packet Python API)."""
        out = []
        while len(out) < n:
            self.restamp()
            out.extend(self.batch.datagram(i) for i in range(BATCH))
        return out[:n]


def measure_floor_and_fast(size: int, fan_out: int, reps: int) -> dict[str, float]:
    from ctms_media._fastforward import FastForwarder

    s = Scene(size, fan_out, FastForwarder)
    h, tag_len = s.stream.hmac, s.group.profile.rtp_tag_len
    arena, lengths = s.batch.arena, s.batch.lengths
    fast, fast_best = _median_us(s.run_batch, BATCH, reps, s.restamp)
    s.check()
    floor, floor_best = _median_us(
        lambda: h.floor_batch(arena, lengths, BATCH, tag_len, 1), BATCH, reps, lambda: None
    )
    oneshot, _ = _median_us(
        lambda: h.oneshot_batch(arena, lengths, BATCH, tag_len, 1), BATCH, reps, lambda: None
    )
    # forward() one datagram at a time: the same C path plus Python objects per packet
    single = s.packets(BATCH)
    fwd = s.fwd
    api, _ = _median_us(lambda: [fwd.forward(p) for p in single], BATCH, 1, lambda: None)
    return {
        "fast": fast,
        "fast_best": fast_best,
        "floor": floor,
        "floor_best": floor_best,
        "oneshot": oneshot,
        "fast_forward_api": api,
    }


def measure_python(size: int, fan_out: int, packets: int) -> float:
    from ctms_media.forward.forwarder import Forwarder

    s = Scene(size, fan_out, Forwarder)
    fwd = s.fwd
    chunks = [s.packets(packets // 5) for _ in range(5)]
    samples = []
    for chunk in chunks:
        t0 = time.perf_counter_ns()
        for p in chunk:
            fwd.forward(p)
        samples.append((time.perf_counter_ns() - t0) / len(chunk) / 1000)
    if fwd.forward(chunks[-1][-1]).drop != "replay":  # the packets were accepted once each
        raise RuntimeError("reference benchmark packets were not forwarded")
    return statistics.median(samples)


def measure_sfu(size: int, fan_out: int, packets: int) -> float:
    """Terminate and re-encrypt with libsrtp: unprotect once, protect once per receiver."""
    import struct

    import pylibsrtp

    def session(key: bytes, outbound: bool) -> pylibsrtp.Session:
        kind = pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND
        return pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=kind))

    uplink = os.urandom(30)  # the sender's key+salt; each receiver has its own
    sender, inbound = session(uplink, True), session(uplink, False)
    outs = [session(os.urandom(30), True) for _ in range(fan_out)]
    payload = bytes(size)
    protected = [
        sender.protect(struct.pack("!BBHIII", 0x81, 96, i & 0xFFFF, 0, 0x51F0, 0x200) + payload)
        for i in range(packets)
    ]
    samples = []
    step = max(1, packets // 5)
    for c in range(0, packets, step):
        chunk = protected[c : c + step]
        t0 = time.perf_counter_ns()
        for p in chunk:
            plain = inbound.unprotect(p)
            for o in outs:
                o.protect(plain)
        samples.append((time.perf_counter_ns() - t0) / len(chunk) / 1000)
    return statistics.median(samples)


# -- end to end over UDP --------------------------------------------------------------------


def _big_buffers(sock: socket.socket) -> None:
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # *BUFFORCE as root
        for o in (force, opt):
            try:
                sock.setsockopt(socket.SOL_SOCKET, o, 8 << 20)
                break
            except OSError:
                continue


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _relay_main(conn: Any, group: Any, streams: list, receiver_addr: tuple, gso: bool) -> None:
    """The relay process: a FastForwarder over one UDP socket with batched I/O."""
    from ctms_media._fastforward import FastForwarder
    from ctms_media.fastpath.relay import AddressBook, Relay

    fwd = FastForwarder("ctms")
    fwd.add_group(*group.forwarder_args())
    for ssrc, _ in streams:
        fwd.add_stream(ssrc, "audio", group.profile)
        fwd.set_route(ssrc, [Receiver("rx", 2, group.spi)])
    book = AddressBook()
    book.set(fwd.receiver_slot("rx"), *receiver_addr)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock)
    sock.bind(("127.0.0.1", 0))
    relay = Relay(sock, fwd, book, capacity=128, slot=512, fan_out=1, gso=gso)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    conn.send(sock.getsockname())
    while True:
        if conn.poll():
            cmd = conn.recv()
            st = relay.stats
            conn.send(
                {
                    "cpu": _cpu_seconds(),
                    "wall": time.perf_counter(),
                    "received": st.received,
                    "forwarded": st.forwarded,
                    "sent": st.sent,
                    "batches": st.batches,
                    "dropped": dict(st.dropped),
                }
            )
            if cmd == "stop":
                return
        if poller.poll(5):  # drain, but answer a mark between batches
            while relay.step() == relay.capacity and not conn.poll():
                pass


def _receiver_main(conn: Any, max_ids: int) -> None:
    """The receiving room: counts datagrams, and stamps arrival times by packet id."""
    from ctms_media._udpio import note_arrivals, recv_batch

    socks = []
    for _ in range(2):  # [0] gets the relay's output, [1] the direct sends
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _big_buffers(s)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    conn.send([s.getsockname() for s in socks])
    arena = np.zeros((256, 512), np.uint8)
    lengths = np.zeros(256, np.int32)
    arrival = [np.zeros(max_ids, np.int64), np.zeros(max_ids, np.int64)]
    counts = [0, 0]
    poller = select.poll()
    for s in socks:
        poller.register(s.fileno(), select.POLLIN)
    fds = {s.fileno(): i for i, s in enumerate(socks)}
    while True:
        if conn.poll():
            cmd = conn.recv()
            if cmd == "reset":
                for a in arrival:
                    a[:] = 0
                counts = [0, 0]
                conn.send(True)
            elif cmd == "report":
                conn.send((counts, arrival))
            elif cmd == "stop":
                return
        for fd, _ in poller.poll(5):
            which = fds[fd]
            while True:
                n = recv_batch(fd, arena, lengths)
                if not n:
                    break
                counts[which] += n
                note_arrivals(arena, n, ID_OFFSET, arrival[which], time.perf_counter_ns())
                if n < len(lengths):
                    break


def _sender_main(
    conn: Any, group: Any, streams: list, relay: tuple, direct: tuple, payload: int
) -> None:
    """A sending room: blasts or paces pre-built packets, stamped in C per batch."""
    from ctms_media._udpio import pack_address, send_batch
    from ctms_media.fastpath.loadgen import SyntheticStream

    rows = 64
    senders = [SyntheticStream(ssrc, group, key, key_start=0) for ssrc, key in streams]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock)
    sock.bind(("127.0.0.1", 0))
    to_relay, to_direct = pack_address(*relay), pack_address(*direct)
    arenas, lengths = [], []
    for s in senders:
        a, n = np.zeros((rows, 512), np.uint8), np.zeros(rows, np.int32)
        s.fill(a, n, np.arange(1, rows + 1), payload, 0x80)
        arenas.append(a)
        lengths.append(n)
        sock.sendto(s.packet(0, payload, 0x80, long=True), relay)  # announce the key
    nxt = [1] * len(senders)

    def stamp(k: int, n: int) -> None:
        idx = np.arange(nxt[k], nxt[k] + n, dtype=np.int64)
        nxt[k] += n
        senders[k].restamp(arenas[k][:n], lengths[k][:n], idx)

    conn.send(True)
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            return
        if cmd[0] == "blast":  # as fast as the socket takes them, one stream per batch
            _, seconds = cmd
            end, sent, k = time.perf_counter() + seconds, 0, 0
            for a in arenas:
                a[:, ID_OFFSET : ID_OFFSET + 4] = 0
            while time.perf_counter() < end:
                stamp(k, rows)
                sent += send_batch(sock.fileno(), arenas[k], lengths[k], rows, 0, to_relay)
                k = (k + 1) % len(senders)
            conn.send(sent)
        elif cmd[0] == "paced":  # ``rate`` per second; every 4th batch goes direct
            _, seconds, rate, id_base, max_ids = cmd
            sent_at = np.zeros(max_ids, np.int64)
            direct_ids: list[np.ndarray] = []
            t0 = time.perf_counter_ns()
            end = t0 + int(seconds * 1e9)
            sent = k = batch_no = 0
            next_id = id_base
            while True:
                now = time.perf_counter_ns()
                if now >= end or next_id + rows >= max_ids:
                    break
                due = int(rate * (now - t0) / 1e9) - sent
                if due <= 0:
                    time.sleep(100e-6)
                    continue
                n = min(due, rows)
                ids = np.arange(next_id, next_id + n, dtype=np.uint32)
                next_id += n
                arenas[k][:n, ID_OFFSET : ID_OFFSET + 4] = ids.view(np.uint8).reshape(n, 4)
                go_direct = batch_no % 4 == 3
                if go_direct:  # the direct path carries unmodified, never-relayed copies
                    direct_ids.append(ids.astype(np.int64))
                else:
                    stamp(k, n)
                t = time.perf_counter_ns()
                send_batch(
                    sock.fileno(), arenas[k], lengths[k], n, 0, to_direct if go_direct else to_relay
                )
                sent_at[ids.astype(np.int64)] = t
                sent += n
                batch_no += 1
                k = (k + 1) % len(senders)
            conn.send((sent, sent_at, np.concatenate(direct_ids) if direct_ids else []))


class EndToEnd:
    """Spawned processes on loopback: senders -> relay -> receiver, with a direct path."""

    def __init__(
        self,
        plan: Plan,
        payload: int = 160,
        streams_per_sender: int = 4,
        gso: bool = True,
    ) -> None:
        from ctms_media.fastpath.loadgen import SyntheticGroup

        self.gso = gso
        self.plan = plan
        self.payload = payload
        self.ctx = mp.get_context("spawn")
        self.group = SyntheticGroup(1)
        self.streams = [
            [(0x10000 * (s + 1) + i, os.urandom(16)) for i in range(streams_per_sender)]
            for s in range(plan.senders)
        ]
        self.procs: list[Any] = []
        self.max_ids = 4_000_000

    def _spawn(self, target: Callable[..., None], *args: Any) -> Any:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=target, args=(child, *args), daemon=True)
        p.start()
        self.procs.append(p)
        return parent

    def start(self) -> None:
        self.rx = self._spawn(_receiver_main, self.max_ids)
        self.rx_addrs = self.rx.recv()
        all_streams = [s for group in self.streams for s in group]
        self.relay = self._spawn(_relay_main, self.group, all_streams, self.rx_addrs[0], self.gso)
        self.relay_addr = self.relay.recv()
        self.senders = [
            self._spawn(
                _sender_main,
                self.group,
                st,
                self.relay_addr,
                self.rx_addrs[1],
                self.payload,
            )
            for st in self.streams
        ]
        for s in self.senders:
            s.recv()
        time.sleep(0.2)  # the key announcements reach the relay

    def mark(self) -> dict[str, Any]:
        self.relay.send("mark")
        return self.relay.recv()

    def capacity(self) -> dict[str, float]:
        """Inbound packets forwarded per relay CPU-second, the senders blasting."""
        p = self.plan
        for s in self.senders:
            s.send(("blast", p.warmup_s + p.capacity_s))
        time.sleep(p.warmup_s)
        a = self.mark()
        time.sleep(p.capacity_s)
        b = self.mark()
        offered = sum(s.recv() for s in self.senders)
        cpu = b["cpu"] - a["cpu"]
        wall = b["wall"] - a["wall"]
        fwd = b["forwarded"] - a["forwarded"]
        return {
            "pps_per_core": fwd / cpu if cpu > 0 else 0.0,
            "relay_cpu_share": cpu / wall if wall > 0 else 0.0,
            "wall_pps": fwd / wall if wall > 0 else 0.0,
            "offered": offered,
            "batch_fill": (b["received"] - a["received"]) / max(1, b["batches"] - a["batches"]),
            "dropped": {
                k: v - a["dropped"][k] for k, v in b["dropped"].items() if v != a["dropped"][k]
            },
        }

    def latency(self, rate: float) -> dict[str, Any]:
        """One-way latency through the relay and direct, at ``rate`` packets per second from
        the first sender (one load process fewer competing with the relay for the cores)."""
        p = self.plan
        sender = self.senders[0]
        self.rx.send("reset")
        self.rx.recv()
        a = self.mark()
        sender.send(("paced", p.latency_s, rate, 1, self.max_ids))
        n, sent_at, direct_ids = sender.recv()
        time.sleep(0.2)
        b = self.mark()
        self.rx.send("report")
        counts, arrival = self.rx.recv()
        direct_mask = np.zeros(len(sent_at), bool)
        if len(direct_ids):
            direct_mask[np.asarray(direct_ids)] = True
        ids = np.nonzero(sent_at)[0]
        lat, when = [], []
        for mask, which in ((~direct_mask, 0), (direct_mask, 1)):
            sel = ids[mask[ids]]
            got = arrival[which][sel]
            ok = got > 0
            lat.append((got[ok] - sent_at[sel][ok]) / 1000.0)
            when.append(sent_at[sel][ok])
        cpu = b["cpu"] - a["cpu"]
        wall = b["wall"] - a["wall"]
        return {
            "rate": rate,
            "achieved_pps": n / p.latency_s,
            "relay_cpu_share": cpu / wall if wall > 0 else 0.0,
            "relay_us": lat[0],
            "direct_us": lat[1],
            "added_us": added_latency(lat[0], when[0], lat[1], when[1]),
            "received": counts,
            "lost_relayed": int((~direct_mask[ids]).sum() - len(lat[0])),
        }

    def stop(self) -> None:
        for conn, cmd in [
            *((s, ("stop",)) for s in getattr(self, "senders", [])),
            *((r, "stop") for r in [getattr(self, "rx", None)] if r),
        ]:
            with contextlib.suppress(OSError):
                conn.send(cmd)
        relay = getattr(self, "relay", None)
        if relay is not None:
            try:
                relay.send("stop")
                relay.recv()
            except (OSError, EOFError):
                pass
        for p in self.procs:
            p.join(3)
            if p.is_alive():
                p.terminate()


# -- the run ------------------------------------------------------------------------------------


def run_bench(quick: bool, as_json: bool, plot: str | None) -> int:
    """Measure everything, print the table (or one JSON object), optionally plot."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    plan = Plan.make(quick, plot is not None)
    res = Results(cpu=cpu_name())
    console = Console(stderr=True)
    fan = {"fast": {}, "floor": {}, "py": {}, "sfu": {}}
    steps: list[tuple[str, Callable[[], None]]] = []

    def in_memory(size: int, k: int) -> Callable[[], None]:
        def step() -> None:
            m = measure_floor_and_fast(size, k, plan.reps)
            fan["fast"][(size, k)] = m["fast"]
            fan["floor"][(size, k)] = m["floor"]
            if k == 1:
                res.floor_us[str(size)] = round(m["floor"], 4)
                res.fast_us[str(size)] = round(m["fast"], 4)
                res.extra[f"fast_best_{size}"] = m["fast_best"]
                res.extra[f"floor_best_{size}"] = m["floor_best"]
                res.extra[f"oneshot_hmac_{size}"] = m["oneshot"]
                res.extra[f"fast_forward_api_{size}"] = m["fast_forward_api"]
            if k == 8 and size == 1200:
                res.fast_us_fanout8["1200"] = round(m["fast"], 4)

        return step

    def python(size: int, k: int) -> Callable[[], None]:
        def step() -> None:
            us = measure_python(size, k, plan.py_packets)
            fan["py"][(size, k)] = us
            if k == 1:
                res.py_us[str(size)] = round(us, 3)

        return step

    def sfu(size: int, k: int) -> Callable[[], None]:
        def step() -> None:
            us = measure_sfu(size, k, plan.sfu_packets)
            fan["sfu"][(size, k)] = us
            if k == 8 and size == 1200:
                res.sfu_us_fanout8["1200"] = round(us, 3)

        return step

    for size in SIZES:
        for k in sorted({1, 8, *plan.fanouts} if size == 1200 else {1}):
            steps.append((f"Cython forwarder + floor, {size} B, fan-out {k}", in_memory(size, k)))
    for size in SIZES:
        py_fanouts = sorted({1, 8, *plan.fanouts}) if size == 1200 else [1]
        py_fanouts = py_fanouts if plot else [k for k in py_fanouts if k in (1, 8)]
        for k in py_fanouts:
            steps.append((f"pure-Python reference, {size} B, fan-out {k}", python(size, k)))
    for k in sorted({1, 8, *plan.fanouts}):
        steps.append((f"libsrtp terminate + re-encrypt, 1200 B, fan-out {k}", sfu(1200, k)))

    e2e = EndToEnd(plan)
    lat: dict[str, Any] = {}

    def e2e_start() -> None:
        e2e.start()

    def e2e_capacity() -> None:
        cap = e2e.capacity()
        res.udp_pps_per_core = round(cap["pps_per_core"])
        res.extra["udp_capacity"] = cap

    def e2e_latency() -> None:
        out = e2e.latency(res.udp_pps_per_core / 2)
        lat.update(out)
        r, d, added = out["relay_us"], out["direct_us"], out["added_us"]
        if len(added):
            res.udp_latency_us = {
                "p50": round(float(np.percentile(added, 50)), 1),
                "p99": round(float(np.percentile(added, 99)), 1),
            }
        res.extra["udp_latency"] = {
            "rate": out["rate"],
            "achieved_pps": out["achieved_pps"],
            "relay_cpu_share": out["relay_cpu_share"],
            "relay_p50": float(np.percentile(r, 50)) if len(r) else None,
            "relay_p99": float(np.percentile(r, 99)) if len(r) else None,
            "direct_p50": float(np.percentile(d, 50)) if len(d) else None,
            "direct_p99": float(np.percentile(d, 99)) if len(d) else None,
            "samples": [len(r), len(d)],
            "lost_relayed": out["lost_relayed"],
        }

    def e2e_no_gso() -> None:
        plain = EndToEnd(plan, gso=False)
        try:
            plain.start()
            res.extra["udp_capacity_no_gso"] = plain.capacity()
        finally:
            plain.stop()

    steps += [
        ("UDP: start sender, relay and receiver processes", e2e_start),
        ("UDP: relay capacity (senders blasting)", e2e_capacity),
        ("UDP: latency at half capacity, relayed and direct", e2e_latency),
    ]
    if not quick:
        steps.append(("UDP: relay capacity again, one sendmmsg message per datagram", e2e_no_gso))
    t_start = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
    ) as progress:
        task = progress.add_task("benchmark", total=len(steps))
        try:
            for label, step in steps:
                progress.update(task, description=label)
                step()
                progress.advance(task)
        finally:
            e2e.stop()
    res.extra["seconds"] = time.perf_counter() - t_start
    res.extra["fanout"] = fan
    if as_json:
        print(json.dumps(res.as_json()))
    else:
        print_table(res)
    if plot:
        draw(plot, fan, lat, res)
    return 0


def ratios(res: Results) -> dict[str, float]:
    """The issue's targets as numbers (higher is better except the floor ratio and p99)."""
    out: dict[str, float] = {}
    if res.floor_us.get("1200"):
        out["floor_ratio_1200"] = res.fast_us["1200"] / res.floor_us["1200"]
    if res.fast_us.get("160"):
        out["audio_pps_per_core"] = 1e6 / res.fast_us["160"]
    if res.fast_us_fanout8.get("1200"):
        out["vs_sfu_fanout8"] = res.sfu_us_fanout8["1200"] / res.fast_us_fanout8["1200"]
    if res.fast_us.get("1200") and res.py_us.get("1200"):
        out["vs_python"] = min(
            res.py_us[s] / res.fast_us[s] for s in ("160", "1200") if s in res.py_us
        )
    out["udp_pps_per_core"] = res.udp_pps_per_core
    if "p99" in res.udp_latency_us:
        out["udp_p99_us"] = res.udp_latency_us["p99"]
    return out


def target_met(name: str, value: float) -> bool:
    goal = TARGETS[name]
    return value <= goal if name in ("floor_ratio_1200", "udp_p99_us") else value >= goal


def print_table(res: Results) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ctms-media bench — {res.cpu}")
    t.add_column("measure")
    t.add_column("160 B", justify="right")
    t.add_column("1200 B", justify="right")
    t.add_column("note")

    def row(name: str, d: dict[str, Any], note: str = "") -> None:
        t.add_row(name, *(f"{d[s]:.3f} µs" if s in d else "—" for s in ("160", "1200")), note)

    row("(a) floor: 2 × HMAC-SHA1, precomputed state", res.floor_us)
    row(
        "    one-shot OpenSSL HMAC() × 2 (re-keys)",
        {
            s: res.extra[f"oneshot_hmac_{s}"]
            for s in ("160", "1200")
            if f"oneshot_hmac_{s}" in res.extra
        },
        "for reference",
    )
    row("(b) Cython forward_batch, fan-out 1", res.fast_us, "median of repetitions")
    row(
        "    Cython forward() per datagram",
        {
            s: res.extra[f"fast_forward_api_{s}"]
            for s in ("160", "1200")
            if f"fast_forward_api_{s}" in res.extra
        },
        "Verdict objects per packet",
    )
    row("(c) pure-Python reference, fan-out 1", res.py_us)
    py8 = res.extra.get("fanout", {}).get("py", {}).get((1200, 8))
    if py8:
        row("    pure-Python reference, fan-out 8", {"1200": py8})
    row("(d) libsrtp terminate, fan-out 8", res.sfu_us_fanout8, "per inbound packet")
    row("    Cython forward_batch, fan-out 8", res.fast_us_fanout8, "per inbound packet")
    Console().print(t)

    e = Table(title="end to end over UDP loopback (160 B audio, fan-out 1)")
    e.add_column("measure")
    e.add_column("value", justify="right")
    cap = res.extra.get("udp_capacity", {})
    e.add_row("relay: forwarded packets per relay CPU-second", f"{res.udp_pps_per_core:,.0f}")
    if cap:
        e.add_row("relay CPU share while blasted", f"{cap['relay_cpu_share']:.2f}")
        e.add_row("relay wall-clock packets/s while blasted", f"{cap['wall_pps']:,.0f}")
        e.add_row("mean datagrams per recvmmsg batch", f"{cap['batch_fill']:.1f}")
    plain = res.extra.get("udp_capacity_no_gso")
    if plain:
        e.add_row("same, one message per datagram (no UDP GSO)", f"{plain['pps_per_core']:,.0f}")
    lat = res.extra.get("udp_latency", {})
    if lat:
        e.add_row(
            "offered rate (half capacity) / achieved",
            f"{lat['rate']:,.0f} / {lat['achieved_pps']:,.0f}",
        )
        for k in ("relay_p50", "relay_p99", "direct_p50", "direct_p99"):
            if lat.get(k) is not None:
                e.add_row(f"one-way {k.replace('_', ' ')}", f"{lat[k]:.1f} µs")
    if lat:
        e.add_row("relayed packets lost / samples", f"{lat['lost_relayed']} / {lat['samples']}")
    for k in ("p50", "p99"):
        if k in res.udp_latency_us:
            e.add_row(f"added latency {k}", f"{res.udp_latency_us[k]:.1f} µs")
    Console().print(e)

    g = Table(title="targets (same run)")
    g.add_column("target")
    g.add_column("value", justify="right")
    g.add_column("goal", justify="right")
    g.add_column("met")
    names = {
        "floor_ratio_1200": ("Cython 1200 B ÷ floor", "≤ {:.1f}×", "{:.2f}×"),
        "audio_pps_per_core": ("audio packets/s per core in memory", "≥ {:,.0f}", "{:,.0f}"),
        "vs_sfu_fanout8": ("libsrtp terminate ÷ Cython, fan-out 8", "≥ {:.0f}×", "{:.1f}×"),
        "vs_python": ("pure Python ÷ Cython (worse size)", "≥ {:.0f}×", "{:.0f}×"),
        "udp_pps_per_core": ("UDP forwarded packets per relay CPU-s", "≥ {:,.0f}", "{:,.0f}"),
        "udp_p99_us": ("UDP added latency p99 at half load", "< {:,.0f} µs", "{:.0f} µs"),
    }
    for name, value in ratios(res).items():
        label, goal, fmt = names[name]
        g.add_row(
            label,
            fmt.format(value),
            goal.format(TARGETS[name]),
            "yes" if target_met(name, value) else "NO",
        )
    Console().print(g)


def draw(path: str, fan: dict[str, dict], lat: dict[str, Any], res: Results) -> None:
    """Per-packet cost against fan-out for each approach (with the floor), and the latency
    distributions of the relayed and the direct path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {
        "sfu": ("libsrtp terminate + re-encrypt", "tab:red"),
        "py": ("pure-Python reference", "tab:orange"),
        "fast": ("Cython forward_batch", "tab:blue"),
        "floor": ("floor: 2 × HMAC-SHA1", "black"),
    }
    for key, (label, color) in styles.items():
        pts = sorted((k, v) for (size, k), v in fan[key].items() if size == 1200)
        if pts:
            ax.plot(
                [k for k, _ in pts],
                [v for _, v in pts],
                marker="o",
                label=label,
                color=color,
                linestyle="--" if key == "floor" else "-",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("receivers at one position (fan-out)")
    ax.set_ylabel("µs per inbound 1200 B packet")
    ax.set_title("cost per packet against fan-out")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    r, d = lat.get("relay_us", np.zeros(0)), lat.get("direct_us", np.zeros(0))
    if len(r) and len(d):
        hi = float(np.percentile(r, 99.9))
        bins = np.linspace(0, max(hi, 1.0), 80)
        bx.hist(d, bins=bins, alpha=0.6, label="direct loopback", density=True)
        bx.hist(r, bins=bins, alpha=0.6, label="through the relay", density=True)
        for q, style in ((50, "-"), (99, ":")):
            bx.axvline(np.percentile(r, q), color="tab:orange", linestyle=style)
            bx.axvline(np.percentile(d, q), color="tab:blue", linestyle=style)
        bx.set_xlabel("one-way latency, µs (lines: p50 solid, p99 dotted)")
        bx.set_title(f"latency at {lat.get('rate', 0):,.0f} packets/s (half capacity)")
        bx.legend()
    fig.suptitle(res.cpu)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
