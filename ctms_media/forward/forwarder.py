"""The reference forwarder (wire.md §5–§7): one uplink datagram in, a Verdict out.

Sans-IO and pure Python: the Cython twin must give the same verdicts and bytes. Every check
runs before any state changes, and the commit step at the end is the only writer, which is
what makes "a rejected packet changes no state" hold by construction.
"""

from __future__ import annotations

from collections.abc import Iterable

from ctms_media.errors import ConfigError, MalformedError, UnwrapError
from ctms_media.forward.keys import KINDS, GroupParams, KeyState, StreamState
from ctms_media.forward.verdict import (
    AUTH,
    MALFORMED,
    NO_KEY,
    REPLAY,
    UNKNOWN_SPI,
    UNKNOWN_SSRC,
    UNWRAP,
    Receiver,
    Verdict,
    dropped,
)
from ctms_media.wire.ekt import (
    FORMAT_CTMS,
    FORMAT_RFC8870,
    CtmsLong,
    Rfc8870Full,
    Rfc8870Plaintext,
    ctms_emk_length,
    ctms_tail_spi,
    rfc8870_full_length,
    rfc8870_tail,
    rfc8870_unwrap,
    rfc8870_wrap,
    unwrap_ctms,
    wrap_ctms,
)
from ctms_media.wire.rtp import DESTINATION_BYTE_OFFSET, RtcpHeader, rtp_header_length
from ctms_media.wire.srtp import (
    SRTCP_E_BIT,
    Profile,
    rtcp_tag,
    rtp_tag,
    tags_equal,
)

SRTCP_INDEX_LEN = 4
PLAIN_SPI = 0  # a receiver that takes plain RTP only (a non-secure room)
IDR_BIT = 0x80  # video tail byte: this packet starts an IDR frame


class _Drop(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Trailer:
    """The EKT trailer of one packet as read off its end, before any key is unwrapped."""

    __slots__ = ("epoch", "group", "length", "long", "raw")

    def __init__(self, long: bool, length: int, group: GroupParams | None, epoch: int) -> None:
        self.long = long
        self.length = length
        self.group = group
        self.epoch = epoch
        self.raw = b""


class Forwarder:
    """Verifies, strips, re-tags and fans out one conference's SRTP/SRTCP.

    Configuration (groups, streams, routes) is set by the conference layer between packets;
    ``forward`` is the only per-packet entry and never raises on packet bytes.
    """

    def __init__(self, ekt_format: str = FORMAT_CTMS) -> None:
        if ekt_format not in (FORMAT_CTMS, FORMAT_RFC8870):
            raise ConfigError(f"unknown EKT format {ekt_format!r}")
        self.ekt_format = ekt_format
        self.groups: dict[int, GroupParams] = {}
        self.streams: dict[int, StreamState] = {}
        self.routes: dict[int, tuple[Receiver, ...]] = {}
        # What the conference accepts: SRTP (secure), plain RTP (non-secure), or both for
        # the second after a DOWNGRADE (wire.md §8). Receivers with SPI 0 take plain only.
        self.srtp = True
        self.plain = False

    def set_modes(self, srtp: bool, plain: bool) -> None:
        """Secure: (True, False); downgrading: (True, True); non-secure: (False, True)."""
        if not (srtp or plain):
            raise ConfigError("a conference must accept SRTP or plain RTP")
        self.srtp = srtp
        self.plain = plain

    # -- configuration -------------------------------------------------------------------

    def add_group(self, spi: int, cipher: int, kek: bytes, salt: bytes, profile: Profile) -> None:
        self.groups[spi] = GroupParams.make(spi, cipher, kek, salt, profile, self.ekt_format)

    def remove_group(self, spi: int) -> None:
        for receivers in self.routes.values():
            if any(r.spi == spi for r in receivers):
                raise ConfigError(f"SPI {spi} is still used by a receiver")
        self.groups.pop(spi, None)

    def add_stream(self, ssrc: int, kind: str, profile: Profile) -> None:
        if kind not in KINDS:
            raise ConfigError(f"stream kind must be one of {KINDS}, got {kind!r}")
        if ssrc in self.streams:
            raise ConfigError(f"SSRC {ssrc} is already declared")
        self.streams[ssrc] = StreamState(ssrc, kind, profile)

    def remove_stream(self, ssrc: int) -> None:
        """Forget a sender and its keys (a room left)."""
        self.streams.pop(ssrc, None)
        self.routes.pop(ssrc, None)

    def set_route(self, ssrc: int, receivers: Iterable[Receiver]) -> None:
        receivers = tuple(receivers)
        if len({r.id for r in receivers}) != len(receivers):
            raise ConfigError(f"SSRC {ssrc}: a receiver appears twice in its route")
        for r in receivers:
            if r.spi != PLAIN_SPI and r.spi not in self.groups:
                raise ConfigError(f"receiver {r.id} holds unknown SPI {r.spi}")
            if not 0 <= r.position <= 0xFF:
                raise ConfigError(f"position {r.position} does not fit a byte")
        self.routes[ssrc] = receivers

    def state_snapshot(self) -> dict[int, tuple]:
        """Every per-stream value a packet may change; twins must agree on it exactly."""
        return {
            ssrc: (*st.snapshot(), self.routes.get(ssrc, ()))
            for ssrc, st in sorted(self.streams.items())
        }

    # -- the packet path -----------------------------------------------------------------

    def forward(self, datagram: bytes, rtcp: bool | None = None) -> Verdict:
        """One uplink datagram -> a Verdict. ``rtcp`` is the demultiplexer's word; None
        means decide from the second byte (RFC 5761)."""
        data = bytes(datagram)
        if rtcp is None:
            rtcp = len(data) >= 2 and 192 <= data[1] <= 223
        try:
            if not self.srtp:
                return self._plain(data, rtcp)
            try:
                return self._rtcp(data) if rtcp else self._rtp(data)
            except _Drop as d:
                # A replay is SRTP for certain (its index was accepted before): never plain.
                if not self.plain or d.reason in (UNKNOWN_SSRC, REPLAY):
                    raise
                return self._plain(data, rtcp)  # a downgraded room's first plain packets
        except _Drop as d:
            ssrc_at, need = (4, 8) if rtcp else (8, 12)
            ssrc = int.from_bytes(data[ssrc_at : ssrc_at + 4], "big") if len(data) >= need else None
            return dropped(d.reason, ssrc, rtcp)

    def _read_trailer(self, region: bytes, key_len: int) -> _Trailer:
        """Find the trailer's form, its group and length at the end of ``region`` (the
        bytes after the header): unknown SPI is decided here, size checks after."""
        try:
            if self.ekt_format == FORMAT_CTMS:
                spi = ctms_tail_spi(region)
                if spi is None:
                    return _Trailer(False, 1, None, 0)
                group = self.groups.get(spi)
                if group is None:
                    raise _Drop(UNKNOWN_SPI)
                return _Trailer(True, ctms_emk_length(group.cipher, key_len) + 8, group, 0)
            tail = rfc8870_tail(region)
            if tail is None:
                return _Trailer(False, 1, None, 0)
            spi, epoch, length, _ = tail
            group = self.groups.get(spi)
            if group is None:
                raise _Drop(UNKNOWN_SPI)
            if length != rfc8870_full_length(key_len):
                raise _Drop(MALFORMED)
            return _Trailer(True, length, group, epoch)
        except MalformedError:
            raise _Drop(MALFORMED) from None

    def _unwrap(self, trailer: _Trailer, ssrc: int, profile: Profile) -> tuple[bytes, int, int]:
        """(master key, ROC, ISN or -1) carried by a long trailer."""
        group = trailer.group
        assert group is not None
        try:
            if self.ekt_format == FORMAT_CTMS:
                t = CtmsLong.decode(trailer.raw)
                key = unwrap_ctms(group.cipher, group.kek, t.emk)
                return key, t.roc, t.isn
            f = Rfc8870Full.decode(trailer.raw)
            pt = rfc8870_unwrap(group.kek, f.ciphertext)
        except MalformedError:
            raise _Drop(MALFORMED) from None
        except UnwrapError:
            raise _Drop(UNWRAP) from None
        if len(pt.key) != profile.key_len or pt.ssrc != ssrc:
            raise _Drop(UNWRAP)
        return pt.key, pt.roc, -1

    def _frame_rtp(self, data: bytes) -> tuple[int, int, StreamState]:
        """The first two checks of every RTP packet: framing, then a declared SSRC."""
        try:
            hlen = rtp_header_length(data)
        except MalformedError:
            raise _Drop(MALFORMED) from None
        ssrc = int.from_bytes(data[8:12], "big")
        stream = self.streams.get(ssrc)
        if stream is None:
            raise _Drop(UNKNOWN_SSRC)
        return hlen, ssrc, stream

    def _frame_rtcp(self, data: bytes) -> tuple[RtcpHeader, StreamState]:
        """The first two checks of every RTCP packet: framing, then a declared SSRC."""
        try:
            hdr = RtcpHeader.parse(data)
        except MalformedError:
            raise _Drop(MALFORMED) from None
        stream = self.streams.get(hdr.ssrc)
        if stream is None:
            raise _Drop(UNKNOWN_SSRC)
        return hdr, stream

    def _rtp(self, data: bytes) -> Verdict:
        hlen, ssrc, stream = self._frame_rtp(data)
        profile = stream.profile
        tag_len = profile.rtp_tag_len
        n = len(data)
        trailer = self._read_trailer(data[hlen:], profile.key_len)
        if n - hlen < 1 + tag_len + trailer.length:
            raise _Drop(MALFORMED)
        auth_end = n - trailer.length - tag_len
        trailer.raw = data[n - trailer.length :]
        seq = (data[2] << 8) | data[3]

        new_key: KeyState | None = None
        if trailer.long:
            master_key, roc, isn = self._unwrap(trailer, ssrc, profile)
            index = (roc << 16) | seq
            key = stream.find_key(master_key)
            if key is None:
                if isn >= 0:  # CTMS: the largest index <= this one whose low bits are ISN
                    start = (index & ~0xFFFF) | isn
                    if start > index:
                        start -= 0x10000
                else:  # RFC 8870: the first RTP packet carrying the key
                    start = index
                assert trailer.group is not None
                new_key = key = KeyState.derive(
                    master_key, trailer.group.salt, start, trailer.epoch
                )
        else:
            index = stream.rtp_index(seq)
            if index is None:
                raise _Drop(NO_KEY)
            if index < 0:
                raise _Drop(REPLAY)
            key = stream.key_for_index(index)
            if key is None:
                raise _Drop(NO_KEY)
            roc = index >> 16

        if not stream.rtp_replay.check(index):
            raise _Drop(REPLAY)
        if not tags_equal(
            rtp_tag(key.rtp_auth, data[:auth_end], roc, tag_len),
            data[auth_end : auth_end + tag_len],
        ):
            raise _Drop(AUTH)

        # Accepted: commit, then build each receiver's bytes.
        if new_key is not None:
            stream.commit(new_key, roc)
        elif trailer.long and self.ekt_format == FORMAT_RFC8870:
            key.epoch = trailer.epoch
        stream.rtp_replay.accept(index)
        tail = data[auth_end - 1]
        switched = self._open_gates(stream, tail)
        return Verdict(
            tail=tail,
            ssrc=ssrc,
            switched=switched,
            outputs=self._fan_out(stream, key, data, hlen, auth_end, tag_len, roc, trailer),
        )

    def _open_gates(self, stream: StreamState, tail: int) -> tuple[str, ...]:
        """At a video IDR start, open gated subscriptions and close the displays' others."""
        if stream.kind != "video" or not tail & IDR_BIT:
            return ()
        route = self.routes.get(stream.ssrc, ())
        opening = [r for r in route if r.gated]
        if not opening:
            return ()
        slots = {(r.id, r.position) for r in opening}
        self.routes[stream.ssrc] = tuple(
            Receiver(r.id, r.position, r.spi) if r.gated else r for r in route
        )
        for ssrc, receivers in self.routes.items():
            other = self.streams.get(ssrc)
            if ssrc == stream.ssrc or other is None or other.kind != "video":
                continue
            kept = tuple(r for r in receivers if (r.id, r.position) not in slots)
            if len(kept) != len(receivers):
                self.routes[ssrc] = kept
        return tuple(r.id for r in opening)

    def _fan_out(
        self,
        stream: StreamState,
        key: KeyState,
        data: bytes,
        hlen: int,
        auth_end: int,
        tag_len: int,
        roc: int,
        trailer: _Trailer,
    ) -> list:
        receivers = self.routes.get(stream.ssrc, ())
        if not receivers:
            return []
        body = bytearray(data[: auth_end - 1])  # the tail byte goes
        tagged: dict[int, bytes] = {}  # position -> body with its tag
        long_for: dict[int, bytes] = {}  # SPI -> long trailer for this key
        pkt_spi = trailer.group.spi if trailer.long and trailer.group else None
        if trailer.long and pkt_spi is not None:
            long_for[pkt_spi] = trailer.raw
        upgrade = key is stream.current
        variants: dict[tuple[int, bytes], list[str]] = {}
        for r in receivers:
            if r.gated or r.spi == PLAIN_SPI:
                continue
            if trailer.long or (upgrade and r.id not in key.sent_to):
                t = long_for.get(r.spi)
                if t is None:
                    t = long_for[r.spi] = self._long_trailer(stream.ssrc, key, roc, r.spi)
                key.sent_to.add(r.id)
            else:
                t = trailer.raw
            variants.setdefault((r.position, t), []).append(r.id)
        out = []
        for (position, t), ids in variants.items():
            head = tagged.get(position)
            if head is None:
                body[DESTINATION_BYTE_OFFSET] = position
                head = tagged[position] = bytes(body) + rtp_tag(key.rtp_auth, body, roc, tag_len)
            out.append((head + t, tuple(ids)))
        return out

    def _long_trailer(self, ssrc: int, key: KeyState, roc: int, spi: int) -> bytes:
        """A long trailer carrying ``key`` for a receiver holding ``spi`` (upgrade/re-wrap)."""
        group = self.groups[spi]
        if self.ekt_format == FORMAT_CTMS:
            emk = wrap_ctms(group.cipher, group.kek, key.master_key)
            return CtmsLong(emk, roc, key.start & 0xFFFF, spi).encode()
        ct = rfc8870_wrap(group.kek, Rfc8870Plaintext(key.master_key, ssrc, roc & 0xFFFFFFFF))
        return Rfc8870Full(ct, spi, key.epoch).encode()

    def _rtcp(self, data: bytes) -> Verdict:
        hdr, stream = self._frame_rtcp(data)
        profile = stream.profile
        tag_len = profile.rtcp_tag_len
        n = len(data)
        trailer = self._read_trailer(data[8:], profile.key_len)
        if n - hdr.length < SRTCP_INDEX_LEN + tag_len + trailer.length:
            raise _Drop(MALFORMED)
        auth_end = n - trailer.length - tag_len
        trailer.raw = data[n - trailer.length :]
        index = int.from_bytes(data[auth_end - SRTCP_INDEX_LEN : auth_end], "big") & ~SRTCP_E_BIT

        new_key: KeyState | None = None
        if trailer.long:
            master_key, roc, isn = self._unwrap(trailer, hdr.ssrc, profile)
            key = stream.find_key(master_key)
            if key is None:
                if isn >= 0:
                    start = (roc << 16) | isn
                else:
                    start = roc << 16
                    cur = stream.current
                    if cur is not None and start <= cur.start:
                        highest = stream.rtp_replay.highest
                        start = highest + 1 if highest >= 0 else cur.start + 1
                assert trailer.group is not None
                new_key = key = KeyState.derive(
                    master_key, trailer.group.salt, start, trailer.epoch
                )
        else:
            key = stream.current
            if key is None:
                raise _Drop(NO_KEY)

        if not key.rtcp_replay.check(index):
            raise _Drop(REPLAY)
        if not tags_equal(
            rtcp_tag(key.rtcp_auth, data[:auth_end], tag_len), data[auth_end : auth_end + tag_len]
        ):
            raise _Drop(AUTH)

        if new_key is not None:
            stream.commit(new_key, roc)
        elif trailer.long and self.ekt_format == FORMAT_RFC8870:
            key.epoch = trailer.epoch
        key.rtcp_replay.accept(index)
        ids = tuple(
            r.id for r in self.routes.get(hdr.ssrc, ()) if not r.gated and r.spi != PLAIN_SPI
        )
        outputs = [(data, ids)] if ids else []
        return Verdict(ssrc=hdr.ssrc, rtcp=True, outputs=outputs)

    def _plain(self, data: bytes, rtcp: bool) -> Verdict:
        """Non-secure media (wire.md §7, last paragraph): the tail byte and CSRC rules, no
        tag, no trailer. Nothing authenticates it, so there is no key or replay state."""
        if rtcp:
            hdr, _ = self._frame_rtcp(data)
            ids = tuple(r.id for r in self.routes.get(hdr.ssrc, ()) if not r.gated)
            return Verdict(ssrc=hdr.ssrc, rtcp=True, outputs=[(data, ids)] if ids else [])
        hlen, ssrc, stream = self._frame_rtp(data)
        if len(data) < hlen + 1:
            raise _Drop(MALFORMED)
        tail = data[-1]
        switched = self._open_gates(stream, tail)
        body = bytearray(data[:-1])
        by_position: dict[int, list[str]] = {}
        for r in self.routes.get(ssrc, ()):
            if not r.gated:
                by_position.setdefault(r.position, []).append(r.id)
        out = []
        for position, ids in by_position.items():
            body[DESTINATION_BYTE_OFFSET] = position
            out.append((bytes(body), tuple(ids)))
        return Verdict(tail=tail, ssrc=ssrc, switched=switched, outputs=out)
