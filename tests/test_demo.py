"""The README's main job runs: a meeting on loopback, every forwarded packet decrypts."""

from __future__ import annotations

import json

import pytest

from ctms_media.cli import main


def test_demo_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--seconds", "1.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decrypt_failed"] == 0
    assert report["forwarded"] > 0 and report["drops"] == {}
    for rid, room in report["rooms"].items():
        assert room["decrypt_ok"] > 0, rid
