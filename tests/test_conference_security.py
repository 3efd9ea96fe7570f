"""Security policy, group keys, GSP timers, rekey on leave and timeouts (wire.md §8–§10)."""

from __future__ import annotations

import logging

import pytest

from ctms_media.conference import (
    ConferenceConfig,
    GroupsChanged,
    RemoveEndpoint,
    SecurityMismatch,
    SendDowngrade,
    SendGsp,
)
from ctms_media.errors import CtmsError

from .test_conference_support import Sim, aud, endpoint, groups_changed, vid

LOGGER = "ctms_media.conference"


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def secure_sim(**kwargs) -> Sim:
    return Sim(ConferenceConfig("conf-1", "secure", "segment", **kwargs))


# -- security policy paths ---------------------------------------------------------------------


def test_non_secure_endpoint_in_secure_conference_is_refused(caplog):
    sim = secure_sim()
    sim.join(endpoint("A", 100))
    caplog.set_level(logging.INFO, LOGGER)
    with pytest.raises(SecurityMismatch, match=r"^security mismatch$") as info:
        sim.conf.add_endpoint(endpoint("13105", 200, secure=False), sim.now)
    assert isinstance(info.value, CtmsError)
    assert (
        "Call in state=Connected, call id=13105, conference id = conf-1 received error from "
        "Confmgr with error='security mismatch' during verification of security policy. "
        "Num=13105"
    ) in lines(caplog)
    assert sim.conf.endpoint_ids() == ["A"]
    assert sim.conf.pop_actions() == []


def test_best_effort_started_by_a_non_secure_endpoint(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    sim = Sim(ConferenceConfig("be-9", "best-effort", "segment"))
    sim.join(endpoint("A", 100, secure=False))
    assert "Conf Id be-9: will start as non-secure" in lines(caplog)
    snap = sim.conf.snapshot({})
    assert snap["security"] == "non-secure" and snap["spi"] is None
    # A secure endpoint joining later completes DTLS and gets DOWNGRADE, never GSP.
    sim.conf.add_endpoint(endpoint("B", 200), sim.now)
    assert sim.conf.endpoint_state("B") == "handshaking"
    sim.conf.endpoint_handshake_done("B", sim.now)
    sim.drain()
    sim.idle(0.3)
    assert sim.of(SendGsp) == []
    assert sim.of(SendDowngrade) == [SendDowngrade("B")]  # the server repeats it 3 times
    assert sim.conf.endpoint_state("B") == "active"
    assert sim.conf.groups() == ()
    assert all(r.spi == 0 for rs in sim.conf.routes().values() for r in rs)


def test_best_effort_downgrade_when_a_non_secure_endpoint_joins(caplog):
    sim = Sim(ConferenceConfig("be-2", "best-effort", "segment"))
    sim.join(endpoint("A", 100))
    sim.join(endpoint("B", 200))
    sim.conf.add_endpoint(endpoint("C", 300), sim.now)  # secure, still handshaking
    sim.drain()
    assert sim.conf.snapshot({})["security"] == "best-effort"
    assert sim.conf.snapshot({})["spi"] == sim.conf.current_group.spi
    sim.clear()
    caplog.set_level(logging.INFO, LOGGER)
    sim.join(endpoint("D", 400, secure=False))
    assert (
        "Conference Manager Conf Id be-2: will downgrade security from secure to non-secure. "
        "All existing endpoints will be downgraded to non-secure."
    ) in lines(caplog)
    sim.idle(0.3)
    assert sim.of(SendDowngrade) == [SendDowngrade("A"), SendDowngrade("B")]
    assert sim.of(SendGsp) == []  # and no GSP resend to A or B after it
    assert groups_changed(sim.of(GroupsChanged)) >= 1 and sim.conf.groups() == ()
    snap = sim.conf.snapshot({})
    assert snap["security"] == "non-secure" and snap["spi"] is None
    assert sim.conf.downgraded_at == pytest.approx(0.0)
    # C was still in DTLS: it is told once its handshake completes.
    sim.conf.endpoint_handshake_done("C", sim.now)
    assert [a for a in sim.drain() if isinstance(a, SendDowngrade)] == [SendDowngrade("C")]
    assert {e["id"]: e["state"] for e in sim.conf.snapshot({})["endpoints"]} == {
        "A": "active",
        "B": "active",
        "C": "active",
        "D": "active",
    }
    assert all(r.spi == 0 for rs in sim.conf.routes().values() for r in rs)


def test_secure_endpoint_in_non_secure_conference_is_downgraded():
    sim = Sim(ConferenceConfig("ns", "non-secure", "segment"))
    sim.join(endpoint("A", 100))
    assert sim.of(SendGsp) == [] and sim.of(SendDowngrade) == [SendDowngrade("A")]
    assert sim.conf.snapshot({})["security"] == "non-secure" == sim.conf.security


def test_endpoint_states():
    sim = secure_sim()
    sim.conf.add_endpoint(endpoint("A", 100), 0.0)
    assert sim.conf.endpoint_state("A") == "handshaking"
    sim.conf.endpoint_handshake_done("A", 0.0)
    gsp = sim.drain()[0]
    assert isinstance(gsp, SendGsp) and sim.conf.endpoint_state("A") == "keying"
    assert gsp.group == sim.conf.current_group
    sim.conf.gsp_ack("A", gsp.group.spi + 1, 0.0)  # not the SPI sent: ignored
    assert sim.conf.endpoint_state("A") == "keying" and sim.conf.endpoint_spi("A") is None
    sim.conf.gsp_ack("A", gsp.group.spi, 0.0)
    assert sim.conf.endpoint_state("A") == "active"
    assert sim.conf.endpoint_spi("A") == gsp.group.spi


def test_non_secure_endpoint_is_active_once_latched():
    sim = Sim(ConferenceConfig("ns", "non-secure", "segment"))
    sim.conf.add_endpoint(endpoint("N", 200, secure=False), 0.0)
    assert sim.conf.endpoint_state("N") == "handshaking"
    sim.conf.endpoint_latched("N", 0.0)
    assert sim.conf.endpoint_state("N") == "active"


def test_security_property_is_the_running_mode():
    sim = Sim(ConferenceConfig("be", "best-effort", "segment"))
    assert sim.conf.security == "best-effort"  # no endpoint yet: the first one decides
    sim.join(endpoint("A", 100))
    assert sim.conf.security == "secure"
    assert sim.conf.snapshot({})["security"] == "best-effort"  # the configured value
    sim.join(endpoint("N", 200, secure=False), active=False)
    assert sim.conf.security == "non-secure" == sim.conf.snapshot({})["security"]


def test_media_from_a_non_secure_room_latches_it():
    sim = Sim(ConferenceConfig("ns", "non-secure", "segment"))
    sim.join(endpoint("N", 200, secure=False), active=False)
    sim.step([(aud(200, 1), 0x7F)])
    assert sim.conf.endpoint_state("N") == "active"


# -- GSP timers --------------------------------------------------------------------------------


def test_gsp_resent_every_500_ms_until_acked():
    sim = secure_sim()
    sim.conf.add_endpoint(endpoint("A", 100), 0.0)
    sim.conf.endpoint_handshake_done("A", 0.0)
    sim.drain()
    sim.idle(2.2)
    sent = [round(t, 3) for t, a in sim.actions if isinstance(a, SendGsp)]
    assert sent == [0.0, 0.5, 1.0, 1.5, 2.0]
    spi = sim.of(SendGsp)[0].group.spi
    sim.conf.gsp_ack("A", spi, sim.now)
    sim.clear()
    sim.idle(6.0)
    assert sim.of(SendGsp) == [] and sim.conf.endpoint_state("A") == "active"


def test_spimap_timeout_drops_the_call_at_5_s(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    sim = secure_sim()
    sim.join(endpoint("A", 100))
    sim.conf.add_endpoint(endpoint("B", 200), sim.now)
    sim.conf.endpoint_handshake_done("B", sim.now)
    sim.drain()
    sim.idle(4.98)
    assert sim.conf.endpoint_state("B") == "keying" and sim.of(RemoveEndpoint) == []
    sim.idle(0.04)
    sends = [round(t, 3) for t, a in sim.actions if isinstance(a, SendGsp) and a.endpoint_id == "B"]
    assert sends == [round(0.5 * i, 3) for i in range(10)]  # 0.0 .. 4.5, none at 5.0
    assert sim.of(RemoveEndpoint) == [RemoveEndpoint("B", "spimap-timeout")]
    assert "SPIMAP timeout, Dropping the call: conference id = conf-1, endpoint id = B" in lines(
        caplog
    )
    assert sim.conf.gsp_timeouts == 1 and sim.conf.endpoint_ids() == ["A"]
    assert all(s not in sim.conf.routes() for s in (aud(200, 1), vid(200, 2)))


# -- rekey on leave ----------------------------------------------------------------------------


def test_rekey_on_leave():
    sim = secure_sim(ekt_cipher=3)
    for eid, base in (("A", 100), ("B", 200), ("C", 300)):
        sim.join(endpoint(eid, base))
    sim.talk({aud(300, 2): 10}, 0.5)  # C speaks: A and B see and hear it
    old = sim.conf.current_group
    assert {sim.conf.endpoint_spi(e) for e in "ABC"} == {old.spi}
    assert any(r.id == "A" for r in sim.conf.routes()[aud(300, 2)])
    sim.clear()

    sim.conf.remove_endpoint("A", sim.now)
    sim.drain()
    new = sim.conf.current_group
    assert sim.conf.rekeys == 1
    assert new.spi != old.spi and new.kek != old.kek and len(new.kek) == 32
    assert (new.salt, new.profile, new.cipher) == (old.salt, old.profile, old.cipher)
    assert sorted(a.endpoint_id for a in sim.of(SendGsp)) == ["B", "C"]
    assert all(a.group == new for a in sim.of(SendGsp))
    assert {g.spi for g in sim.conf.groups()} == {old.spi, new.spi}
    assert sim.of(GroupsChanged)
    assert sim.conf.snapshot({})["spi"] == new.spi
    # The leaver is out of every route at once, as sender and as receiver.
    routes = sim.conf.routes()
    assert not any(s in routes for s in (aud(100, 1), vid(100, 3)))
    assert not any(r.id == "A" for rs in routes.values() for r in rs)

    # B ACKs: its Receiver entries carry the new SPI; C's stay on the old one.
    sim.conf.gsp_ack("B", new.spi, sim.now)
    sim.drain()
    spis = {r.id: r.spi for rs in sim.conf.routes().values() for r in rs}
    assert spis == {"B": new.spi, "C": old.spi}
    sim.conf.gsp_ack("C", new.spi, sim.now)
    sim.conf.rekey_done("B", new.spi, sim.now)
    sim.drain()
    assert {g.spi for g in sim.conf.groups()} == {old.spi, new.spi}  # C still sends on old
    sim.clear()
    sim.conf.rekey_done("C", new.spi, sim.now)
    sim.drain()
    assert [g.spi for g in sim.conf.groups()] == [new.spi]
    assert sim.of(GroupsChanged)
    sim.idle(6.0)  # nothing pending: no resend, no timeout
    assert sim.of(SendGsp) == [] and sim.conf.endpoint_ids() == ["B", "C"]


def test_rekey_gsp_follows_the_same_timeout():
    sim = secure_sim()
    for eid, base in (("A", 100), ("B", 200), ("C", 300)):
        sim.join(endpoint(eid, base))
    sim.conf.remove_endpoint("A", sim.now)
    new = sim.conf.current_group
    sim.conf.gsp_ack("B", new.spi, sim.now)
    sim.drain()
    sim.idle(5.02)
    assert sim.of(RemoveEndpoint) == [RemoveEndpoint("C", "spimap-timeout")]
    assert sim.conf.rekeys == 2  # C had the KEK: its leaving rekeys again, for B
    assert sim.conf.endpoint_ids() == ["B"]


def test_rekeys_do_not_restart_the_clock_of_a_room_that_never_acks():
    """A leave every few seconds must not keep a silent room alive: its SPIMAP clock runs
    from the first GSP it left unanswered."""
    sim = secure_sim()
    sim.join(endpoint("A", 100))
    sim.join(endpoint("S", 900), active=False)
    sim.conf.endpoint_handshake_done("S", sim.now)  # DTLS done, then never an ACK
    sim.drain()
    base = 200
    for _ in range(3):  # a room joins and leaves every 2 s: a rekey each time
        sim.join(endpoint(f"R{base}", base))
        sim.idle(1.0)
        sim.conf.remove_endpoint(f"R{base}", sim.now)
        sim.drain()
        sim.idle(1.0)
        base += 100
        if "S" not in sim.conf.endpoint_ids():
            break
    removed = [t for t, a in sim.actions if a == RemoveEndpoint("S", "spimap-timeout")]
    assert removed and removed[0] <= 5.1  # 5 s after its first GSP, not after the last


def test_a_live_group_spi_is_never_handed_out_again(monkeypatch):
    """SPIs are remembered for SPI_MEMORY rekeys, and a group some room still uses is
    avoided however long ago it was made."""
    monkeypatch.setattr("ctms_media.conference.policy.SPI_MEMORY", 1)
    sim = secure_sim()
    sim.join(endpoint("A", 100))
    sim.join(endpoint("B", 200))
    old = sim.conf.current_group.spi
    sim.conf.remove_endpoint("B", sim.now)  # rekey; A never moves to the new SPI's
    sim.drain()
    for i in range(3):  # more rekeys than the memory holds
        sim.join(endpoint(f"R{i}", 300 + 100 * i))
        sim.conf.remove_endpoint(f"R{i}", sim.now)
        sim.drain()
    assert old in {g.spi for g in sim.conf.groups()}  # A still sends under it
    assert old not in sim.conf._used_spis  # forgotten by the memory...
    assert old in sim.conf._spis_in_use()  # ...but still never drawn again


def test_rekey_done_counts_as_the_ack():
    sim = secure_sim()
    for eid, base in (("A", 100), ("B", 200)):
        sim.join(endpoint(eid, base))
    sim.conf.remove_endpoint("A", sim.now)
    new = sim.conf.current_group
    sim.conf.rekey_done("B", new.spi, sim.now)
    sim.drain()
    assert sim.conf.endpoint_spi("B") == new.spi
    assert [g.spi for g in sim.conf.groups()] == [new.spi]


def test_no_rekey_when_the_leaver_never_got_the_kek():
    sim = secure_sim()
    sim.join(endpoint("A", 100))
    sim.join(endpoint("B", 200), active=False)  # still in DTLS
    spi = sim.conf.current_group.spi
    sim.conf.remove_endpoint("B", sim.now)
    assert sim.conf.rekeys == 0 and sim.conf.current_group.spi == spi


def test_last_keyed_room_leaving_starts_a_fresh_group_for_the_next():
    sim = secure_sim()
    sim.join(endpoint("A", 100))
    first = sim.conf.current_group
    sim.conf.remove_endpoint("A", sim.now)
    assert sim.conf.rekeys == 0 and sim.conf.groups() == ()
    sim.join(endpoint("B", 200))
    second = sim.conf.current_group
    assert second.spi != first.spi and second.kek != first.kek and second.salt == first.salt


# -- media timeout -----------------------------------------------------------------------------


def test_media_timeout(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    sim = Sim(ConferenceConfig("mt", "non-secure", "segment"))
    sim.join(endpoint("13105", 100, secure=False))
    sim.join(endpoint("B", 200, secure=False))
    sim.idle(20.0)
    sim.conf.on_activity("B", sim.now)  # B sent something at 20 s
    sim.conf.on_activity("B", 1.0)  # a stale timestamp never moves the clock back
    sim.idle(10.02)
    assert sim.of(RemoveEndpoint) == [RemoveEndpoint("13105", "media-timeout")]
    assert "Media Timeout occurred for call : called num = 13105, conference id = mt" in lines(
        caplog
    )
    assert sim.conf.endpoint_ids() == ["B"] and sim.conf.media_timeouts == 1
    sim.step(sim.audio_tails({}))  # tail reports count as activity too
    sim.idle(29.9)
    assert sim.conf.endpoint_ids() == ["B"]
    sim.idle(0.2)
    assert sim.conf.endpoint_ids() == []


# -- snapshot ----------------------------------------------------------------------------------


def test_snapshot_shape():
    sim = secure_sim()
    sim.join(endpoint("A", 100))
    sim.join(endpoint("S", 200, segments=1))
    sim.conf.add_endpoint(endpoint("H", 300), sim.now)
    sim.talk({aud(100, 3): 10}, 0.4)
    snap = sim.conf.snapshot({"A": 16384, "S": 16386})
    assert snap == {
        "id": "conf-1",
        "security": "secure",
        "switching": "segment",
        "spi": sim.conf.current_group.spi,
        "endpoints": [
            {"id": "A", "segments": 3, "secure": True, "port": 16384, "state": "active"},
            {"id": "S", "segments": 1, "secure": True, "port": 16386, "state": "active"},
            {"id": "H", "segments": 3, "secure": True, "port": None, "state": "handshaking"},
        ],
        "speakers": ["A"],
        "displays": {
            "A": {"2": {"endpoint": "S", "position": 2}},
            "S": {"2": {"endpoint": "A", "position": 3}},
            "H": {},
        },
    }
