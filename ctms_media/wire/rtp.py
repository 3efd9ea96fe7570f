"""RTP/RTCP framing, the CSRC position code (wire.md §4) and the uplink tail byte (§3).

Views read fields straight out of the datagram; nothing is copied until the forwarder builds
its output, because most datagrams are either dropped or rewritten in place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from ctms_media.errors import MalformedError

RTP_FIXED_HEADER = 12
RTCP_MIN_HEADER = 8  # V/P/RC, PT, length, SSRC of sender


class Position(IntEnum):
    """Camera/microphone/display/speaker positions carried in CSRC[0]."""

    NONE = 0
    LEFT = 1
    CENTER = 2
    RIGHT = 3
    AUX = 4


def classify(datagram: bytes) -> str:
    """RFC 7983 first-byte demultiplexing, with RFC 5761 RTP/RTCP split.

    Returns one of "stun", "dtls", "rtp", "rtcp" or "unknown".
    """
    if not datagram:
        return "unknown"
    b0 = datagram[0]
    if b0 <= 3:
        return "stun"
    if 20 <= b0 <= 63:
        return "dtls"
    if 128 <= b0 <= 191:
        if len(datagram) >= 2 and 192 <= datagram[1] <= 223:
            return "rtcp"
        return "rtp"
    return "unknown"


@dataclass(frozen=True, slots=True)
class RtpHeader:
    """An RTP header as laid out in one datagram; ``length`` includes CSRCs and extension."""

    version: int
    padding: bool
    extension: bool
    cc: int
    marker: bool
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    csrcs: tuple[int, ...]
    extension_profile: int | None
    extension_length: int  # bytes of extension data after its 4-byte header
    length: int

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> RtpHeader:
        n = len(data)
        if n < RTP_FIXED_HEADER:
            raise MalformedError(f"RTP header needs 12 bytes, got {n}")
        b0, b1, seq, ts, ssrc = struct.unpack_from("!BBHII", data, 0)
        if b0 >> 6 != 2:
            raise MalformedError(f"RTP version {b0 >> 6}")
        cc = b0 & 0x0F
        length = RTP_FIXED_HEADER + 4 * cc
        if n < length:
            raise MalformedError("CSRC list past the end")
        csrcs = struct.unpack_from(f"!{cc}I", data, RTP_FIXED_HEADER)
        ext_profile = None
        ext_len = 0
        if b0 & 0x10:
            if n < length + 4:
                raise MalformedError("extension header past the end")
            ext_profile, words = struct.unpack_from("!HH", data, length)
            ext_len = 4 * words
            length += 4 + ext_len
            if n < length:
                raise MalformedError("extension past the end")
        return cls(
            version=2,
            padding=bool(b0 & 0x20),
            extension=bool(b0 & 0x10),
            cc=cc,
            marker=bool(b1 & 0x80),
            payload_type=b1 & 0x7F,
            sequence=seq,
            timestamp=ts,
            ssrc=ssrc,
            csrcs=csrcs,
            extension_profile=ext_profile,
            extension_length=ext_len,
            length=length,
        )


def rtp_header_length(data: bytes | bytearray | memoryview) -> int:
    """Framing check of wire.md §1 for a media packet: the header length, CC >= 1 required.

    Cheaper than :meth:`RtpHeader.parse` and the single place the forwarder's first
    ``malformed`` class is decided.
    """
    n = len(data)
    if n < RTP_FIXED_HEADER:
        raise MalformedError(f"RTP header needs 12 bytes, got {n}")
    b0 = data[0]
    if b0 >> 6 != 2:
        raise MalformedError(f"RTP version {b0 >> 6}")
    cc = b0 & 0x0F
    if cc == 0:
        raise MalformedError("CC = 0: media packets carry a CSRC position code")
    length = RTP_FIXED_HEADER + 4 * cc
    if n < length:
        raise MalformedError("CSRC list past the end")
    if b0 & 0x10:
        if n < length + 4:
            raise MalformedError("extension header past the end")
        length += 4 + 4 * ((data[length + 2] << 8) | data[length + 3])
        if n < length:
            raise MalformedError("extension past the end")
    return length


@dataclass(frozen=True, slots=True)
class RtcpHeader:
    """The first header of an (S)RTCP compound packet."""

    version: int
    padding: bool
    count: int
    packet_type: int
    length_words: int
    ssrc: int

    @property
    def length(self) -> int:
        return (self.length_words + 1) * 4

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> RtcpHeader:
        """Framing check of wire.md §7: second byte 192–223 and the first header fits."""
        n = len(data)
        if n < RTCP_MIN_HEADER:
            raise MalformedError(f"RTCP header needs 8 bytes, got {n}")
        b0, pt, words, ssrc = struct.unpack_from("!BBHI", data, 0)
        if b0 >> 6 != 2:
            raise MalformedError(f"RTCP version {b0 >> 6}")
        if not 192 <= pt <= 223:
            raise MalformedError(f"RTCP packet type {pt} outside 192-223")
        hdr = cls(2, bool(b0 & 0x20), b0 & 0x1F, pt, words, ssrc)
        if hdr.length > n:
            raise MalformedError("first RTCP header's length past the end")
        return hdr


def position_code(source: int, destination: int) -> int:
    """CSRC[0] value: ``(source << 8) | destination``, upper 16 bits zero."""
    return ((source & 0xFF) << 8) | (destination & 0xFF)


def split_position_code(csrc0: int) -> tuple[int, int]:
    """(source position, destination position) of a CSRC[0] value."""
    return (csrc0 >> 8) & 0xFF, csrc0 & 0xFF


# Offset of CSRC[0]'s low byte (the destination position) inside an RTP header.
DESTINATION_BYTE_OFFSET = RTP_FIXED_HEADER + 3


@dataclass(frozen=True, slots=True)
class AudioTail:
    """Audio tail byte, RFC 6464 encoding: level in -dBov (0 loudest, 127 silence)."""

    voice: bool
    level: int

    @classmethod
    def decode(cls, byte: int) -> AudioTail:
        return cls(bool(byte & 0x80), byte & 0x7F)

    def encode(self) -> int:
        return (0x80 if self.voice else 0) | (self.level & 0x7F)


@dataclass(frozen=True, slots=True)
class VideoTail:
    """Video tail byte: bit 7 starts an IDR frame, bit 6 starts a frame."""

    idr: bool
    frame_start: bool

    @classmethod
    def decode(cls, byte: int) -> VideoTail:
        return cls(bool(byte & 0x80), bool(byte & 0x40))

    def encode(self) -> int:
        return (0x80 if self.idr else 0) | (0x40 if self.frame_start else 0)
