"""Clean shutdown of ``ctms-media serve``: a stop signal closes every port, drops all state
and exits 0 within 2 s, with one worker or several; workers never outlive the parent."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .serve_process import PlainPair, ServeProcess, pid_alive, udp_range_free

STOP_BUDGET = 2.0


@pytest.mark.parametrize(
    ("workers", "sig"),
    [(1, signal.SIGTERM), (2, signal.SIGTERM), (2, signal.SIGINT)],
    ids=["1-worker-SIGTERM", "2-workers-SIGTERM", "2-workers-SIGINT"],
)
def test_stop_signal_exits_zero_and_frees_ports(
    tmp_path: Path, workers: int, sig: signal.Signals
) -> None:
    sp = ServeProcess(tmp_path, workers=workers, ports=10).start()
    try:
        pids = []
        if workers > 1:
            pids = [w["pid"] for w in sp.request("GET", "/v1/workers")[1]]
        pairs = []
        for i in range(workers):  # media ports bound in every worker, traffic flowing
            sp.conference(f"c{i}", security="non-secure")
            pairs.append(PlainPair(sp, f"c{i}", 100 * (i + 1)))
        for p in pairs:
            assert min(p.exchange(rounds=5)) > 0
            p.close()
        assert not udp_range_free(sp.port_min, sp.port_max)

        t0 = time.monotonic()
        sp.signal(sig)
        code = sp.wait(STOP_BUDGET + 1)
        elapsed = time.monotonic() - t0
    finally:
        sp.stop()
    log = sp.log()
    assert code == 0, log
    assert elapsed < STOP_BUDGET, (elapsed, log)
    assert f"ctms-media relay: {sig.name} received, shutting down" in log
    assert f"ctms-media relay: stopped, {workers} conference(s) dropped" in log
    assert udp_range_free(sp.port_min, sp.port_max)  # every media port can be bound again
    assert not any(pid_alive(pid) for pid in pids)
    assert "Traceback" not in log


def test_workers_stop_when_the_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL gives the parent no chance to stop anyone: the workers see their stdin close
    and stop by themselves, releasing the media ports."""
    sp = ServeProcess(tmp_path, workers=2, ports=10).start()
    try:
        pids = [w["pid"] for w in sp.request("GET", "/v1/workers")[1]]
        sp.conference("c0", security="non-secure")
        PlainPair(sp, "c0", 100).close()
        sp.signal(signal.SIGKILL)
        assert sp.wait(STOP_BUDGET) == -signal.SIGKILL
        end = time.monotonic() + STOP_BUDGET
        while any(pid_alive(pid) for pid in pids):
            assert time.monotonic() < end, sp.log()
            time.sleep(0.05)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            sp.stop()
    assert udp_range_free(sp.port_min, sp.port_max)
    assert "parent process is gone; stopping" in sp.log()
