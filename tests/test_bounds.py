"""Bounds on what the relay holds (issue 7): every limit of the ``[limits]`` section, reached
through the real admin API over HTTP against a running relay, answers with a clear error and
one log line, holds nothing of the refused request, and frees up again when something leaves.
docs/security.md ("Bounds") lists each limit with its default and its error.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Any

import pytest

from ctms_media.conference.model import MAX_ID_LENGTH
from ctms_media.errors import ConfigError
from ctms_media.server.api import MAX_BODY
from ctms_media.server.config import RelayConfig
from ctms_media.sim.room_client import RoomClient, open_room

from .server_harness import running_relay
from .test_server import run, until


def endpoint(eid: str, ssrc_base: int, segments: int = 1, aux: bool = False) -> dict[str, Any]:
    """A non-secure endpoint body (no DTLS needed to hold a port) with its full stream set."""
    positions = [2] if segments == 1 else [1, 2, 3]
    if aux:
        positions.append(4)
    streams = [
        {"ssrc": ssrc_base + 2 * i + k, "kind": kind, "position": pos}
        for i, pos in enumerate(positions)
        for k, kind in enumerate(("audio", "video"))
    ]
    return {"id": eid, "segments": segments, "secure": False, "streams": streams}


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]


def test_defaults_and_toml(tmp_path: Path) -> None:
    config = RelayConfig()
    assert (
        config.max_conferences,
        config.max_endpoints_per_conference,
        config.max_streams_per_endpoint,
        config.max_streams_per_conference,
        config.max_datagram,
    ) == (64, 48, 8, 256, 2048)
    path = tmp_path / "relay.toml"
    path.write_text(
        "[limits]\nconferences = 3\nendpoints_per_conference = 4\nstreams_per_endpoint = 2\n"
        "streams_per_conference = 5\ndatagram_bytes = 1500\n"
    )
    loaded = RelayConfig.from_toml(path)
    assert (
        loaded.max_conferences,
        loaded.max_endpoints_per_conference,
        loaded.max_streams_per_endpoint,
        loaded.max_streams_per_conference,
        loaded.max_datagram,
    ) == (3, 4, 2, 5, 1500)
    for bad in (
        {"limits": {"conferences": 0}},
        {"limits": {"endpoints_per_conference": -1}},
        {"limits": {"streams_per_conference": "many"}},
        {"limits": {"streams_per_endpoint": True}},
        {"limits": {"datagram_bytes": 1199}},
        {"limits": {"datagram_bytes": 65536}},
        {"limits": {"sessions": 3}},
        {"log": {"level": 1.5}},
        {"media": {"host": ["a"]}},
        {"api": {"port": "8080"}},
    ):
        with pytest.raises(ConfigError):
            RelayConfig.from_mapping(bad)


def test_conference_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path, max_conferences=2) as h:
            await h.conference("c1")
            await h.conference("c2", security="non-secure")
            with caplog.at_level(logging.WARNING):
                status, body = await h.post("/v1/conferences", {"id": "c3"})
            assert (status, body) == (503, {"error": "conference limit reached (2)"})
            assert refusals(caplog) == ["conference c3 refused: conference limit reached (2)"]
            assert sorted(h.relay.conferences) == ["c1", "c2"]
            assert (await h.get("/v1/conferences/c3"))[0] == 404
            _, metrics = await h.get("/metrics")
            assert "ctms_conferences 2.0" in metrics
            # A duplicate id is still the 409 it always was, full relay or not.
            assert (await h.post("/v1/conferences", {"id": "c1"}))[0] == 409
            assert (await h.delete("/v1/conferences/c1"))[0] == 204
            await h.conference("c3")  # room again once one left

    run(scenario())


def test_endpoint_limit_per_conference(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path, max_endpoints_per_conference=2) as h:
            await h.conference("c1", security="non-secure")
            await h.conference("c2", security="non-secure")
            for i in range(2):
                status, _ = await h.post("/v1/conferences/c1/endpoints", endpoint(f"e{i}", 10 * i))
                assert status == 201
            ports = set(h.relay.ports.in_use)
            with caplog.at_level(logging.WARNING):
                status, body = await h.post("/v1/conferences/c1/endpoints", endpoint("e2", 20))
            assert (status, body) == (503, {"error": "endpoint limit reached (2) in conference c1"})
            assert refusals(caplog) == [
                "conference c1: endpoint e2 refused: endpoint limit reached (2) in conference c1"
            ]
            assert h.relay.ports.in_use == ports  # no port taken for the refused endpoint
            assert h.relay.conferences["c1"].policy.endpoint_ids() == ["e0", "e1"]
            # The bound is per conference: another one still admits.
            status, _ = await h.post("/v1/conferences/c2/endpoints", endpoint("e2", 20))
            assert status == 201
            assert (await h.delete("/v1/conferences/c1/endpoints/e0"))[0] == 204
            status, _ = await h.post("/v1/conferences/c1/endpoints", endpoint("e3", 30))
            assert status == 201

    run(scenario())


def test_concurrent_joins_cannot_slip_past_the_limit(tmp_path: Path) -> None:
    """Adding an endpoint awaits its port; the bound is taken before that await."""

    async def scenario() -> None:
        async with running_relay(tmp_path, max_endpoints_per_conference=3) as h:
            await h.conference("c1", security="non-secure")
            answers = await asyncio.gather(
                *(
                    h.post("/v1/conferences/c1/endpoints", endpoint(f"e{i}", 10 * i))
                    for i in range(8)
                )
            )
            statuses = sorted(status for status, _ in answers)
            assert statuses == [201] * 3 + [503] * 5
            assert len(h.relay.conferences["c1"].endpoints) == 3
            assert len(h.relay.ports.in_use) == 3

    run(scenario())


def test_stream_limits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        limits = {"max_streams_per_endpoint": 6, "max_streams_per_conference": 10}
        async with running_relay(tmp_path, **limits) as h:
            await h.conference("c1", security="non-secure")
            with caplog.at_level(logging.WARNING):
                status, body = await h.post(
                    "/v1/conferences/c1/endpoints", endpoint("big", 100, segments=3, aux=True)
                )
            assert status == 400  # 8 streams can never fit a 6-stream bound: the body is wrong
            assert body == {"error": "endpoint big declares 8 streams; the limit is 6 per endpoint"}
            assert len(refusals(caplog)) == 1
            status, _ = await h.post("/v1/conferences/c1/endpoints", endpoint("big", 100, 3))
            assert status == 201  # 6 streams
            status, _ = await h.post("/v1/conferences/c1/endpoints", endpoint("one", 200, aux=True))
            assert status == 201  # 4 more: 10
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                status, body = await h.post("/v1/conferences/c1/endpoints", endpoint("two", 300))
            assert (status, body) == (503, {"error": "stream limit reached (10) in conference c1"})
            assert len(refusals(caplog)) == 1
            assert len(h.relay.conferences["c1"].declared) == 10
            assert (await h.delete("/v1/conferences/c1/endpoints/one"))[0] == 204
            status, _ = await h.post("/v1/conferences/c1/endpoints", endpoint("two", 300))
            assert status == 201

    run(scenario())


def test_body_and_id_bounds(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            # MAX_BODY (64 KiB) bounds every body; the answer is still JSON.
            for size in (MAX_BODY + 1, 2 << 20):
                huge = b'{"id": "' + b"x" * size + b'"}'
                async with h.http.post(h.url + "/v1/conferences", data=huge) as r:
                    assert r.status == 413 and "error" in await r.json()
            for bad in ("x" * (MAX_ID_LENGTH + 1), "two\nlines", "a/b", "tab\there"):
                status, body = await h.post("/v1/conferences", {"id": bad})
                assert status == 400 and "conference id" in body["error"], bad
            await h.conference("x" * MAX_ID_LENGTH, security="non-secure")
            await h.conference("c1", security="non-secure")
            status, body = await h.post(
                "/v1/conferences/c1/endpoints", endpoint("e\r\nforged log line", 10)
            )
            assert status == 400 and "endpoint id" in body["error"]
            assert not h.relay.conferences["c1"].endpoints

    run(scenario())


def test_datagram_limit(tmp_path: Path) -> None:
    """Above ``datagram_bytes`` a datagram is dropped as malformed before anything reads it;
    at the limit it is processed as usual."""

    async def scenario() -> None:
        async with running_relay(tmp_path, max_datagram=1200) as h:
            await h.conference("c1", security="non-secure")
            status, answer = await h.post("/v1/conferences/c1/endpoints", endpoint("e0", 10))
            assert status == 201
            room = await open_room(RoomClient("e0", (answer["host"], answer["port"]), None))
            stats = h.relay.stats
            # Plain RTP of the room's own audio SSRC (11), CC = 1, tail byte last.
            header = bytes([0x81, 96, 0, 1, 0, 0, 0, 0]) + (11).to_bytes(4, "big")
            header += (2 << 8).to_bytes(4, "big")
            room.send(header + bytes(1201 - len(header)))
            await until(lambda: stats.dropped["malformed"] == 1)
            ep = h.relay.conferences["c1"].endpoints["e0"]
            assert ep.peer is None  # nothing latched from it
            room.send(header + bytes(1200 - len(header)))
            await until(lambda: ep.peer is not None)  # processed: the non-secure room latches
            assert stats.dropped["malformed"] == 1
            room.close()

    run(scenario())


def test_config_written_as_toml_reads_back_the_same(tmp_path: Path) -> None:
    config = RelayConfig(
        port_min=20000,
        port_max=20010,
        certificate=str(tmp_path / 'a "quoted" name.pem'),
        max_conferences=2,
        max_datagram=1500,
        log_level="DEBUG",
    )
    path = tmp_path / "relay.toml"
    path.write_text(config.to_toml())
    assert RelayConfig.from_toml(path) == config


def test_an_unexpected_error_still_answers_json(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug behind a call answers 500 {"error": ...} and leaves a traceback in the log."""

    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("c1", security="non-secure")

            def broken(conf_id: str) -> dict:
                raise RuntimeError("injected fault")

            monkeypatch.setattr(h.relay, "snapshot", broken)
            with caplog.at_level(logging.ERROR):
                status, body = await h.get("/v1/conferences/c1")
            assert status == 500 and body == {"error": "internal error"}
            assert any("injected fault" in (r.exc_text or "") for r in caplog.records)

    run(scenario())


def test_a_port_that_cannot_be_bound_leaves_nothing_behind(tmp_path: Path) -> None:
    """An address the machine does not have: 503 in the contract's shape, no phantom
    endpoint in the policy, and the same request works once a port can be bound."""

    async def scenario() -> None:
        async with running_relay(tmp_path, media_host="192.0.2.1") as h:
            await h.conference("c1", security="non-secure")
            body = endpoint("one", 100)
            status, err = await h.post("/v1/conferences/c1/endpoints", body)
            assert status == 503 and "cannot bind" in err["error"]
            conf = h.relay.conferences["c1"]
            assert conf.policy.endpoint_ids() == [] and not conf.endpoints
            assert h.relay.ports.in_use == set()
            status, err = await h.post("/v1/conferences/c1/endpoints", body)
            assert status == 503  # the same answer again, not "already in conference"

    run(scenario())


def test_the_policy_draws_keys_from_the_system_csprng(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("c1")
            assert isinstance(h.relay.conferences["c1"].policy.rng, random.SystemRandom)

    run(scenario())
