"""The relay's counters, kept as plain integers on the packet path and exported to
Prometheus only when scraped (a prometheus_client Counter per packet costs more than the
forwarding decision itself).

With ``serve --workers N`` every worker keeps its own :class:`RelayStats`; the parent
fetches them as JSON (:meth:`StatsSnapshot.to_json`), adds them up (:func:`merge`) and
renders the sum with the same :class:`SnapshotCollector`, so one scrape shows the whole
relay under the same names as a single process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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
    """Cumulative-on-export histogram of sampled processing times (Prometheus semantics).

    ``counts[i]`` holds the samples of bucket i alone (not cumulative) so that adding two
    histograms is adding their lists; the last slot is the +Inf overflow."""

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

    def add(self, other: LatencyHistogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.count += other.count

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (upper bound as text, samples at or below it), +Inf last."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip(LATENCY_BUCKETS, self.counts, strict=False):
            running += n
            out.append((repr(bound), running))
        out.append(("+Inf", self.count))
        return out


@dataclass
class RelayStats:
    received: int = 0
    forwarded: int = 0  # datagrams sent to receivers
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    handshakes: Counter[str] = field(default_factory=Counter)
    gsp_timeouts: int = 0
    media_timeouts: int = 0
    switches: int = 0
    rekeys: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    # Generic over the fields (ints add, Counters add, the histogram merges), so a counter
    # added here later crosses the worker boundary without touching this code.

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, LatencyHistogram):
                out[f.name] = {"counts": value.counts, "total": value.total, "count": value.count}
            elif isinstance(value, Counter):
                out[f.name] = dict(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RelayStats:
        stats = cls()
        for f in fields(stats):
            if f.name not in doc:
                continue  # a worker of an older build: that counter reads 0
            current = getattr(stats, f.name)
            value = doc[f.name]
            if isinstance(current, LatencyHistogram):
                setattr(
                    stats,
                    f.name,
                    LatencyHistogram(list(value["counts"]), float(value["total"]), value["count"]),
                )
            elif isinstance(current, Counter):
                setattr(stats, f.name, Counter(value))
            else:
                setattr(stats, f.name, value)
        return stats

    def add(self, other: RelayStats) -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, LatencyHistogram):
                mine.add(theirs)
            elif isinstance(mine, Counter):
                mine.update(theirs)
            else:
                setattr(self, f.name, mine + theirs)


@dataclass
class StatsSnapshot:
    """Counters plus the two gauges, as one worker (or the sum of all) reports them."""

    stats: RelayStats = field(default_factory=RelayStats)
    conferences: int = 0
    endpoints: int = 0

    @classmethod
    def of_relay(cls, relay: Relay) -> StatsSnapshot:
        return cls(
            relay.stats,
            len(relay.conferences),
            sum(len(c.endpoints) for c in relay.conferences.values()),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "stats": self.stats.to_json(),
            "conferences": self.conferences,
            "endpoints": self.endpoints,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StatsSnapshot:
        return cls(RelayStats.from_json(doc["stats"]), doc["conferences"], doc["endpoints"])


def merge(snapshots: Iterable[StatsSnapshot]) -> StatsSnapshot:
    """Counters summed, gauges summed, histograms merged bucket by bucket."""
    total = StatsSnapshot()
    for s in snapshots:
        total.stats.add(s.stats)
        total.conferences += s.conferences
        total.endpoints += s.endpoints
    return total


def families(snap: StatsSnapshot) -> Iterator[Metric]:
    """The metric families of wire.md §9 (and a few more) for one snapshot."""
    s = snap.stats
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
    yield CounterMetricFamily("ctms_bytes_forwarded", "Bytes sent to receivers", value=s.bytes_out)
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
    yield CounterMetricFamily(
        "ctms_media_timeouts",
        "Endpoints dropped after 30 s without a datagram",
        value=s.media_timeouts,
    )
    yield CounterMetricFamily("ctms_switches", "Display switches", value=s.switches)
    yield CounterMetricFamily("ctms_rekeys", "Group rekeys", value=s.rekeys)
    yield GaugeMetricFamily("ctms_conferences", "Conferences running", value=snap.conferences)
    yield GaugeMetricFamily("ctms_endpoints", "Endpoints in conferences", value=snap.endpoints)
    yield HistogramMetricFamily(
        "ctms_processing_seconds",
        f"Receive-to-last-send time of one datagram, sampled 1 in {LATENCY_SAMPLE_EVERY}",
        buckets=s.latency.cumulative(),
        sum_value=s.latency.total,
    )


class SnapshotCollector(Collector):
    """Renders whatever snapshot ``source`` returns at scrape time."""

    def __init__(self, source: Callable[[], StatsSnapshot]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from families(self.source())


class RelayCollector(SnapshotCollector):
    """Reads a live :class:`Relay` at scrape time."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        super().__init__(lambda: StatsSnapshot.of_relay(relay))
