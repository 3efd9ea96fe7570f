"""Codec for the hop-by-hop control messages of wire.md §8 and the feedback the relay originates.

The control messages are RTCP APP packets (PT 204, name ``CTMS``, subtype in the count field).
They travel as reduced-size SRTCP (RFC 5506) under the DTLS hop keys, so this module only deals
with the plain RTCP bytes: protection is the caller's job (:mod:`ctms_media.dtls.hop`), which
keeps the codec pure and lets a stock libsrtp be the oracle for the crypto.

Decoding is strict on purpose: a control packet arrives authenticated, so anything that does not
frame exactly as the contract says is a peer bug worth counting, not something to guess around.
Every failure is a :class:`~ctms_media.errors.MalformedError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from ctms_media.errors import ConfigError, MalformedError
from ctms_media.wire.ekt import EktCipher, check_group

__all__ = [
    "APP_NAME",
    "RTCP_PT_APP",
    "RTCP_PT_PSFB",
    "ControlMessage",
    "Downgrade",
    "EktCipher",
    "EktFormat",
    "Fir",
    "Gsp",
    "GspAck",
    "Pli",
    "RekeyDone",
    "Subtype",
    "decode_control",
    "decode_feedback",
    "encode_control",
    "encode_fir",
    "encode_pli",
    "is_control_packet",
]

RTCP_PT_APP: Final = 204
RTCP_PT_PSFB: Final = 206
RTCP_PT_BYE: Final = 203
RTCP_PT_RTPFB: Final = 205
APP_NAME: Final = b"CTMS"

_PSFB_PLI: Final = 1
_PSFB_FIR: Final = 4

# V=2, P=0 in the top three bits of the first byte.
_VERSION_BITS: Final = 0x80
_HEADER = struct.Struct("!BBHI")  # first byte, PT, length in words - 1, SSRC
_APP_PREFIX_LEN: Final = _HEADER.size + len(APP_NAME)


class Subtype(IntEnum):
    """APP subtypes of wire.md §8 (the 5-bit count field)."""

    GSP = 1
    GSP_ACK = 2
    REKEY_DONE = 3
    DOWNGRADE = 4


class EktFormat(IntEnum):
    """Which trailer layout the group uses (wire.md §5 vs §6)."""

    CTMS = 1
    RFC8870 = 2


# RFC 5764 profile id -> master salt length (wire.md §2). Both profiles share the salt size,
# but keeping the table lets the check follow the contract if a profile is ever added.
_PROFILE_SALT_LENGTH: Final = {0x0001: 14, 0x0002: 14}


@dataclass(frozen=True)
class Gsp:
    """Group security parameters: everything a room needs to take part in one SPI.

    Validation lives here rather than in the decoder so that the relay cannot *send* a
    parameter set that the contract forbids either (e.g. AES_128_ECB with the RFC 8870 format,
    or an SPI that does not fit the 15-bit CTMS trailer field).
    """

    spi: int
    ekt_cipher: int
    ekt_format: int
    profile_id: int
    kek: bytes
    salt: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.spi <= 0xFFFF:
            raise ConfigError(f"SPI {self.spi} out of range")
        try:
            fmt = EktFormat(self.ekt_format)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if fmt is EktFormat.CTMS and self.spi > 0x7FFF:
            raise ConfigError("CTMS trailers carry a 15-bit SPI")
        # one place for the cipher/KEK/format rules: the EKT codec's
        check_group(self.ekt_cipher, self.kek, fmt.name.lower())
        if self.profile_id not in _PROFILE_SALT_LENGTH:
            raise ConfigError(f"unknown SRTP profile id {self.profile_id:#06x}")
        if len(self.salt) != _PROFILE_SALT_LENGTH[self.profile_id]:
            raise ConfigError("master salt length does not match the SRTP profile")


def _check_u16(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ConfigError(f"{name} {value} out of range")


@dataclass(frozen=True)
class GspAck:
    """The endpoint holds the parameter set of ``spi``; the relay may stop resending the GSP."""

    spi: int

    def __post_init__(self) -> None:
        _check_u16("SPI", self.spi)


@dataclass(frozen=True)
class RekeyDone:
    """The endpoint now sends all its streams under ``spi``; re-wrapping for it can end."""

    spi: int

    def __post_init__(self) -> None:
        _check_u16("SPI", self.spi)


@dataclass(frozen=True)
class Downgrade:
    """From now on the endpoint sends and expects plain RTP/RTCP. Carries no fields."""


ControlMessage = Gsp | GspAck | RekeyDone | Downgrade


def _body(msg: ControlMessage) -> tuple[Subtype, bytes]:
    if isinstance(msg, Gsp):
        body = (
            struct.pack(
                "!HBBHB", msg.spi, msg.ekt_cipher, msg.ekt_format, msg.profile_id, len(msg.kek)
            )
            + msg.kek
            + bytes((len(msg.salt),))
            + msg.salt
        )
        return Subtype.GSP, body + bytes(-len(body) % 4)
    if isinstance(msg, GspAck):
        return Subtype.GSP_ACK, struct.pack("!HH", msg.spi, 0)
    if isinstance(msg, RekeyDone):
        return Subtype.REKEY_DONE, struct.pack("!HH", msg.spi, 0)
    if isinstance(msg, Downgrade):
        return Subtype.DOWNGRADE, bytes(4)
    raise TypeError(f"not a control message: {msg!r}")


def encode_control(msg: ControlMessage, ssrc: int) -> bytes:
    """Plain RTCP APP bytes for ``msg``, ready for SRTCP protection with the hop keys.

    ``ssrc`` is the sender's *control* SSRC: the receiving room uses it to tell the relay's
    own RTCP apart from forwarded end-to-end RTCP (wire.md §8).
    """
    if not 0 <= ssrc <= 0xFFFFFFFF:
        raise ConfigError(f"SSRC {ssrc} out of range")
    subtype, body = _body(msg)
    total = _APP_PREFIX_LEN + len(body)
    header = _HEADER.pack(_VERSION_BITS | subtype, RTCP_PT_APP, total // 4 - 1, ssrc)
    return header + APP_NAME + body


def _decode_gsp(body: bytes) -> Gsp:
    if len(body) < 8:
        raise MalformedError("GSP too short")
    spi, cipher, fmt, profile_id, kek_len = struct.unpack_from("!HBBHB", body)
    pos = 7
    if pos + kek_len + 1 > len(body):
        raise MalformedError("GSP KEK length runs past the end")
    kek = body[pos : pos + kek_len]
    pos += kek_len
    salt_len = body[pos]
    pos += 1
    if pos + salt_len > len(body):
        raise MalformedError("GSP salt length runs past the end")
    salt = body[pos : pos + salt_len]
    pos += salt_len
    pad = body[pos:]
    # The pad is exactly what reaches the next 32-bit boundary; anything longer means the
    # lengths inside disagree with the RTCP length, which a correct sender never produces.
    if len(pad) != -pos % 4 or any(pad):
        raise MalformedError("GSP padding is not the zero pad to 32 bits")
    try:
        return Gsp(spi, cipher, fmt, profile_id, bytes(kek), bytes(salt))
    except ConfigError as exc:
        raise MalformedError(f"GSP: {exc}") from None


def decode_control(data: bytes) -> tuple[int, ControlMessage]:
    """Parse one plain (already unprotected) APP 'CTMS' packet into ``(ssrc, message)``.

    The packet must be exactly one RTCP packet: reduced-size SRTCP carries nothing else, and a
    trailing byte would mean the length field lies.
    """
    data = bytes(data)
    if len(data) < _APP_PREFIX_LEN:
        raise MalformedError("control packet shorter than an APP header")
    first, pt, length, ssrc = _HEADER.unpack_from(data)
    if first >> 6 != 2:
        raise MalformedError("RTCP version is not 2")
    if first & 0x20:
        raise MalformedError("padding bit set on a control packet")
    if pt != RTCP_PT_APP:
        raise MalformedError(f"RTCP PT {pt} is not APP")
    if (length + 1) * 4 != len(data):
        raise MalformedError("RTCP length field does not match the packet size")
    if data[8:12] != APP_NAME:
        raise MalformedError("APP name is not CTMS")
    body = data[_APP_PREFIX_LEN:]
    try:
        subtype = Subtype(first & 0x1F)
    except ValueError:
        raise MalformedError(f"unknown CTMS subtype {first & 0x1F}") from None

    msg: ControlMessage
    if subtype is Subtype.GSP:
        msg = _decode_gsp(body)
    elif len(body) != 4:
        raise MalformedError(f"{subtype.name} body must be 4 bytes")
    elif subtype is Subtype.DOWNGRADE:
        if any(body):
            raise MalformedError("DOWNGRADE body must be zero")
        msg = Downgrade()
    else:
        spi, pad = struct.unpack("!HH", body)
        if pad:
            raise MalformedError(f"{subtype.name} pad must be zero")
        msg = GspAck(spi) if subtype is Subtype.GSP_ACK else RekeyDone(spi)
    return ssrc, msg


def is_control_packet(rtcp_plain_or_srtcp: bytes) -> bool:
    """Whether the first RTCP header says PT 204, i.e. this is hop-keyed control traffic.

    Works on protected packets too: SRTCP leaves the first 8 header bytes in clear, and that is
    what lets the relay choose between hop keys and end-to-end EKT keys before any crypto.
    Never raises, so the demultiplexer can call it on anything.
    """
    data = rtcp_plain_or_srtcp
    return len(data) >= 8 and data[0] >> 6 == 2 and data[1] == RTCP_PT_APP


@dataclass(frozen=True)
class Pli:
    """RFC 4585 Picture Loss Indication: ask ``media_ssrc`` for a new reference frame."""

    sender_ssrc: int
    media_ssrc: int


@dataclass(frozen=True)
class Fir:
    """RFC 5104 Full Intra Request; ``seq_nr`` must change per new request, not per resend."""

    sender_ssrc: int
    target_ssrc: int
    seq_nr: int


def _check_ssrcs(*ssrcs: int) -> None:
    for ssrc in ssrcs:
        if not 0 <= ssrc <= 0xFFFFFFFF:
            raise ConfigError(f"SSRC {ssrc} out of range")


def encode_pli(sender_ssrc: int, media_ssrc: int) -> bytes:
    """PSFB FMT 1 with no FCI; ``sender_ssrc`` is the relay's control SSRC (wire.md §8)."""
    _check_ssrcs(sender_ssrc, media_ssrc)
    return struct.pack(
        "!BBHII", _VERSION_BITS | _PSFB_PLI, RTCP_PT_PSFB, 2, sender_ssrc, media_ssrc
    )


def encode_fir(sender_ssrc: int, target_ssrc: int, seq_nr: int) -> bytes:
    """PSFB FMT 4 with one FCI entry (SSRC, seq nr, 24 reserved bits).

    RFC 5104 §4.3.1 says the media-source field of a FIR SHALL be 0; the target lives in the
    FCI, so that is where ``target_ssrc`` goes.
    """
    _check_ssrcs(sender_ssrc, target_ssrc)
    if not 0 <= seq_nr <= 0xFF:
        raise ConfigError(f"FIR sequence number {seq_nr} out of range")
    return struct.pack(
        "!BBHIIIB3x",
        _VERSION_BITS | _PSFB_FIR,
        RTCP_PT_PSFB,
        4,
        sender_ssrc,
        0,
        target_ssrc,
        seq_nr,
    )


def decode_feedback(data: bytes) -> Pli | Fir:
    """Parse a PLI or a single-entry FIR as built above; lets tests and endpoints check them."""
    data = bytes(data)
    if len(data) < 12:
        raise MalformedError("feedback packet too short")
    first, pt, length = struct.unpack_from("!BBH", data)
    if first >> 6 != 2 or pt != RTCP_PT_PSFB or (length + 1) * 4 != len(data):
        raise MalformedError("not a single PSFB packet")
    fmt = first & 0x1F
    sender, media = struct.unpack_from("!II", data, 4)
    if fmt == _PSFB_PLI and len(data) == 12:
        return Pli(sender, media)
    if fmt == _PSFB_FIR and len(data) == 20:
        target, seq_nr = struct.unpack_from("!IB", data, 12)
        return Fir(sender, target, seq_nr)
    raise MalformedError(f"unsupported PSFB FMT {fmt} or size")


@dataclass(frozen=True, slots=True)
class RtcpRouting:
    """What the relay must know of an end-to-end RTCP packet to route it.

    ``feedback`` is the PT of the first feedback packet (RTPFB 205 or PSFB 206), or None;
    ``media_ssrc`` its media-source SSRC when readable; ``bye`` whether a BYE was seen.
    """

    feedback: int | None = None
    media_ssrc: int | None = None
    bye: bool = False


def rtcp_routing(data: bytes, encrypted: bool) -> RtcpRouting:
    """Classify an RTCP packet for routing without decrypting it.

    SRTCP encrypts everything after the first header's SSRC, so for ``encrypted`` packets
    only the first header's packet type counts (RFC 5506 reduced-size feedback and BYE are
    recognised; a compound RR+PLI is not, and follows the sender's route). Plain RTCP is
    walked header by header; a header whose length runs past the end stops the walk.
    """
    n = len(data)
    if n < 8:
        return RtcpRouting()
    if encrypted:
        pt = data[1]
        if pt in (RTCP_PT_RTPFB, RTCP_PT_PSFB):
            return RtcpRouting(feedback=pt)
        return RtcpRouting(bye=pt == RTCP_PT_BYE)
    off, feedback, media, bye = 0, None, None, False
    while off + 8 <= n:
        pt = data[off + 1]
        end = off + (int.from_bytes(data[off + 2 : off + 4], "big") + 1) * 4
        if end > n:
            break
        if pt == RTCP_PT_BYE:
            bye = True
        elif pt in (RTCP_PT_RTPFB, RTCP_PT_PSFB) and feedback is None:
            feedback = pt
            if end - off >= 12:
                media = int.from_bytes(data[off + 8 : off + 12], "big")
        off = end
    return RtcpRouting(feedback, media, bye)
