"""pytest-benchmark microbenchmarks of the packet path's pieces.

Batch benchmarks time one ``forward_batch`` of BATCH packets per round (divide by BATCH, or
read ``extra_info["us_per_packet"]``); the packets are restamped with fresh indices outside
the timed region, as the replay window requires.
"""

from __future__ import annotations

import os

import pytest
from ctms_media._fastforward import FastForwarder
from ctms_media._fasthmac import HmacSha1

from ctms_media.benchmark import measure_sfu
from ctms_media.forward.forwarder import Forwarder

SIZES = [160, 1200]
ROUNDS = 200


def _per_packet(benchmark, packets: int) -> None:
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is not None:
        benchmark.extra_info["us_per_packet"] = stats.median * 1e6 / packets


@pytest.mark.parametrize("size", SIZES)
def test_tag_verify(benchmark, size: int) -> None:
    """One SRTP tag check (HMAC-SHA1 with precomputed state + constant-time compare),
    called from Python: includes the call overhead."""
    h = HmacSha1(os.urandom(20))
    data = os.urandom(16 + size + 1)
    tag = h.srtp_tag(data, 0, 10)
    assert benchmark(h.verify_srtp, data, 0, tag)


@pytest.mark.parametrize("size", SIZES)
def test_retag(benchmark, size: int) -> None:
    """One re-tag of a forwarded body (tail byte gone), called from Python."""
    h = HmacSha1(os.urandom(20))
    body = os.urandom(16 + size)
    assert len(benchmark(h.srtp_tag, body, 0, 10)) == 10


@pytest.mark.parametrize("size", SIZES)
def test_floor_batch(benchmark, scene_factory, batch_size: int, size: int) -> None:
    """The floor: verify + re-tag HMACs of BATCH packets in C, nothing else."""
    s = scene_factory(size, 1, FastForwarder)
    h, tag_len = s.stream.hmac, s.group.profile.rtp_tag_len
    benchmark(h.floor_batch, s.batch.arena, s.batch.lengths, batch_size, tag_len, 1)
    _per_packet(benchmark, batch_size)


@pytest.mark.parametrize("fan_out", [1, 8, 32])
@pytest.mark.parametrize("size", SIZES)
def test_forward_batch(benchmark, scene_factory, batch_size: int, size: int, fan_out: int):
    """Full forward (verify, strip, CSRC, re-tag, fan-out) of BATCH packets, receivers at
    one position: one output variant per packet."""
    s = scene_factory(size, fan_out, FastForwarder)
    benchmark.pedantic(s.run_batch, setup=s.restamp, rounds=ROUNDS, warmup_rounds=5)
    s.check()
    _per_packet(benchmark, batch_size)


@pytest.mark.parametrize("size", SIZES)
def test_forward_one_datagram(benchmark, scene_factory, size: int) -> None:
    """FastForwarder.forward(): the same C path plus a Verdict and bytes per packet."""
    s = scene_factory(size, 1, FastForwarder)
    packets = iter(s.packets(ROUNDS * 2))
    benchmark.pedantic(
        s.fwd.forward, setup=lambda: ((next(packets),), {}), rounds=ROUNDS, warmup_rounds=5
    )


@pytest.mark.parametrize("size", SIZES)
def test_reference_forward(benchmark, scene_factory, size: int) -> None:
    """The pure-Python reference Forwarder.forward() for comparison."""
    s = scene_factory(size, 1, Forwarder)
    packets = iter(s.packets(ROUNDS * 2))
    benchmark.pedantic(
        s.fwd.forward, setup=lambda: ((next(packets),), {}), rounds=ROUNDS, warmup_rounds=5
    )


def test_libsrtp_terminate_fanout8(benchmark) -> None:
    """libsrtp unprotect once + protect 8 times, per 1200 B packet (µs, median of chunks)."""
    us = benchmark.pedantic(measure_sfu, args=(1200, 8, 400), rounds=3)
    benchmark.extra_info["us_per_packet"] = us
