"""The simulated rooms stay bounded on hostile input (they are the tests' oracle)."""

from __future__ import annotations

import os

from ctms_media.sim.srtp_room import MAX_WALK_ROC, EktGroup, EktReceiver, SenderStream
from ctms_media.wire.srtp import PROFILES_BY_ID


def test_a_trailer_naming_a_far_roc_is_a_failure_not_a_walk() -> None:
    """SRTCP's CTMS trailer ROC is outside every tag, so a room can be handed any ROC; the
    room refuses one it would need billions of dummy packets to reach."""
    group = EktGroup(7, 2, os.urandom(16), os.urandom(14), PROFILES_BY_ID[1])
    sender = SenderStream(1234, "audio", group, os.urandom(16))
    packet, _ = sender.rtp(b"x" * 20, 0x80, long=True)
    room = EktReceiver({7: group})
    far = packet[:-8] + (MAX_WALK_ROC + 1).to_bytes(4, "big") + packet[-4:]
    assert room.receive(far) is None and room.failed == 1
    assert room.sessions == {}  # nothing learnt from it
