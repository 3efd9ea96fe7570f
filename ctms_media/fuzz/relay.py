"""Fuzzing the relay's datagram path: RFC 7983 demux, address checks, SSRC ownership,
hop-keyed control, DTLS after the handshake, and the forwarder behind them, on a real
:class:`~ctms_media.server.relay.Relay` with real endpoints.

A *world* is one relay on loopback with four conferences (secure CTMS, secure RFC 8870,
non-secure, best-effort downgraded by a non-secure joiner) whose secure rooms completed a
real DTLS-SRTP handshake and acknowledged their GSP (:class:`RoomClient`), so their hop keys
are real and their control packets verify. Datagrams then go straight to each endpoint's
port protocol (``EndpointPort.datagram_received``, which calls ``Relay.datagram``) with
fuzzed bytes and fuzzed source addresses; the event loop runs between small runs so the
20 ms policy tick, GSP resends and the rooms' sockets keep going.

After every datagram: no exception escaped, ``stats.received`` grew by one, and the datagram
ended exactly one way: counted under one drop reason, accepted by the forwarder (forwarded
to however many receivers are routed), consumed by DTLS, or accepted as control. Each
conference's forwarder is the reference and the Cython twin side by side
(:class:`~ctms_media.fuzz.twins.TwinChecker`), so twin equality is also checked under the
configuration the real policy installs (routes, IDR gates, downgrade modes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctms_media.conference.model import ConferenceConfig, EndpointConfig, StreamConfig
from ctms_media.conformance import ForwarderFactory
from ctms_media.dtls.certificate import RelayCertificate
from ctms_media.errors import CtmsError
from ctms_media.forward.verdict import Verdict
from ctms_media.fuzz.mutate import Hints, Mutator, layout_of
from ctms_media.fuzz.twins import SLOW, FuzzFailure, TwinChecker, encode_trace
from ctms_media.server.config import RelayConfig
from ctms_media.server.relay import EndpointSession, Relay
from ctms_media.server.stats import ALL_REASONS
from ctms_media.sim.room_client import RoomClient, open_room
from ctms_media.sim.srtp_room import SenderStream, sdes_packet
from ctms_media.wire.control import (
    ControlMessage,
    Downgrade,
    Gsp,
    GspAck,
    RekeyDone,
    encode_control,
    encode_pli,
    is_control_packet,
)
from ctms_media.wire.rtp import classify, position_code

Address = tuple[str, int]
YIELD_EVERY = 64  # datagrams between event-loop turns
CHURN_EVERY = 4000  # datagrams between a room leaving and rejoining, on average
CHURNED = ("fz-ctms", "fz-8870")  # conferences whose rooms churn (each rekeys on a leave)
STUN_BINDING = bytes.fromhex("000100002112a442") + bytes(12)
PORT_RANGE = (47000, 48999)  # wide, so ports other processes hold are simply skipped


@dataclass(frozen=True)
class RoomSpec:
    """One room of a world: ``handshake`` False leaves a secure room mid-way (its port is
    open, no DTLS done), so the relay's handshaking state is fuzzed too."""

    id: str
    segments: int
    secure: bool
    handshake: bool = True


@dataclass(frozen=True)
class ConferenceSpec:
    id: str
    security: str
    switching: str
    ekt_format: str
    ekt_cipher: int | None
    profile: str
    rooms: tuple[RoomSpec, ...]


# Every security mode and EKT format, both switching modes and both tag lengths.
WORLD = (
    ConferenceSpec(
        "fz-ctms",
        "secure",
        "segment",
        "ctms",
        None,
        "AES_CM_128_HMAC_SHA1_80",
        (
            RoomSpec("a3", 3, True),
            RoomSpec("b1", 1, True),
            RoomSpec("c1", 1, True),
            RoomSpec("hs", 1, True, handshake=False),
        ),
    ),
    ConferenceSpec(
        "fz-8870",
        "secure",
        "room",
        "rfc8870",
        3,
        "AES_CM_128_HMAC_SHA1_32",
        (RoomSpec("d3", 3, True), RoomSpec("e1", 1, True)),
    ),
    ConferenceSpec(
        "fz-plain",
        "non-secure",
        "segment",
        "ctms",
        None,
        "AES_CM_128_HMAC_SHA1_80",
        (RoomSpec("p3", 3, False), RoomSpec("q1", 1, False)),
    ),
    ConferenceSpec(  # a secure room, then a non-secure one: the conference downgrades
        "fz-best",
        "best-effort",
        "segment",
        "ctms",
        None,
        "AES_CM_128_HMAC_SHA1_80",
        (RoomSpec("s1", 1, True), RoomSpec("n1", 1, False)),
    ),
)


class TwinProxy:
    """Stands in for a conference's forwarder inside the relay.

    Configuration goes to every twin (a refusal is re-raised as the reference raised it);
    ``forward`` feeds all of them and records a mismatch instead of raising it, so the relay
    keeps running on the reference's verdict. A crash of the reference itself is re-raised:
    that is an exception escaping ``Relay.datagram``, which the world's check reports.
    """

    def __init__(self, checker: TwinChecker, on_mismatch: Callable[[FuzzFailure], None]) -> None:
        self._chk = checker
        self._on_mismatch = on_mismatch
        self.diverged = False

    @property
    def checker(self) -> TwinChecker:
        return self._chk

    def __getattr__(self, name: str) -> Any:
        if name in (
            "set_modes",
            "add_group",
            "remove_group",
            "add_stream",
            "remove_stream",
            "set_route",
        ):
            return lambda *args: self._config(name, *args)
        return getattr(self._chk.ref, name)

    def _config(self, name: str, *args: Any) -> None:
        if self.diverged:
            getattr(self._chk.ref, name)(*args)
            return
        try:
            ok = self._chk.config(name, *args)
        except FuzzFailure as failure:
            self._diverge(failure)
            return
        if not ok and self._chk.refusal is not None:
            raise self._chk.refusal

    def _diverge(self, failure: FuzzFailure) -> None:
        self.diverged = True
        self._on_mismatch(failure)

    def forward(self, datagram: bytes, rtcp: bool | None = None) -> Verdict:
        chk = self._chk
        if self.diverged:
            v = chk.ref.forward(datagram, rtcp)
            chk.last = v
            return v
        try:
            return chk.packet(bytes(datagram), rtcp)
        except FuzzFailure as failure:
            if chk.last is None and failure.__cause__ is not None:
                raise failure.__cause__ from None  # the reference crashed: let it escape
            self._diverge(failure)
            assert chk.last is not None
            return chk.last


def _latest_spi(client: RoomClient) -> int:
    """The SPI of the room's newest GSP: SPIs are random, never ordered (wire.md §8)."""
    gsps = client.events.gsps
    return gsps[-1].spi if gsps and gsps[-1].spi in client.groups else next(iter(client.groups))


class FuzzRoom(RoomClient):
    """A room that handshakes, keys and answers GSP like any other, but does not decrypt
    what it is sent: a fuzzed SRTCP packet may carry a tampered ROC in its CTMS trailer
    (outside every tag, so the relay forwards it as received), and the simulated receiver
    would walk a fresh libsrtp session up to that ROC, 2^15 packets a step."""

    def _media_in(self, data: bytes, rtcp: bool) -> None:
        self.received += 1


class _Sink(asyncio.DatagramProtocol):
    """A stranger's socket: an address of our own to spoof from, which discards replies."""


@dataclass(eq=False)
class Room:
    """One endpoint of the world: the relay's session, the room's socket, its senders."""

    conference: str
    ep: EndpointSession
    client: RoomClient
    address: Address
    streams: list[StreamConfig]
    senders: dict[int, SenderStream] = field(default_factory=dict)
    plain_seq: dict[int, int] = field(default_factory=dict)
    history: list[tuple[bytes, bool]] = field(default_factory=list)

    @property
    def secure_now(self) -> bool:
        return self.ep.config.secure and self.client.secure and self.ep.conference.modes[0]


class RelayWorld:
    """A relay, its conferences and rooms, and the check run around every datagram."""

    def __init__(
        self,
        rng: random.Random,
        directory: Path,
        factories: dict[str, ForwarderFactory],
        on_failure: Callable[[FuzzFailure, dict[str, Any]], None],
        seed: int,
    ) -> None:
        self.rng = rng
        self.directory = directory
        self.factories = factories
        self.on_failure = on_failure
        self.seed = seed
        self.relay: Relay | None = None
        self.rooms: list[Room] = []
        self.strangers: list[Address] = []
        self.proxies: dict[str, TwinProxy] = {}
        self.dtls_seeds: list[bytes] = []
        self.mutator = Mutator(rng)
        self.outcomes: Counter[str] = Counter()
        self.inputs = 0
        self.recent: list[tuple[str, str, bytes]] = []  # (endpoint, address label, datagram)
        self.churns = 0
        self._closers: list[Callable[[], None]] = []

    # -- building ---------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = RelayConfig(
            certificate=str(self.directory / "relay.pem"),
            port_min=PORT_RANGE[0],
            port_max=PORT_RANGE[1],
        )
        relay = self.relay = Relay(cfg, rng=random.Random(self.seed))
        await relay.start()
        for _ in range(2):
            transport, _ = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
            self._closers.append(transport.close)
            self.strangers.append(transport.get_extra_info("sockname")[:2])
        recorded: list[tuple[str, bytes]] = []
        real = relay.datagram

        def record(ep: EndpointSession, data: bytes, addr: Address) -> None:
            recorded.append((ep.id, bytes(data)))
            real(ep, data, addr)

        relay.datagram = record  # type: ignore[method-assign]
        try:
            ssrc = 0x1000
            for spec in WORLD:
                conf = relay.create_conference(
                    ConferenceConfig(
                        spec.id,
                        spec.security,
                        spec.switching,
                        ekt_format=spec.ekt_format,
                        ekt_cipher=spec.ekt_cipher,
                    )
                )
                chk = TwinChecker(
                    {"ekt_format": spec.ekt_format, "groups": [], "streams": [], "receivers": []},
                    self.factories,
                )
                chk.config("set_modes", *conf.modes)  # what the relay set before the swap
                proxy = TwinProxy(chk, lambda f, c=spec.id: self._mismatch(c, f))
                conf.forwarder = proxy
                self.proxies[spec.id] = proxy
                for rs in spec.rooms:
                    positions = (2,) if rs.segments == 1 else (1, 2, 3)
                    streams = []
                    for pos in positions:
                        for kind in ("audio", "video"):
                            ssrc += 1
                            streams.append(StreamConfig(ssrc, kind, pos))
                    await self._join(spec, rs, streams)
                    await asyncio.sleep(0.05)
        finally:
            del relay.datagram
        self.dtls_seeds = [d for _, d in recorded if classify(d) == "dtls"]
        for room in self.rooms:  # non-secure rooms latch on their first RTP packet
            if not room.ep.config.secure:
                self.feed(room, self.valid(room)[0], "own")

    async def _join(self, spec: ConferenceSpec, rs: RoomSpec, streams: list[StreamConfig]) -> None:
        relay = self.relay
        assert relay is not None
        cert = RelayCertificate.generate() if rs.secure else None
        cfg = EndpointConfig(
            rs.id,
            rs.segments,
            rs.secure,
            str(cert.fingerprint("sha-256")) if cert else None,
            spec.profile,
            tuple(streams),
        )
        ep = await relay.add_endpoint(spec.id, cfg)
        client = FuzzRoom(
            rs.id, (relay.config.media_host, ep.port), relay.fingerprint, cert, profile=spec.profile
        )
        await open_room(client)
        self._closers.append(client.close)
        assert client.transport is not None
        address = client.transport.get_extra_info("sockname")[:2]
        room = Room(spec.id, ep, client, address, streams)
        self.rooms.append(room)
        if rs.secure and rs.handshake:
            client.start_dtls()
            await asyncio.wait_for(client.keyed.wait(), 15)

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.stop()
        for close in self._closers:
            with contextlib.suppress(Exception):
                close()

    # -- inputs -------------------------------------------------------------------------------

    def valid(self, room: Room) -> tuple[bytes, bool]:
        """A datagram the room would really send now: SRTP or plain media, SRTCP, control."""
        rng = self.rng
        stream = rng.choice(room.streams)
        client = room.client
        if room.secure_now and client.groups:
            if client.hop is not None and rng.random() < 0.05:
                ssrc = client.control_ssrc if rng.random() < 0.9 else rng.getrandbits(32)
                plain = encode_control(self._control_message(client), ssrc)
                return (client.hop.protect(plain) if rng.random() < 0.95 else plain), True
            group = client.groups[_latest_spi(client)]
            s = room.senders.get(stream.ssrc)
            if s is None:
                s = room.senders[stream.ssrc] = SenderStream(
                    stream.ssrc,
                    stream.kind,
                    group,
                    rng.randbytes(16),
                    position=stream.position,
                    seq=rng.randrange(65536),
                )
            elif s.group.spi != group.spi:
                s.rekey(rng.randbytes(16), group)
            if rng.random() < 0.08:
                return s.rtcp(sdes_packet(s.ssrc), long=rng.random() < 0.5), True
            if rng.random() < 0.03:  # feedback: routed to the rooms it concerns
                return s.rtcp(encode_pli(s.ssrc, rng.choice(room.streams).ssrc), long=False), True
            tail = rng.choice([0x00, 0x40, 0x80 | rng.randrange(40), 0xC0, rng.getrandbits(8)])
            return s.rtp(rng.randbytes(rng.randrange(1, 200)), tail, long=rng.random() < 0.2)[
                0
            ], False
        seq = room.plain_seq.get(stream.ssrc, rng.randrange(65536))
        room.plain_seq[stream.ssrc] = (seq + 1) & 0xFFFF
        if rng.random() < 0.08:
            return sdes_packet(stream.ssrc), True
        header = struct.pack(
            "!BBHIII", 0x81, 96, seq, seq * 960, stream.ssrc, position_code(stream.position, 0)
        )
        tail = rng.choice([0x00, 0x80 | rng.randrange(40), 0xC0])
        return header + rng.randbytes(rng.randrange(1, 200)) + bytes([tail]), False

    def _control_message(self, client: RoomClient) -> ControlMessage:
        """Mostly what a room sends (GSP-ACK, REKEY-DONE for its SPI); also SPIs it never
        got and the relay-to-room messages, which the relay must refuse as ``control``."""
        rng = self.rng
        spi = _latest_spi(client)
        r = rng.random()
        if r < 0.4:
            return GspAck(spi)
        if r < 0.6:
            return RekeyDone(spi)
        if r < 0.7:
            return GspAck(rng.choice([0, 0xFFFF, rng.getrandbits(16)]))
        if r < 0.8:
            return RekeyDone(rng.choice([0, 0x7FFF, rng.getrandbits(16)]))
        if r < 0.9:
            return Downgrade()
        g = client.groups[spi]
        fmt = 1 if g.ekt_format == "ctms" else 2
        return Gsp(g.spi, g.cipher, fmt, g.profile.id, g.kek, g.salt)

    def _address(self, room: Room) -> tuple[str, Address]:
        r = self.rng.random()
        if r < 0.85:
            return "own", room.address
        if r < 0.93:
            other = self.rng.choice(self.rooms)
            return f"room:{other.ep.id}", other.address
        i = self.rng.randrange(len(self.strangers))
        return f"stranger:{i}", self.strangers[i]

    def address_of(self, label: str, room: Room) -> Address:
        if label == "own":
            return room.address
        kind, _, name = label.partition(":")
        if kind == "room":
            return next(r.address for r in self.rooms if r.ep.id == name)
        return self.strangers[int(name)]

    def _input(self, room: Room) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.3 or not room.history:
            data, rtcp = self.valid(room)
            room.history.append((data, rtcp))
            del room.history[:-32]
            return data
        if r < 0.33 and self.dtls_seeds:
            data = rng.choice(self.dtls_seeds)
            return (
                data if rng.random() < 0.3 else self.mutator.mutate(data, None, None, _hints())[0]
            )
        if r < 0.35:
            return rng.choice([STUN_BINDING, rng.randbytes(rng.randrange(80)), b""])
        if r < 0.38:
            return rng.choice(room.history)[0]  # a replay
        base, rtcp = rng.choice(room.history)
        proxy = self.proxies[room.conference]
        fwd = proxy.checker.ref
        fmt = fwd.ekt_format if fwd.srtp else "plain"
        lay = layout_of(
            base,
            rtcp,
            fmt,
            lambda s: None if (st := fwd.streams.get(s)) is None else st.profile.rtp_tag_len,
            lambda spi: None if (g := fwd.groups.get(spi)) is None else int(g.cipher),
        )
        hints = Hints(
            [s.ssrc for s in room.streams] + list(fwd.streams),
            list(fwd.groups),
            lambda: rng.choice(rng.choice(self.rooms).history or [(b"", False)])[0],
        )
        return self.mutator.mutate(base, rtcp, lay, hints)[0]

    async def churn(self) -> None:
        """A keyed secure room leaves (the conference rekeys: new SPI, GSP to the others,
        re-wrapping until REKEY-DONE) and joins again through a new DTLS handshake."""
        relay = self.relay
        assert relay is not None
        rooms = [
            r
            for r in self.rooms
            if r.client.hop is not None and not r.ep.closed and r.conference in CHURNED
        ]
        if not rooms:
            return
        room = self.rng.choice(rooms)
        spec = next(c for c in WORLD if c.id == room.conference)
        rs = next(x for x in spec.rooms if x.id == room.ep.id)
        relay.remove_endpoint(spec.id, rs.id)
        room.client.close()
        self.rooms.remove(room)
        self.churns += 1
        try:
            await self._join(spec, rs, room.streams)
        except (TimeoutError, CtmsError) as exc:
            self._fail(room, b"", "own", "liveness", f"{rs.id} could not rejoin: {exc!r}")

    async def run(self, budget: int) -> int:
        for i in range(budget):
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
                if self.rng.random() < YIELD_EVERY / CHURN_EVERY:
                    await self.churn()
            room = self.rng.choice(self.rooms)
            data = self._input(room)
            label, _ = self._address(room)
            self.feed(room, data, label)
        self.inputs += budget
        return budget

    # -- the check ----------------------------------------------------------------------------

    def feed(self, room: Room, data: bytes, label: str) -> str:
        """One datagram into the room's port; the way it ended (or a reported failure)."""
        relay = self.relay
        assert relay is not None
        addr = self.address_of(label, room)
        self.recent.append((room.ep.id, label, data))
        del self.recent[:-256]
        stats = relay.stats
        received, dropped = stats.received, Counter(stats.dropped)
        proxy = self.proxies[room.conference]
        proxy.checker.last = None
        fed = proxy.checker.inputs
        protocol = room.ep.transport.get_protocol()
        t0 = time.perf_counter()
        try:
            protocol.datagram_received(data, addr)  # type: ignore[attr-defined]
        except Exception as exc:
            message = f"Relay.datagram raised {type(exc).__name__}: {exc}"
            in_forwarder = proxy.checker.inputs > fed and proxy.checker.last is None
            return self._fail(room, data, label, "crash", message, in_forwarder)
        slow = time.perf_counter() - t0
        if slow > SLOW:
            return self._fail(room, data, label, "slow", f"Relay.datagram took {slow:.1f} s")
        if stats.received != received + 1:
            return self._fail(
                room, data, label, "accounting", f"received grew by {stats.received - received}"
            )
        grown = {r: stats.dropped[r] - dropped.get(r, 0) for r in stats.dropped}
        grown = {r: n for r, n in grown.items() if n}
        verdict = proxy.checker.last
        accepted = verdict is not None and verdict.drop is None
        if grown:
            (reason, n), *more = grown.items()
            if more or n != 1:
                return self._fail(room, data, label, "accounting", f"counted as {grown}")
            if reason not in ALL_REASONS:
                return self._fail(room, data, label, "accounting", f"unknown reason {reason!r}")
            if accepted:
                return self._fail(
                    room,
                    data,
                    label,
                    "accounting",
                    f"the forwarder accepted it, the relay dropped it ({reason})",
                )
            outcome = f"drop:{reason}"
        elif accepted:
            outcome = "forwarded"
        else:
            kind = classify(data)
            if kind == "dtls":
                outcome = "dtls"
            elif kind == "rtcp" and is_control_packet(data) and room.ep.hop is not None:
                outcome = "control"
            else:
                return self._fail(
                    room, data, label, "accounting", "neither dropped, forwarded nor consumed"
                )
        self.outcomes[outcome] += 1
        return outcome

    def _fail(
        self,
        room: Room,
        data: bytes,
        label: str,
        kind: str,
        message: str,
        in_forwarder: bool = False,
    ) -> str:
        self.outcomes[f"failure:{kind}"] += 1
        repro: dict[str, Any] = {
            "target": "relay",
            "world_seed": self.seed,
            "endpoint": room.ep.id,
            "address": label,
            "input": data.hex(),
            "recent": [[e, a, d.hex()] for e, a, d in self.recent[:-1]],
        }
        chk = self.proxies[room.conference].checker
        if in_forwarder:  # the forwarder raised: its whole history replays without the relay
            repro["forwarder"] = {
                "target": "twins",
                "setup": chk.setup,
                "implementations": chk.names,
                "trace": encode_trace(chk.trace),
            }
        self.on_failure(FuzzFailure(kind, message), repro)
        return f"failure:{kind}"

    def _mismatch(self, conf_id: str, failure: FuzzFailure) -> None:
        chk = self.proxies[conf_id].checker
        self.outcomes["failure:mismatch"] += 1
        self.on_failure(
            failure,
            {
                "target": "twins",
                "scenario": f"relay:{conf_id}",
                "setup": chk.setup,
                "implementations": chk.names,
                "trace": encode_trace(chk.trace),
            },
        )


def _hints() -> Hints:
    return Hints()


class ErrorLog(logging.Handler):
    """Collects ERROR records of the relay and of asyncio: exceptions swallowed by the
    policy tick or by a loop callback are crashes too, even though nothing raised to us."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class RelayTarget:
    """Runs the relay check over a sequence of worlds (a fresh world every ``world_inputs``)."""

    name = "relay"

    def __init__(
        self,
        rng: random.Random,
        directory: Path,
        factories: dict[str, ForwarderFactory],
        on_failure: Callable[[FuzzFailure, dict[str, Any]], None],
        world_inputs: int = 25_000,
    ) -> None:
        self.rng = rng
        self.directory = directory
        self.factories = factories
        self.on_failure = on_failure
        self.world_inputs = world_inputs
        self.world: RelayWorld | None = None
        self.worlds = 0
        self.churns = 0
        self.inputs = 0
        self.outcomes: Counter[str] = Counter()
        self.mutations: Counter[str] = Counter()
        self.errors = ErrorLog()
        self._in_world = 0

    async def _new_world(self) -> RelayWorld:
        await self.close()
        self.worlds += 1
        world = RelayWorld(
            random.Random(self.rng.getrandbits(64)),
            self.directory,
            self.factories,
            self.on_failure,
            self.rng.getrandbits(32),
        )
        self.world = world
        self._in_world = 0
        await world.start()
        return world

    async def run(self, budget: int) -> int:
        done = 0
        while done < budget:
            world = self.world
            if world is None or self._in_world >= self.world_inputs:
                world = await self._new_world()
            n = min(budget - done, self.world_inputs - self._in_world)
            await world.run(n)
            self._in_world += n
            done += n
            self._check_log()
        self.inputs += done
        return done

    def _check_log(self) -> None:
        records, self.errors.records = self.errors.records, []
        for rec in records:
            self.on_failure(
                FuzzFailure("crash", f"logged error ({rec.name}): {rec.getMessage()}"),
                {
                    "target": "relay",
                    "log": self.errors.format(rec) if rec.exc_info else rec.getMessage(),
                },
            )

    async def close(self) -> None:
        if self.world is not None:
            world, self.world = self.world, None
            self.outcomes.update(world.outcomes)
            self.churns += world.churns
            for name, n in world.mutator.counts.items():
                self.mutations[name] += n
            await world.stop()
            self._check_log()

    def snapshot_outcomes(self) -> Counter[str]:
        out = Counter(self.outcomes)
        if self.world is not None:
            out.update(self.world.outcomes)
        return out


async def replay_relay(
    repro: dict[str, Any], directory: Path, factories: dict[str, ForwarderFactory]
) -> FuzzFailure | None:
    """Best effort: a fresh world from the same seed gets the recent datagrams and the
    failing one again. Hop keys come from a new DTLS handshake, so hop-keyed control
    datagrams replay as forgeries; anything the forwarder decided replays exactly from
    the twins reproducer written beside it."""
    failures: list[FuzzFailure] = []
    world = RelayWorld(
        random.Random(0),
        directory,
        factories,
        lambda f, _r: failures.append(f),
        int(repro.get("world_seed", 0)),
    )
    await world.start()
    try:
        by_id = {r.ep.id: r for r in world.rooms}
        for eid, label, data in [
            *repro.get("recent", []),
            [repro["endpoint"], repro["address"], repro["input"]],
        ]:
            room = by_id.get(eid)
            if room is None:
                raise CtmsError(f"the world has no endpoint {eid!r}")
            world.feed(room, bytes.fromhex(data), label)
    finally:
        await world.stop()
    return failures[0] if failures else None
