"""Churn: 1,000 joins and leaves through the admin API over real sockets leave no growth in
the relay's state, its ports, its timers or its memory (issue 7)."""

from __future__ import annotations

import asyncio
import gc
import os
import struct
import tracemalloc
from pathlib import Path
from typing import Any

from ctms_media.server.relay import Relay
from ctms_media.wire.rtp import AudioTail, position_code

from .server_harness import Harness, running_relay
from .test_server import run, until

JOINS = 1000
FULL_EVERY = 10  # every 10th secure joiner completes DTLS and GSP (and its leave rekeys)


def state_sizes(relay: Relay) -> dict[str, int]:
    """Every container the relay keeps per conference, endpoint, stream or key."""
    sizes: dict[str, int] = {
        "ports": len(relay.ports.in_use),
        "conferences": len(relay.conferences),
    }
    for cid, conf in relay.conferences.items():
        p = conf.policy
        fwd = conf.forwarder
        for name, value in {
            "endpoints": conf.endpoints,
            "declared": conf.declared,
            "groups": conf.groups,
            "installed_spi": conf.installed_spi,
            "fwd.streams": fwd.streams,
            "fwd.groups": fwd.groups,
            "policy.eps": p._eps,
            "policy.streams": p._streams,
            "policy.groups": p._groups,
            "policy.used_spis": p._used_spis,
            "policy.displays": p._displays,
            "policy.desired": p._desired,
            "policy.gate_pos": p._gate_pos,
            "policy.waits": p._waits,
            # FIR sequence numbers live as long as their stream: count only stale ones
            "policy.fir_seq (gone streams)": [s for s in p._fir_seq if s not in p._streams],
            "policy.segment_activity": p._segment_activity,
            "policy.room_activity": p._room_activity,
            "policy.ended": p._ended,
            "speakers.levels": p._speakers._levels,
            "conf.counters": conf.counters,
        }.items():
            sizes[f"{cid}.{name}"] = len(value)
    return sizes


def _live_timers(loop: asyncio.AbstractEventLoop) -> int:
    return sum(1 for t in loop._scheduled if not t.cancelled())  # type: ignore[attr-defined]


def _plain_rtp(ssrc: int, seq: int) -> bytes:
    header = struct.pack("!BBHIII", 0x81, 96, seq, seq * 960, ssrc, position_code(2, 0))
    return header + os.urandom(20) + bytes([AudioTail(True, 20).encode()])


async def _churn(h: Harness, n: int, counter: list[int]) -> None:
    for _ in range(n):
        i = counter[0] = counter[0] + 1
        if i % 2:  # the secure conference
            full = i % FULL_EVERY == 1
            room = await h.join("sec", f"s{i}", ssrc_base=10_000 + 10 * i, start=full)
            if full:
                await asyncio.wait_for(room.keyed.wait(), 10)
        else:  # the non-secure one: latch on a first plain packet, then leave
            room = await h.join("open", f"n{i}", secure=False, ssrc_base=10_000 + 10 * i)
            room.send(_plain_rtp(10_000 + 10 * i + 1, 1))
            conf = h.relay.conferences["open"]
            await until(lambda i=i, conf=conf: conf.endpoints[f"n{i}"].peer is not None)
        status, _ = await h.delete(
            f"/v1/conferences/{'sec' if i % 2 else 'open'}/endpoints/{room.room_id}"
        )
        assert status == 204
        room.close()


def test_a_thousand_joins_and_leaves_leave_nothing_behind(tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        # A small port range: 1,000 joins only fit if every leave returns its port.
        async with running_relay(tmp_path, port_min=40000, port_max=40015) as h:
            await h.conference("sec", security="secure")
            await h.conference("open", security="non-secure")
            stay = [
                await h.join("sec", "stay1", ssrc_base=100),
                await h.join("sec", "stay2", ssrc_base=200),
            ]
            for r in stay:
                await asyncio.wait_for(r.keyed.wait(), 10)
            counter = [0]
            await _churn(h, 50, counter)  # warm-up: caches, first rekeys, the allocator
            await asyncio.sleep(0.2)
            gc.collect()
            before = state_sizes(h.relay)
            tasks_before = len(asyncio.all_tasks())
            loop = asyncio.get_running_loop()
            scheduled_before = _live_timers(loop)
            tracemalloc.start()
            mem_before = tracemalloc.get_traced_memory()[0]
            await _churn(h, JOINS - 50, counter)
            await asyncio.sleep(0.3)  # DOWNGRADE/GSP timers of the last leavers run out
            gc.collect()
            mem_after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            after = state_sizes(h.relay)
            conf = h.relay.conferences["sec"]
            # The two rooms that stayed still hold a key and route to each other.
            assert sorted(conf.endpoints) == ["stay1", "stay2"]
            assert conf.policy.rekeys >= (JOINS // FULL_EVERY) // 2 - 1
            for r in stay:
                r.close()
            return {
                "before": before,
                "after": after,
                "tasks": (tasks_before, len(asyncio.all_tasks())),
                "scheduled": (scheduled_before, _live_timers(loop)),
                "timers": [repr(t) for t in loop._scheduled if not t.cancelled()],  # type: ignore[attr-defined]
                "mem": (mem_before, mem_after),
            }

    out = run(scenario(), timeout=240)
    before, after = out["before"], out["after"]
    grown = {k: (before.get(k), v) for k, v in after.items() if v > before.get(k, 0)}
    # Remembered SPIs are the one container allowed to grow, up to its bound.
    grown.pop("sec.policy.used_spis", None)
    assert not grown, grown
    assert after["ports"] == 2  # the two rooms that stayed
    assert out["tasks"][1] <= out["tasks"][0]
    assert out["scheduled"][1] <= out["scheduled"][0] + 2, out["timers"]
    mem_before, mem_after = out["mem"]
    assert mem_after - mem_before < 512 * 1024, out["mem"]  # traced Python allocations
