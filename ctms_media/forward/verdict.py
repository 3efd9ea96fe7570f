"""What the forwarder answers for one uplink datagram; shared by both forwarder twins."""

from __future__ import annotations

from dataclasses import dataclass, field

# Drop reasons of spec/vectors.md, in the order in which they win when several apply.
MALFORMED = "malformed"
UNKNOWN_SSRC = "unknown_ssrc"
UNKNOWN_SPI = "unknown_spi"
UNWRAP = "unwrap"
NO_KEY = "no_key"
REPLAY = "replay"
AUTH = "auth"
DROP_REASONS = (MALFORMED, UNKNOWN_SSRC, UNKNOWN_SPI, UNWRAP, NO_KEY, REPLAY, AUTH)


@dataclass(frozen=True, slots=True)
class Receiver:
    """A subscription: who gets a sender's packets, at which position, on which SPI.

    ``gated`` (video only): the receiver's display at ``position`` is switching to this
    sender and gets nothing from it until a packet whose tail byte marks an IDR start; at
    that packet the subscription opens and the same display's subscriptions to every other
    video sender close, so the display never shows a frame it cannot decode (wire.md §10).
    """

    id: str
    position: int
    spi: int
    gated: bool = False


@dataclass(slots=True)
class Verdict:
    """A drop with its reason, or the tail byte and the bytes for each receiver.

    ``outputs`` holds one entry per distinct byte string ("variant"); receivers that share a
    position and trailer share the bytes, so a sender computes one tag per variant.
    """

    drop: str | None = None
    tail: int | None = None
    ssrc: int | None = None
    rtcp: bool = False
    outputs: list[tuple[bytes, tuple[str, ...]]] = field(default_factory=list)
    switched: tuple[str, ...] = ()  # receivers whose display opened to this sender now

    def for_receiver(self, receiver_id: str) -> bytes | None:
        for data, receivers in self.outputs:
            if receiver_id in receivers:
                return data
        return None

    def by_receiver(self) -> dict[str, bytes]:
        return {rid: data for data, rids in self.outputs for rid in rids}


def dropped(reason: str, ssrc: int | None = None, rtcp: bool = False) -> Verdict:
    return Verdict(drop=reason, ssrc=ssrc, rtcp=rtcp)
