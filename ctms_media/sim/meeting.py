"""Synthetic meetings driven through the admin API: the one implementation behind
``ctms-media demo`` (against a relay it starts in-process) and ``ctms-media load`` (against
any relay's URL).

A run creates its conferences (wire.md §9), declares every room with its certificate's
fingerprint and its streams, and lets each :class:`~ctms_media.sim.room_client.RoomClient`
do what an endpoint does: DTLS to the port the API answered, GSP -> GSP-ACK, then libsrtp
media with tail bytes and EKT trailers. A script moves the floor from segment to segment, so
the relay switches audio and video; rooms answer its PLI/FIR with an IDR at the next 20 ms
tick. Every packet a room receives is decrypted with keys learnt only from EKT trailers.

Measurements, all in this one process (so every clock agrees):

- latency: the send time of every packet is kept per (SSRC, sequence number); a receiver that
  decrypts a packet looks it up, so each delivered packet is one sample;
- switch time: a source room receiving the relay's PLI (or FIR) for one of its cameras ->
  the first receiver decrypting the IDR the room sent in answer;
- loss: datagrams the rooms sent against the relay's ``ctms_packets_received_total`` (uplink)
  and the relay's ``ctms_packets_forwarded_total`` against media datagrams the rooms got
  (downlink), both over the media window; meaningful when nothing else uses the relay.

Sending is batched: one task per meeting wakes every 20 ms and sends every packet that has
come due for all its rooms (no task or timer per packet), yielding to the event loop between
rooms so a relay in the same process forwards each room's burst before the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ctms_media.dtls.certificate import RelayCertificate
from ctms_media.errors import CtmsError
from ctms_media.sim.room_client import RoomClient, open_room
from ctms_media.sim.srtp_room import EktReceiver, SenderStream, sdes_packet

__all__ = [
    "Address",
    "LoadError",
    "Metrics",
    "RunOptions",
    "RunStatus",
    "RunView",
    "exit_status",
    "run_meetings",
]

PROFILE = "AES_CM_128_HMAC_SHA1_80"
TICK = 0.02  # the sender wakes this often and sends everything due
AUDIO_PPS = 50  # one 20 ms audio packet per microphone
VIDEO_FPS = 30
P_FRAME_PACKETS = 3
IDR_FRAME_PACKETS = 6
AUDIO_BYTES = 120
P_BYTES = 800
IDR_BYTES = 1100
IDR_EVERY = 4.0  # periodic IDR per camera, seconds
SDES_EVERY = 2.0  # SRTCP SDES per stream, with the long EKT trailer
FLOOR_SECONDS = 2.5  # the script hands the floor to the next segment this often
MAX_CATCH_UP = 3  # packets (audio) or frames (video) sent at most per stream per tick
READY_TIMEOUT = 15.0  # DTLS + GSP + ACK for every room
DRAIN = 0.4  # after the last send: let the last packets land
LEDGER_GENERATION = 5.0  # seconds a send time stays findable (two generations kept)
LATENCY_SAMPLES = 200_000  # reservoir size: percentiles stay unbiased, memory bounded
LOUD, SOFT, SILENT = 8, 50, 127  # -dBov of the floor holder, the previous one, everyone else


Address = tuple[str, int]
# Where a room sends instead of the relay port the API answered (``ctms-media soak`` puts an
# ImpairedLink there); called once per room with the room and that port, before DTLS.
RouteHook = Callable[["SimRoom", Address], Awaitable[Address]]
# The receiver a room decrypts with, instead of the EktReceiver its first GSP would create
# (the soak counts replays and packets that arrived before their key apart from failures).
ReceiverFactory = Callable[[], EktReceiver]


class LoadError(CtmsError):
    """The run could not be set up (API unreachable or refusing, rooms never keyed)."""


# -- the admin API and /metrics ----------------------------------------------------------------


@dataclass
class Metrics:
    """The counters of one ``GET /metrics`` scrape that a run reports (deltas are taken)."""

    received: float = 0.0
    forwarded: float = 0.0
    switches: float = 0.0
    dropped: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Metrics:
        m = cls()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "ctms_packets_received_total":
                    m.received = s.value
                elif s.name == "ctms_packets_forwarded_total":
                    m.forwarded = s.value
                elif s.name == "ctms_switches_total":
                    m.switches = s.value
                elif s.name == "ctms_packets_dropped_total":
                    m.dropped[s.labels.get("reason", "?")] = s.value
        return m

    def since(self, base: Metrics) -> Metrics:
        return Metrics(
            self.received - base.received,
            self.forwarded - base.forwarded,
            self.switches - base.switches,
            {r: v - base.dropped.get(r, 0.0) for r, v in self.dropped.items()},
        )

    def drops(self) -> dict[str, int]:
        """Nonzero reasons only, as the report shows them."""
        return {r: int(v) for r, v in sorted(self.dropped.items()) if v}


class ApiClient:
    """The calls of wire.md §9 a run makes; any unexpected answer is a :class:`LoadError`."""

    def __init__(self, base: str, http: aiohttp.ClientSession) -> None:
        self.base = base.rstrip("/")
        self.http = http

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        try:
            async with self.http.request(method, self.base + path, json=body) as r:
                if r.content_type == "application/json":
                    return r.status, await r.json()
                return r.status, await r.text()
        except aiohttp.ClientError as exc:
            raise LoadError(f"{method} {self.base}{path}: {exc}") from None

    async def create_conference(self, conf_id: str) -> None:
        body = {"id": conf_id, "security": "secure", "switching": "segment"}
        status, answer = await self._call("POST", "/v1/conferences", body)
        if status != 201:
            raise LoadError(f"creating conference {conf_id}: {status} {answer}")

    async def add_endpoint(self, conf_id: str, body: dict[str, Any]) -> dict[str, Any]:
        status, answer = await self._call("POST", f"/v1/conferences/{conf_id}/endpoints", body)
        if status != 201:
            raise LoadError(f"joining {body['id']} to {conf_id}: {status} {answer}")
        return answer  # type: ignore[no-any-return]

    async def conference(self, conf_id: str) -> dict[str, Any] | None:
        status, answer = await self._call("GET", f"/v1/conferences/{conf_id}")
        return answer if status == 200 else None

    async def delete_conference(self, conf_id: str) -> int:
        status, _ = await self._call("DELETE", f"/v1/conferences/{conf_id}")
        return status

    async def metrics(self) -> Metrics:
        status, text = await self._call("GET", "/metrics")
        if status != 200 or not isinstance(text, str):
            raise LoadError(f"GET /metrics: {status}")
        return Metrics.parse(text)


# -- measurements shared by every room of the process -----------------------------------------


class Reservoir:
    """A uniform sample of at most ``size`` values (Algorithm R): percentiles of a long load
    run stay unbiased while memory stays bounded."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self.rng = rng
        self.values: list[int] = []
        self.seen = 0

    def add(self, value: int) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.values[j] = value


class Ledger:
    """Send times by ``ssrc << 16 | seq``, looked up when a receiver has decrypted a packet.

    Keyed per packet, not stamped into the payload, so the latency of each delivered packet is
    measured (not a difference of percentiles) and the payload stays opaque. Two generations,
    rotated every :data:`LEDGER_GENERATION` seconds, bound the memory; a sequence number that
    wraps (minutes at these rates) cannot match a stale entry. SSRCs are unique in the process.
    """

    def __init__(self, rng: random.Random) -> None:
        self.current: dict[int, int] = {}
        self.previous: dict[int, int] = {}
        self.answers: dict[int, int] = {}  # first packet of an IDR sent for a PLI/FIR -> its time
        self.latency = Reservoir(LATENCY_SAMPLES, rng)
        self.switch_ns: list[int] = []

    def rotate(self) -> None:
        self.previous, self.current = self.current, {}

    def delivered(self, key: int, now_ns: int) -> None:
        sent = self.current.get(key)
        if sent is None:
            sent = self.previous.get(key)
        if sent is not None:
            self.latency.add(now_ns - sent)
        if self.answers:
            asked = self.answers.pop(key, None)
            if asked is not None:
                self.switch_ns.append(now_ns - asked)


# -- rooms -------------------------------------------------------------------------------------


@dataclass(eq=False)
class SimStream:
    """One microphone or camera of a room and its sending schedule."""

    sender: SenderStream
    kind: str
    position: int
    count: int = 0  # audio packets or video frames sent
    next_idr: float = 0.0  # the first frame is an IDR, as an encoder starts
    first_gap: float = IDR_EVERY  # to the second IDR: staggers the cameras' periodic IDRs
    next_sdes: float = 0.0
    idr_asked_ns: int | None = None  # when a PLI/FIR arrived that no IDR has answered yet


class SimRoom:
    """A room of the meeting: its declaration, its :class:`RoomClient` and its senders."""

    def __init__(self, meeting: Meeting, room_id: str, segments: int, ssrcs: list[int]) -> None:
        self.meeting = meeting
        self.id = room_id
        self.segments = segments
        self.positions = [2] if segments == 1 else [1, 2, 3]
        self.certificate = RelayCertificate.generate()
        self.declared = [
            {"ssrc": ssrcs[2 * i + k], "kind": kind, "position": pos}
            for i, pos in enumerate(self.positions)
            for k, kind in enumerate(("audio", "video"))
        ]
        self.client: RoomClient | None = None
        self.streams: list[SimStream] = []
        self.by_ssrc: dict[int, SimStream] = {}
        self.media_sent = 0
        self.feedback = 0  # PLI + FIR received for its cameras
        self._base = (0, 0, 0, 0)  # received, ok, failed, datagrams sent at the window start

    def endpoint_body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "segments": self.segments,
            "secure": True,
            "fingerprint": str(self.certificate.fingerprint("sha-256")),
            "profile": PROFILE,
            "streams": self.declared,
        }

    async def connect(self, answer: dict[str, Any], api_host: str) -> None:
        host = str(answer["host"])
        if host in ("", "0.0.0.0", "::"):  # a relay bound to every address: reach it as the API
            host = api_host
        port = int(answer["port"])
        if self.meeting.route is not None:
            host, port = await self.meeting.route(self, (host, port))
        bind = "0.0.0.0"
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(host)
            bind = "127.0.0.1" if ip.is_loopback and ip.version == 4 else bind
            bind = "::" if ip.version == 6 else bind
        self.client = RoomClient(
            self.id,
            (host, port),
            str(answer["fingerprint"]),
            self.certificate,
            profile=PROFILE,
            on_media=self._on_media,
            on_feedback=self._on_feedback,
            latency_from_payload=False,
        )
        if self.meeting.receiver is not None:
            self.client.receiver = self.meeting.receiver()  # its GSPs add their groups to it
        await open_room(self.client, bind)
        self.client.start_dtls()

    def start_media(self, rng: random.Random) -> None:
        """Senders under the group the GSP gave; called once the room is keyed."""
        c = self.client
        assert c is not None and c.events.gsps
        group = c.groups[c.events.gsps[-1].spi]
        for d in self.declared:
            sender = SenderStream(
                d["ssrc"],
                d["kind"],
                group,
                os.urandom(16),
                position=d["position"],
                seq=rng.randrange(65536),
                timestamp=rng.getrandbits(32),
            )
            st = SimStream(sender, d["kind"], d["position"])
            st.first_gap = rng.uniform(1.0, IDR_EVERY)
            st.next_sdes = rng.uniform(0.0, SDES_EVERY)
            self.streams.append(st)
            self.by_ssrc[sender.ssrc] = st
        r = c.receiver
        self._base = (
            c.received,
            r.ok if r is not None else 0,
            r.failed if r is not None else 0,
            c.sent,
            r.replayed if r is not None else 0,
        )
        self.media_sent = 0

    # -- counters over the media window -----------------------------------------------------------

    @property
    def received(self) -> int:
        return (self.client.received if self.client else 0) - self._base[0]

    @property
    def decrypt_ok(self) -> int:
        r = self.client.receiver if self.client else None
        return (r.ok if r is not None else 0) - self._base[1]

    @property
    def decrypt_failed(self) -> int:
        r = self.client.receiver if self.client else None
        return (r.failed if r is not None else 0) - self._base[2]

    @property
    def decrypt_replayed(self) -> int:
        """Duplicates libsrtp refused: a network that duplicates makes them, never the relay."""
        r = self.client.receiver if self.client else None
        return (r.replayed if r is not None else 0) - self._base[4]

    @property
    def datagrams_sent(self) -> int:
        return (self.client.sent if self.client else 0) - self._base[3]

    # -- receiving ------------------------------------------------------------------------------

    def _on_media(self, data: bytes, plain: bytes | None) -> None:
        if plain is None or 192 <= data[1] <= 223:  # failed, or SRTCP (no ledger entry)
            return
        key = int.from_bytes(plain[8:12], "big") << 16 | plain[2] << 8 | plain[3]
        self.meeting.ledger.delivered(key, time.perf_counter_ns())

    def _on_feedback(self, kind: str, ssrc: int) -> None:
        st = self.by_ssrc.get(ssrc)
        if st is None or st.kind != "video":
            return
        self.feedback += 1
        if st.idr_asked_ns is None:  # a repeat (FIR after PLI) keeps the first request's time
            st.idr_asked_ns = time.perf_counter_ns()
        st.next_idr = 0.0  # at the next tick

    # -- sending --------------------------------------------------------------------------------

    def send_due(self, t: float) -> None:
        """Everything that has come due by ``t`` seconds into the media window."""
        client = self.client
        assert client is not None
        meeting = self.meeting
        ledger = meeting.ledger
        payload = meeting.payload
        clock = time.perf_counter_ns
        for st in self.streams:
            s = st.sender
            if st.kind == "audio":
                due = min(int(t * AUDIO_PPS) + 1 - st.count, MAX_CATCH_UP)
                tail = meeting.script.audio_tail(self.id, st.position, t)
                for _ in range(due):
                    key = s.ssrc << 16 | s.seq
                    packet, _plain = s.rtp(
                        payload(AUDIO_BYTES), tail, long=st.count % 3 == 0, advance_ts=960
                    )
                    ledger.current[key] = clock()
                    client.send(packet)
                    st.count += 1
                    self.media_sent += 1
            else:
                due = min(int(t * VIDEO_FPS) + 1 - st.count, MAX_CATCH_UP)
                for _ in range(due):
                    idr = t >= st.next_idr
                    if idr:
                        st.next_idr = t + (IDR_EVERY if st.count else st.first_gap)
                    n = IDR_FRAME_PACKETS if idr else P_FRAME_PACKETS
                    size = IDR_BYTES if idr else P_BYTES
                    for k in range(n):
                        key = s.ssrc << 16 | s.seq
                        last = k == n - 1
                        packet, _plain = s.rtp(
                            payload(size),
                            (0xC0 if idr else 0x40) if k == 0 else 0,
                            long=k == 0,
                            marker=last,
                            advance_ts=3000 if last else 0,
                        )
                        now_ns = clock()
                        ledger.current[key] = now_ns
                        if k == 0 and idr and st.idr_asked_ns is not None:
                            ledger.answers[key] = st.idr_asked_ns
                            st.idr_asked_ns = None
                        client.send(packet)
                        self.media_sent += 1
                    st.count += 1
            if t >= st.next_sdes:
                st.next_sdes = t + SDES_EVERY
                client.send(s.rtcp(sdes_packet(s.ssrc, self.id.encode()[:32]), long=True))
                self.media_sent += 1


# -- the script ----------------------------------------------------------------------------------


class FloorScript:
    """Who talks when: every :data:`FLOOR_SECONDS` the floor passes to the next segment,
    alternating a 1-screen room and a segment of the 3-screen room; the previous holder keeps
    talking softly for one turn (a reply), everyone else is silent (voice bit clear)."""

    def __init__(self, rooms: list[SimRoom], offset: int) -> None:
        big = [(rooms[0].id, p) for p in (1, 3, 2)]
        ones = [(r.id, 2) for r in rooms[1:]]
        order = [
            ones[(k // 2) % len(ones)] if k % 2 == 0 else big[(k // 2) % len(big)]
            for k in range(2 * max(len(ones), len(big)))
        ]
        self.order = order[offset % len(order) :] + order[: offset % len(order)]

    def holder(self, t: float) -> tuple[str, int]:
        return self.order[int(t / FLOOR_SECONDS) % len(self.order)]

    def audio_tail(self, room_id: str, position: int, t: float) -> int:
        turn = int(t / FLOOR_SECONDS)
        me = (room_id, position)
        if me == self.order[turn % len(self.order)]:
            return 0x80 | (LOUD + (int(t * AUDIO_PPS) * 7) % 9)  # a voice that moves a little
        if turn > 0 and me == self.order[(turn - 1) % len(self.order)]:
            return 0x80 | SOFT
        return SILENT  # no voice bit


# -- one meeting ---------------------------------------------------------------------------------


class Meeting:
    """One conference: rooms, script and the sending task."""

    def __init__(
        self,
        conf_id: str,
        rooms: int,
        ledger: Ledger,
        rng: random.Random,
        new_ssrcs: Callable[[int], list[int]],
        offset: int = 0,
        route: RouteHook | None = None,
        receiver: ReceiverFactory | None = None,
    ) -> None:
        self.id = conf_id
        self.route = route
        self.receiver = receiver
        self.ledger = ledger
        self.rng = rng
        self.rooms = [
            SimRoom(self, f"room{i + 1}", 3 if i == 0 else 1, new_ssrcs(6 if i == 0 else 2))
            for i in range(rooms)
        ]
        self.script = FloorScript(self.rooms, offset)
        self.created = False
        self._pool = os.urandom(4096)
        self._pool_at = 0

    def payload(self, n: int) -> bytes:
        """Opaque media bytes without a syscall per packet (the content never matters)."""
        at = self._pool_at
        self._pool_at = (at + 131) % (len(self._pool) - IDR_BYTES)
        return self._pool[at : at + n]

    async def join(self, api: ApiClient, api_host: str) -> None:
        await api.create_conference(self.id)
        self.created = True
        for room in self.rooms:
            answer = await api.add_endpoint(self.id, room.endpoint_body())
            await room.connect(answer, api_host)

    async def wait_ready(self, api: ApiClient, deadline: float) -> None:
        """Every room keyed (GSP received) and every endpoint ``active`` (ACK processed), so
        no packet is sent before the relay can route it to everyone."""
        loop = asyncio.get_running_loop()
        for room in self.rooms:
            assert room.client is not None
            try:
                await asyncio.wait_for(room.client.keyed.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise LoadError(
                    f"{self.id}/{room.id}: no GSP within {READY_TIMEOUT:g} s "
                    f"(DTLS {'done' if room.client.connected.is_set() else 'not done'})"
                ) from None
        while True:
            state = await api.conference(self.id)
            eps = state["endpoints"] if state else []
            if eps and all(e["state"] == "active" for e in eps):
                return
            if loop.time() > deadline:
                raise LoadError(f"{self.id}: endpoints not active: {eps}")
            await asyncio.sleep(0.05)

    def start_media(self) -> None:
        for room in self.rooms:
            room.start_media(self.rng)

    async def send_media(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = 0
        while True:
            t = loop.time() - t0
            if t >= seconds:
                return
            for room in self.rooms:
                room.send_due(t)
                await asyncio.sleep(0)  # let the relay and the receivers run between rooms
            n = max(n + 1, int((loop.time() - t0) / TICK))  # skip ticks missed, never burst
            await asyncio.sleep(max(0.0, t0 + n * TICK - loop.time()))

    def close(self) -> None:
        for room in self.rooms:
            if room.client is not None:
                room.client.close()


# -- a run: C meetings at once ---------------------------------------------------------------------


@dataclass
class RunOptions:
    api: str
    conferences: int = 1
    rooms: int = 4
    seconds: float = 20.0
    prefix: str = "load"
    mode: str = "load"  # "demo", "load" or "soak": only the report's label
    route: RouteHook | None = None  # rooms reach the relay through this (the soak's links)
    receiver: ReceiverFactory | None = None  # rooms decrypt with this (the soak's accounting)


@dataclass
class RunStatus:
    """What a view is handed about twice a second."""

    options: RunOptions
    phase: str  # "joining", "media", "draining", "done"
    elapsed: float
    meetings: list[Meeting]
    ledger: Ledger
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: Metrics | None = None  # since the run started
    media_started: float | None = None  # loop time the media window opened


class RunView(Protocol):
    """A live display of a run (the rich views of :mod:`ctms_media.sim.live`)."""

    wants_state: bool  # poll GET /v1/conferences/{id} of the first meetings for it

    def update(self, status: RunStatus) -> None: ...

    def close(self) -> None: ...


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def _ratio(expected: float, got: float) -> float:
    return round((expected - got) / expected, 6) if expected else 0.0


async def run_meetings(options: RunOptions, view: RunView | None = None) -> dict[str, Any]:
    """Run ``options.conferences`` meetings of ``options.rooms`` rooms through the relay at
    ``options.api`` for ``options.seconds`` seconds and return the report. The conferences are
    deleted at the end, also when the run fails or is cancelled (Ctrl-C)."""
    if options.rooms < 2:
        raise LoadError("a meeting needs at least 2 rooms")
    if options.conferences < 1:
        raise LoadError("at least 1 conference")
    rng = random.Random()
    ledger = Ledger(rng)
    used: set[int] = set()

    def new_ssrcs(n: int) -> list[int]:
        out = []
        while len(out) < n:
            ssrc = rng.randrange(0x0100_0000, 0x7000_0000)  # below the rooms' control SSRCs
            if ssrc not in used:
                used.add(ssrc)
                out.append(ssrc)
        return out

    meetings = [
        Meeting(
            f"{options.prefix}-{i + 1}",
            options.rooms,
            ledger,
            rng,
            new_ssrcs,
            offset=i,
            route=options.route,
            receiver=options.receiver,
        )
        for i in range(options.conferences)
    ]
    api_host = urlsplit(options.api).hostname or "127.0.0.1"
    loop = asyncio.get_running_loop()
    started = loop.time()
    status = RunStatus(options, "joining", 0.0, meetings, ledger)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        api = ApiClient(options.api, http)
        monitor: asyncio.Task[None] | None = None
        try:
            base = await api.metrics()
            if view is not None:
                monitor = asyncio.create_task(_monitor(api, status, base, view))
            await asyncio.gather(*(m.join(api, api_host) for m in meetings))
            deadline = loop.time() + READY_TIMEOUT
            await asyncio.gather(*(m.wait_ready(api, deadline) for m in meetings))
            before = await api.metrics()
            for m in meetings:
                m.start_media()
            t_media = status.media_started = loop.time()
            status.phase = "media"
            rotator = asyncio.create_task(_rotate(ledger))
            try:
                await asyncio.gather(*(m.send_media(options.seconds) for m in meetings))
            finally:
                rotator.cancel()
            media_seconds = loop.time() - t_media
            status.phase = "draining"
            status.elapsed = options.seconds
            await asyncio.sleep(DRAIN)
            after = await api.metrics()
            status.phase = "done"
            status.metrics = after.since(base)
            if view is not None:
                view.update(status)
            report = _report(options, meetings, ledger, base, before, after, media_seconds)
            report["setup_s"] = round(t_media - started, 3)
            return report
        finally:
            if monitor is not None:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
            for m in meetings:
                if m.created:
                    with contextlib.suppress(LoadError):
                        await asyncio.shield(api.delete_conference(m.id))
                m.close()


async def _rotate(ledger: Ledger) -> None:
    while True:
        await asyncio.sleep(LEDGER_GENERATION)
        ledger.rotate()


async def _monitor(api: ApiClient, status: RunStatus, base: Metrics, view: RunView) -> None:
    """Feeds the view twice a second; the relay's state and counters once a second."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    n = 0
    while True:
        if status.phase == "media" and status.media_started is not None:
            status.elapsed = loop.time() - status.media_started
        if n % 2 == 0 and status.phase in ("joining", "media"):
            with contextlib.suppress(LoadError):
                status.metrics = (await api.metrics()).since(base)
                if view.wants_state:
                    for m in status.meetings[:1]:
                        state = await api.conference(m.id)
                        if state is not None:
                            status.states[m.id] = state
        view.update(status)
        n += 1
        await asyncio.sleep(max(0.0, started + n * 0.5 - loop.time()))


def _report(
    options: RunOptions,
    meetings: list[Meeting],
    ledger: Ledger,
    base: Metrics,
    before: Metrics,
    after: Metrics,
    media_seconds: float,
) -> dict[str, Any]:
    """The report of docs: every count is over the media window unless it says otherwise."""
    single = len(meetings) == 1
    rooms: dict[str, dict[str, Any]] = {}
    for m in meetings:
        for r in m.rooms:
            rooms[r.id if single else f"{m.id}/{r.id}"] = {
                "segments": r.segments,
                "sent": r.media_sent,
                "received": r.received,
                "decrypt_ok": r.decrypt_ok,
                "decrypt_failed": r.decrypt_failed,
                "decrypt_replayed": r.decrypt_replayed,
                "idr_requests": r.feedback,
            }
    all_rooms = [r for m in meetings for r in m.rooms]
    received = sum(r.received for r in all_rooms)
    window = after.since(before)
    whole = after.since(base)
    lat = ledger.latency.values
    sw = ledger.switch_ns
    uplink_sent = sum(r.datagrams_sent for r in all_rooms)
    return {
        "mode": options.mode,
        "conferences": len(meetings),
        "rooms_per_conference": options.rooms,
        "room_count": len(all_rooms),
        "seconds": round(media_seconds, 3),
        "forwarded": received,
        "forwarded_per_s": round(received / media_seconds, 1) if media_seconds else 0.0,
        "sent": sum(r.media_sent for r in all_rooms),
        "relay": {
            "received": int(window.received),
            "forwarded": int(window.forwarded),
            "forwarded_per_s": round(window.forwarded / media_seconds, 1) if media_seconds else 0,
        },
        "drops": whole.drops(),
        "decrypt_ok": sum(r.decrypt_ok for r in all_rooms),
        "decrypt_failed": sum(r.decrypt_failed for r in all_rooms),
        "decrypt_replayed": sum(r.decrypt_replayed for r in all_rooms),
        "switches": int(whole.switches),
        "switch_ms": {
            "p50": round(_percentile(sw, 0.5) / 1e6, 2),
            "max": round(max(sw) / 1e6, 2) if sw else 0.0,
            "count": len(sw),
        },
        "latency_us": {
            "p50": round(_percentile(lat, 0.5) / 1e3, 1),
            "p99": round(_percentile(lat, 0.99) / 1e3, 1),
            "count": ledger.latency.seen,
        },
        "loss": {
            "uplink": {
                "sent": uplink_sent,
                "relay_received": int(window.received),
                "ratio": _ratio(uplink_sent, window.received),
            },
            "downlink": {
                "relay_forwarded": int(window.forwarded),
                "received": received,
                "ratio": _ratio(window.forwarded, received),
            },
        },
        "rooms": rooms,
    }


def exit_status(report: dict[str, Any]) -> int:
    """0 only if nothing failed to decrypt and every room received and decrypted media."""
    if report["decrypt_failed"]:
        return 1
    if any(r["received"] == 0 or r["decrypt_ok"] == 0 for r in report["rooms"].values()):
        return 1
    return 0
