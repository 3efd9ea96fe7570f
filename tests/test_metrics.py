"""/metrics over HTTP during a run: the names of wire.md §9, counters that move, the sampled
processing-latency histogram, and the sum over ``serve --workers`` workers."""

from __future__ import annotations

import json
from pathlib import Path

from ctms_media.server.stats import (
    LATENCY_BUCKETS,
    LATENCY_SAMPLE_EVERY,
    RelayStats,
    StatsSnapshot,
    merge,
)

from .serve_process import PlainPair, serving

REQUIRED = [
    "ctms_packets_received_total",
    "ctms_packets_forwarded_total",
    'ctms_packets_dropped_total{reason="address"}',
    'ctms_packets_dropped_total{reason="auth"}',
    'ctms_packets_dropped_total{reason="dtls"}',
    'ctms_packets_dropped_total{reason="malformed"}',
    'ctms_packets_dropped_total{reason="no_key"}',
    'ctms_packets_dropped_total{reason="replay"}',
    'ctms_packets_dropped_total{reason="unknown_port"}',
    'ctms_packets_dropped_total{reason="unknown_spi"}',
    'ctms_packets_dropped_total{reason="unknown_ssrc"}',
    'ctms_packets_dropped_total{reason="unwrap"}',
    'ctms_handshakes_total{result="ok"}',
    'ctms_handshakes_total{result="failed"}',
    "ctms_gsp_timeouts_total",
    "ctms_media_timeouts_total",
    "ctms_switches_total",
    "ctms_rekeys_total",
    "ctms_conferences",
    "ctms_endpoints",
    "ctms_bytes_received_total",
    "ctms_bytes_forwarded_total",
    "ctms_processing_seconds_count",
    "ctms_processing_seconds_sum",
    'ctms_processing_seconds_bucket{le="+Inf"}',
]


def test_snapshots_cross_json_and_add_up() -> None:
    a, b = RelayStats(received=10, forwarded=20), RelayStats(received=1, bytes_in=7)
    a.dropped["auth"] += 2
    b.dropped["auth"] += 1
    b.dropped["replay"] += 4
    a.latency.observe(LATENCY_BUCKETS[0] / 2)
    b.latency.observe(LATENCY_BUCKETS[-1] * 2)  # the +Inf slot
    snaps = [
        StatsSnapshot.from_json(json.loads(json.dumps(StatsSnapshot(s, 1, n).to_json())))
        for s, n in ((a, 3), (b, 4))
    ]
    total = merge(snaps)
    assert (total.stats.received, total.stats.forwarded, total.stats.bytes_in) == (11, 20, 7)
    assert total.stats.dropped == {"auth": 3, "replay": 4}
    assert (total.conferences, total.endpoints) == (2, 7)
    buckets = total.stats.latency.cumulative()
    assert buckets[0][1] == 1 and buckets[-2][1] == 1 and buckets[-1] == ("+Inf", 2)
    assert a.received == 10  # merging never touches its inputs


def test_metrics_move_during_a_run_across_two_workers(tmp_path: Path) -> None:
    with serving(tmp_path, workers=2) as sp:
        first = sp.metrics()
        for name in REQUIRED:
            assert name in first, name
        assert first["ctms_workers"] == 2
        assert first["ctms_conferences"] == 0

        c1 = sp.conference("c1", security="non-secure")
        c2 = sp.conference("c2", security="non-secure")
        assert c1["worker"] != c2["worker"]
        pairs = [PlainPair(sp, "c1", 100), PlainPair(sp, "c2", 200)]
        try:
            for p in pairs:
                p.exchange(rounds=20)
            before = sp.metrics()
            for p in pairs:
                p.exchange(rounds=20)
            after = sp.metrics()
        finally:
            for p in pairs:
                p.close()
        assert before["ctms_conferences"] == 2 and before["ctms_endpoints"] == 4
        # 2 rooms x 2 datagrams x 20 rounds per conference, in both workers
        assert before["ctms_packets_received_total"] >= 2 * 80
        assert after["ctms_packets_received_total"] >= before["ctms_packets_received_total"] + 160
        assert after["ctms_packets_forwarded_total"] > before["ctms_packets_forwarded_total"] > 0
        assert after["ctms_bytes_forwarded_total"] > before["ctms_bytes_forwarded_total"]
        # sampled 1 in 16 in each worker: both contributed
        assert after["ctms_processing_seconds_count"] >= 2 * (160 // LATENCY_SAMPLE_EVERY)
        assert after["ctms_processing_seconds_sum"] > 0
        assert (
            after['ctms_processing_seconds_bucket{le="+Inf"}']
            == after["ctms_processing_seconds_count"]
        )
        les = [k for k in after if k.startswith("ctms_processing_seconds_bucket")]
        assert len(les) == len(LATENCY_BUCKETS) + 1
        assert after["ctms_worker_restarts_total"] == 0


def test_single_process_metrics_has_the_histogram(tmp_path: Path) -> None:
    with serving(tmp_path, workers=1) as sp:
        sp.conference("c1", security="non-secure")
        pair = PlainPair(sp, "c1", 100)
        try:
            pair.exchange(rounds=20)
        finally:
            pair.close()
        m = sp.metrics()
    for name in REQUIRED:
        assert name in m, name
    assert "ctms_workers" not in m  # a supervisor metric: only with --workers N > 1
    assert m["ctms_processing_seconds_count"] >= 80 // LATENCY_SAMPLE_EVERY
    assert m["ctms_endpoints"] == 2
