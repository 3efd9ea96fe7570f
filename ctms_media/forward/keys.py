"""Key state the relay keeps: group EKT parameter sets by SPI, and per sender SSRC the
current and previous master keys with their start indices, ROC and replay windows.

A key is committed only after a packet verified under it, so a forged trailer can never
replace a sender's key (wire.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ctms_media.errors import ConfigError
from ctms_media.wire.ekt import EktCipher, check_group
from ctms_media.wire.srtp import (
    Profile,
    ReplayWindow,
    estimate_index,
    rtcp_auth_key,
    rtp_auth_key,
)

KINDS = ("audio", "video")


@dataclass(frozen=True, slots=True)
class GroupParams:
    """A group EKT parameter set: what an SPI names (wire.md §5)."""

    spi: int
    cipher: EktCipher
    kek: bytes
    salt: bytes
    profile: Profile

    @classmethod
    def make(
        cls, spi: int, cipher: int, kek: bytes, salt: bytes, profile: Profile, ekt_format: str
    ) -> GroupParams:
        if not 0 <= spi <= 0xFFFF:
            raise ConfigError(f"SPI {spi} does not fit 16 bits")
        if ekt_format == "ctms" and spi > 0x7FFF:
            raise ConfigError(f"CTMS SPI {spi} does not fit 15 bits")
        if len(salt) != profile.salt_len:
            raise ConfigError(f"{profile.name} needs a {profile.salt_len}-byte salt")
        return cls(spi, check_group(cipher, kek, ekt_format), bytes(kek), bytes(salt), profile)


@dataclass(eq=False, slots=True)
class KeyState:
    """One committed SRTP master key of a sender SSRC."""

    master_key: bytes
    start: int  # RTP packet index from which this key protects the stream
    rtp_auth: bytes
    rtcp_auth: bytes
    epoch: int = 0  # RFC 8870 only: the sender's latest Epoch seen with this key
    sent_to: set[str] = field(default_factory=set)  # receivers sent a long trailer for it
    rtcp_replay: ReplayWindow = field(default_factory=ReplayWindow)

    @classmethod
    def derive(cls, master_key: bytes, salt: bytes, start: int, epoch: int = 0) -> KeyState:
        return cls(
            master_key,
            start,
            rtp_auth_key(master_key, salt),
            rtcp_auth_key(master_key, salt),
            epoch,
        )

    def snapshot(self) -> tuple:
        return (
            self.master_key,
            self.start,
            self.epoch,
            frozenset(self.sent_to),
            self.rtcp_replay.highest,
            self.rtcp_replay.bits,
        )


@dataclass(eq=False, slots=True)
class StreamState:
    """A declared sender SSRC and what the relay knows of its keys."""

    ssrc: int
    kind: str
    profile: Profile
    current: KeyState | None = None
    previous: KeyState | None = None
    rtp_replay: ReplayWindow = field(default_factory=ReplayWindow)
    roc: int | None = None  # from the first long trailer that verified (RTP or SRTCP)

    def find_key(self, master_key: bytes) -> KeyState | None:
        for k in (self.current, self.previous):
            if k is not None and k.master_key == master_key:
                return k
        return None

    def key_for_index(self, index: int) -> KeyState | None:
        """The key protecting RTP ``index``: keys cover [start, next key's start)."""
        cur = self.current
        if cur is None:
            return None
        if index >= cur.start:
            return cur
        prev = self.previous
        if prev is not None and index >= prev.start:
            return prev
        return None

    def rtp_index(self, seq: int) -> int | None:
        """The RTP index of a short-trailer packet with ``seq`` (None: no key yet).

        After the first accepted RTP packet, RFC 3711 estimation from the highest index. Before
        it (the key came from SRTCP), the ROC its trailer carried is the stream's ROC
        (wire.md §5: "initialized from the first long trailer that verifies"), so the packet is
        ``roc << 16 | seq`` whatever half of the sequence space it is in: an estimate
        anchored at the key's start would guess ``roc - 1`` for half of them.
        """
        if self.rtp_replay.highest >= 0:
            return estimate_index(self.rtp_replay.highest, seq)
        if self.roc is None:
            return None
        return (self.roc << 16) | seq

    def commit(self, key: KeyState, roc: int) -> None:
        """Make ``key`` the newest key; the one it replaces stays for late packets. ``roc``:
        what the verifying trailer carried; the first one initializes the stream's ROC."""
        if self.roc is None:
            self.roc = roc
        self.previous = self.current
        self.current = key

    def snapshot(self) -> tuple:
        """Everything a packet may change, for tests that a rejected packet changed nothing."""
        return (
            self.current.snapshot() if self.current else None,
            self.previous.snapshot() if self.previous else None,
            self.rtp_replay.highest,
            self.rtp_replay.bits,
            self.roc,
        )
