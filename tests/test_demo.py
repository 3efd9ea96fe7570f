"""The README's main job runs: ``ctms-media demo`` starts the real relay in-process, rooms do
DTLS and GSP through its admin API, the floor moves, and every packet a room receives
decrypts with keys it learnt only from EKT trailers."""

from __future__ import annotations

import json

import pytest

from ctms_media.cli import main


def test_demo_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--seconds", "5", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)  # exactly one JSON object, nothing else on stdout
    assert report["mode"] == "demo" and report["conferences"] == 1
    assert report["decrypt_failed"] == 0
    assert report["decrypt_replayed"] == 0  # loopback duplicates nothing: neither may the relay
    assert report["forwarded"] > 0 and report["decrypt_ok"] == report["forwarded"]
    assert report["drops"] == {}
    assert report["switches"] >= 1
    # at least one display switch went through the relay's PLI and the room's IDR answer
    assert report["switch_ms"]["count"] >= 1 and 0 < report["switch_ms"]["p50"] < 1000
    lat = report["latency_us"]
    assert lat["count"] > 0 and 0 < lat["p50"] <= lat["p99"]
    assert set(report["rooms"]) == {"room1", "room2", "room3", "room4"}
    assert report["rooms"]["room1"]["segments"] == 3
    for rid, room in report["rooms"].items():
        assert room["sent"] > 0, rid
        assert room["received"] > 0 and room["decrypt_ok"] == room["received"], rid
        assert room["decrypt_failed"] == 0, rid
    # loopback in one process: what the rooms sent, the relay received; what it forwarded,
    # the rooms received
    assert report["loss"]["uplink"]["ratio"] == 0.0
    assert report["loss"]["downlink"]["ratio"] == 0.0


def test_demo_needs_two_rooms(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--rooms", "1", "--seconds", "1", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "at least 2 rooms" in captured.err
