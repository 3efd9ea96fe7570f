"""Behaviour of the forwarder (wire.md §5–§7), checked against libsrtp as the oracle.

Parametrized over every twin through the ``make_forwarder`` fixture.
"""

from __future__ import annotations

import struct

import pytest

from ctms_media.wire.ekt import (
    CtmsLong,
    Rfc8870Full,
    Rfc8870Plaintext,
    rfc8870_unwrap,
    rfc8870_wrap,
    unwrap_ctms,
)
from ctms_media.wire.srtp import AES_CM_128_HMAC_SHA1_32, AES_CM_128_HMAC_SHA1_80

from .helpers import Meeting, sdes_packet

CASES = [
    ("ctms", 1, AES_CM_128_HMAC_SHA1_80),
    ("ctms", 2, AES_CM_128_HMAC_SHA1_32),
    ("ctms", 3, AES_CM_128_HMAC_SHA1_80),
    ("rfc8870", 2, AES_CM_128_HMAC_SHA1_80),
    ("rfc8870", 3, AES_CM_128_HMAC_SHA1_32),
]


def csrc_dest(packet: bytes) -> int:
    return packet[15]


@pytest.mark.parametrize(
    ("fmt", "cipher", "profile"), CASES, ids=[f"{f}-c{c}-{p.rtp_tag_len * 8}" for f, c, p in CASES]
)
def test_every_forwarded_packet_unprotects_in_libsrtp(make_forwarder, fmt, cipher, profile):
    m = Meeting(make_forwarder, fmt, cipher, profile)
    m.group(100)
    audio = m.sender(0x1111, "audio", seq=65500, position=1)
    video = m.sender(0x2222, "video", seq=200, position=3)
    m.receiver("left", 1, 100)
    m.receiver("center", 2, 100)
    m.receiver("center2", 2, 100)
    oracle = {r.id: m.oracle() for r in m.receivers}
    for i in range(120):  # audio crosses sequence 65535 -> 0
        s = audio if i % 2 else video
        packet, plain = s.rtp(m.payload(), tail=i & 0xFF, long=i % 6 == 0)
        v = m.fwd.forward(packet)
        assert v.drop is None and v.tail == i & 0xFF and v.ssrc == s.ssrc
        got = v.by_receiver()
        assert set(got) == {"left", "center", "center2"}
        assert got["center"] is got["center2"] or got["center"] == got["center2"]
        for r in m.receivers:
            out = got[r.id]
            assert csrc_dest(out) == r.position
            dec = oracle[r.id].unprotect(
                out, s.ssrc, s.master_key, m.salt, profile, start_index=s.key_start
            )
            assert dec[16:] == plain[16:]  # original payload; tail byte gone
            assert dec[:15] == plain[:15]  # SSRC, seq, timestamp, source position unchanged
    assert audio.roc == 1


def test_receivers_sharing_a_position_share_one_variant(make_forwarder):
    m = Meeting(make_forwarder)
    m.group(7)
    s = m.sender(5)
    for i in range(4):
        m.receiver(f"r{i}", 2, 7)
    m.receiver("left", 1, 7)
    v = m.fwd.forward(s.rtp(m.payload(), 0x80, long=True)[0])
    assert sorted(len(ids) for _, ids in v.outputs) == [1, 4]


def test_late_receiver_gets_the_key_upgraded_once(make_forwarder):
    m = Meeting(make_forwarder, "ctms", 2)
    m.group(9)
    s = m.sender(77, seq=10)
    m.receiver("early", 2, 9)
    for i in range(5):
        m.fwd.forward(s.rtp(m.payload(), 0x80, long=i == 0)[0])
    m.receiver("late", 1, 9)
    v = m.fwd.forward(s.rtp(m.payload(), 0x80)[0])
    early, late = v.for_receiver("early"), v.for_receiver("late")
    assert early[-1] == 0  # the sender's own short form
    t = CtmsLong.decode(late[-32:])
    assert t.spi == 9 and t.isn == 10 and t.roc == 0
    assert unwrap_ctms(2, m.groups[9].kek, t.emk) == s.master_key
    v = m.fwd.forward(s.rtp(m.payload(), 0x80)[0])
    assert v.for_receiver("late")[-1] == 0  # sent once, then the sender's form
    assert m.oracle().unprotect(late, 77, s.master_key, m.salt, m.profile)


def test_rewrap_for_a_receiver_on_another_spi(make_forwarder):
    m = Meeting(make_forwarder, "rfc8870", 3)
    m.group(1)
    m.group(2, cipher=2)
    s = m.sender(0xABC, spi=1)
    m.receiver("old", 2, 1)
    m.receiver("new", 2, 2)
    v = m.fwd.forward(s.rtp(m.payload(), 0x80, long=True)[0])
    old, new = v.for_receiver("old"), v.for_receiver("new")
    assert old[:-47] == new[:-47]  # same media and tag, different trailer
    f = Rfc8870Full.decode(new[-47:])
    assert f.spi == 2 and f.epoch == s.epoch
    pt = rfc8870_unwrap(m.groups[2].kek, f.ciphertext)
    assert pt == Rfc8870Plaintext(s.master_key, 0xABC, 0)


def test_rekey_keeps_late_packets_of_the_previous_key(make_forwarder):
    m = Meeting(make_forwarder, "ctms", 3)
    m.group(4)
    s = m.sender(31, "video", seq=65530)
    m.receiver("r", 2, 4)
    held = []
    for i in range(8):
        p = s.rtp(m.payload(), 0x40, long=i == 0)
        if i == 7:
            held.append(p)
        else:
            assert m.fwd.forward(p[0]).drop is None
    old_key = s.master_key
    s.rekey(m.rand(16))
    for _ in range(3):
        v = m.fwd.forward(s.rtp(m.payload(), 0x40)[0])
        assert v.drop is None
    late = m.fwd.forward(held[0][0])
    assert late.drop is None
    out = late.for_receiver("r")
    assert out[-1] == 0  # a late packet under an older key goes out in its own form
    dec = m.oracle().unprotect(out, 31, old_key, m.salt, m.profile, start_index=0x10001)
    assert dec[16:] == held[0][1][16:]


def test_forged_long_trailer_does_not_replace_the_key(make_forwarder):
    m = Meeting(make_forwarder, "ctms", 2)
    m.group(5)
    s = m.sender(8)
    m.receiver("r", 2, 5)
    assert m.fwd.forward(s.rtp(m.payload(), 0x80, long=True)[0]).drop is None
    before = m.fwd.state_snapshot()
    real_key = s.master_key
    s.master_key = m.rand(16)  # a trailer carrying another key, packet tagged with the old one
    packet = s.rtp(m.payload(), 0x80)[0]
    forged = packet[:-1] + s.trailer(True, roc=0)
    s.master_key = real_key
    assert m.fwd.forward(forged).drop == "auth"
    assert m.fwd.state_snapshot() == before
    assert m.fwd.forward(s.rtp(m.payload(), 0x80)[0]).drop is None


def test_rejected_packets_change_nothing(make_forwarder):
    m = Meeting(make_forwarder, "rfc8870", 2)
    m.group(11)
    s = m.sender(99)
    m.receiver("r", 2, 11)
    first = s.rtp(m.payload(), 0x80, long=True)[0]
    second = s.rtp(m.payload(), 0x80)[0]
    assert m.fwd.forward(first).drop is None
    assert m.fwd.forward(second).drop is None
    snap = m.fwd.state_snapshot()
    bad_tag = bytearray(s.rtp(m.payload(), 0x80)[0])
    bad_tag[-3] ^= 1
    for packet, reason in [
        (first, "replay"),
        (second, "replay"),
        (bytes(bad_tag), "auth"),
        (second[:13], "malformed"),
        (second[:8] + b"\x00\x00\x00\x01" + second[12:], "unknown_ssrc"),
    ]:
        assert m.fwd.forward(packet).drop == reason
        assert m.fwd.state_snapshot() == snap


def test_replay_window_edge(make_forwarder):
    m = Meeting(make_forwarder, "ctms", 1)
    m.group(3)
    s = m.sender(5, seq=0)
    m.receiver("r", 2, 3)
    packets = [s.rtp(b"p", 0x80, long=i == 0)[0] for i in range(1100)]
    assert m.fwd.forward(packets[0]).drop is None  # long trailer: commits the key
    assert m.fwd.forward(packets[1099]).drop is None  # highest = 1099
    assert m.fwd.forward(packets[75]).drop == "replay"  # 1099 - 1024: just out of the window
    assert m.fwd.forward(packets[76]).drop is None  # 1099 - 1023: still inside
    assert m.fwd.forward(packets[76]).drop == "replay"


def test_srtcp_forwarded_byte_for_byte_and_replay(make_forwarder):
    m = Meeting(make_forwarder, "ctms", 2, AES_CM_128_HMAC_SHA1_32)
    m.group(6)
    s = m.sender(0x5150)
    m.receiver("a", 1, 6)
    m.receiver("b", 3, 6)
    sdes = s.rtcp(sdes_packet(0x5150))
    v = m.fwd.forward(sdes)
    assert v.drop is None and v.rtcp and v.tail is None
    assert v.by_receiver() == {"a": sdes, "b": sdes}
    plain = m.oracle().unprotect(sdes, 0x5150, s.master_key, m.salt, m.profile, rtcp=True)
    assert plain == sdes_packet(0x5150)
    assert m.fwd.forward(sdes).drop == "replay"
    short = s.rtcp(sdes_packet(0x5150), long=False)
    assert m.fwd.forward(short).drop is None
    # a key first learnt on SRTCP lets short RTP through
    assert m.fwd.forward(s.rtp(m.payload(), 0x80)[0]).drop is None


def test_srtcp_short_trailer_without_key_is_no_key(make_forwarder):
    m = Meeting(make_forwarder)
    m.group(6)
    s = m.sender(1)
    m.receiver("a", 1, 6)
    assert m.fwd.forward(s.rtcp(sdes_packet(1), long=False)).drop == "no_key"


def test_rfc8870_field_checks(make_forwarder):
    m = Meeting(make_forwarder, "rfc8870", 2)
    g = m.group(12)
    s = m.sender(0x77)
    m.receiver("r", 2, 12)
    packet = s.rtp(m.payload(), 0x80, long=True)[0]
    body = packet[:-47]
    wrong_ssrc = rfc8870_wrap(g.kek, Rfc8870Plaintext(s.master_key, 0x78, 0))
    assert m.fwd.forward(body + Rfc8870Full(wrong_ssrc, 12, 0).encode()).drop == "unwrap"
    short_key = rfc8870_wrap(g.kek, Rfc8870Plaintext(s.master_key[:15], 0x77, 0))
    assert m.fwd.forward(body + Rfc8870Full(short_key, 12, 0).encode()).drop == "malformed"
    bad_len = bytearray(packet)
    bad_len[-2] += 1
    assert m.fwd.forward(bytes(bad_len)).drop == "malformed"
    assert m.fwd.forward(body + b"\x01").drop == "malformed"  # unknown message type
    assert m.fwd.forward(body[:-1] + Rfc8870Full(wrong_ssrc, 13, 0).encode()).drop == (
        "unknown_spi"
    )
    assert m.fwd.forward(packet).drop is None


def test_malformed_framing(make_forwarder):
    m = Meeting(make_forwarder)
    m.group(1)
    s = m.sender(0x42)
    m.receiver("r", 2, 1)
    good = s.rtp(m.payload(), 0x80, long=True)[0]
    cases = {
        "short header": good[:11],
        "version 1": bytes([0x41]) + good[1:],
        "CC = 0": bytes([0x80]) + good[1:12] + good[16:],
        "CC = 15": bytes([0x8F]) + good[1:40],
        "extension past the end": bytes([0x91]) + good[1:16] + b"\xbe\xde\xff\xff" + good[16:],
        "no room for tail and tag": good[:17] + good[-32:],
    }
    for name, packet in cases.items():
        assert m.fwd.forward(packet).drop == "malformed", name
    assert m.fwd.forward(good).drop is None


def test_no_route_still_verifies_and_commits(make_forwarder):
    m = Meeting(make_forwarder)
    m.group(1)
    s = m.sender(3)
    v = m.fwd.forward(s.rtp(m.payload(), 0x33, long=True)[0])
    assert v.drop is None and v.tail == 0x33 and v.outputs == []
    assert m.fwd.forward(s.rtp(m.payload(), 0x33)[0]).drop is None


def test_csrc_source_position_is_kept(make_forwarder):
    m = Meeting(make_forwarder)
    m.group(1)
    s = m.sender(3, position=3)
    m.receiver("r", 2, 1)
    out = m.fwd.forward(s.rtp(m.payload(), 0x80, long=True)[0]).for_receiver("r")
    assert struct.unpack_from("!I", out, 12)[0] == 0x0302


def test_idr_gated_switch_opens_at_the_idr_and_closes_the_old_source(make_forwarder):
    from ctms_media.forward.verdict import Receiver

    m = Meeting(make_forwarder)
    m.group(1)
    old = m.sender(0xA, "video", seq=100)
    new = m.sender(0xB, "video", seq=500)
    m.fwd.set_route(0xA, [Receiver("r", 2, 1), Receiver("other", 2, 1)])
    m.fwd.set_route(0xB, [Receiver("r", 2, 1, gated=True)])
    v = m.fwd.forward(new.rtp(m.payload(), 0x40, long=True)[0])  # frame start, no IDR
    assert v.drop is None and v.outputs == [] and v.switched == ()
    assert set(m.fwd.forward(old.rtp(m.payload(), 0xC0, long=True)[0]).by_receiver()) == {
        "r",
        "other",
    }  # the old source flows until the switch
    v = m.fwd.forward(new.rtp(m.payload(), 0xC0)[0])  # IDR start
    assert v.switched == ("r",)
    out = v.for_receiver("r")
    assert out is not None and len(out) > 40  # upgraded: the first packet carries the key
    assert set(m.fwd.forward(old.rtp(m.payload(), 0x40)[0]).by_receiver()) == {"other"}
    assert set(m.fwd.forward(new.rtp(m.payload(), 0x00)[0]).by_receiver()) == {"r"}


def _plain_rtp(ssrc: int, seq: int, payload: bytes, tail: int, source: int = 2) -> bytes:
    return struct.pack("!BBHIII", 0x81, 96, seq, 0, ssrc, source << 8) + payload + bytes([tail])


def test_non_secure_forwards_plain_rtp(make_forwarder):
    from ctms_media.forward.verdict import Receiver

    fwd = make_forwarder("ctms")
    fwd.set_modes(srtp=False, plain=True)
    fwd.add_stream(9, "audio", AES_CM_128_HMAC_SHA1_80)
    fwd.set_route(9, [Receiver("a", 1, 0), Receiver("b", 3, 0)])
    v = fwd.forward(_plain_rtp(9, 1, b"hello", 0x85))
    assert v.drop is None and v.tail == 0x85
    got = v.by_receiver()
    assert got["a"] == _plain_rtp(9, 1, b"hello", 0)[:-1][:15] + b"\x01" + b"hello"
    assert got["b"][15] == 3 and got["b"].endswith(b"hello")
    assert fwd.forward(_plain_rtp(10, 1, b"x", 0)).drop == "unknown_ssrc"
    assert fwd.forward(b"\x81\x60").drop == "malformed"
    rr = struct.pack("!BBHI", 0x80, 201, 1, 9)
    assert fwd.forward(rr).by_receiver() == {"a": rr, "b": rr}


def test_downgrade_window_takes_both_and_keeps_srtp_from_plain_rooms(make_forwarder):
    from ctms_media.forward.verdict import Receiver

    m = Meeting(make_forwarder)
    m.group(1)
    s = m.sender(0x55)
    m.fwd.set_route(0x55, [Receiver("secure", 2, 1), Receiver("plain", 2, 0)])
    v = m.fwd.forward(s.rtp(m.payload(), 0x80, long=True)[0])
    assert set(v.by_receiver()) == {"secure"}  # SRTP never goes to a plain-only room
    assert m.fwd.forward(_plain_rtp(0x55, 7, b"p", 0x80)).drop is not None
    m.fwd.set_modes(srtp=True, plain=True)
    in_flight = s.rtp(m.payload(), 0x80)[0]
    assert m.fwd.forward(in_flight).drop is None  # in-flight SRTP
    assert m.fwd.forward(in_flight).drop == "replay"  # certainly SRTP: never taken as plain
    v = m.fwd.forward(_plain_rtp(0x55, 7, b"p", 0x80))
    assert v.drop is None and set(v.by_receiver()) == {"secure", "plain"}
    m.fwd.set_modes(srtp=False, plain=True)
    v = m.fwd.forward(s.rtp(m.payload(), 0x80)[0])  # late SRTP now looks like plain RTP
    assert v.drop is None and v.tail != 0x80
