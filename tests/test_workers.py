"""``ctms-media serve --workers 2`` as a real process tree: conference placement, routing of
the admin API, media through both workers, and a worker that dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from ctms_media.errors import ConfigError
from ctms_media.server.config import RelayConfig
from ctms_media.server.supervisor import split_ports

from .serve_process import PlainPair, pid_alive, serving


def test_restart_back_off_starts_at_one_second() -> None:
    from ctms_media.server.supervisor import _backoff

    assert [_backoff(n) for n in range(7)] == [1.0, 1.0, 2.0, 5.0, 10.0, 30.0, 30.0]


def test_port_slices_are_disjoint_and_cover_the_range() -> None:
    cfg = RelayConfig(port_min=1000, port_max=1010)  # 11 ports
    slices = split_ports(cfg, 3)
    assert [(c.port_min, c.port_max) for c in slices] == [(1000, 1003), (1004, 1007), (1008, 1010)]
    assert all(c.api_port == cfg.api_port for c in slices)
    with pytest.raises(ConfigError):
        split_ports(RelayConfig(port_min=1000, port_max=1000), 2)
    with pytest.raises(ConfigError):
        split_ports(cfg, 0)


def test_two_workers_place_route_and_forward(tmp_path: Path) -> None:
    with serving(tmp_path, workers=2) as sp:
        status, workers = sp.request("GET", "/v1/workers")
        assert status == 200 and [w["id"] for w in workers] == [0, 1]
        assert all(w["running"] and pid_alive(w["pid"]) for w in workers)
        slices = {w["id"]: (w["port_min"], w["port_max"]) for w in workers}
        assert slices[0][1] < slices[1][0]  # disjoint halves of the range

        c1 = sp.conference("c1", security="non-secure")
        c2 = sp.conference("c2", security="non-secure")
        assert c1["worker"] != c2["worker"]  # the empty worker takes the second one
        assert sp.request("POST", "/v1/conferences", {"id": "c1"})[0] == 409

        pairs = {"c1": PlainPair(sp, "c1", 100), "c2": PlainPair(sp, "c2", 200)}
        try:
            for cid, conf in (("c1", c1), ("c2", c2)):
                low, high = slices[conf["worker"]]
                assert all(low <= p <= high for p in pairs[cid].ports), (cid, pairs[cid].ports)
            # one certificate file, created by the parent: one fingerprint everywhere
            fps = {a["fingerprint"] for p in pairs.values() for a in p.answers.values()}
            assert len(fps) == 1

            # a third conference goes to the worker with fewer endpoints: both have 2, so
            # fewer conferences decides, then the lower id
            c3 = sp.conference("c3", security="non-secure")
            assert c3["worker"] == 0

            for cid, pair in pairs.items():
                got_a, got_b = pair.exchange()
                assert got_a > 0 and got_b > 0, (cid, got_a, got_b)

            status, listing = sp.request("GET", "/v1/conferences")
            assert status == 200 and [c["id"] for c in listing] == ["c1", "c2", "c3"]
            assert {c["id"]: c["worker"] for c in listing} == {
                "c1": c1["worker"],
                "c2": c2["worker"],
                "c3": 0,
            }
            status, one = sp.request("GET", "/v1/conferences/c2")
            assert status == 200 and one["worker"] == c2["worker"]
            assert sorted(e["id"] for e in one["endpoints"]) == ["c2-a", "c2-b"]
            status, err = sp.request("GET", "/v1/conferences/nope")
            assert status == 404 and "error" in err
            assert sp.request("POST", "/v1/conferences/nope/endpoints", {"id": "x"})[0] == 404
            status, err = sp.request(
                "POST", "/v1/conferences/c1/endpoints", {"id": "c1-a", "segments": 1}
            )
            assert status in (400, 409) and "error" in err  # the worker's own answer
            status, workers = sp.request("GET", "/v1/workers")
            by_id = {w["id"]: w for w in workers}
            assert sorted(by_id[c1["worker"]]["conferences"]) == sorted(
                ["c1", "c3"] if c1["worker"] == 0 else ["c1"]
            )
            assert by_id[c2["worker"]]["endpoints"] == 2

            assert sp.request("DELETE", "/v1/conferences/c2/endpoints/c2-b")[0] == 204
            assert sp.request("DELETE", "/v1/conferences/c2/endpoints/c2-b")[0] == 404
            assert sp.request("DELETE", "/v1/conferences/c2")[0] == 204
            assert sp.request("GET", "/v1/conferences/c2")[0] == 404
            assert sp.request("DELETE", "/v1/conferences/c2")[0] == 404
        finally:
            for p in pairs.values():
                p.close()
        log = sp.log()
        assert "conference c1: placed on worker" in log
        assert "[worker 1]" in log and "[worker 0]" in log


def test_a_full_worker_passes_the_conference_on(tmp_path: Path) -> None:
    """``[limits] conferences`` holds per worker: placement skips a full one."""
    with serving(tmp_path, workers=2, max_conferences=2) as sp:
        assert sp.conference("c1", security="non-secure")["worker"] == 0
        assert sp.conference("c2", security="non-secure")["worker"] == 1
        pair = PlainPair(sp, "c1", 100)  # worker 0 now has 2 endpoints
        pair.close()
        assert sp.conference("c3", security="non-secure")["worker"] == 1  # fewer endpoints
        assert sp.conference("c4", security="non-secure")["worker"] == 0  # 1 is full
        status, err = sp.request("POST", "/v1/conferences", {"id": "c5"})
        assert status == 503 and "limit" in err["error"]
        assert sp.request("GET", "/v1/conferences/c5")[0] == 404


def test_any_id_one_process_accepts_routes_the_same_through_workers(tmp_path: Path) -> None:
    """Ids with URL-significant characters reach the worker as the same id (raw path)."""
    with serving(tmp_path, workers=2) as sp:
        for cid, quoted in (("a?b", "a%3Fb"), ("x#y", "x%23y"), ("50%41", "50%2541")):
            sp.conference(cid, security="non-secure")
            status, doc = sp.request("GET", f"/v1/conferences/{quoted}")
            assert status == 200 and doc["id"] == cid, (cid, doc)
            assert sp.endpoint(quoted, "e1", 10)["port"]
        sp.conference("50A", security="non-secure")
        assert sp.request("DELETE", "/v1/conferences/50%2541")[0] == 204
        assert sp.request("GET", "/v1/conferences/50A")[0] == 200  # not the one deleted
        assert sp.request("GET", "/v1/conferences/50%2541")[0] == 404
        # A bad body is 400 before the id is looked up, as in one process.
        status, err = sp.request("POST", "/v1/conferences", {"id": "a?b", "security": "x"})
        assert status == 400, err


def test_dead_worker_is_logged_forgotten_and_replaced(tmp_path: Path) -> None:
    with serving(tmp_path, workers=2) as sp:
        c1 = sp.conference("c1", security="non-secure")
        pair = PlainPair(sp, "c1", 100)
        pair.close()
        workers = sp.request("GET", "/v1/workers")[1]
        victim = next(w for w in workers if w["id"] == c1["worker"])
        os.kill(victim["pid"], signal.SIGKILL)

        end = time.monotonic() + 10
        while sp.request("GET", "/v1/conferences/c1")[0] != 404:
            assert time.monotonic() < end, sp.log()
            time.sleep(0.05)
        log = sp.log()
        assert (
            f"worker {victim['id']} (pid {victim['pid']}) was killed by signal 9; "
            "its 1 conference(s) are gone: c1" in log
        )
        # placement skips it while it is down; it comes back on the same ports
        while True:
            _status, workers = sp.request("GET", "/v1/workers")
            back = next(w for w in workers if w["id"] == victim["id"])
            if back["running"]:
                break
            assert time.monotonic() < end, sp.log()
            time.sleep(0.1)
        assert back["restarts"] == 1 and back["pid"] != victim["pid"]
        assert (back["port_min"], back["port_max"]) == (victim["port_min"], victim["port_max"])
        again = sp.conference("c1", security="non-secure")  # the id is free again
        assert again["worker"] in (0, 1)
        # the ports the dead worker held can be handed out again by its replacement
        if again["worker"] == victim["id"]:
            PlainPair(sp, "c1", 300).close()
