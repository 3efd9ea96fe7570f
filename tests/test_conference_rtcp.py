"""End-to-end RTCP in the conference engine: BYE and where feedback goes (sans-IO)."""

from __future__ import annotations

import struct

from ctms_media.conference import ConferenceConfig
from ctms_media.wire.control import (
    RTCP_PT_PSFB,
    RTCP_PT_RTPFB,
    encode_pli,
    rtcp_routing,
)

from .test_conference_support import Sim, aud, endpoint, vid

A, B, S, T = 100, 200, 400, 500


def mixed() -> Sim:
    s = Sim(ConferenceConfig("c", "secure", "segment"))
    s.join(endpoint("A", A))
    s.join(endpoint("B", B))
    s.join(endpoint("S", S, segments=1))
    s.join(endpoint("T", T, segments=1))
    return s


def test_bye_on_video_moves_the_displays_to_the_next_source_at_its_idr():
    s = mixed()
    s.talk({aud(S, 2): 10}, 1.0)
    assert s.shown("T") == {2: ("S", 2)}
    assert ("S", 2) in s.shown("A").values()
    s.conf.on_bye(vid(S, 2), s.now)
    s.drain()
    s.talk({aud(S, 2): 10}, 0.2)  # S still talks, but its camera has stopped
    assert s.shown("T")[2][0] != "S"
    assert all(src[0] != "S" for src in s.shown("A").values())
    assert vid(S, 2) not in s.gated_sources()
    # Media from the camera again: a candidate once more, and S is still the loudest.
    s.idr(vid(S, 2))
    s.talk({aud(S, 2): 10}, 0.5)
    assert s.shown("T") == {2: ("S", 2)}


def test_bye_on_audio_leaves_the_speaker_set_at_once():
    s = mixed()
    s.talk({aud(S, 2): 10, aud(A, 1): 20, aud(B, 2): 30}, 1.0)
    assert s.conf.routes()[aud(S, 2)]  # heard by the others
    s.conf.on_bye(aud(S, 2), s.now)
    s.drain()
    assert s.conf.routes()[aud(S, 2)] == ()
    assert s.conf.speakers()[0] != "S"
    s.conf.on_bye(aud(S, 2), s.now)  # a repeated BYE changes nothing
    assert s.conf.routes()[aud(S, 2)] == ()


def test_bye_for_an_unknown_ssrc_is_ignored():
    s = mixed()
    version = s.conf.routes_version
    s.conf.on_bye(0xDEAD, s.now)
    assert s.conf.routes_version == version


def test_feedback_goes_to_the_rooms_the_sender_receives_from():
    s = mixed()
    s.talk({aud(S, 2): 10, aud(A, 1): 20}, 1.0)
    assert s.shown("T") == {2: ("S", 2)}
    # PLI/FIR (payload-specific): the rooms whose video T gets.
    assert s.conf.feedback_targets("T", video_only=True) == ("S",)
    # NACK (transport): audio sources too.
    heard = {s.who(ssrc)[0] for ssrc, rs in s.conf.routes().items() if any(r.id == "T" for r in rs)}
    assert set(s.conf.feedback_targets("T")) == heard - {"T"}
    assert "A" in heard
    # A readable media SSRC names the source: its owner only.
    assert s.conf.feedback_targets("T", vid(B, 3), video_only=True) == ("B",)
    # Its own SSRC or an unknown one: back to the routes.
    assert s.conf.feedback_targets("T", vid(T, 2), video_only=True) == ("S",)
    assert s.conf.feedback_targets("T", 0xDEAD, video_only=True) == ("S",)
    assert s.conf.feedback_targets("nobody") == ()


# -- the wire side: what the relay can read without decrypting ---------------------------------


def _rr(ssrc: int) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


def _bye(ssrc: int) -> bytes:
    return struct.pack("!BBHI", 0x81, 203, 1, ssrc)


def _nack(sender: int, media: int) -> bytes:
    return struct.pack("!BBHIIHH", 0x81, 205, 3, sender, media, 7, 0)


def test_rtcp_routing_of_encrypted_packets_reads_the_first_header_only():
    pli = encode_pli(1, 2)
    assert rtcp_routing(pli + b"\x00" * 14, encrypted=True).feedback == RTCP_PT_PSFB
    assert rtcp_routing(pli, encrypted=True).media_ssrc is None  # ciphertext there
    assert rtcp_routing(_nack(1, 2), encrypted=True).feedback == RTCP_PT_RTPFB
    assert rtcp_routing(_bye(1), encrypted=True).bye
    compound = _rr(1) + _bye(1)  # BYE behind ciphertext: not visible
    assert rtcp_routing(compound, encrypted=True) == rtcp_routing(_rr(1), encrypted=True)
    assert rtcp_routing(b"\x80\xce", encrypted=True).feedback is None


def test_rtcp_routing_of_plain_packets_walks_the_compound():
    r = rtcp_routing(_rr(1) + encode_pli(1, 0x4242), encrypted=False)
    assert (r.feedback, r.media_ssrc, r.bye) == (RTCP_PT_PSFB, 0x4242, False)
    r = rtcp_routing(_rr(1) + _nack(1, 9) + _bye(1), encrypted=False)
    assert (r.feedback, r.media_ssrc, r.bye) == (RTCP_PT_RTPFB, 9, True)
    # A header running past the end stops the walk: nothing behind it is believed.
    broken = _rr(1)[:2] + b"\x00\x09" + _rr(1)[4:] + _bye(1)
    assert not rtcp_routing(broken, encrypted=False).bye
