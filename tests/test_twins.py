"""Twin equivalence: every implementation of ``implementations()`` against the reference.

Parametrized over the twins (aiohttp style) through ``make_forwarder``: the tests drive the
implementation under test and the pure-Python reference side by side with the same traffic
and demand identical verdicts, bytes and ``state_snapshot()`` after every packet. For the
reference itself this is a self-check; nothing in a test tells which twin it runs. The batch
API is tested wherever a twin offers ``forward_batch``.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ctms_media.conformance import build_forwarder, load_vector, vector_files
from ctms_media.errors import CtmsError
from ctms_media.forward.forwarder import Forwarder
from ctms_media.forward.verdict import Receiver, Verdict
from ctms_media.sim.srtp_room import EktGroup, SenderStream, sdes_packet, trailer_length
from ctms_media.wire.srtp import AES_CM_128_HMAC_SHA1_32, AES_CM_128_HMAC_SHA1_80, Profile

from .conftest import IMPLEMENTATIONS, vector_dirs
from .helpers import Meeting

VECTORS = [p for d in vector_dirs() for p in vector_files(d)]
BATCHED = sorted(name for name, f in IMPLEMENTATIONS.items() if hasattr(f, "forward_batch"))


class Pair:
    """Two forwarders configured by the same calls: the reference and the one under test.

    A configuration call must succeed or fail alike on both (same exception type)."""

    def __init__(self, reference: Any, twin: Any) -> None:
        self.ref = reference
        self.twin = twin
        self.trace: list[tuple] = []  # ("config", name, args) and ("packet", bytes, rtcp)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.trace.append(("config", name, args))
            outcomes = []
            for fwd in (self.ref, self.twin):
                try:
                    outcomes.append((None, getattr(fwd, name)(*args)))
                except CtmsError as exc:
                    outcomes.append((type(exc), None))
            assert outcomes[0][0] == outcomes[1][0], f"{name}{args}: {outcomes}"
            if outcomes[0][0] is not None:
                raise outcomes[0][0]("both twins refused")
            return outcomes[0][1]

        return call

    def forward(self, datagram: bytes, rtcp: bool | None = None) -> Verdict:
        self.trace.append(("packet", datagram, rtcp))
        want = self.ref.forward(datagram, rtcp)
        got = self.twin.forward(datagram, rtcp)
        assert got == want, f"verdicts differ for {datagram.hex()}"
        assert self.twin.state_snapshot() == self.ref.state_snapshot()
        return got


# -- every vector: outputs as the file says, and the state as the reference's after each packet


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_vector_verdicts_and_state_track_the_reference(path: Path, make_forwarder) -> None:
    vector = load_vector(path)
    pair = Pair(build_forwarder(vector, Forwarder), build_forwarder(vector, make_forwarder))
    for i, p in enumerate(vector["packets"]):
        v = pair.forward(bytes.fromhex(p["in"]), bool(p.get("rtcp", False)))
        assert v.drop == p.get("drop"), f"packet {i}"
        assert v.tail == p.get("tail"), f"packet {i}"
        assert {r: d.hex() for r, d in v.by_receiver().items()} == p.get("out", {}), f"packet {i}"


# -- randomized mixed traffic -------------------------------------------------------------


def _plain_rtp(ssrc: int, seq: int, payload: bytes, tail: int) -> bytes:
    return struct.pack("!BBHIII", 0x81, 96, seq & 0xFFFF, 0, ssrc, 2 << 8) + payload + bytes([tail])


class Traffic:
    """Seeded mixed traffic through a Pair: valid packets (long and short trailers), rekeys,
    ROC rollover, re-wrap across SPIs, SRTCP, forged, replayed, reordered and malformed
    packets, unknown SSRC and SPI, route and mode changes, IDR-gated switches."""

    def __init__(self, make_forwarder: Any, fmt: str, cipher: int, profile: Profile, seed: int):
        self.rng = random.Random(seed)
        self.m = Meeting(
            lambda f: Pair(Forwarder(f), make_forwarder(f)), fmt, cipher, profile, seed
        )
        self.fmt = fmt
        m = self.m
        m.group(10)
        m.group(20, cipher=3 if cipher == 3 else 2)
        self.audio = [
            m.sender(0xA0, "audio", spi=10, seq=65400, position=1),
            m.sender(0xA1, "audio", spi=20, seq=3, position=3),
        ]
        self.video = [
            m.sender(0xB0, "video", spi=10, seq=65500, position=2),
            m.sender(0xB1, "video", spi=20, seq=100, position=2),
        ]
        self.receivers = [
            Receiver("r1", 1, 10),
            Receiver("r2", 2, 10),
            Receiver("r3", 2, 20),
            Receiver("r4", 3, 20),
            Receiver("r5", 2, 10),
        ]
        m.receivers = list(self.receivers)
        m.route()
        # Senders the forwarder does not know: an undeclared SSRC, and a declared one whose
        # trailers name an SPI the forwarder does not hold.
        stranger = EktGroup(99, 2, m.rand(16), m.salt, profile, fmt)
        self.unknown_ssrc = SenderStream(0xDEAD, "audio", m.groups[10], m.rand(16))
        self.unknown_spi = SenderStream(0xA0, "audio", stranger, m.rand(16))
        self.history: list[tuple[bytes, bool]] = []
        self.held: list[bytes] = []
        self.outcomes: Counter[str] = Counter()
        self.mode_ttl = 0  # steps left in a downgrade/non-secure mode before going secure
        self.newcomers = 0

    @property
    def pair(self) -> Pair:
        return self.m.fwd

    def send(self, packet: bytes, rtcp: bool | None = None) -> Verdict:
        self.history.append((packet, bool(rtcp)))
        v = self.pair.forward(packet, rtcp)
        self.outcomes[v.drop or ("switched" if v.switched else "forwarded")] += 1
        return v

    def media(self) -> bytes:
        s = self.rng.choice(self.audio + self.video)
        tail = self.rng.choice([0x00, 0x40, 0x80, 0xC0, self.rng.randrange(256)])
        return s.rtp(self.m.payload(), tail, long=self.rng.random() < 0.3)[0]

    def step(self) -> None:
        r = self.rng.random()
        m, rng = self.m, self.rng
        if self.mode_ttl:
            self.mode_ttl -= 1
            if not self.mode_ttl:
                self.pair.set_modes(True, False)
        if r < 0.45:
            self.send(self.media())
        elif r < 0.50:  # hold one back, release it later (reorder / late under an old key)
            self.held.append(self.media())
        elif r < 0.55 and self.held:
            self.send(self.held.pop(rng.randrange(len(self.held))))
        elif r < 0.60 and self.history:  # replay
            self.send(*rng.choice(self.history))
        elif r < 0.67:  # forged: one bit flipped anywhere
            p = bytearray(self.media())
            p[rng.randrange(len(p))] ^= 1 << rng.randrange(8)
            self.send(bytes(p))
        elif r < 0.71:  # malformed: truncated, CC = 0, garbage
            p = self.media()
            choice = rng.randrange(3)
            if choice == 0:
                p = p[: rng.randrange(len(p))]
            elif choice == 1:
                p = bytes([0x80]) + p[1:]
            else:
                p = bytes(rng.getrandbits(8) for _ in range(rng.randrange(40)))
            self.send(p, rng.choice([None, False, True]))
        elif r < 0.74:
            self.send(self.unknown_ssrc.rtp(m.payload(), 0x80, long=True)[0])
        elif r < 0.76:
            self.send(self.unknown_spi.rtp(m.payload(), 0x80, long=True)[0])
        elif r < 0.81:  # SRTCP, long (SDES) or short, sometimes replayed later
            s = rng.choice(self.audio + self.video)
            self.send(s.rtcp(sdes_packet(s.ssrc), long=rng.random() < 0.6))
        elif r < 0.84:  # rekey, possibly moving to the other SPI
            s = rng.choice(self.audio + self.video)
            s.rekey(m.rand(16), m.groups[rng.choice([10, 20])])
        elif r < 0.88:  # a new route: subset, positions, SPIs, gated video subscriptions
            s = rng.choice(self.audio + self.video)
            chosen = [x for x in self.receivers if rng.random() < 0.7]
            route = [
                Receiver(
                    x.id,
                    rng.choice([x.position, 1, 2, 3]),
                    rng.choice([x.spi, 10, 20, 0]),
                    gated=s.kind == "video" and rng.random() < 0.3,
                )
                for x in chosen
            ]
            self.pair.set_route(s.ssrc, route)
        elif r < 0.89:  # a stretch of downgrade window or non-secure conference
            self.pair.set_modes(*rng.choice([(True, True), (False, True)]))
            self.mode_ttl = rng.randrange(5, 30)
        elif r < 0.90:  # a room joins: its first packets are short (no key yet), or one leaves
            if rng.random() < 0.3:
                s = rng.choice(self.audio + self.video)
                self.pair.remove_stream(s.ssrc)
                self.pair.add_stream(s.ssrc, s.kind, m.profile)
                self.pair.set_route(s.ssrc, self.receivers)
                s.rekey(m.rand(16))
            else:
                self.newcomers += 1
                s = m.sender(0xC00 + self.newcomers, rng.choice(["audio", "video"]), seq=60000)
                for _ in range(rng.randrange(1, 4)):  # key announcement lost: short form
                    p = s.rtp(m.payload(), 0xC0)[0]
                    ciphers = {spi: g.cipher for spi, g in m.groups.items()}
                    self.send(p[: len(p) - trailer_length(p, self.fmt, ciphers)] + b"\x00")
                (self.video if s.kind == "video" else self.audio).append(s)
        elif r < 0.93:
            s = rng.choice(self.audio + self.video)
            self.send(_plain_rtp(s.ssrc, rng.randrange(65536), m.payload(), rng.randrange(256)))
        elif r < 0.95:  # plain RTCP
            s = rng.choice(self.audio + self.video)
            self.send(struct.pack("!BBHI", 0x80, 201, 1, s.ssrc))
        elif r < 0.97:  # configuration the twins must refuse alike
            with pytest.raises(CtmsError):
                self.pair.remove_group(rng.choice([10, 20]))
        else:  # a new SPI appears, then goes (nobody holds it)
            self.pair.add_group(30, 2, m.rand(16), m.salt, m.profile)
            self.pair.remove_group(30)


CASES = [
    ("ctms", 1, AES_CM_128_HMAC_SHA1_80),
    ("ctms", 2, AES_CM_128_HMAC_SHA1_32),
    ("ctms", 3, AES_CM_128_HMAC_SHA1_80),
    ("rfc8870", 2, AES_CM_128_HMAC_SHA1_32),
    ("rfc8870", 3, AES_CM_128_HMAC_SHA1_80),
]


@pytest.mark.parametrize(
    ("fmt", "cipher", "profile"), CASES, ids=[f"{f}-c{c}-{p.rtp_tag_len * 8}" for f, c, p in CASES]
)
@pytest.mark.parametrize("seed", [1, 2])
def test_random_mixed_traffic_gives_identical_verdicts_bytes_and_state(
    make_forwarder, fmt: str, cipher: int, profile: Profile, seed: int
) -> None:
    t = Traffic(make_forwarder, fmt, cipher, profile, seed)
    for _ in range(350):
        t.step()
    for packet, rtcp in t.history[-50:]:  # the recent past again: replays now
        t.send(packet, rtcp)
    # The generator did what it says (it is seeded, so this is not a flaky statistic).
    assert set(t.outcomes) >= {
        "forwarded",
        "auth",
        "replay",
        "malformed",
        "unknown_ssrc",
        "unknown_spi",
        "no_key",
    }


def test_roc_rollover_and_rewrap_agree(make_forwarder) -> None:
    """A long run across SEQ 65535 -> 0 with a receiver on another SPI (re-wrap each long
    trailer) and a late receiver (upgrade), checked packet by packet."""
    m = Meeting(lambda f: Pair(Forwarder(f), make_forwarder(f)), "ctms", 2, seed=7)
    m.group(1)
    m.group(2)
    s = m.sender(0x77, "video", spi=1, seq=65300)
    m.receiver("same", 2, 1)
    m.receiver("other", 1, 2)
    for i in range(400):
        if i == 200:
            m.receiver("late", 3, 1)
        v = m.fwd.forward(s.rtp(m.payload(), 0xC0 if i % 30 == 0 else 0x00, long=i % 30 == 0)[0])
        assert v.drop is None
    assert s.roc == 1


# -- the batch API: same verdicts as one by one ---------------------------------------------


@pytest.mark.parametrize("impl", BATCHED)
@pytest.mark.parametrize("seed", [3, 4])
def test_batch_verdicts_equal_one_by_one(impl: str, seed: int) -> None:
    """Replay a recorded mixed run: the reference one by one, the twin in batches of up to
    16 datagrams between configuration calls."""
    from ctms_media.fastpath.batch import Batch

    fmt = "rfc8870" if seed % 2 else "ctms"
    t = Traffic(IMPLEMENTATIONS[impl], fmt, 2, AES_CM_128_HMAC_SHA1_80, seed)
    for _ in range(300):
        t.step()
    ref, twin = Forwarder(fmt), IMPLEMENTATIONS[impl](fmt)
    batch = Batch(16, fan_out=1)
    expected: list[Verdict] = []

    def flush() -> None:
        if batch.count:
            assert batch.forward_all(twin) == expected
        batch.clear()
        expected.clear()

    for event in t.pair.trace:
        if event[0] == "config":
            flush()
            _, name, args = event
            refused = []
            for fwd in (ref, twin):
                try:
                    getattr(fwd, name)(*args)
                except CtmsError as exc:
                    refused.append(type(exc))
            assert len(refused) in (0, 2)
            continue
        _, packet, rtcp = event
        if batch.count == batch.capacity:
            flush()
        batch.add(packet, rtcp)
        expected.append(ref.forward(packet, rtcp))
    flush()
    assert twin.state_snapshot() == ref.state_snapshot()


@pytest.mark.parametrize("impl", BATCHED)
def test_batch_outputs_share_bytes_per_variant_and_resume_when_full(impl: str) -> None:
    """Eight receivers at one position: one output row, eight receiver slots; output arrays
    too small for the whole batch: the run stops between packets and resumes."""
    from ctms_media.fastpath.batch import Batch

    m = Meeting(IMPLEMENTATIONS[impl], "ctms", 2, seed=11)
    ref = Meeting(Forwarder, "ctms", 2, seed=11)
    for mm in (m, ref):
        mm.group(5)
        mm.sender(0x10, "audio", seq=500)
        for i in range(8):
            mm.receiver(f"r{i}", 2, 5)
    s, s_ref = m.senders[0x10], ref.senders[0x10]
    packets = [s.rtp(b"x" * 100, 0x80, long=i == 0)[0] for i in range(12)]
    assert [s_ref.rtp(b"x" * 100, 0x80, long=i == 0)[0] for i in range(12)] == packets
    batch = Batch(12, fan_out=1)
    batch.out_receivers = batch.out_receivers[:20]  # room for two packets' receivers
    batch.fill(packets)
    assert batch.run(m.fwd) == 2
    assert batch.n_out == 2 and batch.n_rcv == 16
    data, slots = batch.output(1)
    assert [m.fwd.receiver_ids[x] for x in slots] == [f"r{i}" for i in range(8)]
    expected = [ref.fwd.forward(p) for p in packets]
    assert [batch.verdict(i, m.fwd.receiver_ids) for i in range(2)] == expected[:2]
    assert bytes(data) == expected[1].outputs[0][0]
    assert batch.run(m.fwd, 2) == 4
    assert [batch.verdict(i, m.fwd.receiver_ids) for i in range(2, 4)] == expected[2:4]
