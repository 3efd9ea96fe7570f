"""``ctms-media soak``: a long run of the meeting engine through a real relay process, with
loss, reordering and duplication injected on every room's path, and every count reconciled.

Why each part is the way it is:

- The relay is a child process (``ctms-media serve --config`` on a throwaway TOML file, a free
  API port, a certificate in a temporary directory), so the resident memory read from
  ``/proc/<pid>/status`` and the CPU time read from ``/proc/<pid>/stat`` are the relay's
  alone, and a crash is a dead process plus a traceback in a log file, not an exception
  swallowed somewhere in a shared event loop.
- The load is :func:`ctms_media.sim.meeting.run_meetings` (what ``demo`` and ``load`` run)
  against the relay's admin API, every room connected through its own
  :class:`~ctms_media.sim.impair.ImpairedLink` (both directions, handshake included).
- The number of conferences is half the measured capacity (:func:`probe`), unless
  ``--conferences`` fixes it: a soak looks for leaks and unexplained drops, not for the
  overload behaviour of whichever side saturates first.
- Every drop is explained, not just counted: each link watches, in delivery order, every
  datagram it hands to the kernel and replays it through a model of the far end
  (:class:`FarEnd`): the relay's forwarder for the uplink, the room's EKT receiver for the
  downlink. The model says which datagrams must be replays, which arrive before their
  stream's key, which hop-control packets are replays, and which DTLS datagrams carry nothing
  new; the relay's ``/metrics`` and the rooms' counters must match it exactly (DTLS: at most).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ctms_media.errors import CtmsError
from ctms_media.server.config import RelayConfig
from ctms_media.sim.impair import Faults, ImpairedLink, LinkCounters
from ctms_media.sim.meeting import (
    Address,
    ApiClient,
    LoadError,
    Metrics,
    RunOptions,
    RunStatus,
    SimRoom,
    run_meetings,
)
from ctms_media.sim.srtp_room import EktReceiver
from ctms_media.wire.control import is_control_packet
from ctms_media.wire.ekt import FORMAT_CTMS
from ctms_media.wire.rtp import classify

LOCAL = "127.0.0.1"
RSS_GROWTH_LIMIT_PCT = 5.0
SHUTDOWN_LIMIT_S = 2.0  # SIGTERM -> exit 0 within this long
WARM_MIN_S = 30.0  # the warm RSS sample: after 10 % of the run or 30 s, whichever is later,
WARM_SHARE = 0.1  # but never past the middle of a short run
RSS_WINDOW_S = 5.0  # the warm and the end figure are medians of the samples of 5 s windows
PROBE_STEPS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48)
PROBE_EFFICIENCY = 0.85  # a step scales if it forwards >= 85 % of C x the 1-conference rate
CPU_SATURATED = 0.90  # of one core: a single-threaded process cannot go much past this
PORT_SPAN = 1000  # the relay's media port range; one port per room, far more than needed
RECENT_GENERATION = 8192  # datagrams a FarEnd remembers per generation (two are kept)
KINDS = ("media", "control", "dtls", "other")


class SoakError(CtmsError):
    """The relay could not be started, or the run could not be set up."""


# -- the relay process -----------------------------------------------------------------------------


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


class RelayProcess:
    """``ctms-media serve`` in a child process with its own config, certificate and log."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.api_port = _free_tcp_port()
        # Below Linux's ephemeral range, so the rooms' and links' own sockets rarely land in
        # it; the relay's allocator skips any port someone else holds anyway.
        self.port_min = random.randrange(20000, 32000 - PORT_SPAN)
        self.port_max = self.port_min + PORT_SPAN - 1
        self.url = f"http://{LOCAL}:{self.api_port}"
        self.config = workdir / "relay.toml"
        config = RelayConfig.on_loopback(workdir, self.port_min, self.port_max, self.api_port)
        self.config.write_text(config.to_toml())
        self.log_path = workdir / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.shutdown_s: float | None = None
        self._clock_tick = os.sysconf("SC_CLK_TCK")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "ctms_media.cli", "serve", "--config", str(self.config)]
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SoakError(f"the relay exited {self.proc.returncode}:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/v1/conferences", timeout=2) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.05)
        raise SoakError(f"the relay did not answer in {timeout:g} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def memory_kb(self) -> dict[str, int]:
        """VmRSS (the relay's resident memory: the soak's criterion) and its anonymous part,
        RssAnon (heap: where a leak grows; file pages of the code come and go with the page
        cache). Empty once the process is gone."""
        out: dict[str, int] = {}
        with contextlib.suppress(OSError, IndexError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(("VmRSS:", "RssAnon:")):
                    out[line.split(":")[0]] = int(line.split()[1])
        return out

    def rss_kb(self) -> int:
        return self.memory_kb().get("VmRSS", 0)

    def cpu_seconds(self) -> float:
        """utime + stime of the relay process."""
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / self._clock_tick
        return 0.0

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_problems(self) -> dict[str, int]:
        """Tracebacks and ERROR/CRITICAL records: a clean relay writes neither."""
        text = self.log_text()
        return {
            "tracebacks": text.count("Traceback (most recent call last)"),
            "errors": len(re.findall(r"^\S+ \S+ (ERROR|CRITICAL) ", text, re.MULTILINE)),
        }

    def terminate(self) -> None:
        """SIGTERM, then the time to exit; killed (and reported) if it takes over 10 s."""
        if self.proc is None or self.exit_code is not None:
            return
        if self.proc.poll() is not None:
            self.exit_code = self.proc.returncode
            return
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(10)
            self.shutdown_s = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.exit_code = None


# -- the faulty paths and their accounting ---------------------------------------------------------


class _Recent:
    """Datagrams seen lately, by content (two generations): a duplicate follows its original
    within the longest reorder hold, so a bounded memory recognises every one of them."""

    def __init__(self) -> None:
        self.current: set[bytes] = set()
        self.previous: set[bytes] = set()

    def __contains__(self, data: bytes) -> bool:
        return data in self.current or data in self.previous

    def add(self, data: bytes) -> None:
        if len(self.current) >= RECENT_GENERATION:
            self.previous, self.current = self.current, set()
        self.current.add(data)


def _trailer_is_long(data: bytes, ekt_format: str) -> bool:
    """A key-carrying EKT trailer (wire.md §5/§6): CTMS long has its low bit set, RFC 8870
    anything but the one-byte short form."""
    return bool(data[-1] & 1) if ekt_format == FORMAT_CTMS else data[-1] != 0


def _dtls_messages(data: bytes) -> set[tuple[int, ...]]:
    """What the records of one DTLS datagram carry: (type, epoch, message_seq,
    fragment_offset) for cleartext handshake fragments, (type, epoch) for the rest. A
    retransmitted flight repeats these with new record numbers; a duplicate repeats the bytes."""
    out: set[tuple[int, ...]] = set()
    pos = 0
    while pos + 13 <= len(data):
        ctype, epoch = data[pos], int.from_bytes(data[pos + 3 : pos + 5], "big")
        length = int.from_bytes(data[pos + 11 : pos + 13], "big")
        body = data[pos + 13 : pos + 13 + length]
        if ctype == 22 and epoch == 0 and len(body) >= 12:
            out.add(
                (
                    ctype,
                    epoch,
                    int.from_bytes(body[4:6], "big"),
                    body[6] << 16 | body[7] << 8 | body[8],
                )
            )
        else:
            out.add((ctype, epoch))
        pos += 13 + length
    return out


@dataclass
class FarEnd:
    """The receiving end of one direction of one link, modelled datagram by datagram in the
    order the link delivers them: the relay's forwarder (uplink) or the room's EKT receiver
    (downlink). Both hold no key for a stream until a long EKT trailer of it arrives, and both
    keep a 1024-packet replay window, so with holds of at most tens of ms:

    - a media datagram (RTP or end-to-end SRTCP) before any long trailer of its SSRC: ``no_key``;
    - a byte-identical copy of one that was accepted: ``replay`` (the relay's drop reason, a
      room's libsrtp "replay check failed");
    - a hop-keyed control packet (PT 204 APP, the relay's PLI/FIR) seen before:
      ``control_replay`` (libsrtp's SRTCP replay check under the hop keys, on either side);
    - one delivered before this end can have finished DTLS (before both the peer's
      ChangeCipherSpec and its Finished were delivered, in any order: OpenSSL keeps a record of
      the next epoch until the ChangeCipherSpec comes): ``control_early``, no hop keys to
      check it with (a relay's GSP overtaking its own lost or held Finished);
    - a DTLS datagram whose every record was delivered before: ``dtls_redundant`` (a duplicate
      or a retransmitted flight: the most the relay may count as ``dtls``).
    """

    keyed: set[int] = field(default_factory=set)
    recent: _Recent = field(default_factory=_Recent)
    dtls_seen: set[tuple[int, ...]] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)

    def media(self, data: bytes, rtcp: bool, long: bool) -> None:
        ssrc = int.from_bytes(data[4:8] if rtcp else data[8:12], "big")
        if long:
            self.keyed.add(ssrc)
        if ssrc not in self.keyed:
            self.counts["no_key"] += 1
        elif data in self.recent:
            self.counts["replay"] += 1
        else:
            self.recent.add(data)
            self.counts["ok"] += 1

    @property
    def hop_ready(self) -> bool:
        return (20, 0) in self.dtls_seen and (22, 1) in self.dtls_seen

    def control(self, data: bytes) -> None:
        if not self.hop_ready:
            self.counts["control_early"] += 1
        elif data in self.recent:
            self.counts["control_replay"] += 1
        else:
            self.recent.add(data)
            self.counts["control_ok"] += 1

    def dtls(self, data: bytes) -> None:
        messages = _dtls_messages(data)
        self.counts["dtls"] += 1
        if messages <= self.dtls_seen:
            self.counts["dtls_redundant"] += 1
        self.dtls_seen |= messages


class _Tap(asyncio.DatagramTransport):
    """Stands in for one side's transport of a link: every datagram the link hands the kernel
    passes here first, held (reordered) copies included, in the order they leave."""

    def __init__(self, inner: asyncio.DatagramTransport, seen: Callable[[bytes], None]) -> None:
        super().__init__()
        self.inner = inner
        self.seen = seen

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.seen(bytes(data))
        self.inner.sendto(data, addr)

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def close(self) -> None:
        self.inner.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)


@dataclass
class SoakLink(ImpairedLink):
    """An :class:`ImpairedLink` that also counts its faults by kind of datagram and models what
    its far ends must make of what it delivers (see :class:`FarEnd`)."""

    room: SimRoom | None = None
    up_kinds: dict[str, LinkCounters] = field(
        default_factory=lambda: {k: LinkCounters() for k in KINDS}
    )
    down_kinds: dict[str, LinkCounters] = field(
        default_factory=lambda: {k: LinkCounters() for k in KINDS}
    )
    relay_end: FarEnd = field(default_factory=FarEnd)  # the relay, fed what goes up
    room_end: FarEnd = field(default_factory=FarEnd)  # the room, fed what comes down
    down_arrived: Counter[str] = field(default_factory=Counter)  # from the relay, by kind

    async def open(self, host: str = LOCAL) -> Address:
        near = await super().open(host)
        for side, upstream in ((self._far, True), (self._near, False)):
            assert side is not None and side.transport is not None
            side.transport = _Tap(side.transport, lambda d, u=upstream: self._delivered(d, u))
        return near

    def _kind(self, data: bytes, upstream: bool) -> str:
        kind = classify(data)
        if kind == "dtls":
            return "dtls"
        if kind == "rtp":
            return "media"
        if kind == "rtcp":
            if is_control_packet(data):
                return "control"
            client = self.room.client if self.room is not None else None
            relay_ssrc = client.relay_ssrc if client is not None else -1
            own = int.from_bytes(data[4:8], "big") == relay_ssrc
            return "control" if own and not upstream else "media"  # the room's own rule
        return "other"

    def _ekt_format(self) -> str:
        client = self.room.client if self.room is not None else None
        if client is not None and client.groups:
            return next(iter(client.groups.values())).ekt_format
        return FORMAT_CTMS

    def arrived(self, data: bytes, addr: Address, upstream: bool) -> None:
        counters = self.up if upstream else self.down
        before = (counters.passed, counters.lost, counters.reordered, counters.duplicated)
        super().arrived(data, addr, upstream)
        kind = self._kind(data, upstream)
        if not upstream and addr == self.relay:
            self.down_arrived[kind] += 1
        after = (counters.passed, counters.lost, counters.reordered, counters.duplicated)
        delta = LinkCounters(*(a - b for a, b in zip(after, before, strict=True)))
        (self.up_kinds if upstream else self.down_kinds)[kind].add(delta)

    def _delivered(self, data: bytes, upstream: bool) -> None:
        end = self.relay_end if upstream else self.room_end
        kind = self._kind(data, upstream)
        if kind == "media":
            end.media(data, classify(data) == "rtcp", _trailer_is_long(data, self._ekt_format()))
        elif kind == "control":
            end.control(data)
        elif kind == "dtls":
            end.dtls(data)
        else:
            end.counts["other"] += 1


class SoakReceiver(EktReceiver):
    """A room's EKT receiver whose misses are told apart: a packet rejected by libsrtp's
    replay check (a duplicate of one already decrypted) and a packet that arrived before any
    key of its stream (the key-carrying packet was lost or is still held) are not decryption
    failures; ``failed`` keeps only what should never happen (bad tag, unknown SPI, an EKT
    trailer that does not unwrap, a malformed packet)."""

    def __init__(self) -> None:
        super().__init__({})
        self.no_key = 0

    def _missing_key(self) -> None:
        self.no_key += 1


def _sum(counters: Iterable[LinkCounters]) -> LinkCounters:
    total = LinkCounters()
    for c in counters:
        total.add(c)
    return total


def _counts(c: LinkCounters) -> dict[str, int]:
    return {
        "passed": c.passed,
        "lost": c.lost,
        "reordered": c.reordered,
        "duplicated": c.duplicated,
    }


# -- one run of meetings through links -------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds into the media window
    rss_kb: int
    anon_kb: int
    relay_cpu: float
    own_cpu: float
    wall: float


class SoakView:
    """Fed by the run's monitor twice a second: samples the relay (RSS, CPU) and this
    process (CPU) in the media window, and shows progress on stderr: a rich live table on a
    terminal, one line every ``every`` seconds otherwise (a log file of a long run)."""

    wants_state = False

    def __init__(
        self,
        relay: RelayProcess,
        links: list[SoakLink],
        label: str,
        console: Console | None,
        every: float = 15.0,
    ) -> None:
        self.relay = relay
        self.links = links
        self.label = label
        self.console = console
        self.every = every
        self.samples: list[Sample] = []
        self.end: Sample | None = None
        self.live: Live | None = None
        self._rate = 0.0  # the relay's forwarded/s over the last second or so
        self._last: tuple[float, float] | None = None
        self._printed = 0  # the first line after ``every`` seconds, then one each ``every``
        if console is not None and console.is_terminal:
            self.live = Live(console=console, auto_refresh=False, transient=True)
            self.live.start()

    def _sample(self, t: float) -> Sample:
        mem = self.relay.memory_kb()
        return Sample(
            t,
            mem.get("VmRSS", 0),
            mem.get("RssAnon", 0),
            self.relay.cpu_seconds(),
            time.process_time(),
            time.monotonic(),
        )

    def update(self, status: RunStatus) -> None:
        if status.phase == "media":
            self.samples.append(self._sample(status.elapsed))
        elif status.phase == "done" and self.end is None:
            self.end = self._sample(status.options.seconds)
        m = status.metrics
        if m is not None:
            now = time.monotonic()
            if self._last is None:
                self._last = (now, m.forwarded)
            elif now - self._last[0] >= 0.9:
                self._rate = (m.forwarded - self._last[1]) / (now - self._last[0])
                self._last = (now, m.forwarded)
        if self.console is None:
            return
        if self.live is not None:
            self.live.update(self._render(status), refresh=True)
        elif status.phase == "media" and int(status.elapsed // self.every) > self._printed:
            self._printed = int(status.elapsed // self.every)
            self.console.print(self._line(status), soft_wrap=True, highlight=False)

    def _figures(self, status: RunStatus) -> dict[str, Any]:
        rooms = [r for mt in status.meetings for r in mt.rooms]
        recv = [
            r.client.receiver
            for r in rooms
            if r.client is not None and isinstance(r.client.receiver, SoakReceiver)
        ]
        m = status.metrics
        return {
            "rss": self.samples[-1].rss_kb if self.samples else self.relay.rss_kb(),
            "rate": self._rate,
            "drops": m.drops() if m is not None else {},
            "ok": sum(x.ok for x in recv),
            "failed": sum(x.failed for x in recv),
            "replayed": sum(x.replayed for x in recv),
            "no_key": sum(x.no_key for x in recv),
            "lost": sum(lk.up.lost + lk.down.lost for lk in self.links),
            "dup": sum(lk.up.duplicated + lk.down.duplicated for lk in self.links),
        }

    def _line(self, status: RunStatus) -> str:
        f = self._figures(status)
        return (
            f"{self.label} {status.elapsed:6.1f}/{status.options.seconds:g} s  "
            f"relay forwarded {f['rate']:,.0f}/s  drops {f['drops'] or 'none'}  "
            f"RSS {f['rss'] / 1024:.1f} MiB  decrypt ok {f['ok']} failed {f['failed']} "
            f"(replays {f['replayed']}, before key {f['no_key']})  "
            f"injected lost {f['lost']} dup {f['dup']}"
        )

    def _render(self, status: RunStatus) -> Group:
        f = self._figures(status)
        total = status.options.seconds
        head = Table.grid(padding=(0, 2))
        head.add_row(
            Text.assemble((f"ctms-media soak {self.label}", "bold"), f"  {status.phase}"),
            ProgressBar(total=total, completed=min(status.elapsed, total), width=40),
            Text(f"{status.elapsed:5.1f}/{total:g} s"),
        )
        t = Table(box=None, show_header=False, pad_edge=False)
        t.add_column(style="bold")
        t.add_column()
        t.add_row(
            "conferences",
            f"{len(status.meetings)} ({sum(len(m.rooms) for m in status.meetings)} rooms)",
        )
        t.add_row("relay forwarded/s", f"{f['rate']:,.0f}")
        t.add_row("relay drops", str(f["drops"] or "none"))
        t.add_row("relay RSS", f"{f['rss'] / 1024:.1f} MiB")
        t.add_row(
            "rooms decrypt",
            Text.assemble(
                f"ok {f['ok']}  ",
                (f"failed {f['failed']}", "bold red" if f["failed"] else ""),
                f"  replays rejected {f['replayed']}  before key {f['no_key']}",
            ),
        )
        t.add_row("injected", f"lost {f['lost']}  duplicated {f['dup']}")
        return Group(head, t)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


@dataclass
class RunResult:
    """One run of meetings through links: the meeting report, the relay's counters over
    exactly the run, the links, and the samples taken in the media window."""

    report: dict[str, Any]
    relay: Metrics  # final scrape minus the scrape before the run
    links: list[SoakLink]
    receivers: list[SoakReceiver]
    rooms: list[SimRoom]
    view: SoakView
    media_start: Sample | None
    media_end: Sample | None


async def _scrape(url: str) -> Metrics:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        return await ApiClient(url, http).metrics()


async def run_through_links(
    relay: RelayProcess,
    conferences: int,
    rooms: int,
    seconds: float,
    faults: Faults,
    rng: random.Random,
    label: str,
    console: Console | None,
) -> RunResult:
    """``conferences`` meetings for ``seconds`` of media, every room behind its own link."""
    links: list[SoakLink] = []
    receivers: list[SoakReceiver] = []
    seen_rooms: list[SimRoom] = []

    async def route(room: SimRoom, to: Address) -> Address:
        link = SoakLink(to, faults, random.Random(rng.getrandbits(64)), room=room)
        links.append(link)
        seen_rooms.append(room)
        return await link.open(LOCAL)

    def receiver() -> EktReceiver:
        r = SoakReceiver()
        receivers.append(r)
        return r

    options = RunOptions(
        api=relay.url,
        conferences=conferences,
        rooms=rooms,
        seconds=seconds,
        prefix=f"soak-{secrets.token_hex(3)}",
        mode="soak",
        route=route,
        receiver=receiver,
    )
    view = SoakView(relay, links, label, console)
    base = await _scrape(relay.url)
    try:
        report = await run_meetings(options, view)
    finally:
        view.close()
        await asyncio.sleep(0.2)  # anything still held by a link lands before it closes
        for link in links:
            link.close()
    final = await _scrape(relay.url)
    samples = view.samples
    return RunResult(
        report,
        final.since(base),
        links,
        receivers,
        seen_rooms,
        view,
        samples[0] if samples else None,
        view.end or (samples[-1] if samples else None),
    )


def _cpu_share(a: Sample | None, b: Sample | None) -> tuple[float, float]:
    """(relay, this process) CPU over [a, b] as a share of one core."""
    if a is None or b is None or b.wall <= a.wall:
        return 0.0, 0.0
    wall = b.wall - a.wall
    return round((b.relay_cpu - a.relay_cpu) / wall, 3), round((b.own_cpu - a.own_cpu) / wall, 3)


def _link_delivered_up(links: list[SoakLink]) -> int:
    return sum(lk.up.passed + lk.up.duplicated for lk in links)


# -- capacity --------------------------------------------------------------------------------------


async def probe(
    relay: RelayProcess,
    rooms: int,
    faults: Faults,
    rng: random.Random,
    step_seconds: float,
    max_conferences: int,
    console: Console | None,
) -> dict[str, Any]:
    """Capacity: run 1, 2, 3, 4, 6, 8 ... conferences for ``step_seconds`` of media each,
    through faulty links exactly as the soak does, and stop at the first step that

    - forwards less than :data:`PROBE_EFFICIENCY` x C x the 1-conference rate (the relay's
      ``ctms_packets_forwarded_total`` per second: throughput stopped growing with load), or
    - loses datagrams on the way into the relay beyond those injected (relay received < links
      delivered: its socket buffer overflowed), or
    - saturates a process: the relay's or this load generator's CPU (utime + stime over the
      media window) at :data:`CPU_SATURATED` of one core or more.

    Capacity is the last step that did none of these. The limit is the generator when it
    saturated its CPU or could not keep its own sending schedule (media sent per second below
    :data:`PROBE_EFFICIENCY` x C x the 1-conference figure: its 20 ms ticks ran late) while the
    relay neither saturated nor lost datagrams; otherwise the relay.
    """
    steps: list[dict[str, Any]] = []
    capacity, stopped_by, limit = 0, "probe maximum reached", "not reached (at least this)"
    base_rate = base_sent = 0.0
    for c in [s for s in PROBE_STEPS if s <= max_conferences]:
        run = await run_through_links(
            relay, c, rooms, step_seconds, faults, rng, f"probe C={c}", console
        )
        relay_cpu, own_cpu = _cpu_share(run.media_start, run.media_end)
        rate = run.report["relay"]["forwarded_per_s"]
        sent = run.report["sent"] / run.report["seconds"] if run.report["seconds"] else 0.0
        base_rate, base_sent = base_rate or rate, base_sent or sent
        efficiency = round(rate / (c * base_rate), 3) if base_rate else 0.0
        sending = round(sent / (c * base_sent), 3) if base_sent else 0.0
        kernel_loss = _link_delivered_up(run.links) - int(run.relay.received)
        step = {
            "conferences": c,
            "relay_forwarded_per_s": rate,
            "rooms_received_per_s": run.report["forwarded_per_s"],
            "efficiency": efficiency,
            "sending": sending,
            "relay_cpu": relay_cpu,
            "generator_cpu": own_cpu,
            "uplink_kernel_loss": kernel_loss,
        }
        steps.append(step)
        reasons = []
        if efficiency < PROBE_EFFICIENCY:
            reasons.append(f"forwarded/s {efficiency:.0%} of linear")
        if kernel_loss > 0:
            reasons.append(f"{kernel_loss} datagrams lost into the relay")
        if relay_cpu >= CPU_SATURATED:
            reasons.append(f"relay CPU {relay_cpu:.0%}")
        if own_cpu >= CPU_SATURATED:
            reasons.append(f"generator CPU {own_cpu:.0%}")
        if console is not None:
            console.print(
                f"probe C={c}: relay forwarded {rate:,.0f}/s ({efficiency:.0%} of linear, "
                f"rooms sent {sending:.0%} of linear), CPU relay {relay_cpu:.0%} generator "
                f"{own_cpu:.0%}" + (f" -> stop: {', '.join(reasons)}" if reasons else ""),
                highlight=False,
                soft_wrap=True,
            )
        if reasons:
            step["stopped"] = reasons
            stopped_by = "; ".join(reasons)
            generator = own_cpu >= CPU_SATURATED or sending < PROBE_EFFICIENCY
            relay_bound = relay_cpu >= CPU_SATURATED or kernel_loss > 0
            limit = "generator" if generator and not relay_bound else "relay"
            break
        capacity = c
    return {
        "steps": steps,
        "step_seconds": step_seconds,
        "capacity_conferences": max(capacity, 1),
        "stopped_by": stopped_by,
        "limit": limit,
    }


# -- the soak --------------------------------------------------------------------------------------


def warm_point(seconds: float) -> float:
    """Where the warm RSS sample is taken: after 10 % of the run or 30 s, whichever is later,
    but at most half-way (a 60 s run: 30 s; 600 s: 60 s)."""
    return min(max(WARM_MIN_S, WARM_SHARE * seconds), seconds / 2)


def _median_kb(samples: list[Sample]) -> tuple[int, int]:
    """(VmRSS, RssAnon) medians of a window of samples: one sample taken while the allocator
    or the page cache happens to move would otherwise decide the check."""
    if not samples:
        return 0, 0
    return (
        int(statistics.median(s.rss_kb for s in samples)),
        int(statistics.median(s.anon_kb for s in samples)),
    )


def _growth(before: int, after: int) -> float:
    return round(100.0 * (after - before) / before, 2) if before else 0.0


def _checks_and_figures(
    run: RunResult, relay: RelayProcess, seconds: float, rss_start: int, alive: bool
) -> dict[str, Any]:
    """Everything the soak reports except shutdown and capacity; checks are filled in here."""
    links, m = run.links, run.relay
    up = _sum(lk.up for lk in links)
    down = _sum(lk.down for lk in links)
    up_kinds = {k: _counts(_sum(lk.up_kinds[k] for lk in links)) for k in KINDS}
    down_kinds = {k: _counts(_sum(lk.down_kinds[k] for lk in links)) for k in KINDS}
    relay_model = Counter[str]()
    room_model = Counter[str]()
    for lk in links:
        relay_model.update(lk.relay_end.counts)
        room_model.update(lk.room_end.counts)
    recv = run.receivers
    clients = [r.client for r in run.rooms if r.client is not None]
    decrypt_ok = sum(r.ok for r in recv)
    decrypt_failed = sum(r.failed for r in recv)
    replays = sum(r.replayed for r in recv)
    too_old = sum(r.too_old for r in recv)
    no_key = sum(r.no_key for r in recv)
    room_control_failures = sum(c.events.control_failures for c in clients)
    media_arrived = sum(lk.down_arrived["media"] for lk in links)

    drops = m.drops()
    expected = {"replay": relay_model["replay"], "no_key": relay_model["no_key"]}
    expected["control"] = relay_model["control_replay"] + relay_model["control_early"]
    expected = {k: v for k, v in expected.items() if v}
    unexplained: dict[str, int] = {}
    for reason, n in drops.items():
        if reason == "dtls":
            if n > relay_model["dtls_redundant"]:
                unexplained[reason] = n - relay_model["dtls_redundant"]
        elif n != expected.get(reason, 0):
            unexplained[reason] = n - expected.get(reason, 0)
    for reason, n in expected.items():
        if reason not in drops:
            unexplained[reason] = -n  # predicted drops that never happened: also unexplained

    delivered_up = up.passed + up.duplicated
    tapped_up = sum(
        sum(v for k, v in lk.relay_end.counts.items() if k != "dtls_redundant") for lk in links
    )
    samples = run.view.samples + ([run.view.end] if run.view.end is not None else [])
    warm_at = warm_point(seconds)
    warm_window = [s for s in samples if warm_at <= s.t < warm_at + RSS_WINDOW_S]
    end_window = [s for s in samples if s.t >= seconds - RSS_WINDOW_S]
    rss_warm, anon_warm = _median_kb(warm_window)
    rss_end, anon_end = _median_kb(end_window)
    growth = _growth(rss_warm, rss_end)
    relay_cpu, own_cpu = _cpu_share(run.media_start, run.media_end)
    problems = relay.log_problems()
    report = run.report
    receivers_explained = (
        replays == room_model["replay"]
        and no_key == room_model["no_key"]
        and room_control_failures == room_model["control_replay"] + room_model["control_early"]
        and decrypt_ok == room_model["ok"]
    )
    checks = {
        "no_decrypt_failures": decrypt_failed == 0 and too_old == 0,
        "receivers_explained": receivers_explained,
        "relay_alive": alive,
        "relay_log_clean": problems["tracebacks"] == 0 and problems["errors"] == 0,
        "rss_growth_under_5pct": bool(rss_warm) and growth < RSS_GROWTH_LIMIT_PCT,
        "uplink_reconciled": int(m.received) == delivered_up == tapped_up,
        "drops_explained": not unexplained,
    }
    return {
        "mode": "soak",
        "seconds": report["seconds"],
        "conferences": report["conferences"],
        "rooms_per_conference": report["rooms_per_conference"],
        "rooms": report["room_count"],
        "setup_s": report["setup_s"],
        "forwarded": report["forwarded"],
        "forwarded_per_s": report["forwarded_per_s"],
        "sent": report["sent"],
        "relay": {
            "received": int(m.received),
            "forwarded": int(m.forwarded),
            "forwarded_per_s": report["relay"]["forwarded_per_s"],
            "cpu": relay_cpu,
        },
        "generator_cpu": own_cpu,
        "decrypt_ok": decrypt_ok,
        "decrypt_failed": decrypt_failed,
        "decrypt_failure_reasons": dict(
            sum((r.failure_reasons for r in recv), collections.Counter()).most_common(10)
        ),
        "replays_rejected_by_rooms": replays,
        "too_old_at_rooms": too_old,
        "before_key_at_rooms": no_key,
        "control_failures_at_rooms": room_control_failures,
        "drops": drops,
        "drops_expected": {**expected, "dtls_at_most": relay_model["dtls_redundant"]},
        "drops_unexplained": unexplained,
        "injected": {
            "uplink": {**_counts(up), "by_kind": up_kinds},
            "downlink": {**_counts(down), "by_kind": down_kinds},
        },
        "reconciliation": {
            "uplink": {
                "links_delivered": delivered_up,
                "relay_received": int(m.received),
                "relay_model": dict(sorted(relay_model.items())),
            },
            "downlink": {
                "relay_forwarded": int(m.forwarded),
                "links_media_arrived": media_arrived,
                "kernel_loss": int(m.forwarded) - media_arrived,
                "rooms_model": dict(sorted(room_model.items())),
            },
        },
        "rss_kb": {
            "start": rss_start,
            "warm": rss_warm,
            "end": rss_end,
            "max": max((s.rss_kb for s in samples), default=0),
            "growth_pct": growth,
            "warm_window_s": [round(warm_at, 1), round(warm_at + RSS_WINDOW_S, 1)],
            "end_window_s": [round(max(0.0, seconds - RSS_WINDOW_S), 1), round(seconds, 1)],
            "anon": {
                "warm": anon_warm,
                "end": anon_end,
                "growth_pct": _growth(anon_warm, anon_end),
            },
        },
        "relay_alive": alive,
        "relay_log": problems,
        "latency_us": report["latency_us"],
        "switch_ms": report["switch_ms"],
        "switches": report["switches"],
        "checks": checks,
    }


async def _soak(
    args: argparse.Namespace, relay: RelayProcess, console: Console | None
) -> dict[str, Any]:
    faults = Faults(args.loss, args.reorder, args.duplicate, (args.hold_min_ms, args.hold_max_ms))
    rng = random.Random(args.seed)
    rss_idle = relay.rss_kb()
    capacity: dict[str, Any] = {"probed": False}
    conferences = args.conferences
    if conferences is None:
        capacity = {"probed": True, "rss_kb_idle": rss_idle}
        capacity.update(
            await probe(relay, args.rooms, faults, rng, args.probe_seconds, args.probe_max, console)
        )
        conferences = max(1, capacity["capacity_conferences"] // 2)
        capacity["soak_conferences"] = conferences
        await asyncio.sleep(1.0)  # the probe's last conferences are gone; let the relay settle
    rss_start = relay.rss_kb()
    run = await run_through_links(
        relay, conferences, args.rooms, args.seconds, faults, rng, "soak", console
    )
    alive = relay.alive()
    out = _checks_and_figures(run, relay, args.seconds, rss_start, alive)
    out["faults"] = {
        "loss": faults.loss,
        "reorder": faults.reorder,
        "duplicate": faults.duplicate,
        "hold_ms": list(faults.hold_ms),
    }
    out["capacity"] = capacity
    return out


def _print_report(r: dict[str, Any], console: Console) -> None:
    def p(text: str) -> None:
        console.print(text, soft_wrap=True, highlight=False)

    rss, inj, rec = r["rss_kb"], r["injected"], r["reconciliation"]
    cap = r["capacity"]
    p(
        f"[bold]ctms-media soak[/]: {r['conferences']} conference(s) x "
        f"{r['rooms_per_conference']} rooms = {r['rooms']} rooms, {r['seconds']:g} s of media "
        f"(setup {r['setup_s']:g} s)"
    )
    f = r["faults"]
    p(
        f"  faults each way: loss {f['loss']:.0%}, reorder {f['reorder']:.0%} (held "
        f"{f['hold_ms'][0]:g}-{f['hold_ms'][1]:g} ms), duplicate {f['duplicate']:.0%}"
    )
    if cap.get("probed"):
        p(
            f"  capacity probe ({cap['step_seconds']:g} s per step): "
            + ", ".join(
                f"C={s['conferences']} {s['relay_forwarded_per_s']:,.0f}/s "
                f"({s['efficiency']:.0%}, CPU relay {s['relay_cpu']:.0%} "
                f"gen {s['generator_cpu']:.0%})"
                for s in cap["steps"]
            )
        )
        p(
            f"  capacity {cap['capacity_conferences']} conference(s), limit: {cap['limit']} "
            f"({cap['stopped_by']}); soak at {cap['soak_conferences']}"
        )
    p(
        f"  relay: received {r['relay']['received']}, forwarded {r['relay']['forwarded']} "
        f"({r['relay']['forwarded_per_s']:,.0f}/s), CPU {r['relay']['cpu']:.0%} of a core; "
        f"generator CPU {r['generator_cpu']:.0%}"
    )
    p(
        f"  rooms: received {r['forwarded']} ({r['forwarded_per_s']:,.0f}/s), decrypted "
        f"{r['decrypt_ok']}, [bold]failed {r['decrypt_failed']}[/], replays rejected "
        f"{r['replays_rejected_by_rooms']}, arrived before their key {r['before_key_at_rooms']}, "
        f"control packets refused {r['control_failures_at_rooms']}"
    )
    for d in ("uplink", "downlink"):
        x = inj[d]
        p(
            f"  injected {d}: lost {x['lost']}, reordered {x['reordered']}, duplicated "
            f"{x['duplicated']} (passed {x['passed']})"
        )
    p(
        f"  uplink: links delivered {rec['uplink']['links_delivered']}, relay received "
        f"{rec['uplink']['relay_received']}; downlink: relay forwarded "
        f"{rec['downlink']['relay_forwarded']}, links got {rec['downlink']['links_media_arrived']}"
    )
    p(
        f"  relay drops {r['drops'] or 'none'}; expected {r['drops_expected']}; unexplained "
        f"{r['drops_unexplained'] or 'none'}"
    )
    p(
        f"  relay VmRSS: start {rss['start']} kB, warm {rss['warm']} kB (median over "
        f"{rss['warm_window_s'][0]:g}-{rss['warm_window_s'][1]:g} s), end {rss['end']} kB "
        f"(median over the last {RSS_WINDOW_S:g} s), max {rss['max']} kB: growth "
        f"{rss['growth_pct']:+.2f} % (RssAnon {rss['anon']['growth_pct']:+.2f} %)"
    )
    sd = r["shutdown"]
    p(f"  SIGTERM: exit {sd['exit_code']} after {sd['seconds']} s; relay log {r['relay_log']}")
    for name, verdict in r["checks"].items():
        style = "green" if verdict == "pass" else "bold red"
        p(f"  [{style}]{verdict.upper():4}[/] {name}")


def main(args: argparse.Namespace) -> int:
    """Exit 0 when every check passes, 1 when one fails, 2 when the run cannot be set up,
    130 when interrupted."""
    console = Console(stderr=True)
    if args.conferences is not None and args.conferences < 1:
        print("ctms-media soak: --conferences must be at least 1", file=sys.stderr)
        return 2
    if not 0 <= args.loss < 1 or not 0 <= args.reorder <= 1 or not 0 <= args.duplicate <= 1:
        print("ctms-media soak: fault rates are shares in [0, 1)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ctms-soak-") as tmp:
        relay = RelayProcess(Path(tmp))
        try:
            relay.start()
            report = asyncio.run(_soak(args, relay, console))
        except (SoakError, LoadError) as exc:
            died = relay.proc is not None and not relay.alive()
            print(f"ctms-media soak: {exc}", file=sys.stderr)
            relay.terminate()
            if relay.proc is not None:
                print(relay.log_tail(), file=sys.stderr)
            if died:  # a crash is the soak's finding, not a setup problem
                print(f"ctms-media soak: the relay died (exit {relay.exit_code})", file=sys.stderr)
                return 1
            return 2
        except KeyboardInterrupt:
            relay.terminate()
            print("ctms-media soak: interrupted", file=sys.stderr)
            return 130
        finally:
            relay.terminate()
            if args.log:
                Path(args.log).write_text(relay.log_text())
        report["shutdown"] = {
            "signal": "SIGTERM",
            "exit_code": relay.exit_code,
            "seconds": round(relay.shutdown_s, 3) if relay.shutdown_s is not None else None,
        }
        checks: dict[str, bool] = report["checks"]
        checks["clean_shutdown"] = (
            relay.exit_code == 0
            and relay.shutdown_s is not None
            and relay.shutdown_s <= SHUTDOWN_LIMIT_S
        )
        problems = relay.log_problems()  # the shutdown's own lines included
        report["relay_log"] = problems
        checks["relay_log_clean"] = problems["tracebacks"] == 0 and problems["errors"] == 0
        report["checks"] = {k: "pass" if v else "fail" for k, v in checks.items()}
        failed = [k for k, v in checks.items() if not v]
        if failed:
            console.print(f"relay log tail:\n{relay.log_tail()}", highlight=False)
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        _print_report(report, Console())
    return 1 if failed else 0
