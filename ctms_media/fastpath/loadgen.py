"""Synthetic senders for load: SRTP packets made in bulk, fast enough to out-run a relay.

The benchmark needs hundreds of thousands of valid packets per second from a Python process,
so a stream here is one template (header with the CSRC position code, payload bytes, tail
byte, tag, short EKT trailer) copied into arena rows and stamped in C with each row's
sequence number and tag (``HmacSha1.stamp_rtp``). The relay never decrypts, so the payload
is arbitrary bytes; the tag is real, computed with the project's own RFC 3711 auth key. The
first packet of a key (long trailer) is built in Python with the wire codecs.
For libsrtp-encrypted rooms (demo, interop tests) see ``ctms_media.sim.srtp_room``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np

from ctms_media._fasthmac import HmacSha1
from ctms_media.wire.ekt import (
    FORMAT_CTMS,
    CtmsLong,
    Rfc8870Full,
    Rfc8870Plaintext,
    rfc8870_wrap,
    wrap_ctms,
)
from ctms_media.wire.rtp import position_code
from ctms_media.wire.srtp import AES_CM_128_HMAC_SHA1_80, Profile, rtp_auth_key, rtp_tag

RTP_HEADER = 16  # fixed header + one CSRC (the position code)


@dataclass
class SyntheticGroup:
    """An EKT parameter set as a sender holds it."""

    spi: int
    cipher: int = 2
    kek: bytes = field(default_factory=lambda: os.urandom(16))
    salt: bytes = field(default_factory=lambda: os.urandom(14))
    profile: Profile = AES_CM_128_HMAC_SHA1_80
    ekt_format: str = FORMAT_CTMS

    def forwarder_args(self) -> tuple:
        """Arguments of ``add_group`` for a forwarder that knows this group."""
        return (self.spi, self.cipher, self.kek, self.salt, self.profile)


class SyntheticStream:
    """One sender SSRC under one master key; packets by index (ROC << 16 | SEQ)."""

    def __init__(
        self,
        ssrc: int,
        group: SyntheticGroup,
        master_key: bytes | None = None,
        position: int = 2,
        key_start: int = 0,
    ) -> None:
        self.ssrc = ssrc
        self.group = group
        self.master_key = master_key or os.urandom(16)
        self.position = position
        self.key_start = key_start
        self.tag_len = group.profile.rtp_tag_len
        self.auth = rtp_auth_key(self.master_key, group.salt)
        self.hmac = HmacSha1(self.auth)

    def _body(self, index: int, payload_len: int, tail: int) -> bytes:
        header = struct.pack(
            "!BBHIII",
            0x81,
            96,
            index & 0xFFFF,
            0,  # timestamp: the relay never reads it; constant so stamping needs SEQ only
            self.ssrc,
            position_code(self.position, 0),
        )
        payload = bytes((7 * i + 3) & 0xFF for i in range(payload_len))
        return header + payload + bytes([tail & 0xFF])

    def long_trailer(self, roc: int) -> bytes:
        g = self.group
        if g.ekt_format == FORMAT_CTMS:
            emk = wrap_ctms(g.cipher, g.kek, self.master_key)
            return CtmsLong(emk, roc, self.key_start & 0xFFFF, g.spi).encode()
        ct = rfc8870_wrap(g.kek, Rfc8870Plaintext(self.master_key, self.ssrc, roc))
        return Rfc8870Full(ct, g.spi, 0).encode()

    def packet(self, index: int, payload_len: int = 160, tail: int = 0x80, long: bool = False):
        """One complete uplink packet (bytes)."""
        body = self._body(index, payload_len, tail)
        tag = rtp_tag(self.auth, body, index >> 16, self.tag_len)
        return body + tag + (self.long_trailer(index >> 16) if long else b"\x00")

    def fill(
        self,
        arena: np.ndarray,
        lengths: np.ndarray,
        indices: np.ndarray,
        payload_len: int = 160,
        tail: int = 0x80,
        rows: slice | None = None,
    ) -> None:
        """Rows ``rows`` (default: the first len(indices)) of ``arena`` become short-trailer
        packets with the given indices: one template copy, then SEQ and tag stamped in C."""
        count = len(indices)
        rows = rows or slice(0, count)
        template = self.packet(0, payload_len, tail)
        n = len(template)
        view = arena[rows]
        view[:, :n] = np.frombuffer(template, np.uint8)
        lengths[rows] = n
        self.hmac.stamp_rtp(
            view, lengths[rows], np.ascontiguousarray(indices, np.int64), count, self.tag_len, 1
        )

    def restamp(self, arena: np.ndarray, lengths: np.ndarray, indices: np.ndarray) -> None:
        """Give rows already filled by :meth:`fill` new indices (and so new tags)."""
        self.hmac.stamp_rtp(
            arena, lengths, np.ascontiguousarray(indices, np.int64), len(indices), self.tag_len, 1
        )
