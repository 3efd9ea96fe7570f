"""Writes conformance vectors (spec/vectors.md format) that cross every rule of wire.md
§5–§7 with every case the text allows.

The defects an outside run found hid where a rule meets an unusual but legal case, so each
file here is one point of the cross product: EKT format x EKT cipher x SRTP profile x ROC 0
or > 0 x SEQ low, high or just before a rollover x the first key seen on RTP or on SRTCP. Each
file walks the same story: a packet before any key (``no_key``), the first key, upgrades for
every receiver (one on another SPI, so re-wrapped), the sender's own rhythm of long and short
trailers, SRTCP forwarded as is, every drop reason, then a rekey (across the rollover when
SEQ starts just before it) with a late packet of the old key.

The expected bytes are not the forwarder's: the uplink comes from a room built on libsrtp
(:class:`SenderStream`), and each expected output is libsrtp's own protection of the plain
packet with the receiver's CSRC destination (one outbound session per key and destination),
followed by the trailer the rules of §7 call for, built from the receiver's group. Every
expected RTP output is then decrypted by an :class:`EktReceiver` per receiver, which learns
keys only from the trailers (a late packet of the old key, which such a room no longer holds,
by a libsrtp session of that key), so a wrong trailer fails here, at generation.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pylibsrtp

from ctms_media.errors import CtmsError
from ctms_media.sim.srtp_room import (
    EktGroup,
    EktReceiver,
    ReceiverOracle,
    SenderStream,
    _dummy_rtp,
    libsrtp_session,
    sdes_packet,
)
from ctms_media.wire.ekt import (
    CtmsLong,
    Rfc8870Full,
    Rfc8870Plaintext,
    ctms_emk_length,
    rfc8870_wrap,
    wrap_ctms,
)
from ctms_media.wire.rtp import position_code
from ctms_media.wire.srtp import (
    AES_CM_128_HMAC_SHA1_32,
    AES_CM_128_HMAC_SHA1_80,
    Profile,
)

FORMAT_CIPHERS = [("ctms", 1), ("ctms", 2), ("ctms", 3), ("rfc8870", 2), ("rfc8870", 3)]
PROFILES = [AES_CM_128_HMAC_SHA1_80, AES_CM_128_HMAC_SHA1_32]
ROCS = [0, 3]
# "prewrap" starts far enough before the rollover for the story to rekey right across it
SEQS = {"low": 1000, "high": 40000, "prewrap": 65516}
FIRSTS = ["rtp", "srtcp"]
CIPHER_NAMES = {1: "ecb", 2: "kw128", 3: "kw256"}
KEK_LENGTH = {1: 16, 2: 16, 3: 32}
UNKNOWN_SPI = 0x7FFE
# libsrtp's outbound index estimate needs each protected index within 2^15 of the last;
# dummies stay this far below the next real index so a late packet never meets one.
_STEP, _CLEARANCE = 0x6000, 4096


@dataclass(frozen=True)
class Case:
    """One point of the cross product."""

    ekt_format: str
    cipher: int
    profile: Profile
    roc: int
    seq: str
    first: str

    @property
    def name(self) -> str:
        tag = self.profile.rtp_tag_len * 8
        return (
            f"x-{self.ekt_format}-{CIPHER_NAMES[self.cipher]}-sha{tag}-roc{self.roc}"
            f"-seq{self.seq}-{self.first}first"
        )


def crossed_cases() -> Iterator[Case]:
    for fmt, cipher in FORMAT_CIPHERS:
        for profile in PROFILES:
            for roc in ROCS:
                for seq in SEQS:
                    for first in FIRSTS:
                        yield Case(fmt, cipher, profile, roc, seq, first)


@dataclass
class _Mirror:
    """libsrtp's protection of one key's packets for one CSRC destination."""

    session: pylibsrtp.Session
    ssrc: int
    last: int = -1

    def protect(self, plain: bytes, index: int) -> bytes:
        nxt = self.last + _STEP if self.last >= 0 else 0
        while index - self.last > 0x7000 and nxt < index - _CLEARANCE:
            self.session.protect(_dummy_rtp(self.ssrc, nxt))
            self.last, nxt = nxt, nxt + _STEP
        self.last = max(self.last, index)
        return self.session.protect(plain)


@dataclass
class _Key:
    key: bytes
    isn: int
    start: int
    epoch: int
    sent: set[str] = field(default_factory=set)  # receivers sent an RTP long trailer for it


@dataclass
class _Receiver:
    id: str
    position: int
    group: EktGroup


class _Story:
    """The model of §7 the expected bytes follow, kept apart from either forwarder."""

    def __init__(self, case: Case, rng: random.Random) -> None:
        self.case = case
        self.rng = rng
        salt = rng.randbytes(14)
        groups = []
        for _ in range(2):
            spi = rng.randrange(1, 0x7FF0)
            while spi in [g.spi for g in groups]:
                spi = rng.randrange(1, 0x7FF0)
            kek = rng.randbytes(KEK_LENGTH[case.cipher])
            groups.append(EktGroup(spi, case.cipher, kek, salt, case.profile, case.ekt_format))
        self.groups = groups
        self.receivers = [
            _Receiver("r1", 1, groups[0]),
            _Receiver("r2", 2, groups[0]),
            _Receiver("r3", 3, groups[1]),  # on another parameter set: re-wrapped trailers
        ]
        self.ssrc = rng.randrange(1, 1 << 32)
        kind = "video" if case.seq != "low" else "audio"
        self.sender = SenderStream(
            self.ssrc,
            kind,
            groups[0],
            rng.randbytes(16),
            position=2,
            seq=SEQS[case.seq],
            roc=case.roc,
        )
        self.keys: dict[bytes, _Key] = {}
        self.current: bytes | None = None
        self.mirrors: dict[tuple[bytes, int], _Mirror] = {}
        self.packets: list[dict[str, Any]] = []
        self.rooms = {r.id: EktReceiver({r.group.spi: r.group}) for r in self.receivers}
        self._late_key: _Key | None = None
        ciphers = {g.spi: g.cipher for g in groups}
        self.late_oracles = {r.id: ReceiverOracle(case.ekt_format, ciphers) for r in self.receivers}

    # -- what goes in --------------------------------------------------------------------

    def _payload(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(12, 48))

    def _key_of_sender(self) -> _Key:
        s = self.sender
        k = self.keys.get(s.master_key)
        if k is None:
            k = self.keys[s.master_key] = _Key(s.master_key, s.isn, s.key_start, s.epoch)
        return k

    def rtp(self, long: bool = False, tail: int | None = None) -> tuple[bytes, bytes, int, int]:
        """(uplink, plain, index, tail) of the sender's next packet, not yet recorded."""
        s = self.sender
        index = s.index
        tail = (0x40 if s.kind == "video" else 0x85) if tail is None else tail
        marker = long and s.kind == "video"
        packet, plain = s.rtp(self._payload(), tail=tail, long=long, marker=marker)
        return packet, plain, index, tail

    # -- what comes out ------------------------------------------------------------------

    def _mirror(self, key: _Key, position: int) -> _Mirror:
        m = self.mirrors.get((key.key, position))
        if m is None:
            session = libsrtp_session(key.key, self.groups[0].salt, self.case.profile, True)
            m = self.mirrors[(key.key, position)] = _Mirror(session, self.ssrc)
        return m

    def _trailer_for(self, r: _Receiver, key: _Key, roc: int) -> bytes:
        """An upgraded or re-wrapped trailer: the receiver's SPI, the packet's ROC, the key's
        ISN (CTMS) or the sender's Epoch for that key (RFC 8870)."""
        g = r.group
        if self.case.ekt_format == "ctms":
            return CtmsLong(wrap_ctms(g.cipher, g.kek, key.key), roc, key.isn, g.spi).encode()
        ct = rfc8870_wrap(g.kek, Rfc8870Plaintext(key.key, self.ssrc, roc))
        return Rfc8870Full(ct, g.spi, key.epoch).encode()

    def _trailer_length(self, packet: bytes) -> int:
        if self.case.ekt_format == "ctms":
            return ctms_emk_length(self.case.cipher) + 8 if packet[-1] & 1 else 1
        return 47 if packet[-1] == 0x02 else 1

    def forwarded_rtp(
        self, packet: bytes, plain: bytes, index: int, tail: int, late: bool = False
    ) -> None:
        """Record an RTP packet the relay must forward, with every receiver's bytes."""
        key = self._late_key if late and self._late_key else self._key_of_sender()
        n = self._trailer_length(packet)
        own_long = n > 1
        if own_long and self.current != key.key and not late:
            self.current = key.key
        if own_long:
            spi = (
                ((packet[-2] << 8 | packet[-1]) >> 1)
                if self.case.ekt_format == "ctms"
                else (packet[-7] << 8 | packet[-6])
            )
        roc = index >> 16
        out: dict[str, str] = {}
        for r in self.receivers:
            dest = bytearray(plain)
            struct.pack_into("!I", dest, 12, position_code(self.sender.position, r.position))
            srtp = self._mirror(key, r.position).protect(bytes(dest), index)
            is_current = key.key == self.current
            if is_current and r.id not in key.sent:
                trailer = self._trailer_for(r, key, roc)  # upgraded
            elif own_long and spi != r.group.spi:
                trailer = self._trailer_for(r, key, roc)  # re-wrapped
            else:
                trailer = packet[-n:]  # the sender's own form
            if len(trailer) > 1:
                key.sent.add(r.id)
            wire = srtp + trailer
            self._check(r, wire, bytes(dest), key, late)
            out[r.id] = wire.hex()
        self.packets.append(
            {"in": packet.hex(), "rtcp": False, "tail": tail, "out": out, "drop": None}
        )

    def _check(self, r: _Receiver, wire: bytes, plain: bytes, key: _Key, late: bool) -> None:
        """Every expected output decrypts as a room would decrypt it."""
        if late:
            got = self.late_oracles[r.id].unprotect(
                wire,
                self.ssrc,
                key.key,
                self.groups[0].salt,
                self.case.profile,
                start_index=key.start,
            )
        else:
            room = self.rooms[r.id]
            got = room.receive(wire)
            if got is None:
                raise CtmsError(f"{self.case.name}: {r.id} cannot decrypt: {room.failure_reasons}")
        if got != plain:
            raise CtmsError(f"{self.case.name}: {r.id} decrypts other bytes")

    def forwarded_srtcp(self, packet: bytes) -> None:
        """SRTCP goes to every receiver byte for byte; a long trailer commits its key."""
        if packet[-1] & 1 if self.case.ekt_format == "ctms" else packet[-1] == 0x02:
            self.current = self._key_of_sender().key
        out = {r.id: packet.hex() for r in self.receivers}
        self.packets.append(
            {"in": packet.hex(), "rtcp": True, "tail": None, "out": out, "drop": None}
        )

    def dropped(self, packet: bytes, reason: str, rtcp: bool = False) -> None:
        self.packets.append(
            {"in": packet.hex(), "rtcp": rtcp, "tail": None, "out": {}, "drop": reason}
        )

    def sdes(self, long: bool = True) -> bytes:
        return self.sender.rtcp(sdes_packet(self.ssrc), long=long)

    # -- the story -----------------------------------------------------------------------

    def announce_first_key(self) -> None:
        """The first key, on RTP (a long trailer) or on SRTCP (an SDES), then short RTP."""
        if self.case.first == "srtcp":
            sdes = self.sdes(long=True)
            self.forwarded_srtcp(sdes)
            self.dropped(sdes, "replay", rtcp=True)
            self.sender._announce = False
            self.forwarded_rtp(*self.rtp(long=False))
        else:
            self.forwarded_rtp(*self.rtp(long=True))

    def rhythm(self, count: int) -> list[bytes]:
        """The sender's own mix: a long trailer every third packet (§5), the rest short."""
        sent = []
        for i in range(count):
            packet, plain, index, tail = self.rtp(long=(i % 3 == 2))
            self.forwarded_rtp(packet, plain, index, tail)
            sent.append(packet)
        return sent

    def bad_packets(self, earlier: bytes) -> None:
        """Every drop reason, none of which may change what follows."""
        self.dropped(earlier, "replay")
        packet = self.rtp(long=False)[0]
        forged = bytearray(packet)
        forged[-2] ^= 0x01  # inside the tag (the short trailer is the last octet)
        self.dropped(bytes(forged), "auth")
        packet = self.rtp(long=True)[0]
        n = self._trailer_length(packet)
        body, trailer = packet[:-n], packet[-n:]
        if self.case.ekt_format == "ctms":
            t = CtmsLong.decode(trailer)
            alien = CtmsLong(t.emk, t.roc, t.isn, UNKNOWN_SPI).encode()
            broken = CtmsLong(bytes([t.emk[0] ^ 0x80]) + t.emk[1:], t.roc, t.isn, t.spi).encode()
            bad_key = "auth" if self.case.cipher == 1 else "unwrap"  # ECB cannot tell
        else:
            f = Rfc8870Full.decode(trailer)
            alien = Rfc8870Full(f.ciphertext, UNKNOWN_SPI, f.epoch).encode()
            broken = Rfc8870Full(
                bytes([f.ciphertext[0] ^ 0x80]) + f.ciphertext[1:], f.spi, f.epoch
            ).encode()
            bad_key = "unwrap"
        self.dropped(body + alien, "unknown_spi")
        self.dropped(body + broken, bad_key)
        self.dropped(packet[:13], "malformed")
        self.sender._announce = False
        self.dropped(self.sdes(long=False)[:9], "malformed", rtcp=True)

    def rekey_with_late_packet(self) -> None:
        """A second key (across the rollover when SEQ started just before it); a late
        packet of the old key arrives after the new key's first packet, in its own form."""
        s = self.sender
        while self.case.seq == "prewrap" and s.seq != 0xFFFE:
            self.rhythm(1)
        late = self.rtp(long=False)
        self._late_key = self._key_of_sender()
        # One more packet of the old key is accepted, so the late one is below the highest
        # index (an RFC 8870 key first seen on SRTCP in the same ROC starts just above it).
        self.rhythm(1)
        s.rekey(self.rng.randbytes(16))
        if self.case.first == "srtcp":
            self.forwarded_srtcp(self.sdes(long=True))
            s._announce = False
            self.forwarded_rtp(*self.rtp(long=False))
        else:
            self.forwarded_rtp(*self.rtp(long=True))
        self.forwarded_rtp(*late, late=True)
        self.rhythm(4)
        self.forwarded_srtcp(self.sdes(long=False))

    def run(self) -> dict[str, Any]:
        self.sender._announce = False
        self.dropped(self.rtp(long=False)[0], "no_key")
        self.sender._announce = True
        self.announce_first_key()
        sent = self.rhythm(7)
        self.bad_packets(sent[2])
        self.rhythm(3)
        self.rekey_with_late_packet()
        return self.vector()

    def vector(self) -> dict[str, Any]:
        p = self.case.profile.name
        return {
            "name": self.case.name,
            "ekt_format": self.case.ekt_format,
            "groups": [
                {
                    "spi": g.spi,
                    "ekt_cipher": g.cipher,
                    "kek": g.kek.hex(),
                    "salt": g.salt.hex(),
                    "profile": p,
                }
                for g in self.groups
            ],
            "streams": [{"ssrc": self.ssrc, "kind": self.sender.kind, "profile": p}],
            "receivers": [
                {"id": r.id, "position": r.position, "spi": r.group.spi} for r in self.receivers
            ],
            "packets": self.packets,
        }


def build(case: Case, seed: int = 0) -> dict[str, Any]:
    """One vector; the same case and seed give the same bytes."""
    return _Story(case, random.Random(f"{seed}:{case.name}")).run()


def generate(directory: Path, seed: int = 0) -> list[Path]:
    """Write the crossed set into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in crossed_cases():
        path = directory / f"{case.name}.json"
        path.write_text(json.dumps(build(case, seed), indent=1) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
