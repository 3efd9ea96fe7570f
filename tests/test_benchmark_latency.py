"""The benchmark's added-latency figure: per-packet pairs, not a difference of percentiles."""

from __future__ import annotations

import numpy as np

from ctms_media.benchmark import added_latency


def test_each_relayed_packet_is_paired_with_the_nearest_direct_one() -> None:
    relay = np.array([100.0, 200.0, 300.0])
    relay_sent = np.array([10, 20, 30])
    direct = np.array([50.0, 60.0])
    direct_sent = np.array([29, 11])  # out of order on purpose
    assert added_latency(relay, relay_sent, direct, direct_sent).tolist() == [40.0, 140.0, 250.0]


def test_noise_shared_by_both_paths_cancels() -> None:
    rng = np.random.default_rng(3)
    relay_sent = np.arange(0, 20_000, 4)
    direct_sent = relay_sent + 1  # each relayed packet has a direct twin 1 µs later
    noise = rng.exponential(200.0, len(relay_sent))  # a spike hits both twins alike
    direct = 20.0 + noise
    stalls = rng.random(len(relay_sent)) < 0.02  # the relay stalls 2% of packets by 500 µs
    relay = 20.0 + noise + 30.0 + 500.0 * stalls
    added = added_latency(relay, relay_sent, direct, direct_sent)
    assert np.allclose(np.sort(added), np.sort(30.0 + 500.0 * stalls))
    assert np.percentile(added, 50) == 30.0 and np.percentile(added, 99) == 530.0
    # The old figure, p99(relay) - p99(direct), hides most of the stalls in the shared tail.
    assert np.percentile(relay, 99) - np.percentile(direct, 99) < 300.0


def test_no_samples_no_figure() -> None:
    assert len(added_latency(np.zeros(0), np.zeros(0), np.ones(3), np.arange(3))) == 0
    assert len(added_latency(np.ones(3), np.arange(3), np.zeros(0), np.zeros(0))) == 0
