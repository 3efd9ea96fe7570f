"""``ctms-media load`` against a relay it did not start: conferences through the admin API,
rooms over real UDP with DTLS and libsrtp, and its conferences gone when it ends."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ctms_media.cli import main
from ctms_media.sim.meeting import (
    FloorScript,
    Meeting,
    Metrics,
    RunOptions,
    exit_status,
    run_meetings,
)

from .server_harness import running_relay


def test_load_against_a_running_relay(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            options = RunOptions(api=h.url, conferences=1, rooms=3, seconds=3.0, prefix="t")
            report = await run_meetings(options)
            assert exit_status(report) == 0
            assert report["forwarded"] > 0 and report["relay"]["forwarded"] > 0
            assert report["decrypt_failed"] == 0
            assert report["forwarded_per_s"] > 0 and report["room_count"] == 3
            assert set(report["rooms"]) == {"room1", "room2", "room3"}
            # the relay's own counters agree with what the rooms counted (loopback, no loss)
            assert report["relay"]["forwarded"] == report["forwarded"]
            assert report["loss"]["uplink"]["sent"] == report["relay"]["received"]
            # its conferences are deleted at the end
            assert h.relay.conferences == {}
            assert await h.get("/v1/conferences") == (200, [])

    asyncio.run(asyncio.wait_for(scenario(), 40))


def test_load_deletes_its_conferences_when_cancelled(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            options = RunOptions(api=h.url, conferences=2, rooms=2, seconds=30.0, prefix="c")
            task = asyncio.create_task(run_meetings(options))
            for _ in range(200):  # until the rooms are sending
                await asyncio.sleep(0.05)
                if h.relay.stats.forwarded:
                    break
            assert set(h.relay.conferences) == {"c-1", "c-2"}
            task.cancel()  # what Ctrl-C does to asyncio.run's main task
            with pytest.raises(asyncio.CancelledError):
                await task
            assert h.relay.conferences == {}

    asyncio.run(asyncio.wait_for(scenario(), 40))


def test_load_reports_an_unreachable_api(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", "--api", "http://127.0.0.1:9", "--seconds", "1", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "ctms-media load:" in captured.err


def test_floor_script_alternates_rooms_and_segments() -> None:
    meeting = Meeting("m", 4, ledger=None, rng=None, new_ssrcs=lambda n: list(range(n)))  # type: ignore[arg-type]
    script = FloorScript(meeting.rooms, offset=0)
    assert script.order == [
        ("room2", 2),
        ("room1", 1),
        ("room3", 2),
        ("room1", 3),
        ("room4", 2),
        ("room1", 2),
    ]
    assert script.audio_tail("room2", 2, 0.1) & 0x80  # the holder talks (voice bit)
    assert script.audio_tail("room3", 2, 0.1) == 127  # everyone else is silent
    later = script.holder(2.6)
    assert later == ("room1", 1) and script.audio_tail("room2", 2, 2.6) & 0x80  # soft reply


def test_metrics_deltas_keep_nonzero_drop_reasons() -> None:
    text = (
        "ctms_packets_received_total 10.0\nctms_packets_forwarded_total 7.0\n"
        "ctms_switches_total 3.0\n"
        'ctms_packets_dropped_total{reason="auth"} 2.0\n'
        'ctms_packets_dropped_total{reason="replay"} 0.0\n'
    )
    base = Metrics.parse(text.replace("10.0", "4.0").replace('"auth"} 2.0', '"auth"} 1.0'))
    delta = Metrics.parse(text).since(base)
    assert delta.received == 6 and delta.forwarded == 0 and delta.drops() == {"auth": 1}
