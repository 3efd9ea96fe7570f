"""The relay's counters, kept as plain integers on the packet path and exported to
Prometheus only when scraped (a prometheus_client Counter per packet costs more than the
forwarding decision itself)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ctms_media.forward.verdict import DROP_REASONS

if TYPE_CHECKING:
    from ctms_media.server.relay import Relay

# Transport-level reasons on top of the forwarder's (wire.md §9).
TRANSPORT_REASONS = ("address", "unknown_port", "dtls", "stun", "control")
ALL_REASONS = DROP_REASONS + TRANSPORT_REASONS


# Processing-latency histogram bounds in seconds: receive -> last send of one datagram.
LATENCY_BUCKETS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3)
LATENCY_SAMPLE_EVERY = 16  # one datagram in 16 is timed: perf_counter twice costs ~0.1 µs


@dataclass
class LatencyHistogram:
    """Cumulative-on-export histogram of sampled processing times (Prometheus semantics)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        i = 0
        for bound in LATENCY_BUCKETS:
            if seconds <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.total += seconds
        self.count += 1


@dataclass
class RelayStats:
    received: int = 0
    forwarded: int = 0  # datagrams sent to receivers
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    handshakes: Counter[str] = field(default_factory=Counter)
    gsp_timeouts: int = 0
    switches: int = 0
    rekeys: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)


class RelayCollector(Collector):
    """Reads a live :class:`Relay` at scrape time."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.relay.stats
        yield CounterMetricFamily(
            "ctms_packets_received", "Datagrams received on media ports", value=s.received
        )
        yield CounterMetricFamily(
            "ctms_packets_forwarded",
            "Datagrams sent to receivers (one per receiver)",
            value=s.forwarded,
        )
        yield CounterMetricFamily(
            "ctms_bytes_received", "Bytes received on media ports", value=s.bytes_in
        )
        yield CounterMetricFamily(
            "ctms_bytes_forwarded", "Bytes sent to receivers", value=s.bytes_out
        )
        dropped = CounterMetricFamily(
            "ctms_packets_dropped", "Datagrams dropped, by reason", labels=["reason"]
        )
        for reason in sorted(set(ALL_REASONS) | set(s.dropped)):
            dropped.add_metric([reason], s.dropped.get(reason, 0))
        yield dropped
        hs = CounterMetricFamily("ctms_handshakes", "DTLS handshakes, by result", labels=["result"])
        for result in sorted({"ok", "failed"} | set(s.handshakes)):
            hs.add_metric([result], s.handshakes.get(result, 0))
        yield hs
        yield CounterMetricFamily(
            "ctms_gsp_timeouts", "Endpoints dropped for a missing GSP-ACK", value=s.gsp_timeouts
        )
        yield CounterMetricFamily("ctms_switches", "Display switches", value=s.switches)
        yield CounterMetricFamily("ctms_rekeys", "Group rekeys", value=s.rekeys)
        yield GaugeMetricFamily(
            "ctms_conferences", "Conferences running", value=len(self.relay.conferences)
        )
        yield GaugeMetricFamily(
            "ctms_endpoints",
            "Endpoints in conferences",
            value=sum(len(c.endpoints) for c in self.relay.conferences.values()),
        )
