"""Shared pieces for the conference engine tests: endpoint builders with a fixed SSRC plan,
a simulated clock, and a stand-in for the forwarder's IDR gate so switches complete the way
the real forwarder completes them. No tests here."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from ctms_media.conference import (
    Conference,
    ConferenceConfig,
    EndpointConfig,
    GroupsChanged,
    SendGsp,
    StreamConfig,
)
from ctms_media.conference.actions import Action
from ctms_media.forward.verdict import Receiver

FINGERPRINT = "sha-256 " + ":".join(["AB"] * 32)
STEP = 0.02  # one audio packet per stream per step, as a CTS sends them


def aud(base: int, pos: int) -> int:
    """SSRC of an endpoint's audio stream at ``pos`` (see :func:`endpoint`)."""
    return base + pos


def vid(base: int, pos: int) -> int:
    """SSRC of an endpoint's video stream at ``pos``."""
    return base + 10 + pos


def endpoint(
    eid: str,
    base: int,
    segments: int = 3,
    secure: bool = True,
    aux: bool = False,
    video: bool = True,
    profile: str = "AES_CM_128_HMAC_SHA1_80",
) -> EndpointConfig:
    """An endpoint with one audio and one video stream per segment (and aux if asked):
    audio SSRC = base + position, video SSRC = base + 10 + position."""
    positions = [1, 2, 3] if segments == 3 else [2]
    if aux:
        positions.append(4)
    streams = []
    for p in positions:
        streams.append(StreamConfig(aud(base, p), "audio", p))
        if video:
            streams.append(StreamConfig(vid(base, p), "video", p))
    return EndpointConfig(
        eid, segments, secure, FINGERPRINT if secure else None, profile, tuple(streams)
    )


def voice(level: int) -> int:
    return 0x80 | level


SILENT = 0x7F  # no voice bit, level 127


@dataclass
class Sim:
    """A conference on a simulated clock, with the forwarder's routing table beside it."""

    config: ConferenceConfig
    seed: int = 7
    now: float = 0.0
    conf: Conference = field(init=False)
    actions: list[tuple[float, Action]] = field(default_factory=list)
    fwd_routes: dict[int, tuple[Receiver, ...]] = field(default_factory=dict)
    fwd_version: int = -1
    bases: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.conf = Conference(self.config, self.now, random.Random(self.seed))

    # -- plumbing ---------------------------------------------------------------------------

    def drain(self) -> list[Action]:
        got = self.conf.pop_actions()
        self.actions.extend((self.now, a) for a in got)
        self.sync()
        return got

    def sync(self) -> None:
        """What the server does after each call: push changed routes to the forwarder."""
        if self.conf.routes_version != self.fwd_version:
            self.fwd_version = self.conf.routes_version
            self.fwd_routes = self.conf.routes()

    def of(self, kind: type) -> list:
        return [a for _, a in self.actions if isinstance(a, kind)]

    def clear(self) -> None:
        self.actions.clear()

    # -- endpoints --------------------------------------------------------------------------

    def join(self, ep: EndpointConfig, base: int | None = None, active: bool = True) -> None:
        """Add an endpoint; with ``active`` also finish DTLS and ACK (or latch)."""
        self.conf.add_endpoint(ep, self.now)
        if base is None:
            base = min(s.ssrc for s in ep.streams) // 100 * 100 if ep.streams else 0
        self.bases[ep.id] = base
        self.drain()
        if active:
            self.activate(ep.id)

    def activate(self, eid: str) -> None:
        ep = next(e for e in self.conf.snapshot({})["endpoints"] if e["id"] == eid)
        if ep["secure"]:
            self.conf.endpoint_handshake_done(eid, self.now)
            gsps = [a for a in self.drain() if isinstance(a, SendGsp) and a.endpoint_id == eid]
            if gsps:
                self.conf.gsp_ack(eid, gsps[-1].group.spi, self.now)
                self.drain()
        else:
            self.conf.endpoint_latched(eid, self.now)
            self.drain()

    # -- media ------------------------------------------------------------------------------

    def step(self, tails: Iterable[tuple[int, int]] = ()) -> None:
        """One 20 ms step: a batch of tail reports, then the timer tick."""
        reports = list(tails)
        if reports:
            self.conf.on_tails(reports, self.now)
            self.drain()
        self.conf.tick(self.now)
        self.drain()
        self.check_invariants()
        self.now = round(self.now + STEP, 9)

    def audio_tails(self, levels: dict[int, int | None]) -> list[tuple[int, int]]:
        """Every declared audio stream reports: a level from ``levels`` (voice) or silence."""
        out = []
        for ssrc, (_, s) in self.conf.streams().items():
            if s.kind == "audio":
                lvl = levels.get(ssrc)
                out.append((ssrc, SILENT if lvl is None else voice(lvl)))
        return out

    def talk(self, levels: dict[int, int | None], seconds: float, idr: bool = True) -> None:
        """Everyone sends for ``seconds``; streams in ``levels`` speak at that level. With
        ``idr``, every gated video source answers its PLI with an IDR at the next step."""
        for _ in range(round(seconds / STEP)):
            self.step(self.audio_tails(levels))
            if idr:
                for ssrc in self.gated_sources():
                    self.idr(ssrc)

    def idle(self, seconds: float) -> None:
        for _ in range(round(seconds / STEP)):
            self.step()

    def gated_sources(self) -> list[int]:
        self.sync()
        return sorted(s for s, rs in self.fwd_routes.items() if any(r.gated for r in rs))

    def idr(self, ssrc: int, report: bool = True) -> tuple[str, ...]:
        """A packet of ``ssrc`` starting an IDR reaches the forwarder: open its gated
        subscriptions and close the displays' other video (as Forwarder._open_gates does),
        then report the tail byte and the switch to the conference."""
        self.sync()
        streams = self.conf.streams()
        route = self.fwd_routes.get(ssrc, ())
        opening = [r for r in route if r.gated]
        if opening:
            slots = {(r.id, r.position) for r in opening}
            self.fwd_routes[ssrc] = tuple(
                Receiver(r.id, r.position, r.spi) if r.gated else r for r in route
            )
            for other, rs in self.fwd_routes.items():
                if other != ssrc and streams[other][1].kind == "video":
                    self.fwd_routes[other] = tuple(r for r in rs if (r.id, r.position) not in slots)
        ids = tuple(r.id for r in opening)
        if report:
            self.conf.on_tails([(ssrc, 0xC0)], self.now)
            self.drain()
            if ids:
                self.conf.on_switched(ssrc, ids, self.now)
                self.drain()
        return ids

    # -- views ------------------------------------------------------------------------------

    def who(self, ssrc: int) -> tuple[str, int]:
        eid, s = self.conf.streams()[ssrc]
        return eid, s.position

    def shown(self, rid: str) -> dict[int, tuple[str, int]]:
        """Display -> (source endpoint, source position), from the GET snapshot."""
        snap = self.conf.snapshot({})["displays"].get(rid, {})
        return {int(d): (v["endpoint"], v["position"]) for d, v in snap.items()}

    def forwarded_video(self, rid: str) -> dict[int, int]:
        """Display -> source SSRC the forwarder's table sends ``rid`` ungated."""
        streams = self.conf.streams()
        out: dict[int, int] = {}
        for ssrc, rs in self.fwd_routes.items():
            if ssrc in streams and streams[ssrc][1].kind == "video":
                for r in rs:
                    if r.id == rid and not r.gated:
                        assert r.position not in out, f"{rid} display {r.position} twice"
                        out[r.position] = ssrc
        return out

    def hears(self, rid: str) -> dict[int, int]:
        """Audio SSRC -> speaker position for ``rid``."""
        streams = self.conf.streams()
        return {
            ssrc: r.position
            for ssrc, rs in self.conf.routes().items()
            if streams[ssrc][1].kind == "audio"
            for r in rs
            if r.id == rid
        }

    def check_invariants(self) -> None:
        """What must hold after every call, whatever the scenario."""
        conf = self.conf
        routes = conf.routes()
        streams = conf.streams()
        assert set(routes) == set(streams)
        audio_routed = 0
        for ssrc, rs in routes.items():
            owner, stream = streams[ssrc]
            ids = [r.id for r in rs]
            assert len(ids) == len(set(ids)), f"{ssrc} sent twice to one room: {rs}"
            assert owner not in ids, f"{owner} gets its own stream {ssrc}"
            if stream.kind == "audio":
                audio_routed += bool(rs)
                assert not any(r.gated for r in rs)
        assert audio_routed <= conf.config.audio_streams
        spis = {g.spi for g in conf.groups()}
        for rs in routes.values():
            for r in rs:
                assert r.spi in spis if conf.secure else r.spi == 0
        # one ungated video source per display of a receiver
        seen: set[tuple[str, int]] = set()
        for ssrc, rs in routes.items():
            if streams[ssrc][1].kind == "video":
                for r in rs:
                    if not r.gated:
                        assert (r.id, r.position) not in seen, f"display {r} twice"
                        seen.add((r.id, r.position))
        # the snapshot reports exactly what the routes forward
        snap = conf.snapshot({})["displays"]
        for rid in snap:
            want = {int(d): (v["endpoint"], v["position"]) for d, v in snap[rid].items()}
            got = {}
            for ssrc, rs in routes.items():
                if streams[ssrc][1].kind == "video":
                    for r in rs:
                        if r.id == rid and not r.gated:
                            got[r.position] = (streams[ssrc][0], streams[ssrc][1].position)
            assert want == got


def groups_changed(actions: Iterable[Action]) -> int:
    return sum(isinstance(a, GroupsChanged) for a in actions)
