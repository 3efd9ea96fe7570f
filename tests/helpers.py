"""A small meeting for forwarder tests: declared senders, groups and receivers on one
forwarder, with libsrtp rooms on both sides."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

from ctms_media.forward.verdict import Receiver
from ctms_media.sim.srtp_room import EktGroup, ReceiverOracle, SenderStream, sdes_packet
from ctms_media.wire.srtp import AES_CM_128_HMAC_SHA1_80, Profile

__all__ = ["Meeting", "sdes_packet"]


@dataclass
class Meeting:
    """One forwarder, its groups, senders and receivers, built from a seed."""

    make_forwarder: Any
    ekt_format: str = "ctms"
    cipher: int = 2
    profile: Profile = AES_CM_128_HMAC_SHA1_80
    seed: int = 1
    groups: dict[int, EktGroup] = field(default_factory=dict)
    senders: dict[int, SenderStream] = field(default_factory=dict)
    receivers: list[Receiver] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.salt = self.rand(14)
        self.fwd = self.make_forwarder(self.ekt_format)

    def rand(self, n: int) -> bytes:
        return bytes(self.rng.getrandbits(8) for _ in range(n))

    def group(self, spi: int, cipher: int | None = None) -> EktGroup:
        cipher = self.cipher if cipher is None else cipher
        kek = self.rand(32 if cipher == 3 else 16)
        g = EktGroup(spi, cipher, kek, self.salt, self.profile, self.ekt_format)
        self.groups[spi] = g
        self.fwd.add_group(spi, cipher, kek, self.salt, self.profile)
        return g

    def sender(
        self,
        ssrc: int,
        kind: str = "audio",
        spi: int | None = None,
        seq: int = 1000,
        position: int = 2,
        roc: int = 0,
    ) -> SenderStream:
        g = self.groups[spi if spi is not None else next(iter(self.groups))]
        s = SenderStream(ssrc, kind, g, self.rand(16), position=position, seq=seq, roc=roc)
        self.senders[ssrc] = s
        self.fwd.add_stream(ssrc, kind, self.profile)
        self.route()
        return s

    def receiver(self, rid: str, position: int, spi: int) -> None:
        self.receivers.append(Receiver(rid, position, spi))
        self.route()

    def route(self) -> None:
        for ssrc in self.senders:
            self.fwd.set_route(ssrc, self.receivers)

    def oracle(self) -> ReceiverOracle:
        return ReceiverOracle(self.ekt_format, {s: g.cipher for s, g in self.groups.items()})

    def payload(self) -> bytes:
        return os.urandom(self.rng.randint(20, 200))
