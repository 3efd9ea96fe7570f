"""The simulated rooms stay bounded on hostile input (they are the tests' oracle)."""

from __future__ import annotations

import os
import struct

from ctms_media.sim.srtp_room import (
    MAX_WALK_ROC,
    EktGroup,
    EktReceiver,
    SenderStream,
    sdes_packet,
)
from ctms_media.wire.ekt import ctms_short
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


def test_a_key_first_learnt_from_srtcp_decrypts_rtp_in_the_upper_half_of_a_roc() -> None:
    """The SDES trailer carries the ROC but not the RTP sequence number: a room that walked
    its session to ``ROC << 16`` would have libsrtp guess ROC − 1 for SEQ 40000 and fail
    every packet of that stream (seen in the soak as a few % of authentication failures)."""
    group = EktGroup(7, 2, os.urandom(16), os.urandom(14), PROFILES_BY_ID[1])
    sender = SenderStream(1234, "audio", group, os.urandom(16), seq=40000, roc=1)
    room = EktReceiver({7: group})
    assert room.receive(sender.rtcp(sdes_packet(1234), long=True), rtcp=True) is not None
    for _ in range(5):  # downlink RTP as the relay sends it: no tail byte, short trailer
        plain = struct.pack("!BBHII", 0x80, 96, sender.seq, sender.timestamp, 1234) + b"x" * 20
        downlink = sender._session.protect(plain) + ctms_short()
        sender._advance(960)
        assert room.receive(downlink) == plain
    assert room.failed == 0 and room.ok == 6
