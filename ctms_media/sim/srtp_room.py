"""A room's SRTP side as a CTS endpoint would do it, built on libsrtp (pylibsrtp).

libsrtp encrypts and tags; the room then inserts the cleartext tail byte before the tag,
re-tags over it (wire.md §3) and appends the EKT trailer (§5/§6). Receivers cut the trailer
and hand the rest to a fresh libsrtp session, which is the oracle every forwarded packet
must satisfy.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass, field

import pylibsrtp

from ctms_media.errors import CtmsError
from ctms_media.wire.ekt import (
    FORMAT_CTMS,
    CtmsLong,
    Rfc8870Full,
    Rfc8870Plaintext,
    ctms_emk_length,
    ctms_short,
    rfc8870_unwrap,
    rfc8870_wrap,
    unwrap_ctms,
    wrap_ctms,
)
from ctms_media.wire.rtp import position_code
from ctms_media.wire.srtp import Profile, rtp_auth_key, rtp_tag

_LIBSRTP_PROFILE = {
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}


def libsrtp_session(
    master_key: bytes, salt: bytes, profile: Profile, outbound: bool, ssrc: int | None = None
) -> pylibsrtp.Session:
    """A libsrtp session for one master key (inbound sessions accept any SSRC)."""
    if ssrc is None:
        ssrc_type = (
            pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND
        )
        policy = pylibsrtp.Policy(
            key=master_key + salt, ssrc_type=ssrc_type, srtp_profile=_LIBSRTP_PROFILE[profile.name]
        )
    else:
        policy = pylibsrtp.Policy(
            key=master_key + salt,
            ssrc_type=pylibsrtp.Policy.SSRC_SPECIFIC,
            ssrc_value=ssrc,
            srtp_profile=_LIBSRTP_PROFILE[profile.name],
        )
    policy.window_size = 1024
    return pylibsrtp.Session(policy)


# pylibsrtp has no ROC setter, so a room walks a fresh session up to a key's ROC with dummy
# packets (about 2.3 per rollover). Rooms here start near ROC 0; a trailer naming a ROC far
# beyond this is refused (a decrypt failure) rather than walked for hours.
MAX_WALK_ROC = 4096


def walk_indices(target: int) -> list[int]:
    """Indices below ``target``, each within 2^15 of the last, that lead libsrtp's index
    estimate from 0 up to ``target``'s ROC without touching ``target`` itself."""
    out = []
    i = 0
    while i < target and (target >> 16) > 0:
        out.append(i)
        i += 0x7000
    return out


def _dummy_rtp(ssrc: int, index: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, index & 0xFFFF, 0, ssrc) + b"x"


@dataclass
class EktGroup:
    """What a room holds of a group EKT parameter set (from GSP)."""

    spi: int
    cipher: int
    kek: bytes
    salt: bytes
    profile: Profile
    ekt_format: str = FORMAT_CTMS


@dataclass
class SenderStream:
    """One outgoing SSRC of a room: libsrtp protects, the room adds tail byte and EKT."""

    ssrc: int
    kind: str
    group: EktGroup
    master_key: bytes
    position: int = 2
    seq: int = 1000
    timestamp: int = 0
    payload_type: int = 96
    roc: int = 0
    isn: int = field(init=False)
    key_start: int = field(init=False)
    epoch: int = 0
    _session: pylibsrtp.Session = field(init=False, repr=False)
    _auth: bytes = field(init=False, repr=False)
    _sent: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._rekeyed(self.master_key)

    @property
    def index(self) -> int:
        return (self.roc << 16) | self.seq

    def _rekeyed(self, key: bytes) -> None:
        self.master_key = key
        self._session = libsrtp_session(key, self.group.salt, self.group.profile, True)
        self._auth = rtp_auth_key(key, self.group.salt)
        self.isn = self.seq
        self.key_start = self.index
        self._announce = True  # a new key goes out in a long trailer first
        self._walk(self.key_start)

    def _walk(self, index: int) -> None:
        """Bring a fresh libsrtp session's ROC up to ``index`` (pylibsrtp has no ROC setter)."""
        for dummy in walk_indices(index):
            self._session.protect(_dummy_rtp(self.ssrc, dummy))

    def skip_to(self, seq: int) -> None:
        """Move the stream forward to ``seq`` (same ROC or the next) without sending, as a
        room does whose packets were lost: libsrtp's estimate is walked along so that its
        next packet is protected at the new index."""
        target = (self.index & ~0xFFFF) | seq
        if target <= self.index:
            target += 1 << 16
        i = self.index  # the first skipped packet is "sent" (lost on the way)
        while i < target:
            self._session.protect(_dummy_rtp(self.ssrc, i))
            i += 0x7000
        self.roc, self.seq = target >> 16, target & 0xFFFF

    def rekey(self, key: bytes, group: EktGroup | None = None) -> None:
        """Start a new master key at the next packet (its ISN); optionally a new group."""
        if group is not None:
            self.group = group
        self.epoch += 1
        self._rekeyed(key)

    def trailer(self, long: bool, roc: int | None = None) -> bytes:
        g = self.group
        roc = self.roc if roc is None else roc
        if g.ekt_format == FORMAT_CTMS:
            if not long:
                return ctms_short()
            emk = wrap_ctms(g.cipher, g.kek, self.master_key)
            assert len(emk) == ctms_emk_length(g.cipher)
            return CtmsLong(emk, roc, self.isn, g.spi).encode()
        if not long:
            return b"\x00"
        ct = rfc8870_wrap(g.kek, Rfc8870Plaintext(self.master_key, self.ssrc, roc))
        return Rfc8870Full(ct, g.spi, self.epoch).encode()

    def rtp(
        self,
        payload: bytes,
        tail: int,
        long: bool = False,
        marker: bool = False,
        csrc_source: int | None = None,
        advance_ts: int = 960,
    ) -> tuple[bytes, bytes]:
        """(uplink packet, the plain RTP packet it protects after the relay strips the tail).

        The plain packet has destination position 0; a receiver compares payloads.
        """
        src = self.position if csrc_source is None else csrc_source
        header = struct.pack(
            "!BBHIII",
            0x81,
            (0x80 if marker else 0) | self.payload_type,
            self.seq,
            self.timestamp,
            self.ssrc,
            position_code(src, 0),
        )
        plain = header + payload
        srtp = self._session.protect(plain)
        tag_len = self.group.profile.rtp_tag_len
        body = srtp[:-tag_len] + bytes([tail])
        packet = body + rtp_tag(self._auth, body, self.roc, tag_len)
        packet += self.trailer(long or self._announce)
        self._announce = False
        self._advance(advance_ts)
        return packet, plain

    def _advance(self, ts: int) -> None:
        self._sent += 1
        self.timestamp = (self.timestamp + ts) & 0xFFFFFFFF
        nxt = (self.seq + 1) & 0xFFFF
        if nxt == 0:
            self.roc += 1
        self.seq = nxt

    def rtcp(self, plain_rtcp: bytes, long: bool = True) -> bytes:
        """SRTCP (libsrtp) with the EKT trailer appended; SDES carries the long form."""
        return self._session.protect_rtcp(plain_rtcp) + self.trailer(long)


def sdes_packet(ssrc: int, cname: bytes = b"room") -> bytes:
    """A minimal RTCP SDES with one CNAME chunk."""
    item = bytes([1, len(cname)]) + cname + b"\x00"
    chunk = struct.pack("!I", ssrc) + item
    chunk += b"\x00" * (-len(chunk) % 4)
    return struct.pack("!BBH", 0x81, 202, (4 + len(chunk)) // 4 - 1) + chunk


def trailer_length(packet: bytes, ekt_format: str, cipher_of_spi: dict[int, int]) -> int:
    """Octets of the EKT trailer at the end of a downlink packet (for receivers)."""
    last = packet[-1]
    if ekt_format == FORMAT_CTMS:
        if not last & 1:
            return 1
        spi = ((packet[-2] << 8) | last) >> 1
        return ctms_emk_length(cipher_of_spi[spi]) + 8
    if last == 0:
        return 1
    return (packet[-3] << 8) | packet[-2]


class ReceiverOracle:
    """A receiving room: one fresh libsrtp inbound session per sender key."""

    def __init__(self, ekt_format: str, cipher_of_spi: dict[int, int]) -> None:
        self.ekt_format = ekt_format
        self.cipher_of_spi = cipher_of_spi
        self.sessions: dict[tuple[int, bytes], pylibsrtp.Session] = {}

    def unprotect(
        self,
        packet: bytes,
        ssrc: int,
        master_key: bytes,
        salt: bytes,
        profile: Profile,
        rtcp: bool = False,
        start_index: int = 0,
    ) -> bytes:
        body = packet[: len(packet) - trailer_length(packet, self.ekt_format, self.cipher_of_spi)]
        s = self.sessions.get((ssrc, master_key))
        if s is None:
            s = self.sessions[(ssrc, master_key)] = libsrtp_session(
                master_key, salt, profile, False
            )
            if start_index:  # walk the fresh session up to the key's ROC with dummies
                tx = libsrtp_session(master_key, salt, profile, True)
                for dummy in walk_indices(start_index):
                    s.unprotect(tx.protect(_dummy_rtp(ssrc, dummy)))
        try:
            return s.unprotect_rtcp(body) if rtcp else s.unprotect(body)
        except pylibsrtp.Error as exc:
            raise CtmsError(f"libsrtp refused a forwarded packet: {exc}") from None


class EktReceiver:
    """A receiving room as it really works: keys come only from EKT trailers it unwraps
    with the group KEKs it holds; libsrtp then decrypts. A packet whose sender key the room
    has never been given fails, which is how a missed upgrade would show."""

    def __init__(self, groups: dict[int, EktGroup]) -> None:
        self.groups = dict(groups)
        self.sessions: dict[int, tuple[bytes, pylibsrtp.Session]] = {}  # ssrc -> key, session
        # New keys whose session has not seen RTP yet: ssrc -> (key, ROC it came with, group)
        self._unanchored: dict[int, tuple[bytes, int, EktGroup]] = {}
        self.ok = 0
        self.failed = 0
        self.replayed = 0
        self.too_old = 0
        # Why packets failed, by exception: a failure should say what it was.
        self.failure_reasons: collections.Counter[str] = collections.Counter()

    def _learn(self, packet: bytes, ssrc: int, seq: int, rtcp: bool = False) -> int:
        """Read the trailer, take a key it carries, return the trailer's length.

        A key learnt from SRTCP does not say where the stream's RTP sequence numbers are
        (its trailer has the ROC, not the current SEQ), so the session's RTP index is set
        only at the stream's first RTP packet (:meth:`_anchor`): walking it to ``ROC << 16``
        would make libsrtp guess the previous ROC for every SEQ in the upper half.
        """
        g0 = next(iter(self.groups.values()))
        fmt = g0.ekt_format
        n = trailer_length(packet, fmt, {s: g.cipher for s, g in self.groups.items()})
        if n == 1:
            if not rtcp:
                self._anchor(ssrc, None, seq)
            return n
        raw = packet[-n:]
        if fmt == FORMAT_CTMS:
            t = CtmsLong.decode(raw)
            g = self.groups[t.spi]
            key, roc = unwrap_ctms(g.cipher, g.kek, t.emk), t.roc
        else:
            f = Rfc8870Full.decode(raw)
            g = self.groups[f.spi]
            pt = rfc8870_unwrap(g.kek, f.ciphertext)
            key, roc = pt.key, pt.roc
        have = self.sessions.get(ssrc)
        if have is None or have[0] != key:
            if roc > MAX_WALK_ROC:  # an unauthenticated SRTCP trailer may name any ROC
                raise ValueError(f"ROC {roc} is past what a simulated room walks to")
            self.sessions[ssrc] = (key, libsrtp_session(key, g.salt, g.profile, False))
            self._unanchored[ssrc] = (key, roc, g)
        if not rtcp:
            self._anchor(ssrc, roc, seq)
        return n

    def _anchor(self, ssrc: int, roc: int | None, seq: int) -> None:
        """Bring a new key's session to this RTP packet's index (pylibsrtp has no ROC
        setter); ``roc`` None: a short trailer, so the ROC the key came with."""
        pending = self._unanchored.pop(ssrc, None)
        if pending is None:
            return
        key, key_roc, g = pending
        session = self.sessions[ssrc][1]
        tx = libsrtp_session(key, g.salt, g.profile, True)
        for dummy in walk_indices(((key_roc if roc is None else roc) << 16) | seq):
            session.unprotect(tx.protect(_dummy_rtp(ssrc, dummy)))

    def receive(self, packet: bytes, rtcp: bool = False) -> bytes | None:
        """Decrypt a downlink packet; None if it does not, counted as one of: ``replayed``
        (libsrtp's replay check: a duplicate of a packet already decrypted, which a network
        may make but the relay never forwards), ``too_old`` (behind libsrtp's window),
        ``_missing_key`` (no key for its stream yet) or ``failed`` (everything else: a bad
        tag, an unknown SPI, a trailer that does not unwrap, a malformed packet)."""
        if not self.groups:  # no GSP yet: nothing can be decrypted
            self._fail("no group parameter set yet")
            return None
        try:
            if rtcp:
                ssrc, seq = struct.unpack_from("!I", packet, 4)[0], 0
            else:
                ssrc, seq = struct.unpack_from("!I", packet, 8)[0], packet[2] << 8 | packet[3]
            n = self._learn(packet, ssrc, seq, rtcp)
            have = self.sessions.get(ssrc)
            if have is None:
                self._missing_key()
                return None
            session = have[1]
            plain = session.unprotect_rtcp(packet[:-n]) if rtcp else session.unprotect(packet[:-n])
        except pylibsrtp.Error as exc:
            if "bad index" in str(exc):
                self.replayed += 1
            elif "too old" in str(exc):
                self.too_old += 1
            else:
                self._fail(f"libsrtp: {exc}")
            return None
        except (KeyError, IndexError, CtmsError, ValueError) as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            return None
        self.ok += 1
        return plain

    def _missing_key(self) -> None:
        """The oracle is strict: a stream whose key never came is how a missed upgrade
        shows, so it is a failure (the soak, which loses key packets on purpose, counts it
        apart)."""
        self._fail("no key for its stream")

    def _fail(self, reason: str) -> None:
        self.failed += 1
        self.failure_reasons[reason[:120]] += 1
