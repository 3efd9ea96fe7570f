"""Who is heard (wire.md §10, audio): the N loudest streams, hysteresis, positions."""

from __future__ import annotations

import pytest

from ctms_media.conference import ConferenceConfig
from ctms_media.conference.audio import LEAD_TIME, SpeakerTracker, tail_loudness

from .test_conference_support import STEP, Sim, aud, endpoint

A, B, C = 100, 200, 300


def meeting(n: int = 3) -> Sim:
    s = Sim(ConferenceConfig("c", "secure", "segment", audio_streams=n))
    s.join(endpoint("A", A))
    s.join(endpoint("B", B))
    s.join(endpoint("C", C, segments=1))
    return s


def test_tail_loudness():
    assert tail_loudness(0x80) == 127  # voice at 0 dBov
    assert tail_loudness(0x80 | 127) == 0
    assert tail_loudness(0x00) == 0  # no voice bit: silence, whatever the level says
    assert tail_loudness(0x80 | 40) == 87


def test_top_n_counts_streams_not_rooms():
    s = meeting(3)
    s.talk({aud(A, 1): 10, aud(A, 2): 12, aud(A, 3): 14, aud(B, 2): 30}, 1.0)
    routed = {ssrc for ssrc, rs in s.conf.routes().items() if rs and ssrc % 100 < 10}
    assert routed == {aud(A, 1), aud(A, 2), aud(A, 3)}  # all three of A's, none of B's
    assert s.hears("A") == {}  # a room never hears itself
    assert s.hears("B") == {aud(A, 1): 1, aud(A, 2): 2, aud(A, 3): 3}
    assert s.hears("C") == {aud(A, 1): 2, aud(A, 2): 2, aud(A, 3): 2}  # one speaker
    assert s.conf.snapshot({})["speakers"] == ["A"]


def test_audio_positions_and_speakers_order():
    s = meeting(2)
    s.talk({aud(C, 2): 10, aud(B, 3): 20}, 1.0)
    assert s.hears("A") == {aud(C, 2): 2, aud(B, 3): 3}
    assert s.hears("B") == {aud(C, 2): 2}
    assert s.hears("C") == {aud(B, 3): 2}
    assert s.conf.snapshot({})["speakers"] == ["C", "B"]


def test_packets_without_the_voice_bit_are_silence():
    s = meeting(3)
    loud_but_no_voice = [(aud(B, 1), 0x00)]
    for _ in range(50):
        s.step(loud_but_no_voice)
    assert s.conf.speakers() == [] and not s.conf.routes()[aud(B, 1)]


def test_an_empty_slot_is_taken_at_once_a_full_set_needs_a_300_ms_lead():
    s = meeting(2)
    s.step(s.audio_tails({aud(A, 1): 30}))
    assert s.conf.routes()[aud(A, 1)]  # the first words are heard
    s.talk({aud(A, 1): 30, aud(B, 1): 30}, 1.0)
    assert set(s.conf._speakers.members) == {aud(A, 1), aud(B, 1)}
    # C starts, louder than both: it must lead the weaker member for 300 ms first.
    tracker = s.conf._speakers
    led_since = None
    while aud(C, 2) not in tracker.members:
        t = s.now
        s.step(s.audio_tails({aud(A, 1): 30, aud(B, 1): 32, aud(C, 2): 5}))
        if led_since is None and tracker.loudness(aud(C, 2), t) > tracker.loudness(aud(B, 1), t):
            led_since = t
        assert s.now < 5
    joined = s.now - STEP
    assert led_since is not None
    assert joined - led_since == pytest.approx(LEAD_TIME)
    assert set(tracker.members) == {aud(A, 1), aud(C, 2)}  # B1 was the weakest
    assert not s.conf.routes()[aud(B, 1)]


def test_a_leavers_slot_refills_at_once():
    s = meeting(2)
    s.talk({aud(A, 1): 10, aud(B, 1): 12, aud(C, 2): 20}, 1.0)
    assert set(s.conf._speakers.members) == {aud(A, 1), aud(B, 1)}
    s.conf.remove_endpoint("A", s.now)
    s.drain()
    s.step(s.audio_tails({aud(B, 1): 12, aud(C, 2): 20}))
    assert set(s.conf._speakers.members) == {aud(B, 1), aud(C, 2)}


def test_tracker_ignores_batching():
    """The same packets give the same levels whether reported one by one or in batches."""
    one, many = SpeakerTracker(3), SpeakerTracker(3)
    for t in (one, many):
        t.add_stream(1)
    tails = [0x80 | (10 + i % 7) for i in range(50)]
    for i, tail in enumerate(tails):
        one.sample(1, tail, i * STEP)
    for i, tail in enumerate(tails):
        many.sample(1, tail, (i // 3) * 3 * STEP)  # three packets per batch
    now = 49 * STEP
    assert abs(one.loudness(1, now) - many.loudness(1, now)) < 1e-9
