"""``ctms-media soak``: a real relay process, meetings through lossy, reordering, duplicating
links, and every count reconciled; plus the accounting rules it relies on, on their own."""

from __future__ import annotations

import json
import os
import struct

import pytest

from ctms_media.cli import main
from ctms_media.sim.srtp_room import EktGroup, libsrtp_session
from ctms_media.soak import FarEnd, SoakReceiver, warm_point
from ctms_media.wire.ekt import CtmsLong, EktCipher, ctms_short, wrap_ctms
from ctms_media.wire.srtp import PROFILES

PROFILE = PROFILES["AES_CM_128_HMAC_SHA1_80"]


def _downlink(group: EktGroup, key: bytes, ssrc: int, seqs: list[int], long: set[int]):
    """Packets as a room receives them: libsrtp-protected RTP with a CTMS trailer."""
    tx = libsrtp_session(key, group.salt, group.profile, outbound=True)
    out = []
    for seq in seqs:
        plain = struct.pack("!BBHII", 0x80, 96, seq, seq * 960, ssrc) + b"x" * 40
        if seq in long:
            emk = wrap_ctms(group.cipher, group.kek, key)
            trailer = CtmsLong(emk, 0, seqs[0], group.spi).encode()
        else:
            trailer = ctms_short()
        out.append(tx.protect(plain) + trailer)
    return out


def test_a_room_tells_replays_and_missing_keys_from_failures() -> None:
    group = EktGroup(7, EktCipher.AESKW_128, os.urandom(16), os.urandom(14), PROFILE)
    key = os.urandom(16)
    p0, p1, p2 = _downlink(group, key, 0x1234, [100, 101, 102], long={101})
    r = SoakReceiver()
    r.groups[group.spi] = group  # what a GSP does
    assert r.receive(p0) is None and r.no_key == 1  # its key was in a packet not yet here
    assert r.receive(p1) is not None and r.receive(p2) is not None
    assert r.receive(p2) is None and r.replayed == 1  # a duplicate: libsrtp's replay check
    bad = bytearray(p0)
    bad[20] ^= 1
    assert r.receive(bytes(bad)) is None
    assert (r.ok, r.failed, r.replayed, r.no_key) == (2, 1, 1, 1)  # only the tag is a failure


def test_the_far_end_model_predicts_each_drop() -> None:
    end = FarEnd()
    short = struct.pack("!BBHII", 0x80, 96, 1, 0, 9) + b"p" + b"\x00"
    long = struct.pack("!BBHII", 0x80, 96, 2, 0, 9) + b"q" + b"\x01"
    end.media(short, rtcp=False, long=False)  # before any key: no_key, and no state
    end.media(long, rtcp=False, long=True)
    end.media(long, rtcp=False, long=True)  # its duplicate
    end.media(short, rtcp=False, long=False)  # a held copy of the first, now keyed
    control = b"\x80\xcc" + b"c" * 30
    end.control(control)  # before the DTLS Finished: no hop keys yet
    end.dtls(bytes([20, 0xFE, 0xFD, 0, 0]) + bytes(6) + b"\x00\x01\x01")
    end.dtls(bytes([22, 0xFE, 0xFD, 0, 1]) + bytes(6) + b"\x00\x02ff")
    end.control(control)
    end.control(control)
    end.dtls(bytes([22, 0xFE, 0xFD, 0, 1]) + bytes([0, 0, 0, 0, 0, 9]) + b"\x00\x02ff")
    assert end.counts == {
        "no_key": 1,
        "ok": 2,
        "replay": 1,
        "control_early": 1,
        "control_ok": 1,
        "control_replay": 1,
        "dtls": 3,
        "dtls_redundant": 1,  # a retransmitted Finished carries nothing new
    }


def test_warm_point() -> None:
    assert warm_point(60) == 30 and warm_point(600) == 60 and warm_point(10) == 5


def test_soak_60_seconds_passes_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    """The CI soak: 60 s of media, 2 conferences (8 rooms), 5 % loss, reordering and
    duplication both ways; the capacity probe is skipped (``ctms-media soak`` without
    ``--conferences`` runs it)."""
    status = main(["soak", "--seconds", "60", "--conferences", "2", "--json", "--seed", "7"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # exactly one JSON object on stdout
    why = report.get("decrypt_failure_reasons"), report.get("drops_unexplained")
    assert report["checks"] == {k: "pass" for k in report["checks"]}, (why, captured.err)
    assert status == 0
    assert set(report["checks"]) >= {
        "no_decrypt_failures",
        "receivers_explained",
        "relay_alive",
        "relay_log_clean",
        "rss_growth_under_5pct",
        "uplink_reconciled",
        "drops_explained",
        "clean_shutdown",
    }
    assert report["conferences"] == 2 and report["rooms"] == 8
    assert 59 < report["seconds"] < 70
    assert report["forwarded"] > 0 and report["forwarded_per_s"] > 0
    assert report["decrypt_ok"] > 0 and report["decrypt_failed"] == 0
    for way in ("uplink", "downlink"):  # the faults really happened, both ways
        inj = report["injected"][way]
        assert inj["lost"] > 0 and inj["reordered"] > 0 and inj["duplicated"] > 0
    # a duplicate is a replay at the relay (uplink) and at the room (downlink), exactly
    assert report["drops"]["replay"] == report["drops_expected"]["replay"] > 0
    assert report["replays_rejected_by_rooms"] > 0
    assert report["drops_unexplained"] == {}
    rec = report["reconciliation"]["uplink"]
    assert rec["relay_received"] == rec["links_delivered"]
    rss = report["rss_kb"]
    assert rss["start"] > 0 and rss["warm"] > 0 and rss["end"] > 0 and rss["growth_pct"] < 5
    assert report["relay_alive"] is True
    assert report["shutdown"]["exit_code"] == 0 and report["shutdown"]["seconds"] <= 2
    assert report["capacity"] == {"probed": False}
