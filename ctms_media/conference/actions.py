"""What the conference engine asks the server to do (sans-IO output).

The engine never touches a socket: it queues these, and the server drains them with
``Conference.pop_actions()`` after each call and turns each into datagrams or port
bookkeeping. Timed repetition is in the queue as separate actions (a GSP resent every
500 ms, FIR retransmissions), so the server sends each of those once; DOWNGRADE is the
exception — one action, which the server sends three times (its repeats need no state).
"""

from __future__ import annotations

from dataclasses import dataclass

from ctms_media.conference.model import EktGroupSpec

__all__ = [
    "Action",
    "GroupsChanged",
    "RemoveEndpoint",
    "SendDowngrade",
    "SendFir",
    "SendGsp",
    "SendPli",
]


@dataclass(frozen=True, slots=True)
class SendGsp:
    """Send ``group`` as a GSP control message (wire.md §8) to the endpoint, hop-protected."""

    endpoint_id: str
    group: EktGroupSpec


@dataclass(frozen=True, slots=True)
class SendDowngrade:
    """Send DOWNGRADE to the endpoint: the server sends it three times, 100 ms apart (§8;
    it is never acknowledged), and keeps accepting and forwarding SRTP for 1 s after it."""

    endpoint_id: str


@dataclass(frozen=True, slots=True)
class SendPli:
    """Ask ``endpoint_id`` for an IDR of its stream ``media_ssrc`` (RFC 4585 PLI)."""

    endpoint_id: str
    media_ssrc: int


@dataclass(frozen=True, slots=True)
class SendFir:
    """RFC 5104 FIR for ``media_ssrc``; a retransmission keeps ``seq``, a new request
    increments it (mod 256)."""

    endpoint_id: str
    media_ssrc: int
    seq: int


@dataclass(frozen=True, slots=True)
class RemoveEndpoint:
    """The engine dropped this endpoint (``reason`` "spimap-timeout" or "media-timeout"):
    release its port, forget its address and remove its streams from the forwarder."""

    endpoint_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class GroupsChanged:
    """``Conference.groups()`` differs from before: add the new SPIs to the forwarder before
    applying the routes, remove the gone ones after."""


Action = SendGsp | SendDowngrade | SendPli | SendFir | RemoveEndpoint | GroupsChanged
