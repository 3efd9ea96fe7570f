"""Who sees whom where: CSRC mapping, segment and room switching, IDR gating (wire.md §4, §10).

Every step of every scenario also runs ``Sim.check_invariants``: no room gets its own
streams, no stream reaches a room twice, one source per display, the GET snapshot matches
the routes.
"""

from __future__ import annotations

import random

import pytest

from ctms_media.conference import ConferenceConfig, SendFir, SendPli
from ctms_media.conference.video import (
    Candidate,
    assign_displays,
    audio_destination,
    video_destinations,
)
from ctms_media.forward.verdict import Receiver

from .test_conference_support import STEP, Sim, aud, endpoint, vid

A, B, C, S, T = 100, 200, 300, 400, 500  # SSRC bases


def sim(switching: str = "segment", **kwargs) -> Sim:
    return Sim(ConferenceConfig("c", "secure", switching, **kwargs))


def mixed(switching: str = "segment") -> Sim:
    """Two 3-screen rooms A, B and two 1-screen rooms S, T, in that join order."""
    s = sim(switching)
    s.join(endpoint("A", A))
    s.join(endpoint("B", B))
    s.join(endpoint("S", S, segments=1))
    s.join(endpoint("T", T, segments=1))
    return s


# -- the CSRC mapping table --------------------------------------------------------------------

MAPPING = [
    # source segments, source position, receiver segments, audio dest, video dest(s) (segment)
    (3, 1, 3, 1, (1,)),
    (3, 2, 3, 2, (2,)),
    (3, 3, 3, 3, (3,)),
    (3, 4, 3, 4, (4,)),
    (3, 1, 1, 2, (2,)),
    (3, 2, 1, 2, (2,)),
    (3, 3, 1, 2, (2,)),  # the 3-screen room's right camera on a 1-screen room: 2
    (3, 4, 1, 2, (4,)),
    (1, 2, 3, 2, (1, 2, 3)),
    (1, 4, 3, 4, (4,)),
    (1, 2, 1, 2, (2,)),
    (1, 4, 1, 2, (4,)),
]


@pytest.mark.parametrize(("src_seg", "pos", "rcv_seg", "audio", "video"), MAPPING)
def test_csrc_mapping_table(src_seg, pos, rcv_seg, audio, video):
    assert audio_destination(pos, rcv_seg) == audio
    assert video_destinations(src_seg, pos, rcv_seg, "segment") == video
    room = video_destinations(src_seg, pos, rcv_seg, "room")
    assert room == ((2,) if video == (1, 2, 3) else video)


@pytest.mark.parametrize("switching", ["segment", "room"])
@pytest.mark.parametrize(("src_seg", "pos", "rcv_seg", "audio", "video"), MAPPING)
def test_csrc_mapping_in_a_conference(switching, src_seg, pos, rcv_seg, audio, video):
    s = sim(switching)
    s.join(endpoint("X", A, segments=src_seg, aux=True))
    s.join(endpoint("R", B, segments=rcv_seg))
    s.talk({aud(A, pos): 10}, 0.4)
    routes = s.conf.routes()
    assert Receiver("R", audio, s.conf.endpoint_spi("R")) in routes[aud(A, pos)]
    (got,) = [r.position for r in routes[vid(A, pos)] if r.id == "R"]
    assert got == (2 if src_seg == 1 and pos == 2 else video[0])
    assert s.shown("R")[got] == ("X", pos)


def test_assign_displays_never_shows_a_source_twice_and_keeps_what_it_can():
    any3 = (1, 2, 3)
    ones = [Candidate(s, any3, 2) for s in (10, 11, 12, 13)]
    got = assign_displays(any3, ones)
    assert got == {1: 11, 2: 10, 3: 12}  # the most wanted in the center, then left, right
    # a 3-screen segment that can only go to 2 takes it; 11 stays where it was shown
    fixed = Candidate(20, (2,), 2)
    got = assign_displays(any3, [fixed, ones[0], ones[1]], keep={1: [11], 2: [10], 3: [12]})
    assert got == {1: 11, 2: 20, 3: 10}
    assert assign_displays(any3, [Candidate(30, (3,), 3)]) == {1: None, 2: None, 3: 30}
    assert assign_displays((2,), [Candidate(40, (2,), 2), Candidate(41, (2,), 2)]) == {2: 40}


# -- segment switching -------------------------------------------------------------------------


def test_segment_mode_three_screen_rooms():
    s = sim()
    for eid, base in (("A", A), ("B", B), ("C", C)):
        s.join(endpoint(eid, base))
    s.talk({}, 0.1)  # the first IDRs open the displays
    # Nobody has spoken: each display shows the earliest joined other room's segment there.
    assert s.shown("A") == {1: ("B", 1), 2: ("B", 2), 3: ("B", 3)}
    assert s.shown("B") == {1: ("A", 1), 2: ("A", 2), 3: ("A", 3)}
    s.talk({aud(C, 1): 10}, 0.5)
    assert s.shown("A") == {1: ("C", 1), 2: ("B", 2), 3: ("B", 3)}
    assert s.shown("B") == {1: ("C", 1), 2: ("A", 2), 3: ("A", 3)}
    assert s.shown("C") == {1: ("A", 1), 2: ("A", 2), 3: ("A", 3)}
    s.talk({aud(B, 1): 10}, 1.0)
    assert s.shown("A")[1] == ("B", 1)
    assert s.shown("C")[1] == ("B", 1)
    assert s.shown("B")[1] == ("C", 1)  # the most recent speaker at 1 other than itself
    s.talk({aud(A, 3): 10}, 1.0)
    assert s.shown("B") == {1: ("C", 1), 2: ("A", 2), 3: ("A", 3)}
    assert s.shown("C") == {1: ("B", 1), 2: ("A", 2), 3: ("A", 3)}
    assert s.shown("A") == {1: ("B", 1), 2: ("B", 2), 3: ("B", 3)}


def test_one_screen_room_is_a_candidate_for_every_position():
    s = mixed()
    for pos in (1, 3, 2):  # B's segments speak in turn, B2 last
        s.talk({aud(B, pos): 10}, 1.0)
    assert s.shown("A") == {1: ("B", 1), 2: ("B", 2), 3: ("B", 3)}
    s.talk({aud(S, 2): 10}, 1.0)
    # S displaces the least recently active segment, B1, on its display
    assert s.shown("A") == {1: ("S", 2), 2: ("B", 2), 3: ("B", 3)}
    s.talk({aud(T, 2): 10}, 1.0)
    # Most recent first: T, S, B2 (B3 goes). S stays on its display, B2 can only be at 2,
    # so T takes B3's place.
    assert s.shown("A") == {1: ("S", 2), 2: ("B", 2), 3: ("T", 2)}
    # 1-screen receivers show the most recent speaker anywhere else, at 2
    assert s.shown("S") == {2: ("T", 2)}
    assert s.shown("T") == {2: ("S", 2)}
    s.talk({aud(A, 3): 10}, 1.0)
    assert s.shown("S") == {2: ("A", 3)} and s.shown("T") == {2: ("A", 3)}


def test_a_shown_source_moves_displays_without_an_idr():
    s = mixed()
    for pos in (1, 3):
        s.talk({aud(B, pos): 10}, 1.0)
    s.talk({aud(S, 2): 10}, 1.0)
    assert s.shown("A") == {1: ("B", 1), 2: ("S", 2), 3: ("B", 3)}
    s.clear()
    # B2 speaks: it can only go to display 2, so S moves to 1 and B1 (least recent) goes.
    s.talk({aud(B, 2): 10}, 1.0, idr=False)
    assert s.forwarded_video("A") == {1: vid(S, 2), 3: vid(B, 3)}  # S moved at once
    assert s.of(SendPli) == [SendPli("B", vid(B, 2))]
    assert Receiver("A", 2, s.conf.endpoint_spi("A"), gated=True) in s.conf.routes()[vid(B, 2)]
    s.idr(vid(B, 2))
    assert s.shown("A") == {1: ("S", 2), 2: ("B", 2), 3: ("B", 3)}


def test_display_with_no_candidate_shows_nothing():
    s = sim()
    s.join(endpoint("A", A))
    s.join(endpoint("S", S, segments=1))
    s.talk({aud(A, 1): 10}, 0.5)
    assert s.shown("A") == {2: ("S", 2)}
    assert s.conf.snapshot({})["displays"]["A"] == {"2": {"endpoint": "S", "position": 2}}
    assert s.shown("S") == {2: ("A", 1)}
    s.conf.remove_endpoint("S", s.now)
    s.drain()
    assert s.shown("A") == {}  # the source left: the display empties at once


def test_aux_video_goes_to_the_aux_display():
    s = sim()
    s.join(endpoint("A", A, aux=True))
    s.join(endpoint("S", S, segments=1, aux=True))
    s.join(endpoint("R", C))
    s.talk({aud(S, 4): 10}, 0.5)
    assert s.shown("R")[4] == ("S", 4)
    assert s.shown("A")[4] == ("S", 4)
    assert s.shown("S")[4] == ("A", 4)
    s.talk({aud(A, 4): 10}, 1.0)
    assert s.shown("R")[4] == ("A", 4)


# -- room switching ----------------------------------------------------------------------------


def test_room_mode():
    s = sim("room")
    s.join(endpoint("A", A))
    s.join(endpoint("B", B))
    s.join(endpoint("S", S, segments=1))
    s.talk({}, 0.1)
    assert s.shown("A") == {1: ("B", 1), 2: ("B", 2), 3: ("B", 3)}
    assert s.shown("S") == {2: ("A", 2)}
    s.talk({aud(B, 3): 10}, 0.5)
    assert s.shown("A") == {1: ("B", 1), 2: ("B", 2), 3: ("B", 3)}
    assert s.shown("S") == {2: ("B", 3)}  # a 1-screen room sees the active segment
    assert s.shown("B") == {1: ("A", 1), 2: ("A", 2), 3: ("A", 3)}
    s.talk({aud(A, 1): 10}, 1.0)
    assert s.shown("B") == {1: ("A", 1), 2: ("A", 2), 3: ("A", 3)}
    assert s.shown("S") == {2: ("A", 1)}
    assert s.shown("A") == {1: ("B", 1), 2: ("B", 2), 3: ("B", 3)}  # keeps the previous
    s.talk({aud(S, 2): 10}, 1.0)
    assert s.shown("A") == {2: ("S", 2)}  # a 1-screen room lands in the center
    assert s.shown("B") == {2: ("S", 2)}
    assert s.shown("S") == {2: ("A", 1)}  # the loudest room keeps the previous one
    s.talk({aud(B, 2): 10}, 1.0)
    assert s.shown("S") == {2: ("B", 2)}
    assert s.shown("B") == {2: ("S", 2)}


# -- IDR gating, PLI, FIR ----------------------------------------------------------------------


def settle_then_switch(s: Sim) -> float:
    """A speaks, then B1 takes over without answering PLIs; returns the decision time."""
    s.talk({aud(A, 2): 10}, 1.0)
    s.clear()
    while not s.of(SendPli):
        s.talk({aud(B, 1): 10}, STEP, idr=False)
        assert s.now < 10
    return s.now - STEP


def test_switch_is_gated_with_pli_then_fir_after_1_s():
    s = sim()
    for eid, base in (("A", A), ("B", B), ("C", C)):
        s.join(endpoint(eid, base))
    s.talk({aud(C, 1): 10}, 0.5)
    t0 = settle_then_switch(s)
    assert s.of(SendPli) == [SendPli("B", vid(B, 1))]  # one PLI for A's and C's display 1
    route = s.conf.routes()[vid(B, 1)]
    assert {(r.id, r.position, r.gated) for r in route} == {("A", 1, True), ("C", 1, True)}
    assert s.forwarded_video("C")[1] == vid(A, 1)  # the old source flows until the IDR
    assert s.forwarded_video("A")[1] == vid(C, 1)
    assert s.shown("C")[1] == ("A", 1)
    s.talk({aud(B, 1): 10}, 2.5, idr=False)
    firs = [(round(t - t0, 2), a) for t, a in s.actions if isinstance(a, SendFir)]
    assert firs == [(1.0, SendFir("B", vid(B, 1), 0)), (2.0, SendFir("B", vid(B, 1), 0))]
    assert s.idr(vid(B, 1)) == ("A", "C")
    assert s.shown("C")[1] == ("B", 1) and s.forwarded_video("C")[1] == vid(B, 1)
    assert s.conf.switches_completed >= 2
    s.clear()
    s.talk({aud(B, 1): 10}, 2.0, idr=False)
    assert s.of(SendFir) == [] and s.of(SendPli) == []
    # the next request for the same source gets the next FIR sequence number
    s.talk({aud(A, 1): 10}, 1.0)
    s.clear()
    s.talk({aud(B, 1): 10}, 2.0, idr=False)
    assert [a.seq for a in s.of(SendFir)] == [1]


def test_no_fir_when_the_idr_comes_in_time():
    s = sim()
    for eid, base in (("A", A), ("B", B), ("C", C)):
        s.join(endpoint(eid, base))
    s.talk({aud(C, 1): 10}, 0.5)
    settle_then_switch(s)
    s.talk({aud(B, 1): 10}, 0.5, idr=False)
    s.idr(vid(B, 1))
    s.talk({aud(B, 1): 10}, 2.0, idr=False)
    assert s.of(SendFir) == []
    assert s.shown("A")[1] == ("B", 1)


def test_idr_seen_in_tails_without_a_switch_restarts_the_fir_clock():
    s = sim()
    for eid, base in (("A", A), ("B", B), ("C", C)):
        s.join(endpoint(eid, base))
    s.talk({aud(C, 1): 10}, 0.5)
    t0 = settle_then_switch(s)
    s.talk({aud(B, 1): 10}, 0.6, idr=False)
    s.conf.on_tails([(vid(B, 1), 0xC0)], s.now)  # an IDR the forwarder did not gate on
    t_idr = s.now
    s.talk({aud(B, 1): 10}, 1.5, idr=False)
    firs = [round(t - t_idr, 2) for t, a in s.actions if isinstance(a, SendFir)]
    assert firs == [1.0] and t_idr - t0 > 0.5


def test_a_late_switch_to_a_source_no_longer_wanted_is_reported_truthfully():
    s = sim()
    for eid, base in (("A", A), ("B", B), ("C", C)):
        s.join(endpoint(eid, base))
    s.talk({aud(C, 1): 10}, 0.5)
    settle_then_switch(s)  # C's display 1: A1 shown, B1 gated
    stale = dict(s.fwd_routes)
    s.talk({aud(A, 1): 10}, 1.0, idr=False)  # C's display 1 now wants A1 again
    assert not any(r.gated for r in s.conf.routes()[vid(B, 1)] if r.id == "C")
    s.fwd_routes, s.fwd_version = stale, s.conf.routes_version  # the forwarder lagged
    s.idr(vid(B, 1))  # and opened the old gate
    assert s.shown("C")[1] == ("B", 1)  # what the room really gets
    assert Receiver("C", 1, s.conf.endpoint_spi("C"), gated=True) in s.conf.routes()[vid(A, 1)]


# -- flapping ----------------------------------------------------------------------------------


def test_no_flapping_between_near_equal_speakers():
    s = mixed()
    s.talk({aud(A, 2): 30, aud(B, 2): 30}, 1.0)
    switches, version = s.conf.switches, s.conf.routes_version
    for i in range(250):  # 5 s, the louder of the two alternating every packet
        lv = {aud(A, 2): 29, aud(B, 2): 31} if i % 2 else {aud(A, 2): 31, aud(B, 2): 29}
        s.talk(lv, STEP)
    for i in range(25):  # 5 s of 200 ms turns with a 20 dB difference: never 300 ms ahead
        lv = {aud(A, 2): 20, aud(B, 2): 40} if i % 2 else {aud(A, 2): 40, aud(B, 2): 20}
        s.talk(lv, 0.2)
    assert s.conf.switches == switches and s.conf.routes_version == version
    before = s.shown("S")[2]
    s.talk({aud(B, 2): 20} if before[0] == "A" else {aud(A, 2): 20}, 1.0)
    assert s.conf.switches > switches and s.shown("S")[2] != before


# -- a soak over random meetings ---------------------------------------------------------------


@pytest.mark.parametrize("switching", ["segment", "room"])
def test_random_meetings_keep_the_invariants(switching):
    rng = random.Random(11)
    s = sim(switching, audio_streams=2)
    rooms = [("A", A, 3), ("B", B, 3), ("S", S, 1), ("T", T, 1), ("C", C, 3)]
    for eid, base, seg in rooms[:4]:
        s.join(endpoint(eid, base, segments=seg, aux=eid in "AS"))
    audio = [ssrc for ssrc, (_, st) in s.conf.streams().items() if st.kind == "audio"]
    for turn in range(40):
        talkers = rng.sample(audio, rng.randint(0, 3))
        levels = {t: rng.randint(5, 60) for t in talkers}
        s.talk(levels, rng.choice([0.1, 0.3, 0.6]), idr=rng.random() < 0.7)
        if turn == 15:
            s.join(endpoint("C", C))
            audio += [aud(C, p) for p in (1, 2, 3)]
        if turn == 25:
            s.conf.remove_endpoint("B", s.now)
            s.drain()
            audio = [a for a in audio if a // 100 != 2]
    for rid in s.conf.endpoint_ids():
        assert rid not in {e for e, _ in s.shown(rid).values()}
        assert all(s.conf.streams()[a][0] != rid for a in s.hears(rid))
