"""The relay process: conferences, their endpoints' UDP ports, DTLS, control and media.

Everything that touches a socket or a timer is here (the batched system calls of the
endpoint ports in :mod:`ctms_media.server.udp`); the decisions are made by sans-IO parts:
:class:`~ctms_media.dtls.negotiator.DtlsServer` (handshakes), the conference policy (who is
heard and seen, who holds which group key) and the forwarder (every media packet).
The packet path calls the policy never: it queues tail bytes, and a 20 ms tick hands them
over in a batch and installs whatever routes the policy answers with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ctms_media._udpio import DatagramReceiver
from ctms_media.conference.actions import (
    GroupsChanged,
    RemoveEndpoint,
    SendDowngrade,
    SendFir,
    SendGsp,
    SendPli,
)
from ctms_media.conference.model import ConferenceConfig, EndpointConfig
from ctms_media.conference.policy import ACTIVE, Conference
from ctms_media.conformance import implementations
from ctms_media.dtls import (
    DtlsDriver,
    DtlsServer,
    HandshakeComplete,
    HandshakeFailed,
    HopSrtcp,
    PeerClosed,
    RelayCertificate,
)
from ctms_media.errors import ConfigError, CtmsError, LimitReached, MalformedError
from ctms_media.forward.verdict import Receiver
from ctms_media.server.config import RelayConfig
from ctms_media.server.ports import PortAllocator, PortsUnavailable
from ctms_media.server.stats import LATENCY_SAMPLE_EVERY, RelayStats
from ctms_media.server.udp import PortSocket
from ctms_media.wire.control import (
    RTCP_PT_PSFB,
    Downgrade,
    GspAck,
    RekeyDone,
    decode_control,
    encode_control,
    encode_fir,
    encode_pli,
    is_control_packet,
    rtcp_routing,
)
from ctms_media.wire.control import Gsp as GspMessage
from ctms_media.wire.ekt import EKT_FORMAT_IDS
from ctms_media.wire.rtp import RtcpHeader, classify, rtp_header_length
from ctms_media.wire.srtp import profile_named

log = logging.getLogger("ctms_media.relay")

TICK = 0.02  # how often tail bytes reach the policy and routes are re-installed
DOWNGRADE_REPEATS = 3
DOWNGRADE_SPACING = 0.1
DOWNGRADE_GRACE = 1.0  # SRTP still accepted this long after a DOWNGRADE (wire.md §8)
READ_BATCH = 64  # datagrams read per wakeup of one port (one recvmmsg)
_SSRC_AT = struct.Struct("!I").unpack_from  # no slice object per packet


def _no_clock() -> float:
    return 0.0  # activity time before start(): no loop yet


Address = tuple[str, int]


class EndpointPort(asyncio.DatagramProtocol):
    """The relay's UDP port of one endpoint: hands every datagram to the relay.

    Reads in batches (:class:`~ctms_media.server.udp.PortSocket`): one wakeup reads up to
    ``READ_BATCH`` waiting datagrams with one system call and :meth:`Relay.datagrams` takes
    them one by one through :meth:`Relay.datagram`, exactly as the per-datagram callback
    (``datagram_received``, still what asyncio calls where batching is unavailable) does.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.endpoint: EndpointSession | None = None
        self.io: PortSocket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.io = PortSocket(transport)  # type: ignore[arg-type]
        self.io.start_reading(self._readable)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.io is not None:
            self.io.stop_reading()

    def _readable(self) -> None:
        io = self.io
        assert io is not None
        if io.transport.is_closing():
            io.stop_reading()
            return
        try:
            batch = self.relay.receiver.receive(io.read_fd)
        except OSError as exc:  # what asyncio's reader does with a socket error
            self.error_received(exc)
            return
        if batch:
            self.relay.datagrams(self, batch)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        ep = self.endpoint
        if ep is None or ep.closed:
            self.relay.stats.received += 1
            self.relay.stats.dropped["unknown_port"] += 1
            return
        self.relay.datagram(ep, data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP from a room that went away
        if self.endpoint is not None:
            ep = self.endpoint
            log.debug("conference %s: endpoint %s: socket error %s", ep.conference.id, ep.id, exc)


@dataclass(eq=False)
class EndpointSession:
    """One endpoint's runtime: port, latched address, DTLS and hop keys."""

    id: str
    conference: ConferenceSession
    config: EndpointConfig
    port: int
    transport: asyncio.DatagramTransport
    ssrcs: frozenset[int]
    peer: Address | None = None
    dtls: DtlsServer | None = None
    driver: DtlsDriver | None = None
    hop: HopSrtcp | None = None
    control_ssrc: int | None = None
    last_activity: float = 0.0
    closed: bool = False
    io: PortSocket | None = None  # batched sends; None: every output through the transport
    outbox: list[bytes] = field(default_factory=list)  # outputs queued for peer (Relay._flush)

    def send(self, data: bytes) -> None:
        if self.peer is not None and not self.closed:
            self.transport.sendto(data, self.peer)

    def send_control(self, plain_rtcp: bytes) -> None:
        """Relay-originated RTCP: under hop keys when the endpoint has them, else plain."""
        if self.hop is not None:
            try:
                plain_rtcp = self.hop.protect(plain_rtcp)
            except CtmsError as exc:
                log.warning(
                    "conference %s: endpoint %s: cannot protect control packet: %s",
                    self.conference.id,
                    self.id,
                    exc,
                )
                return
        self.send(plain_rtcp)


@dataclass(eq=False)
class ConferenceSession:
    id: str
    config: ConferenceConfig
    policy: Conference
    forwarder: Any
    control_ssrc: int
    endpoints: dict[str, EndpointSession] = field(default_factory=dict)
    tails: list[tuple[int, int]] = field(default_factory=list)
    switched: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)
    byes: list[int] = field(default_factory=list)  # SSRCs whose verified RTCP carried BYE
    installed_version: int = -1
    installed_latched: frozenset[str] = frozenset()
    counters: dict[str, int] = field(default_factory=dict)
    declared: set[int] = field(default_factory=set)  # SSRCs the forwarder knows
    groups: set[int] = field(default_factory=set)  # SPIs the forwarder knows
    modes: tuple[bool, bool] = (True, False)  # forwarder (srtp, plain)
    installed_spi: dict[str, int] = field(default_factory=dict)  # receiver -> SPI it gets
    grace_spi: dict[str, int] | None = None  # during the downgrade second: SPIs held before


class Relay:
    """Owns every conference of this process and the shared resources (ports, certificate)."""

    def __init__(
        self,
        config: RelayConfig | None = None,
        *,
        implementation: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or RelayConfig()
        self.certificate = RelayCertificate.load_or_create(self.config.certificate)
        self.fingerprint = str(self.certificate.fingerprint("sha-256"))
        impls = implementations()
        self.implementation = implementation or ("cython" if "cython" in impls else "python")
        self._forwarder_factory = impls[self.implementation]
        self.ports = PortAllocator(
            self.config.media_host, self.config.port_min, self.config.port_max
        )
        self.conferences: dict[str, ConferenceSession] = {}
        self.stats = RelayStats()
        # Larger datagrams are dropped unread: no MTU-sized packet is this big. The default
        # (2048) is the batch path's arena row (fastpath/batch.py), so both accept the same.
        self.max_datagram = self.config.max_datagram
        self.rng = rng or random.SystemRandom()
        self._tick_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock: Callable[[], float] = _no_clock  # the loop's time once started
        # Batched reads share one arena, its rows as long as the datagram limit, so an
        # oversize datagram is known by its size without being read (EndpointPort).
        self.receiver = DatagramReceiver(READ_BATCH, self.max_datagram)
        # Outputs wait in their receiver's outbox until the batch (or the single datagram)
        # is done, then leave per receiver in one system call (_flush).
        self._batching = False
        self._dirty: list[EndpointSession] = []  # receivers with a non-empty outbox
        self._sampled: list[float] = []  # latency samples whose outputs are still queued

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._clock = self._loop.time
        self._tick_task = asyncio.create_task(self._ticker(), name="ctms-relay-tick")

    async def stop(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
            self._tick_task = None
        for conf_id in list(self.conferences):
            self.delete_conference(conf_id)

    @property
    def now(self) -> float:
        return (self._loop or asyncio.get_running_loop()).time()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for conf in list(self.conferences.values()):
                try:
                    self._tick(conf)
                except Exception:  # a policy bug must not stop the other conferences
                    log.exception("conference %s: tick failed", conf.id)

    # -- admin operations (the API calls these) --------------------------------------------

    def _refuse(self, what: str, error: CtmsError) -> CtmsError:
        """One log line for a request a ``[limits]`` bound refuses; the error is the answer."""
        log.warning("%s refused: %s", what, error)
        return error

    def create_conference(self, config: ConferenceConfig) -> ConferenceSession:
        if config.id in self.conferences:
            raise ConfigError(f"conference {config.id} exists")
        if len(self.conferences) >= (limit := self.config.max_conferences):
            error = LimitReached(f"conference limit reached ({limit})")
            raise self._refuse(f"conference {config.id}", error)
        fwd = self._forwarder_factory(config.ekt_format)
        # KEKs and salts come from the policy's rng: the system's CSPRNG unless a test
        # handed the relay a seeded one (a 64-bit-seeded Mersenne Twister would put every
        # later KEK within a leaver's reach and defeat rekey on leave).
        seeded = not isinstance(self.rng, random.SystemRandom)
        policy = Conference(
            config, self.now, rng=random.Random(self.rng.getrandbits(64)) if seeded else None
        )
        conf = ConferenceSession(config.id, config, policy, fwd, self.rng.getrandbits(32) or 1)
        self._apply_security(conf)
        self.conferences[config.id] = conf
        log.info(
            "conference %s: created (%s, %s switching, %s EKT)",
            config.id,
            config.security,
            config.switching,
            config.ekt_format,
        )
        return conf

    def delete_conference(self, conf_id: str) -> None:
        conf = self.conferences.pop(conf_id)
        for eid in list(conf.endpoints):
            self._close_endpoint(conf, eid)
        log.info("conference %s: deleted", conf_id)

    async def add_endpoint(self, conf_id: str, config: EndpointConfig) -> EndpointSession:
        conf = self.conferences[conf_id]
        if config.id in conf.endpoints:
            raise ConfigError(f"endpoint {config.id} is already in conference {conf_id}")
        for s in config.streams:
            if s.ssrc in conf.declared:
                raise ConfigError(f"SSRC {s.ssrc} is already declared in conference {conf_id}")
        # Bounds count what the policy holds: it admits synchronously, before the port is
        # bound, so concurrent requests cannot all slip under a limit during that await.
        what, limits = f"conference {conf_id}: endpoint {config.id}", self.config
        if len(conf.policy.endpoint_ids()) >= (limit := limits.max_endpoints_per_conference):
            error = LimitReached(f"endpoint limit reached ({limit}) in conference {conf_id}")
            raise self._refuse(what, error)
        if len(config.streams) > (limit := limits.max_streams_per_endpoint):
            error = ConfigError(  # this body can never succeed here: 400, not 503
                f"endpoint {config.id} declares {len(config.streams)} streams; "
                f"the limit is {limit} per endpoint"
            )
            raise self._refuse(what, error)
        streams = len(conf.policy.streams()) + len(config.streams)
        if streams > (limit := limits.max_streams_per_conference):
            error = LimitReached(f"stream limit reached ({limit}) in conference {conf_id}")
            raise self._refuse(what, error)
        now = self.now
        conf.policy.add_endpoint(config, now)  # may raise SecurityMismatch
        try:
            transport, proto, port = await self.ports.bind(lambda: EndpointPort(self))
        except (CtmsError, OSError) as exc:
            conf.policy.remove_endpoint(config.id, now, "no port")
            if isinstance(exc, CtmsError):
                raise
            raise PortsUnavailable(f"cannot bind a media port: {exc.strerror or exc}") from exc
        if self.conferences.get(conf_id) is not conf:  # deleted while the port was bound
            transport.close()
            self.ports.release(port)
            raise KeyError(conf_id)
        ep = EndpointSession(
            config.id,
            conf,
            config,
            port,
            transport,
            frozenset(s.ssrc for s in config.streams),
            last_activity=now,
        )
        assert isinstance(proto, EndpointPort)
        proto.endpoint = ep
        ep.io = proto.io
        conf.endpoints[config.id] = ep
        for s in config.streams:
            conf.forwarder.add_stream(s.ssrc, s.kind, profile_named(config.profile))
            conf.declared.add(s.ssrc)
        if config.secure:
            self._new_dtls(ep)
        log.info(
            "conference %s: endpoint %s joined on port %d (%d segment(s), %s)",
            conf_id,
            config.id,
            port,
            config.segments,
            "secure" if config.secure else "non-secure",
        )
        self._tick(conf)
        return ep

    def remove_endpoint(self, conf_id: str, endpoint_id: str, reason: str = "removed") -> None:
        conf = self.conferences[conf_id]
        if endpoint_id not in conf.endpoints:
            raise KeyError(endpoint_id)
        conf.policy.remove_endpoint(endpoint_id, self.now, reason)
        self._close_endpoint(conf, endpoint_id)
        self._tick(conf)

    def _close_endpoint(self, conf: ConferenceSession, endpoint_id: str) -> None:
        ep = conf.endpoints.pop(endpoint_id, None)
        if ep is None:
            return
        ep.closed = True
        if ep.driver is not None:
            ep.driver.close()
        for ssrc in ep.ssrcs:
            conf.forwarder.remove_stream(ssrc)
            conf.declared.discard(ssrc)
        if ep.outbox:  # queued before it left: it goes out first, as it would have
            self._flush()
        ep.transport.close()
        if ep.io is not None:  # nothing more is read from a closed port
            ep.io.stop_reading()
        self.ports.release(ep.port)
        self._install_routes(conf, force=True)
        log.info("conference %s: endpoint %s left, port %d released", conf.id, endpoint_id, ep.port)

    # -- DTLS --------------------------------------------------------------------------------

    def _new_dtls(self, ep: EndpointSession) -> None:
        fingerprint = ep.config.fingerprint
        if not fingerprint:
            raise ConfigError(f"secure endpoint {ep.id} declared no fingerprint")
        ep.dtls = DtlsServer(self.certificate, fingerprint, ep.id, self.now)
        ep.driver = DtlsDriver(
            ep.dtls,
            lambda data, addr: ep.transport.sendto(data, addr),
            lambda event: self._dtls_event(ep, event),
            loop=self._loop,
        )

    def _dtls_event(self, ep: EndpointSession, event: object) -> None:
        conf = ep.conference
        if ep.closed:
            return
        if isinstance(event, HandshakeComplete):
            self.stats.handshakes["ok"] += 1
            ep.peer = event.peer_address  # type: ignore[assignment]
            ep.hop = HopSrtcp(event.keys)
            log.info(
                "conference %s: endpoint %s: DTLS-SRTP done (%s), address latched at %s",
                conf.id,
                ep.id,
                event.keys.profile,
                ep.peer,
            )
            conf.policy.endpoint_handshake_done(ep.id, self.now)
            self._tick(conf)
        elif isinstance(event, HandshakeFailed):
            self.stats.handshakes["failed"] += 1
            log.warning(
                "conference %s: endpoint %s: DTLS handshake failed: %s; waiting for a "
                "new ClientHello",
                conf.id,
                ep.id,
                event.reason,
            )
            if ep.driver is not None:
                ep.driver.close()
            self._new_dtls(ep)  # failure is final for a DtlsServer; a retry gets a fresh one
        elif isinstance(event, PeerClosed):
            log.info("conference %s: endpoint %s closed its DTLS association", conf.id, ep.id)

    # -- the packet path ---------------------------------------------------------------------

    def _drop(self, ep: EndpointSession, reason: str, addr: Address) -> None:
        n = self.stats.dropped[reason] = self.stats.dropped[reason] + 1
        if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th ...: visible without flooding the log
            log.info(
                "conference %s: endpoint %s: dropped a datagram from %s:%d (%s; %d so far)",
                ep.conference.id,
                ep.id,
                addr[0],
                addr[1],
                reason,
                n,
            )

    def datagrams(self, port: EndpointPort, batch: list[tuple[bytes | int, Address]]) -> None:
        """One wakeup's datagrams of one port (``DatagramReceiver.receive``), in arrival
        order, each through :meth:`datagram` (or :meth:`oversize` for one known only by its
        size); the outputs of all of them leave at the end, per receiver (:meth:`_flush`)."""
        ep = port.endpoint
        stats = self.stats
        if ep is None or ep.closed:  # datagram_received's answer, for each of them
            stats.received += len(batch)
            stats.dropped["unknown_port"] += len(batch)
            return
        datagram = self.datagram  # looked up per batch: the fuzzer wraps it for a while
        self._batching = True
        try:
            for data, addr in batch:
                try:
                    if data.__class__ is int:
                        self.oversize(ep, data, addr)  # type: ignore[arg-type]
                    else:
                        datagram(ep, data, addr)  # type: ignore[arg-type]
                except Exception as exc:  # reported and skipped, as asyncio does per callback
                    (self._loop or asyncio.get_running_loop()).call_exception_handler(
                        {"message": "Relay.datagram failed", "exception": exc, "protocol": port}
                    )
                if ep.closed:  # the port closed under this batch: asyncio would have read
                    break  # no more of it, so the rest is not counted either
        finally:
            self._batching = False
            if self._dirty:
                self._flush()

    def datagram(self, ep: EndpointSession, data: bytes, addr: Address) -> None:
        """Every datagram an endpoint port reads comes through here, one at a time: counted,
        size-checked, then :meth:`_datagram`. Its outputs leave before this returns, unless it
        is part of a batch (:meth:`datagrams`), whose outputs leave together at its end."""
        stats = self.stats
        stats.received += 1
        if len(data) > self.max_datagram:  # before anything parses it, DTLS included
            stats.bytes_in += len(data)
            self._drop(ep, "malformed", addr)
            return
        if stats.received % LATENCY_SAMPLE_EVERY:
            self._datagram(ep, data, addr)
            if self._dirty and not self._batching:
                self._flush()
            return
        forwarded = stats.forwarded
        t0 = time.perf_counter()
        self._datagram(ep, data, addr)
        if not self._batching:
            if self._dirty:
                self._flush()
        elif stats.forwarded != forwarded:
            self._sampled.append(t0)  # receive-to-last-send: observed when its outputs leave
            return
        stats.latency.observe(time.perf_counter() - t0)

    def oversize(self, ep: EndpointSession, size: int, addr: Address) -> None:
        """A datagram above the limit that was read only as its size (a batch read's row
        holds up to the limit): what :meth:`datagram` does with an oversize one."""
        stats = self.stats
        stats.received += 1
        stats.bytes_in += size
        self._drop(ep, "malformed", addr)

    def _flush(self) -> None:
        """Send every queued output, per receiver in queue order through that receiver's own
        port, in as few system calls as the kernel takes (``PortSocket.send``); then close
        the latency samples that waited for them."""
        dirty, self._dirty = self._dirty, []
        for r in dirty:
            out, r.outbox = r.outbox, []
            if r.io is not None:
                r.io.send(out, r.peer)  # type: ignore[arg-type]
            else:
                for data in out:
                    r.transport.sendto(data, r.peer)
        if self._sampled:
            now = time.perf_counter()
            observe = self.stats.latency.observe
            for t0 in self._sampled:
                observe(now - t0)
            self._sampled = []

    def _datagram(self, ep: EndpointSession, data: bytes, addr: Address) -> None:
        stats = self.stats
        size = len(data)
        stats.bytes_in += size
        # RFC 7983 demux, media first: the first byte 128-191 is what classify() calls RTP or
        # RTCP (split as RFC 5761, by the second byte), the one case per packet; classify()
        # sorts every other datagram.
        b0 = data[0] if size else 0
        if 128 <= b0 <= 191:
            rtcp = size >= 2 and 192 <= data[1] <= 223
        else:
            self._other(ep, data, addr, classify(data))
            return
        peer = ep.peer
        if peer is not None:
            if addr != peer:
                self._drop(ep, "address", addr)
                return
        elif ep.config.secure and ep.conference.policy.secure:
            self._drop(ep, "address", addr)  # secure rooms latch at the DTLS handshake only
            return
        if rtcp and is_control_packet(data):
            if self._dirty:  # what the control tick sends goes after the outputs
                self._flush()
            self._control(ep, data, addr)
            return
        # Framing first (vectors.md: `malformed` wins over `unknown_ssrc`), then ownership,
        # before the forwarder can touch any state: every room holds every sender's key
        # through EKT, so only a room's own SSRCs are believed from its port.
        try:
            if rtcp:
                RtcpHeader.parse(data)
            else:
                rtp_header_length(data)
        except MalformedError:
            self._drop(ep, "malformed", addr)
            return
        ssrc = _SSRC_AT(data, 4 if rtcp else 8)[0]
        if ssrc not in ep.ssrcs:
            self._drop(ep, "unknown_ssrc", addr)
            return
        conf = ep.conference
        verdict = conf.forwarder.forward(data, rtcp)
        if verdict.drop is not None:
            self._drop(ep, verdict.drop, addr)
            return
        ep.last_activity = self._clock()
        if peer is None:
            ep.peer = addr
            log.info("conference %s: endpoint %s: address latched at %s:%d", conf.id, ep.id, *addr)
            conf.policy.endpoint_latched(ep.id, self._clock())  # RTP or RTCP (wire.md §8)
            self._install_routes(conf)
        if verdict.tail is not None:
            conf.tails.append((verdict.ssrc, verdict.tail))
        if verdict.switched:
            conf.switched.append((verdict.ssrc, verdict.switched))
        if rtcp:
            self._route_rtcp(conf, ep, data, verdict.ssrc)
            return
        endpoints = conf.endpoints
        for out, receivers in verdict.outputs:
            self._queue(out, [endpoints.get(rid) for rid in receivers])

    def _queue(self, data: bytes, receivers: Iterable[EndpointSession | None]) -> None:
        """Queue ``data`` for each latched receiver; it leaves with the batch (_flush)."""
        stats, dirty, n = self.stats, self._dirty, 0
        for r in receivers:
            if r is not None and r.peer is not None:
                box = r.outbox
                if not box:
                    dirty.append(r)
                box.append(data)
                n += 1
        stats.forwarded += n
        stats.bytes_out += n * len(data)

    def _other(self, ep: EndpointSession, data: bytes, addr: Address, kind: str) -> None:
        """A datagram that is not RTP/RTCP: DTLS to the handshake, the rest dropped."""
        if kind == "dtls":
            if self._dirty:  # what DTLS sends (or a handshake's tick) goes after the outputs
                self._flush()
            if ep.driver is None or ep.dtls is None:
                self._drop(ep, "dtls", addr)
                return
            before = ep.dtls.datagrams_ignored
            ep.driver.datagram_received(data, addr)
            if ep.dtls.datagrams_ignored != before:
                self._drop(ep, "dtls", addr)
            else:  # a room working through its handshake is not silent
                ep.last_activity = self._clock()
            return
        if kind == "stun":
            self._drop(ep, "stun", addr)
            return
        self._drop(ep, "malformed", addr)  # "unknown": no protocol of RFC 7983

    def _route_rtcp(
        self, conf: ConferenceSession, ep: EndpointSession, data: bytes, ssrc: int | None
    ) -> None:
        """End-to-end RTCP goes by its own rule, not the sender's media route: feedback
        (NACK, PLI, FIR) to the rooms the sender receives from, everything else (SR, RR,
        SDES with its long EKT trailer, BYE) to every other active room, so that any room
        can learn any sender's key and decrypt the feedback it is sent. A BYE is queued for
        the policy. While SRTP is still accepted (also the downgrade second) only the first
        header is read: the rest may be ciphertext."""
        routing = rtcp_routing(data, encrypted=conf.modes[0])
        if routing.bye and ssrc is not None:
            conf.byes.append(ssrc)
        policy = conf.policy
        if routing.feedback is not None:
            targets: Iterable[str] = policy.feedback_targets(
                ep.id, routing.media_ssrc, video_only=routing.feedback == RTCP_PT_PSFB
            )
        else:
            targets = [
                eid
                for eid in conf.endpoints
                if eid != ep.id and policy.endpoint_state(eid) == ACTIVE
            ]
        self._queue(data, [conf.endpoints.get(rid) for rid in targets])

    def _control(self, ep: EndpointSession, data: bytes, addr: Address) -> None:
        if ep.hop is None:
            self._drop(ep, "control", addr)
            return
        try:
            ssrc, msg = decode_control(ep.hop.unprotect(data))
        except CtmsError as exc:
            self._drop(ep, "control", addr)
            log.debug(
                "conference %s: endpoint %s: bad control packet: %s", ep.conference.id, ep.id, exc
            )
            return
        if ep.control_ssrc is None:
            ep.control_ssrc = ssrc
        ep.last_activity = self.now
        conf = ep.conference
        if isinstance(msg, GspAck):
            conf.policy.gsp_ack(ep.id, msg.spi, self.now)
        elif isinstance(msg, RekeyDone):
            conf.policy.rekey_done(ep.id, msg.spi, self.now)
        else:
            self._drop(ep, "control", addr)
            return
        self._tick(conf)

    # -- policy glue -------------------------------------------------------------------------

    def _tick(self, conf: ConferenceSession) -> None:
        now = self.now
        policy = conf.policy
        if conf.tails:
            tails, conf.tails = conf.tails, []
            policy.on_tails(tails, now)
        if conf.switched:
            switched, conf.switched = conf.switched, []
            for ssrc, ids in switched:
                policy.on_switched(ssrc, ids, now)
        if conf.byes:
            byes, conf.byes = conf.byes, []
            for ssrc in byes:
                policy.on_bye(ssrc, now)
        for ep in conf.endpoints.values():
            policy.on_activity(ep.id, ep.last_activity)
        policy.tick(now)
        self._actions(conf)
        self._sync_counters(conf)
        self._install_routes(conf)

    def _actions(self, conf: ConferenceSession) -> None:
        # Security first: a downgrade must start its grace second (and keep the groups)
        # before the GroupsChanged that comes with it would remove them.
        self._apply_security(conf)
        for action in conf.policy.pop_actions():
            ep = conf.endpoints.get(getattr(action, "endpoint_id", ""), None)
            if isinstance(action, GroupsChanged):
                self._sync_groups(conf)
            elif isinstance(action, SendGsp) and ep is not None:
                g = action.group
                if g.spi not in conf.groups:  # a resend finds its group installed already
                    self._sync_groups(conf)
                msg = GspMessage(
                    g.spi,
                    int(g.cipher),
                    EKT_FORMAT_IDS[conf.config.ekt_format],
                    profile_named(g.profile).id if isinstance(g.profile, str) else g.profile.id,
                    g.kek,
                    g.salt,
                )
                ep.send_control(encode_control(msg, conf.control_ssrc))
            elif isinstance(action, SendDowngrade) and ep is not None:
                self._downgrade(conf, ep)
            elif isinstance(action, SendPli) and ep is not None:
                ep.send_control(encode_pli(conf.control_ssrc, action.media_ssrc))
            elif isinstance(action, SendFir) and ep is not None:
                ep.send_control(encode_fir(conf.control_ssrc, action.media_ssrc, action.seq))
            elif isinstance(action, RemoveEndpoint) and ep is not None:
                self._close_endpoint(conf, ep.id)
        self._apply_security(conf)

    def _downgrade(self, conf: ConferenceSession, ep: EndpointSession) -> None:
        packet = encode_control(Downgrade(), conf.control_ssrc)
        loop = self._loop or asyncio.get_running_loop()
        for i in range(DOWNGRADE_REPEATS):
            loop.call_later(i * DOWNGRADE_SPACING, ep.send_control, packet)

    def _set_modes(self, conf: ConferenceSession, srtp: bool, plain: bool) -> None:
        conf.modes = (srtp, plain)
        conf.forwarder.set_modes(srtp, plain)

    def _end_grace(self, conf: ConferenceSession) -> None:
        conf.grace_spi = None
        self._set_modes(conf, False, True)
        self._sync_groups(conf)

    def _apply_security(self, conf: ConferenceSession) -> None:
        """Forwarder modes follow the policy: SRTP, plain, or both for a second after a
        downgrade, during which SRTP still reaches the rooms that were secure with the SPI
        they held (wire.md §8)."""
        if conf.policy.secure:
            if conf.modes != (True, False):
                self._set_modes(conf, True, False)
        elif conf.modes == (True, False):
            if conf.policy.downgraded_at is None:  # born non-secure: nothing in flight
                self._set_modes(conf, False, True)
                return
            conf.grace_spi = dict(conf.installed_spi)
            self._set_modes(conf, True, True)
            loop = self._loop or asyncio.get_running_loop()
            loop.call_later(DOWNGRADE_GRACE, self._end_grace, conf)
            log.info(
                "conference %s: downgraded; SRTP accepted for %.1f s more", conf.id, DOWNGRADE_GRACE
            )

    def _sync_groups(self, conf: ConferenceSession) -> None:
        want = {g.spi: g for g in conf.policy.groups()}
        for spi, g in want.items():
            if spi not in conf.groups:
                profile = profile_named(g.profile) if isinstance(g.profile, str) else g.profile
                conf.forwarder.add_group(spi, int(g.cipher), g.kek, g.salt, profile)
                conf.groups.add(spi)
        self._install_routes(conf, force=True)
        if conf.grace_spi is not None:
            return  # groups stay until in-flight SRTP may no longer arrive
        for spi in list(conf.groups - set(want)):
            with contextlib.suppress(ConfigError):  # still routed: dropped on the next sync
                conf.forwarder.remove_group(spi)
                conf.groups.discard(spi)

    def _install_routes(self, conf: ConferenceSession, force: bool = False) -> None:
        latched = frozenset(eid for eid, ep in conf.endpoints.items() if ep.peer is not None)
        version = conf.policy.routes_version
        if not force and version == conf.installed_version and latched == conf.installed_latched:
            return
        fwd = conf.forwarder
        grace = conf.grace_spi
        installed: dict[str, int] = {}
        for ssrc, receivers in conf.policy.routes().items():
            if ssrc not in fwd.streams:
                continue
            chosen = []
            for r in receivers:
                if r.id not in latched:
                    continue
                if grace is not None and r.spi == 0 and grace.get(r.id):
                    # The downgrade second: a formerly secure room still gets SRTP, under
                    # the SPI it held (plain RTP reaches it whatever the SPI).
                    r = Receiver(r.id, r.position, grace[r.id], r.gated)
                if r.spi == 0 or r.spi in fwd.groups:
                    chosen.append(r)
                    if r.spi:
                        installed[r.id] = r.spi
            fwd.set_route(ssrc, chosen)
        conf.installed_spi = installed
        conf.installed_version = version
        conf.installed_latched = latched

    def _sync_counters(self, conf: ConferenceSession) -> None:
        for name in ("switches", "rekeys", "gsp_timeouts", "media_timeouts"):
            value = getattr(conf.policy, name, 0)
            delta = value - conf.counters.get(name, 0)
            if delta:
                setattr(self.stats, name, getattr(self.stats, name) + delta)
                conf.counters[name] = value

    def snapshot(self, conf_id: str) -> dict[str, Any]:
        conf = self.conferences[conf_id]
        return conf.policy.snapshot({eid: ep.port for eid, ep in conf.endpoints.items()})


__all__ = ["EndpointSession", "Receiver", "Relay"]
