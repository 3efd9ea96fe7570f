"""The sans-IO conference engine: security policy, group keys, speakers, displays, IDR gating.

No sockets, no asyncio, no clock of its own: every entry takes ``now`` (seconds, any
monotonic origin) and the server feeds it events (endpoint added, DTLS done, GSP-ACK,
REKEY-DONE, tail bytes, switched displays, ``tick``). The engine answers with state the server
reads — :meth:`Conference.routes` (with :attr:`Conference.routes_version`),
:meth:`Conference.groups`, :meth:`Conference.snapshot` — and actions it drains with
:meth:`Conference.pop_actions`. Decisions are slow and packets fast (DESIGN.md): the packet
loop only reports tail bytes in batches and swaps the routing table when the version moves.

Server protocol, per call: (1) call the event method, (2) drain ``pop_actions()`` in order,
(3) on ``GroupsChanged`` add every SPI of ``groups()`` the forwarder lacks, (4) if
``routes_version`` moved, ``set_route`` every stream of ``routes()`` (and ``remove_stream``
the SSRCs no longer in ``streams()``), (5) remove the forwarder's SPIs not in ``groups()``.
Call ``tick(now)`` every 50–100 ms; timers are checked there.

Every log line goes to ``logging.getLogger("ctms_media.conference")`` and names the
conference and the endpoint; the lines of the source's Table 7-1 keep its words exactly.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ctms_media.conference.actions import (
    Action,
    GroupsChanged,
    RemoveEndpoint,
    SendDowngrade,
    SendFir,
    SendGsp,
    SendPli,
)
from ctms_media.conference.audio import SpeakerTracker
from ctms_media.conference.model import (
    ConferenceConfig,
    EktGroupSpec,
    EndpointConfig,
    SecurityMismatch,
    StreamConfig,
    new_group,
)
from ctms_media.conference.video import (
    AUX_DISPLAYS,
    POSITION_ORDER,
    Candidate,
    assign_displays,
    audio_destination,
    main_displays,
    video_destinations,
)
from ctms_media.errors import ConfigError
from ctms_media.forward.verdict import Receiver
from ctms_media.wire.rtp import Position
from ctms_media.wire.srtp import Profile

__all__ = [
    "FIR_AFTER",
    "GSP_RESEND",
    "GSP_TIMEOUT",
    "LOG",
    "MEDIA_TIMEOUT",
    "Conference",
    "GroupsChanged",
    "RemoveEndpoint",
    "SecurityMismatch",
    "SendDowngrade",
    "SendFir",
    "SendGsp",
    "SendPli",
]

LOG = logging.getLogger("ctms_media.conference")

GSP_RESEND: Final = 0.5  # seconds between GSP sends until the ACK (wire.md §8)
GSP_TIMEOUT: Final = 5.0  # no ACK this long after the first GSP -> drop the call
FIR_AFTER: Final = 1.0  # no IDR this long after a PLI -> FIR, repeated every second
MEDIA_TIMEOUT: Final = 30.0  # nothing from an endpoint this long -> drop the call
IDR_BIT: Final = 0x80
EPS: Final = 1e-9

# Table 7-1 of the source, word for word; the ids of the call fill the x's.
MSG_SECURITY_MISMATCH: Final = (
    "Call in state=Connected, call id={eid}, conference id = {conf} received error from "
    "Confmgr with error='security mismatch' during verification of security policy. Num={eid}"
)
MSG_START_NON_SECURE: Final = "Conf Id {conf}: will start as non-secure"
MSG_DOWNGRADE: Final = (
    "Conference Manager Conf Id {conf}: will downgrade security from secure to non-secure. "
    "All existing endpoints will be downgraded to non-secure."
)
# The source's line, then the ids (the source's line carries none).
MSG_SPIMAP_TIMEOUT: Final = (
    "SPIMAP timeout, Dropping the call: conference id = {conf}, endpoint id = {eid}"
)
MSG_MEDIA_TIMEOUT: Final = (
    "Media Timeout occurred for call : called num = {eid}, conference id = {conf}"
)

SPI_MEMORY: Final = 4096  # SPIs not reused within this many rekeys (their groups are long gone)

HANDSHAKING: Final = "handshaking"
KEYING: Final = "keying"
ACTIVE: Final = "active"


@dataclass(slots=True)
class _GspTimer:
    group: EktGroupSpec
    first: float
    next_at: float


@dataclass(slots=True)
class _Endpoint:
    cfg: EndpointConfig
    seq: int  # join order: the tie-break of every "who first" question
    state: str
    last_activity: float
    dtls_done: bool = False
    keyed: bool = False  # was sent a GSP: may know a KEK, so its leaving forces a rekey
    rx_spi: int | None = None  # the SPI it ACKed: what its Receiver entries carry
    tx_spi: int | None = None  # the SPI its own streams use (first ACK, then REKEY-DONE)
    gsp: _GspTimer | None = None

    @property
    def id(self) -> str:
        return self.cfg.id


@dataclass(slots=True)
class _Display:
    shown: int | None = None  # the source the forwarder sends to this display (ungated)
    pending: int | None = None  # the source it switches to at that source's next IDR (gated)


@dataclass(slots=True)
class _IdrWait:
    """An outstanding request for an IDR from one video source."""

    since: float  # the first PLI, or the last IDR seen that did not resolve every gate
    pli_at: float | None = None
    fir_at: float | None = None
    fir_seq: int = 0


class Conference:
    """One conference's policy. See the module docstring for how the server drives it."""

    def __init__(
        self, config: ConferenceConfig, now: float, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.created = now
        self.rng = rng if rng is not None else random.SystemRandom()
        # Effective security: True secure, False non-secure, None = best-effort, no one yet.
        self._secure: bool | None = {"secure": True, "non-secure": False}.get(config.security)
        self.downgraded_at: float | None = None
        self._profile: Profile | None = None
        self._salt: bytes | None = None
        self._current: EktGroupSpec | None = None
        self._groups: dict[int, EktGroupSpec] = {}
        # SPIs handed out, oldest first; the last SPI_MEMORY are never reused (bounded: a
        # conference with endless churn must not grow, and must not run out of SPIs).
        self._used_spis: dict[int, None] = {}
        self._distributed_spi: int | None = None
        self._eps: dict[str, _Endpoint] = {}
        self._next_seq = 0
        self._streams: dict[int, tuple[str, StreamConfig]] = {}
        self._ended: set[int] = set()  # SSRCs that sent BYE and no media since
        self._speakers = SpeakerTracker(config.audio_streams)
        self._activity_counter = 0
        self._segment_activity: dict[tuple[str, int], int] = {}
        self._room_activity: dict[str, int] = {}
        self._displays: dict[str, dict[int, _Display]] = {}
        self._desired: dict[str, dict[int, int | None]] = {}
        self._gate_pos: dict[tuple[str, int], int] = {}
        self._waits: dict[int, _IdrWait] = {}
        self._fir_seq: dict[int, int] = {}
        self._actions: list[Action] = []
        self._routes: dict[int, tuple[Receiver, ...]] = {}
        self._routes_version = 0
        self._routes_dirty = False
        self._video_dirty = False
        self._published_spis: frozenset[int] = frozenset()
        # Counters for /metrics.
        self.switches = 0  # display source decisions (a display told to show another source)
        self.switches_completed = 0  # displays the forwarder opened at an IDR (on_switched)
        self.rekeys = 0
        self.gsp_timeouts = 0
        self.media_timeouts = 0
        self.plis = 0
        self.firs = 0

    # -- read side ----------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def security(self) -> str:
        """The mode media runs in now: "secure" or "non-secure"; "best-effort" only while a
        best-effort conference has had no endpoint yet (the first one decides)."""
        if self._secure is None:
            return self.config.security
        return "secure" if self._secure else "non-secure"

    @property
    def secure(self) -> bool:
        """True while media is SRTP with EKT (false after a downgrade or non-secure start)."""
        return self._secure is not False

    @property
    def routes_version(self) -> int:
        """Changes whenever :meth:`routes` would answer differently."""
        self._refresh_routes()
        return self._routes_version

    def routes(self) -> dict[int, tuple[Receiver, ...]]:
        """Every declared stream -> its receivers (``Receiver.id`` = endpoint id, ``position``
        = CSRC destination, ``spi`` = the receiver's SPI or 0 when non-secure, ``gated`` for
        a display waiting for this source's IDR)."""
        self._refresh_routes()
        return dict(self._routes)

    def groups(self) -> tuple[EktGroupSpec, ...]:
        """The group parameter sets the forwarder must know now, oldest first."""
        return tuple(self._groups.values())

    @property
    def current_group(self) -> EktGroupSpec | None:
        return self._current

    def streams(self) -> dict[int, tuple[str, StreamConfig]]:
        """Every declared SSRC -> (endpoint id, stream): what the forwarder must declare."""
        return dict(self._streams)

    def endpoint_config(self, eid: str) -> EndpointConfig | None:
        """The endpoint as declared (e.g. its ``srtp_profile`` for ``Forwarder.add_stream``)."""
        ep = self._eps.get(eid)
        return ep.cfg if ep is not None else None

    def endpoint_ids(self) -> list[str]:
        return list(self._eps)

    def endpoint_state(self, eid: str) -> str | None:
        ep = self._eps.get(eid)
        return ep.state if ep is not None else None

    def endpoint_spi(self, eid: str) -> int | None:
        """The SPI the endpoint ACKed (what its Receiver entries carry), None before."""
        ep = self._eps.get(eid)
        return ep.rx_spi if ep is not None else None

    def speakers(self) -> list[str]:
        """Endpoint ids of the audio set, loudest first, each once."""
        out: list[str] = []
        for ssrc in self._speakers.ranked_members():
            eid = self._streams[ssrc][0]
            if eid not in out:
                out.append(eid)
        return out

    def displays(self) -> dict[str, dict[int, int]]:
        """Receiver id -> {display position: source SSRC currently forwarded there}."""
        return {
            rid: {d: dd.shown for d, dd in disp.items() if dd.shown is not None}
            for rid, disp in self._displays.items()
        }

    def pop_actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def snapshot(self, ports: dict[str, int]) -> dict[str, Any]:
        """The conference as ``GET /v1/conferences/{id}`` answers it (wire.md §9)."""
        displays: dict[str, dict[str, dict[str, Any]]] = {}
        for eid in self._eps:
            shown: dict[str, dict[str, Any]] = {}
            for d, dd in sorted(self._displays.get(eid, {}).items()):
                if dd.shown is not None:
                    src_eid, stream = self._streams[dd.shown]
                    shown[str(d)] = {"endpoint": src_eid, "position": stream.position}
            displays[eid] = shown
        return {
            "id": self.id,
            "security": self.config.security if self.secure else "non-secure",
            "switching": self.config.switching,
            "spi": self._distributed_spi if self.secure else None,
            "endpoints": [
                {
                    "id": ep.id,
                    "segments": ep.cfg.segments,
                    "secure": ep.cfg.secure,
                    "port": ports.get(ep.id),
                    "state": ep.state,
                }
                for ep in self._eps.values()
            ],
            "speakers": self.speakers(),
            "displays": displays,
        }

    # -- endpoints and security policy ----------------------------------------------------------

    def add_endpoint(self, ep: EndpointConfig, now: float) -> None:
        """Admit an endpoint (``POST .../endpoints``). Raises :class:`SecurityMismatch` for a
        non-secure endpoint in a secure conference and :class:`ConfigError` for an id or SSRC
        already in the conference or an SRTP profile other than the conference's; nothing
        changes when it raises."""
        conf = self.id
        if ep.id in self._eps:
            raise ConfigError(f"endpoint {ep.id} is already in conference {conf}")
        for s in ep.streams:
            if s.ssrc in self._streams:
                raise ConfigError(
                    f"endpoint {ep.id}: SSRC {s.ssrc} is already used by endpoint "
                    f"{self._streams[s.ssrc][0]} in conference {conf}"
                )
        if self.config.security == "secure" and not ep.secure:
            LOG.warning(MSG_SECURITY_MISMATCH.format(eid=ep.id, conf=conf))
            raise SecurityMismatch()
        may_run_secure = self._secure is True or (self._secure is None and ep.secure)
        if ep.secure and may_run_secure:
            # One SRTP profile per conference for its whole life (wire.md §5): the group's
            # profile is the one every room decrypts every other room with.
            fixed = self._profile.name if self._profile is not None else None
            if fixed is not None and ep.profile != fixed:
                raise ConfigError(
                    f"endpoint {ep.id}: SRTP profile {ep.profile} differs from conference "
                    f"{conf}'s {fixed}"
                )
        # Validated: from here on nothing raises.
        if self._secure is None:  # best-effort, first endpoint decides
            self._secure = ep.secure
            if not ep.secure:
                LOG.info(MSG_START_NON_SECURE.format(conf=conf))
                LOG.info("Conf Id %s: started by non-secure endpoint %s", conf, ep.id)
        elif self._secure and not ep.secure:  # best-effort running secure
            self._downgrade(now, ep.id)
        if ep.secure and self._secure and self._profile is None:
            self._profile = ep.srtp_profile
        self._eps[ep.id] = _Endpoint(ep, self._next_seq, HANDSHAKING, now)
        self._next_seq += 1
        for s in ep.streams:
            self._streams[s.ssrc] = (ep.id, s)
            if s.kind == "audio":
                self._speakers.add_stream(s.ssrc)
        LOG.info(
            "Conf Id %s: endpoint %s joined (%d segment%s, %s, %d streams)",
            conf,
            ep.id,
            ep.segments,
            "" if ep.segments == 1 else "s",
            "secure" if ep.secure else "non-secure",
            len(ep.streams),
        )
        self._routes_dirty = True
        self._commit(now)

    def _downgrade(self, now: float, cause: str) -> None:
        """Best-effort conference running secure meets a non-secure endpoint (wire.md §8)."""
        conf = self.id
        LOG.warning(MSG_DOWNGRADE.format(conf=conf))
        told = []
        self._secure = False
        self.downgraded_at = now
        for ep in self._eps.values():
            ep.gsp = None
            if ep.cfg.secure and ep.dtls_done:
                self._tell_downgrade(ep)
                told.append(ep.id)
        LOG.warning(
            "Conf Id %s: non-secure endpoint %s joined; DOWNGRADE to %s",
            conf,
            cause,
            ", ".join(told) or "no endpoint yet",
        )
        self._current = None
        self._groups.clear()
        self._video_dirty = self._routes_dirty = True

    def _tell_downgrade(self, ep: _Endpoint) -> None:
        ep.gsp = None
        ep.state = ACTIVE
        self._actions.append(SendDowngrade(ep.id))

    def endpoint_handshake_done(self, eid: str, now: float) -> None:
        """DTLS completed with a matching fingerprint: the hop keys exist, so the relay can
        now send GSP — or DOWNGRADE if the conference runs non-secure (wire.md §8)."""
        ep = self._eps.get(eid)
        if ep is None or ep.dtls_done:
            return
        if not ep.cfg.secure:
            LOG.warning("Conf Id %s: non-secure endpoint %s did DTLS; ignored", self.id, eid)
            return
        ep.dtls_done = True
        ep.last_activity = now
        if self.secure:
            self._send_gsp(ep, self._ensure_group(), now)
            ep.state = KEYING
            LOG.info("Conf Id %s: endpoint %s handshake done, GSP sent", self.id, eid)
        else:
            self._tell_downgrade(ep)
            LOG.info(
                "Conf Id %s: endpoint %s handshake done, conference runs non-secure: DOWNGRADE",
                self.id,
                eid,
            )
            self._video_dirty = self._routes_dirty = True
        self._commit(now)

    def endpoint_latched(self, eid: str, now: float) -> None:
        """A non-secure endpoint's first RTP/RTCP packet latched its address: it is active."""
        ep = self._eps.get(eid)
        if ep is None:
            return
        ep.last_activity = now
        if not ep.cfg.secure and ep.state == HANDSHAKING:
            ep.state = ACTIVE
            LOG.info("Conf Id %s: endpoint %s latched, active", self.id, eid)
            self._video_dirty = self._routes_dirty = True
        self._commit(now)

    def gsp_ack(self, eid: str, spi: int, now: float) -> None:
        """GSP-ACK: the endpoint holds ``spi``; it receives on it from now on."""
        ep = self._eps.get(eid)
        if ep is None:
            return
        ep.last_activity = now
        if ep.gsp is None or ep.gsp.group.spi != spi:
            LOG.debug("Conf Id %s: endpoint %s ACKed SPI %d, not pending", self.id, eid, spi)
            return
        self._acked(ep, spi)
        self._commit(now)

    def _acked(self, ep: _Endpoint, spi: int) -> None:
        ep.gsp = None
        ep.rx_spi = spi
        if ep.tx_spi is None:
            ep.tx_spi = spi  # a joining room sends under the first SPI it holds
        if ep.state == KEYING:
            ep.state = ACTIVE
            self._video_dirty = True
        LOG.info("Conf Id %s: endpoint %s on SPI %d", self.id, ep.id, spi)
        self._routes_dirty = True

    def rekey_done(self, eid: str, spi: int, now: float) -> None:
        """REKEY-DONE: all of the endpoint's streams now use ``spi``. A REKEY-DONE for the
        SPI still awaiting its ACK counts as the ACK too (it could not send under it
        otherwise). Once no endpoint sends or receives under an old SPI, it is dropped."""
        ep = self._eps.get(eid)
        if ep is None:
            return
        ep.last_activity = now
        if ep.gsp is not None and ep.gsp.group.spi == spi:
            self._acked(ep, spi)
        if spi != ep.rx_spi or spi not in self._groups:
            LOG.warning(
                "Conf Id %s: endpoint %s sent REKEY-DONE for SPI %d it does not hold",
                self.id,
                eid,
                spi,
            )
            self._commit(now)
            return
        ep.tx_spi = spi
        LOG.info("Conf Id %s: endpoint %s REKEY-DONE SPI %d", self.id, eid, spi)
        self._prune_groups()
        self._commit(now)

    def on_activity(self, eid: str, now: float) -> None:
        """Any datagram from the endpoint's latched address (or its DTLS) resets its media
        timer."""
        ep = self._eps.get(eid)
        if ep is not None and now > ep.last_activity:
            ep.last_activity = now

    def remove_endpoint(self, eid: str, now: float, reason: str = "api") -> bool:
        """The server drops an endpoint (``DELETE``, hang-up). Its streams leave every route
        at once; a secure conference rekeys if a room that was sent the KEK leaves and
        others that hold it remain. No RemoveEndpoint action: the server already knows.
        Returns False for an unknown id."""
        ep = self._eps.get(eid)
        if ep is None:
            return False
        self._remove(ep, now, reason, notify=False)
        self._commit(now)
        return True

    def _remove(self, ep: _Endpoint, now: float, reason: str, notify: bool) -> None:
        conf = self.id
        del self._eps[ep.id]
        gone = [s.ssrc for s in ep.cfg.streams]
        for ssrc in gone:
            self._streams.pop(ssrc, None)
            self._ended.discard(ssrc)
            self._speakers.remove_stream(ssrc)
            self._waits.pop(ssrc, None)
            self._fir_seq.pop(ssrc, None)
        gone_set = set(gone)
        self._displays.pop(ep.id, None)
        self._desired.pop(ep.id, None)
        for disp in self._displays.values():
            for dd in disp.values():
                if dd.shown in gone_set:
                    dd.shown = None
                if dd.pending in gone_set:
                    dd.pending = None
        for key in [k for k in self._gate_pos if k[0] == ep.id or k[1] in gone_set]:
            del self._gate_pos[key]
        for key in [k for k in self._segment_activity if k[0] == ep.id]:
            del self._segment_activity[key]
        self._room_activity.pop(ep.id, None)
        LOG.info("Conf Id %s: endpoint %s removed (%s)", conf, ep.id, reason)
        if notify:
            self._actions.append(RemoveEndpoint(ep.id, reason))
        if self.secure and ep.keyed:
            if any(other.keyed for other in self._eps.values()):
                self._rekey(now, ep.id)
            else:
                # No one left holds the KEK: the next secure room starts a fresh group.
                self._current = None
        self._prune_groups()
        self._video_dirty = self._routes_dirty = True

    # -- keys -------------------------------------------------------------------------------

    def _ensure_group(self) -> EktGroupSpec:
        if self._current is None:
            profile = self._profile
            assert profile is not None  # set when the first secure endpoint was admitted
            group = new_group(
                self.rng,
                self.config.ekt_format,
                self.config.cipher,
                profile,
                salt=self._salt,
                avoid_spis=self._spis_in_use(),
            )
            self._salt = group.salt  # one master salt for the conference's life
            self._adopt(group)
        assert self._current is not None
        return self._current

    def _spis_in_use(self) -> set[int]:
        """SPIs a new group must not take: the recently used ones and every live group (a
        room that never sends REKEY-DONE keeps an old group alive past any memory)."""
        return set(self._used_spis) | set(self._groups)

    def _adopt(self, group: EktGroupSpec) -> None:
        self._current = group
        self._groups[group.spi] = group
        self._used_spis[group.spi] = None
        while len(self._used_spis) > SPI_MEMORY:
            del self._used_spis[next(iter(self._used_spis))]

    def _send_gsp(self, ep: _Endpoint, group: EktGroupSpec, now: float) -> None:
        # A rekey while a room still owes an ACK keeps its SPIMAP clock: otherwise a leave
        # every few seconds would keep a room that never answers alive forever.
        first = ep.gsp.first if ep.gsp is not None else now
        ep.gsp = _GspTimer(group, first, now + GSP_RESEND)
        ep.keyed = True
        self._distributed_spi = group.spi
        self._actions.append(SendGsp(ep.id, group))

    def _rekey(self, now: float, leaver: str) -> None:
        """New SPI and KEK, same salt and profile, to every room that did DTLS (wire.md §10)."""
        old = self._current
        assert old is not None
        group = new_group(
            self.rng,
            self.config.ekt_format,
            self.config.cipher,
            old.profile,
            salt=old.salt,
            avoid_spis=self._spis_in_use(),
        )
        self._adopt(group)
        self.rekeys += 1
        to = []
        for ep in self._eps.values():
            if ep.cfg.secure and ep.dtls_done:
                self._send_gsp(ep, group, now)
                to.append(ep.id)
        LOG.info(
            "Conf Id %s: endpoint %s left, rekey SPI %d -> %d, GSP to %s",
            self.id,
            leaver,
            old.spi,
            group.spi,
            ", ".join(to) or "nobody yet",
        )

    def _prune_groups(self) -> None:
        """Keep the current group and every group some room still receives or sends under."""
        used: set[int] = set()
        if self._current is not None:
            used.add(self._current.spi)
        for ep in self._eps.values():
            used.update(s for s in (ep.rx_spi, ep.tx_spi) if s is not None)
            if ep.gsp is not None:
                used.add(ep.gsp.group.spi)
        for spi in [s for s in self._groups if s not in used]:
            del self._groups[spi]
            LOG.info("Conf Id %s: SPI %d retired", self.id, spi)

    # -- media input ------------------------------------------------------------------------

    def on_tails(self, reports: Sequence[tuple[int, int]], now: float) -> None:
        """A batch of (SSRC, tail byte) from verified uplink RTP packets, in arrival order."""
        for ssrc, tail in reports:
            entry = self._streams.get(ssrc)
            if entry is None:
                continue
            eid, stream = entry
            ep = self._eps[eid]
            ep.last_activity = now
            if ssrc in self._ended:  # media again after a BYE: the stream is back
                self._ended.discard(ssrc)
                self._video_dirty = True
            if ep.state == HANDSHAKING and not ep.cfg.secure:
                # Verified media from a non-secure room: its address has latched.
                ep.state = ACTIVE
                self._video_dirty = self._routes_dirty = True
            if stream.kind == "audio":
                self._speakers.sample(ssrc, tail, now)
            elif tail & IDR_BIT:
                self._idr_seen(ssrc, now)
        self._evaluate_speakers(now)
        self._commit(now)

    def on_switched(self, ssrc: int, receiver_ids: Iterable[str], now: float) -> None:
        """The forwarder opened these receivers' gated displays to ``ssrc`` at its IDR
        (``Verdict.switched``) and closed the displays' other video sources."""
        entry = self._streams.get(ssrc)
        if entry is None or entry[1].kind != "video":
            return
        for rid in receiver_ids:
            disp = self._displays.get(rid)
            if disp is None:
                continue
            where = [d for d, dd in disp.items() if dd.pending == ssrc]
            if not where and (rid, ssrc) in self._gate_pos:
                where = [self._gate_pos[(rid, ssrc)]]  # opened a gate since replaced
            for d in where[:1]:
                dd = disp.setdefault(d, _Display())
                for other in disp.values():
                    if other.shown == ssrc:
                        other.shown = None
                dd.shown = ssrc
                if dd.pending == ssrc:
                    dd.pending = None
                self._gate_pos.pop((rid, ssrc), None)
                self.switches_completed += 1
                self._apply_desired(rid, self._desired.get(rid, {}), now, count=False)
        self._idr_seen(ssrc, now)
        self._routes_dirty = True
        self._commit(now)

    def on_bye(self, ssrc: int, now: float) -> None:
        """A verified RTCP BYE for ``ssrc`` (RFC 3550 §6.6): the source has stopped.

        Its audio leaves the speaker set at once (no 300 ms lead for whoever replaces it)
        and its video stops being a display candidate, so displays move to the next source
        at that source's IDR instead of freezing on the last frame. The endpoint stays:
        leaving the conference is the admin API's call (or the media timeout's). Media from
        the SSRC after the BYE makes it a candidate again.
        """
        entry = self._streams.get(ssrc)
        if entry is None or ssrc in self._ended:
            return
        eid, stream = entry
        self._ended.add(ssrc)
        LOG.info("Conf Id %s: endpoint %s: BYE for SSRC %d (%s)", self.id, eid, ssrc, stream.kind)
        if stream.kind == "audio":
            self._speakers.remove_stream(ssrc)
            self._speakers.add_stream(ssrc)  # back at zero level, a fresh candidate
            self._routes_dirty = True
        self._waits.pop(ssrc, None)
        self._video_dirty = True
        self._evaluate_speakers(now)
        self._commit(now)

    def feedback_targets(
        self, eid: str, media_ssrc: int | None = None, video_only: bool = False
    ) -> tuple[str, ...]:
        """Where end-to-end RTCP feedback (NACK, PLI, FIR) from receiver ``eid`` goes.

        The feedback's media-source SSRC sits in the encrypted part of SRTCP, and the relay
        does not decrypt, so the targets are the rooms whose streams ``eid`` is currently
        routed (ungated or waiting for an IDR), video streams only for payload-specific
        feedback (PLI, FIR). When the media SSRC is readable (plain RTCP) and belongs to
        another endpoint, only that endpoint is the target.
        """
        if media_ssrc is not None:
            entry = self._streams.get(media_ssrc)
            if entry is not None and entry[0] != eid:
                return (entry[0],)
        owners = set()
        for ssrc, receivers in self._routes.items():
            entry = self._streams.get(ssrc)
            if entry is None or (video_only and entry[1].kind != "video"):
                continue
            if any(r.id == eid for r in receivers):
                owners.add(entry[0])
        owners.discard(eid)
        return tuple(sorted(owners))

    def _idr_seen(self, ssrc: int, now: float) -> None:
        wait = self._waits.get(ssrc)
        if wait is not None:
            wait.since = now
            wait.fir_at = None  # a FIR after this would be a new request

    # -- time -------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Timers: GSP resends and SPIMAP timeout, media timeout, FIR,
        and the speakers' hysteresis (which advances with time, not only with packets)."""
        conf = self.id
        for ep in list(self._eps.values()):
            if now - ep.last_activity >= MEDIA_TIMEOUT - EPS:
                LOG.warning(MSG_MEDIA_TIMEOUT.format(eid=ep.id, conf=conf))
                self.media_timeouts += 1
                self._remove(ep, now, "media-timeout", notify=True)
                continue
            if ep.gsp is not None:
                timer = ep.gsp
                if now - timer.first >= GSP_TIMEOUT - EPS:
                    LOG.warning(MSG_SPIMAP_TIMEOUT.format(conf=conf, eid=ep.id))
                    self.gsp_timeouts += 1
                    self._remove(ep, now, "spimap-timeout", notify=True)
                    continue
                if now + EPS >= timer.next_at:
                    self._actions.append(SendGsp(ep.id, timer.group))
                    while timer.next_at <= now + EPS:
                        timer.next_at += GSP_RESEND
        self._evaluate_speakers(now)
        for ssrc, wait in self._waits.items():
            if now - wait.since < FIR_AFTER - EPS:
                continue
            if wait.fir_at is not None and now - wait.fir_at < FIR_AFTER - EPS:
                continue
            if wait.fir_at is None:  # a new request: next sequence number (RFC 5104)
                wait.fir_seq = self._fir_seq[ssrc] = (self._fir_seq.get(ssrc, -1) + 1) & 0xFF
            wait.fir_at = now
            self.firs += 1
            self._actions.append(SendFir(self._streams[ssrc][0], ssrc, wait.fir_seq))
        self._commit(now)

    # -- decisions --------------------------------------------------------------------------

    def _evaluate_speakers(self, now: float) -> None:
        set_changed, dom_changed = self._speakers.evaluate(now)
        if set_changed:
            self._routes_dirty = True
        dom = self._speakers.dominant
        if dom_changed and dom is not None:
            eid, stream = self._streams[dom]
            self._activity_counter += 1
            self._segment_activity[(eid, stream.position)] = self._activity_counter
            self._room_activity[eid] = self._activity_counter
            LOG.debug("Conf Id %s: dominant speaker %s position %d", self.id, eid, stream.position)
            self._video_dirty = True

    def _commit(self, now: float) -> None:
        if self._video_dirty:
            self._video_dirty = False
            self._update_video(now)
        pending = {dd.pending for disp in self._displays.values() for dd in disp.values()}
        for ssrc in [s for s in self._waits if s not in pending]:
            del self._waits[ssrc]
        spis = frozenset(self._groups)
        if spis != self._published_spis:
            self._published_spis = spis
            self._actions.append(GroupsChanged())
        self._refresh_routes()

    def _receivers(self) -> list[_Endpoint]:
        return [ep for ep in self._eps.values() if ep.state == ACTIVE]

    def _update_video(self, now: float) -> None:
        active = self._receivers()
        ids = {ep.id for ep in active}
        for rid in [r for r in self._displays if r not in ids]:
            del self._displays[rid]
            self._desired.pop(rid, None)
            self._routes_dirty = True
        for rcv in active:
            self._apply_desired(rcv.id, self._want(rcv, active), now, count=True)

    def _want(self, rcv: _Endpoint, active: list[_Endpoint]) -> dict[int, int | None]:
        """What each display of ``rcv`` should show, by the rules of wire.md §10.

        Activity: a segment (endpoint, position) is active when its audio stream becomes the
        dominant speaker; "most recently active" orders segments by when they last did. A
        segment that never spoke ranks below every one that did, then by join order, then
        center before left before right.
        """
        mode = self.config.switching
        others = [ep for ep in active if ep.id != rcv.id]
        keep: dict[int, list[int]] = {}
        prev = self._desired.get(rcv.id, {})
        for d, dd in self._displays.get(rcv.id, {}).items():
            keep[d] = [s for s in (dd.shown, prev.get(d)) if s is not None]

        def rank(ep: _Endpoint, pos: int) -> tuple[int, int, int]:
            return (-self._segment_activity.get((ep.id, pos), 0), ep.seq, POSITION_ORDER[pos])

        def candidates(eps: Iterable[_Endpoint], positions: tuple[int, ...]) -> list[Candidate]:
            found = []
            for ep in eps:
                for s in ep.cfg.streams:
                    if s.kind != "video" or s.position not in positions or s.ssrc in self._ended:
                        continue
                    eligible = video_destinations(
                        ep.cfg.segments, s.position, rcv.cfg.segments, mode
                    )
                    preferred = Position.CENTER if ep.cfg.segments == 1 else s.position
                    found.append((rank(ep, s.position), Candidate(s.ssrc, eligible, preferred)))
            return [c for _, c in sorted(found, key=lambda x: x[0])]

        main = main_displays(rcv.cfg.segments)
        if mode == "segment":
            pool: Iterable[_Endpoint] = others
        else:
            with_video = [
                ep
                for ep in others
                if any(
                    s.kind == "video" and s.position in (1, 2, 3) and s.ssrc not in self._ended
                    for s in ep.cfg.streams
                )
            ]
            with_video.sort(key=lambda ep: (-self._room_activity.get(ep.id, 0), ep.seq))
            pool = with_video[:1]
        want = assign_displays(main, candidates(pool, (1, 2, 3)), keep)
        want.update(assign_displays(AUX_DISPLAYS, candidates(others, AUX_DISPLAYS), keep))
        return want

    def _apply_desired(
        self, rid: str, want: dict[int, int | None], now: float, count: bool
    ) -> None:
        """Turn a wanted assignment into shown/pending per display.

        A source the receiver already gets (on any display) moves at once, ungated: the
        room decodes per SSRC, so it needs no IDR for it, and this keeps a source from being
        sent to one room twice. A new source is gated (shown at its next IDR) while the
        display's old source flows on; a display that should be empty empties at once.
        """
        disp = self._displays.setdefault(rid, {})
        for d in want:
            disp.setdefault(d, _Display())
        prev = self._desired.get(rid, {})
        shown_now = {dd.shown for dd in disp.values() if dd.shown is not None}
        new_shown: dict[int, int | None] = {}
        for d, src in want.items():
            if src is not None and src in shown_now:
                new_shown[d] = src
        placed = set(new_shown.values())
        for d, dd in disp.items():
            if d in new_shown:
                continue
            cur = dd.shown
            keep_old = want.get(d) is not None and cur is not None and cur not in placed
            new_shown[d] = cur if keep_old else None
            if keep_old:
                placed.add(cur)
        for d, dd in disp.items():
            src = want.get(d)
            if dd.shown != new_shown[d]:
                self._routes_dirty = True
            dd.shown = new_shown[d]
            pending = src if src is not None and src != dd.shown else None
            if pending != dd.pending:
                self._routes_dirty = True
                dd.pending = pending
                if pending is not None:
                    self._gate_pos[(rid, pending)] = d
                    self._request_idr(pending, now)
            if count and src is not None and src != prev.get(d):
                self.switches += 1
        self._desired[rid] = dict(want)

    def _request_idr(self, ssrc: int, now: float) -> None:
        """PLI the new source: once per source per call, however many displays switch to it
        at once. The FIR clock runs from the first request the source has left unanswered."""
        wait = self._waits.get(ssrc)
        if wait is None:
            wait = self._waits[ssrc] = _IdrWait(since=now)
        elif wait.pli_at == now:
            return
        wait.pli_at = now
        self.plis += 1
        self._actions.append(SendPli(self._streams[ssrc][0], ssrc))

    def _refresh_routes(self) -> None:
        if not self._routes_dirty:
            return
        self._routes_dirty = False
        receivers = self._receivers()
        secure = self.secure

        def spi(ep: _Endpoint) -> int:
            return (ep.rx_spi or 0) if secure else 0

        table: dict[int, list[Receiver]] = {ssrc: [] for ssrc in self._streams}
        for ssrc in self._speakers.members:
            src_eid, stream = self._streams[ssrc]
            for rcv in receivers:
                if rcv.id != src_eid:
                    dest = audio_destination(stream.position, rcv.cfg.segments)
                    table[ssrc].append(Receiver(rcv.id, dest, spi(rcv)))
        for rcv in receivers:
            for d, dd in sorted(self._displays.get(rcv.id, {}).items()):
                if dd.shown is not None:
                    table[dd.shown].append(Receiver(rcv.id, d, spi(rcv)))
                if dd.pending is not None:
                    table[dd.pending].append(Receiver(rcv.id, d, spi(rcv), gated=True))
        routes = {ssrc: tuple(rs) for ssrc, rs in table.items()}
        if routes != self._routes:
            self._routes = routes
            self._routes_version += 1
