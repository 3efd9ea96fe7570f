"""The precomputed-state HMAC (ctms_media._fasthmac) and the bulk sender built on it agree
with the reference tag code and forwarder."""

from __future__ import annotations

import os

import numpy as np
from ctms_media._fasthmac import HmacSha1

from ctms_media.fastpath.loadgen import SyntheticGroup, SyntheticStream
from ctms_media.forward.forwarder import Forwarder
from ctms_media.forward.verdict import Receiver
from ctms_media.wire.srtp import rtcp_tag, rtp_tag


def test_tags_match_the_reference_code() -> None:
    for n in (0, 1, 55, 56, 63, 64, 65, 119, 1200, 1400):
        key, data = os.urandom(20), os.urandom(n)
        h = HmacSha1(key)
        for roc in (0, 1, 0xFFFFFFFF):
            assert h.srtp_tag(data, roc, 10) == rtp_tag(key, data, roc, 10)
            assert h.verify_srtp(data, roc, rtp_tag(key, data, roc, 4))
            assert not h.verify_srtp(data, roc ^ 1, rtp_tag(key, data, roc, 4))
        assert h.srtcp_tag(data, 10) == rtcp_tag(key, data, 10)


def test_stamped_packets_are_what_the_reference_accepts() -> None:
    g = SyntheticGroup(3)
    s = SyntheticStream(0x99, g, key_start=0xFFF0)
    fwd = Forwarder("ctms")
    fwd.add_group(*g.forwarder_args())
    fwd.add_stream(s.ssrc, "video", g.profile)
    fwd.set_route(s.ssrc, [Receiver("r", 2, 3)])
    assert fwd.forward(s.packet(0xFFF0, 300, long=True)).drop is None
    arena = np.zeros((40, 512), np.uint8)
    lengths = np.zeros(40, np.int32)
    indices = np.arange(0xFFF1, 0xFFF1 + 40)  # across the ROC 0 -> 1 boundary
    s.fill(arena, lengths, indices, 300, tail=0x40)
    for i in range(40):
        packet = arena[i, : lengths[i]].tobytes()
        assert packet == s.packet(int(indices[i]), 300, 0x40)
        v = fwd.forward(packet)
        assert v.drop is None and v.tail == 0x40
    assert s.hmac.floor_batch(arena, lengths, 40, 10, 1) == s.hmac.floor_batch(
        arena, lengths, 40, 10, 1
    )
    assert isinstance(s.hmac.oneshot_batch(arena, lengths, 40, 10, 1), int)
