"""Differential fuzzing of the forwarder twins: the pure-Python reference and every other
implementation get the same configuration calls and the same datagrams, and must give equal
verdicts (drop reason, tail byte, SSRC, output bytes and receivers, switched displays) and an
equal ``state_snapshot()`` after every datagram.

The reference is also checked against the contract on its own: it never raises on packet
bytes, a dropped datagram changes no state (spec/vectors.md), and no receiver is sent a
datagram twice or without being routed.

An *episode* is one pair of fresh forwarders set up from a *scenario* (a conformance vector's
setup, or a generated meeting of libsrtp senders), fed a seeded mix of valid packets that
advance the state, replays, mutants of past and upcoming packets, and configuration changes.
Everything it did is kept as a *trace*, so a failure is written out as a JSON reproducer that
:func:`replay` runs again without the fuzzer.
"""

from __future__ import annotations

import random
import re
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctms_media.conformance import ForwarderFactory, build_forwarder, load_vector
from ctms_media.errors import CtmsError
from ctms_media.forward.verdict import DROP_REASONS, Receiver, Verdict
from ctms_media.fuzz.mutate import Hints, Layout, Mutator, layout_of
from ctms_media.sim.srtp_room import EktGroup, SenderStream, sdes_packet
from ctms_media.wire.ekt import (
    CtmsLong,
    Rfc8870Full,
    Rfc8870Plaintext,
    ctms_short,
    rfc8870_wrap,
    wrap_ctms,
)
from ctms_media.wire.rtp import position_code
from ctms_media.wire.srtp import (
    AES_CM_128_HMAC_SHA1_32,
    AES_CM_128_HMAC_SHA1_80,
    SRTCP_E_BIT,
    Profile,
    profile_named,
    rtcp_auth_key,
    rtcp_tag,
    rtp_auth_key,
    rtp_tag,
)

BATCH_ROW = 2048  # bytes per row of the batch arena (fastpath.batch.DEFAULT_SLOT)
SLOW = 1.0  # seconds for one datagram: ~10^4 times the usual cost, so a hang or a blow-up

# (EKT format, cipher, profile) of generated meetings: every cipher, both tag lengths.
GENERATED_CASES: tuple[tuple[str, int, Profile], ...] = (
    ("ctms", 1, AES_CM_128_HMAC_SHA1_80),
    ("ctms", 1, AES_CM_128_HMAC_SHA1_32),
    ("ctms", 2, AES_CM_128_HMAC_SHA1_32),
    ("ctms", 3, AES_CM_128_HMAC_SHA1_80),
    ("rfc8870", 2, AES_CM_128_HMAC_SHA1_80),
    ("rfc8870", 3, AES_CM_128_HMAC_SHA1_32),
)


class FuzzFailure(Exception):
    """A crash (an exception where the contract promises none) or a twin mismatch."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


# -- trace (de)serialisation: configuration arguments as JSON ----------------------------------


def encode_arg(value: Any) -> Any:
    """A configuration argument as JSON: receivers, profiles and bytes are tagged."""
    if isinstance(value, Receiver):
        return {"receiver": [value.id, value.position, value.spi, value.gated]}
    if isinstance(value, Profile):
        return {"profile": value.name}
    if isinstance(value, bytes | bytearray):
        return {"hex": bytes(value).hex()}
    if isinstance(value, list | tuple):
        return [encode_arg(v) for v in value]
    return value


def decode_arg(value: Any) -> Any:
    if isinstance(value, dict):
        if "receiver" in value:
            rid, pos, spi, gated = value["receiver"]
            return Receiver(rid, pos, spi, gated)
        if "profile" in value:
            return profile_named(value["profile"])
        return bytes.fromhex(value["hex"])
    if isinstance(value, list):
        return [decode_arg(v) for v in value]
    return value


def encode_trace(trace: list[tuple[Any, ...]]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for event in trace:
        if event[0] == "packet":
            out.append(["packet", event[1].hex(), event[2]])
        elif event[0] == "config":
            out.append(["config", event[1], encode_arg(list(event[2]))])
        else:
            out.append(list(event))
    return out


def decode_trace(items: list[list[Any]]) -> list[tuple[Any, ...]]:
    trace: list[tuple[Any, ...]] = []
    for item in items:
        if item[0] == "packet":
            trace.append(("packet", bytes.fromhex(item[1]), item[2]))
        elif item[0] == "config":
            trace.append(("config", item[1], tuple(decode_arg(item[2]))))
        else:
            trace.append(tuple(item))
    return trace


# -- the checker -----------------------------------------------------------------------------


def _describe(want: Verdict, got: Verdict) -> str:
    for name in ("drop", "tail", "ssrc", "rtcp", "switched"):
        a, b = getattr(want, name), getattr(got, name)
        if a != b:
            return f"{name}: reference {a!r}, twin {b!r}"
    if len(want.outputs) != len(got.outputs):
        return f"outputs: reference {len(want.outputs)} variants, twin {len(got.outputs)}"
    for i, ((wd, wr), (gd, gr)) in enumerate(zip(want.outputs, got.outputs, strict=True)):
        if wr != gr:
            return f"output {i} receivers: reference {wr}, twin {gr}"
        if wd != gd:
            return f"output {i} bytes differ ({len(wd)} B vs {len(gd)} B)"
    return "verdicts differ"


class TwinChecker:
    """The reference forwarder and its twins, configured alike and fed alike.

    ``batch``: twins that have ``forward_batch`` get datagrams in runs of 1 to 16 through
    :class:`ctms_media.fastpath.batch.Batch` (the relay's fast path) instead of one by one;
    their verdicts and state are compared at the end of each run.
    """

    def __init__(
        self,
        setup: dict[str, Any],
        factories: dict[str, ForwarderFactory],
        batch: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.setup = setup
        self.names = list(factories)
        self.fwds = {name: build_forwarder(setup, f) for name, f in factories.items()}
        self.ref = self.fwds[self.names[0]]
        self.twins = [(n, self.fwds[n]) for n in self.names[1:]]
        self.trace: list[tuple[Any, ...]] = []
        self.rng = rng or random.Random(0)
        self.batched = [n for n, f in self.twins if batch and hasattr(f, "forward_batch")]
        self._batch: Any = None
        if self.batched:
            from ctms_media.fastpath.batch import Batch

            self._batch = Batch(16, fan_out=2)
        self._pending: list[tuple[bytes, bool | None, Verdict]] = []
        self._run_len = self._next_run_len()
        self.auto_flush = True  # False: runs end only where flush() is called (a replay)
        self.snap = self.ref.state_snapshot()
        self.inputs = 0
        self.last: Verdict | None = None  # the reference's verdict for the latest datagram
        self.refusal: CtmsError | None = None  # the reference's refusal of the latest call

    def _next_run_len(self) -> int:
        return self.rng.choice([1, 2, 3, 5, 8, 13, 16])

    # configuration ---------------------------------------------------------------------------

    def config(self, name: str, *args: Any) -> bool:
        """Apply one configuration call to every forwarder; True if it was accepted.

        Refusals must agree (a CtmsError from all, or from none); any other exception is a
        crash, since configuration comes from the conference layer, not the network.
        """
        self.flush()
        self.trace.append(("config", name, args))
        outcomes: list[str | None] = []
        self.refusal = None
        for impl in self.names:
            try:
                getattr(self.fwds[impl], name)(*args)
            except CtmsError as exc:
                outcomes.append(type(exc).__name__)
                if impl == self.names[0]:
                    self.refusal = exc
            except Exception as exc:
                raise FuzzFailure(
                    "crash", f"{impl}.{name} raised {type(exc).__name__}: {exc}"
                ) from exc
            else:
                outcomes.append(None)
        if len(set(outcomes)) != 1:
            raise FuzzFailure(
                "mismatch", f"{name}: outcomes {dict(zip(self.names, outcomes, strict=True))}"
            )
        self.snap = self.ref.state_snapshot()
        for impl, fwd in self.twins:
            if fwd.state_snapshot() != self.snap:
                raise FuzzFailure("mismatch", f"state after {name} differs ({impl})")
        return outcomes[0] is None

    # packets -----------------------------------------------------------------------------------

    def packet(self, data: bytes, rtcp: bool | None) -> Verdict:
        """Feed one datagram to every forwarder; the reference's verdict."""
        if self.batched:
            data = data[:BATCH_ROW]
        self.trace.append(("packet", data, rtcp))
        self.inputs += 1
        before = self.snap
        self.last = None
        t0 = time.perf_counter()
        try:
            want = self.ref.forward(data, rtcp)
        except Exception as exc:
            raise FuzzFailure(
                "crash", f"{self.names[0]}.forward raised {type(exc).__name__}: {exc}"
            ) from exc
        self.last = want
        slow = time.perf_counter() - t0
        if slow > SLOW:  # a datagram must never cost the relay this much (a DoS)
            raise FuzzFailure("slow", f"{self.names[0]}.forward took {slow:.1f} s")
        after = self.ref.state_snapshot()
        self._check_contract(want, before, after)
        self.snap = after
        for impl, fwd in self.twins:
            if impl in self.batched:
                continue
            t0 = time.perf_counter()
            try:
                got = fwd.forward(data, rtcp)
            except Exception as exc:
                raise FuzzFailure(
                    "crash", f"{impl}.forward raised {type(exc).__name__}: {exc}"
                ) from exc
            slow = time.perf_counter() - t0
            if slow > SLOW:
                raise FuzzFailure("slow", f"{impl}.forward took {slow:.1f} s")
            if got != want:
                raise FuzzFailure("mismatch", f"{impl}: {_describe(want, got)}")
            if fwd.state_snapshot() != after:
                raise FuzzFailure("mismatch", f"{impl}: state_snapshot differs after the packet")
        if self.batched:
            self._pending.append((data, rtcp, want))
            if self.auto_flush and len(self._pending) >= self._run_len:
                self.flush()
        return want

    def _check_contract(self, v: Verdict, before: dict[int, Any], after: dict[int, Any]) -> None:
        if v.drop is not None:
            if v.drop not in DROP_REASONS:
                raise FuzzFailure("contract", f"unknown drop reason {v.drop!r}")
            if v.outputs or v.switched:
                raise FuzzFailure("contract", f"dropped ({v.drop}) yet has outputs")
            if after != before:
                raise FuzzFailure("contract", f"a datagram dropped as {v.drop} changed state")
            return
        seen: set[str] = set()
        routed = {r.id for r in self.ref.routes.get(v.ssrc, ())}
        for _, receivers in v.outputs:
            for rid in receivers:
                if rid in seen:
                    raise FuzzFailure("contract", f"receiver {rid} sent one datagram twice")
                if rid not in routed:
                    raise FuzzFailure("contract", f"receiver {rid} is not routed")
                seen.add(rid)

    def flush(self) -> None:
        """Run the pending datagrams through the batched twins and compare."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._run_len = self._next_run_len()
        self.trace.append(("flush",))
        batch = self._batch
        for impl in self.batched:
            fwd = self.fwds[impl]
            batch.clear()
            for data, rtcp, _ in pending:
                batch.add(data, rtcp)
            try:
                got = batch.forward_all(fwd)
            except Exception as exc:
                raise FuzzFailure(
                    "crash", f"{impl}.forward_batch raised {type(exc).__name__}: {exc}"
                ) from exc
            for (_, _, want), g in zip(pending, got, strict=True):
                if g != want:
                    raise FuzzFailure("mismatch", f"{impl} (batch): {_describe(want, g)}")
            if fwd.state_snapshot() != self.snap:
                raise FuzzFailure("mismatch", f"{impl} (batch): state_snapshot differs")


def replay(repro: dict[str, Any], factories: dict[str, ForwarderFactory]) -> FuzzFailure | None:
    """Run a twins reproducer again: the failure it still shows, or None once fixed."""
    events = decode_trace(repro["trace"])
    batch = any(e[0] == "flush" for e in events)
    chk = TwinChecker(repro["setup"], factories, batch=batch)
    chk.auto_flush = False  # batch runs end exactly where the trace says
    try:
        for event in events:
            if event[0] == "packet":
                chk.packet(event[1], event[2])
            elif event[0] == "config":
                chk.config(event[1], *event[2])
            else:
                chk.flush()
        chk.flush()
    except FuzzFailure as failure:
        return failure
    return None


def signature(failure: FuzzFailure) -> tuple[str, str]:
    """What makes two failures the same one: kind and message with the numbers out."""
    return failure.kind, re.sub(r"\d+", "N", failure.message)


def minimize(
    repro: dict[str, Any], factories: dict[str, ForwarderFactory], seconds: float = 120.0
) -> dict[str, Any]:
    """A shorter trace that still ends in the same failure (ddmin over the events, the
    failing last one always kept); stops improving after ``seconds``."""
    first = replay(repro, factories)
    if first is None:
        return repro
    want = signature(first)
    events = list(repro["trace"])
    deadline = time.monotonic() + seconds

    def fails(candidate: list[Any]) -> bool:
        got = replay({**repro, "trace": candidate}, factories)
        return got is not None and signature(got) == want

    parts = 2
    while len(events) > 1 and time.monotonic() < deadline:
        body, last = events[:-1], events[-1]
        size = max(1, -(-len(body) // parts))
        for start in range(0, len(body), size):
            candidate = body[:start] + body[start + size :] + [last]
            if fails(candidate):
                events = candidate
                parts = max(parts - 1, 2)
                break
        else:
            if size == 1:
                break
            parts = min(len(body), parts * 2)
    return {**repro, "trace": events, "minimized": True}


# -- scenarios ---------------------------------------------------------------------------------


class Scenario:
    """A forwarder setup in conformance-vector form and a source of valid datagrams."""

    name = "scenario"

    def __init__(self, setup: dict[str, Any]) -> None:
        self.setup = setup
        self.ekt_format = setup.get("ekt_format", "ctms")
        self.fwd: Any = None  # the reference forwarder, for the current groups and streams

    def next_valid(self) -> tuple[bytes, bool] | None:
        """The next valid datagram in the scenario's order, None when there is none."""
        return None

    def upcoming(self) -> list[tuple[bytes, bool]]:
        """Valid datagrams not sent yet: mutants of these reach the deepest checks."""
        return []

    def layout(self, data: bytes, rtcp: bool | None) -> Layout | None:
        fwd = self.fwd
        is_rtcp = rtcp if rtcp is not None else len(data) >= 2 and 192 <= data[1] <= 223

        def tag_len(ssrc: int) -> int | None:
            st = fwd.streams.get(ssrc)
            return None if st is None else st.profile.rtp_tag_len

        def cipher(spi: int) -> int | None:
            g = fwd.groups.get(spi)
            return None if g is None else int(g.cipher)

        fmt = self.ekt_format if fwd.srtp else "plain"
        return layout_of(data, is_rtcp, fmt, tag_len, cipher)

    def hints(self, donor: Callable[[], bytes]) -> Hints:
        return Hints(tuple(self.fwd.streams), tuple(self.fwd.groups), donor)


class VectorScenario(Scenario):
    """A conformance vector: its setup and its packets in order."""

    def __init__(self, path: Path) -> None:
        vector = load_vector(path)
        super().__init__({k: v for k, v in vector.items() if k != "packets"})
        self.name = f"vector:{path.name}"
        self.packets = [
            (bytes.fromhex(p["in"]), bool(p.get("rtcp", False))) for p in vector["packets"]
        ]
        self.pos = 0

    def next_valid(self) -> tuple[bytes, bool] | None:
        if self.pos >= len(self.packets):
            return None
        self.pos += 1
        return self.packets[self.pos - 1]

    def upcoming(self) -> list[tuple[bytes, bool]]:
        return self.packets[self.pos :] or self.packets


def _plain_rtp(ssrc: int, seq: int, payload: bytes, tail: int, position: int) -> bytes:
    return (
        struct.pack("!BBHIII", 0x81, 96, seq & 0xFFFF, 0, ssrc, position << 8)
        + payload
        + bytes([tail])
    )


class SyntheticStream:
    """A sender without libsrtp, at any ROC and SRTCP index.

    The relay never decrypts, so random bytes can stand in for the ciphertext while the tag
    (the sender's k_a over header, payload, tail byte and ROC) and the EKT trailer are
    exact: the relay cannot tell this sender from a real one. libsrtp can only walk a
    stream's ROC up 2^15 packets at a time, so this is how the fuzzer reaches ROC 2^32 - 1,
    the 48-bit index limit and an SRTCP index about to wrap.
    """

    def __init__(
        self,
        rng: random.Random,
        ssrc: int,
        kind: str,
        group: EktGroup,
        position: int,
        seq: int,
        roc: int,
    ) -> None:
        self.rng = rng
        self.ssrc = ssrc
        self.kind = kind
        self.position = position
        self.seq = seq
        self.roc = roc
        self.epoch = 0
        self.srtcp_index = rng.choice([0, 1, 0x7FFF_FFF0, rng.getrandbits(31)])
        self.group = group
        self._rekeyed(rng.randbytes(16))

    def _rekeyed(self, key: bytes) -> None:
        self.master_key = key
        self.isn = self.seq
        self._rtp_auth = rtp_auth_key(key, self.group.salt)
        self._rtcp_auth = rtcp_auth_key(key, self.group.salt)
        self._announce = True

    def rekey(self, key: bytes, group: EktGroup | None = None) -> None:
        if group is not None:
            self.group = group
        self.epoch += 1
        self._rekeyed(key)

    def trailer(self, long: bool) -> bytes:
        g, roc = self.group, self.roc & 0xFFFF_FFFF
        if g.ekt_format == "ctms":
            if not long:
                return ctms_short(self.rng.getrandbits(7))
            return CtmsLong(
                wrap_ctms(g.cipher, g.kek, self.master_key), roc, self.isn, g.spi
            ).encode()
        if not long:
            return b"\x00"
        ct = rfc8870_wrap(g.kek, Rfc8870Plaintext(self.master_key, self.ssrc, roc))
        return Rfc8870Full(ct, g.spi, self.epoch & 0xFFFF).encode()

    def rtp(self, payload: bytes, tail: int, long: bool = False) -> tuple[bytes, None]:
        header = struct.pack(
            "!BBHIII", 0x81, 96, self.seq, 0, self.ssrc, position_code(self.position, 0)
        )
        body = header + payload + bytes([tail])
        tag = rtp_tag(self._rtp_auth, body, self.roc, self.group.profile.rtp_tag_len)
        packet = body + tag + self.trailer(long or self._announce)
        self._announce = False
        self.seq = (self.seq + 1) & 0xFFFF
        if not self.seq:
            self.roc = (self.roc + 1) & 0xFFFF_FFFF  # past 2^48 packets the ROC wraps
        return packet, None

    def rtcp(self, plain_rtcp: bytes, long: bool = True) -> bytes:
        word = SRTCP_E_BIT | self.srtcp_index
        self.srtcp_index = (self.srtcp_index + 1) & 0x7FFF_FFFF
        body = plain_rtcp[:8] + self.rng.randbytes(len(plain_rtcp) - 8) + word.to_bytes(4, "big")
        return body + rtcp_tag(self._rtcp_auth, body, 10) + self.trailer(long)


class GeneratedScenario(Scenario):
    """A meeting of senders (two groups, audio and video, a receiver per position, a
    plain-only one), producing fresh valid packets with rekeys, SPI moves, ROC rollover,
    SRTCP with long and short trailers, and plain RTP for the downgrade modes. Most senders
    are libsrtp's; one in four is a :class:`SyntheticStream` at an extreme ROC."""

    def __init__(self, rng: random.Random, fmt: str, cipher: int, profile: Profile) -> None:
        self.rng = rng
        self.profile = profile
        salt = rng.randbytes(14)
        max_spi = 0x7FFF if fmt == "ctms" else 0xFFFF
        spis = rng.sample(range(1, max_spi + 1), 2)
        other_cipher = rng.choice([2, 3] if fmt == "rfc8870" else [1, 2, 3])
        self.groups = [
            EktGroup(spi, c, rng.randbytes(32 if c == 3 else 16), salt, profile, fmt)
            for spi, c in zip(spis, (cipher, other_cipher), strict=True)
        ]
        ssrcs = rng.sample(range(1, 1 << 32), 4)
        start = rng.choice([rng.randrange(65536), 65535 - rng.randrange(40), rng.randrange(40)])
        roc = rng.choice([0, 0, 0, 1, 2])
        self.senders: list[SenderStream | SyntheticStream] = []
        for i, (ssrc, kind, pos) in enumerate(
            zip(ssrcs, ("audio", "audio", "video", "video"), (1, 3, 2, 4), strict=True)
        ):
            seq = (start + 7919 * i) & 0xFFFF
            if rng.random() < 0.25:
                far = rng.choice(
                    [0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFE, 0xFFFF_FFFF, rng.getrandbits(32)]
                )
                self.senders.append(
                    SyntheticStream(rng, ssrc, kind, self.groups[i % 2], pos, seq, far)
                )
            else:
                self.senders.append(
                    SenderStream(
                        ssrc, kind, self.groups[i % 2], rng.randbytes(16), pos, seq, roc=roc
                    )
                )
        receivers = [("r1", 1, 0), ("r2", 2, 0), ("r3", 2, 1), ("r4", 3, 1), ("r5", 4, 0)]
        setup = {
            "name": "generated",
            "ekt_format": fmt,
            "groups": [
                {
                    "spi": g.spi,
                    "ekt_cipher": g.cipher,
                    "kek": g.kek.hex(),
                    "salt": g.salt.hex(),
                    "profile": profile.name,
                }
                for g in self.groups
            ],
            "streams": [
                {"ssrc": s.ssrc, "kind": s.kind, "profile": profile.name} for s in self.senders
            ],
            "receivers": [{"id": r, "position": p, "spi": spis[i]} for r, p, i in receivers]
            + [{"id": "plain", "position": 2, "spi": 0}],
        }
        super().__init__(setup)
        self.name = f"generated:{fmt}-c{cipher}-{profile.rtp_tag_len * 8}"
        self.ahead: list[tuple[bytes, bool]] = []

    def _make(self) -> tuple[bytes, bool]:
        rng = self.rng
        s = rng.choice(self.senders)
        r = rng.random()
        if r < 0.03:  # rekey, sometimes onto the other group (a move during a rekey)
            s.rekey(rng.randbytes(16), rng.choice(self.groups))
        if r < 0.12:
            return s.rtcp(sdes_packet(s.ssrc), long=rng.random() < 0.6), True
        if r < 0.16 and self.fwd is not None and self.fwd.plain:
            seq = rng.randrange(65536)
            return _plain_rtp(
                s.ssrc, seq, rng.randbytes(rng.randrange(40)), 0xC0, s.position
            ), False
        tail = rng.choice([0x00, 0x40, 0x80, 0xC0, 0x80 | rng.randrange(128), rng.getrandbits(8)])
        payload = rng.randbytes(rng.choice([0, 1, 20, rng.randrange(300)]))
        return s.rtp(payload, tail, long=rng.random() < 0.2)[0], False

    def _fill(self) -> None:
        while len(self.ahead) < 4:
            self.ahead.append(self._make())

    def next_valid(self) -> tuple[bytes, bool] | None:
        self._fill()
        if self.rng.random() < 0.05 and len(self.ahead) > 1:  # reordering
            return self.ahead.pop(self.rng.randrange(1, len(self.ahead)))
        return self.ahead.pop(0)

    def upcoming(self) -> list[tuple[bytes, bool]]:
        self._fill()
        return self.ahead


# -- the target ---------------------------------------------------------------------------------


class TwinTarget:
    """Runs episodes of differential fuzzing until a budget of datagrams is used."""

    name = "twins"

    def __init__(
        self,
        rng: random.Random,
        factories: dict[str, ForwarderFactory],
        vectors: list[Path],
        on_failure: Callable[[FuzzFailure, dict[str, Any]], None],
    ) -> None:
        self.rng = rng
        self.factories = factories
        self.vectors = vectors
        self.on_failure = on_failure
        self.mutator = Mutator(rng)
        self.outcomes: Counter[str] = Counter()
        self.inputs = 0
        self.episodes = 0
        self.batch_inputs = 0
        self.configs = 0
        self.donors: list[bytes] = []  # datagrams of earlier episodes, for splices

    def _scenario(self) -> Scenario:
        if self.vectors and self.rng.random() < 0.35:
            return VectorScenario(self.rng.choice(self.vectors))
        fmt, cipher, profile = self.rng.choice(GENERATED_CASES)
        return GeneratedScenario(random.Random(self.rng.getrandbits(64)), fmt, cipher, profile)

    def _donor(self) -> bytes:
        return self.rng.choice(self.donors) if self.donors else self.rng.randbytes(40)

    def run(self, budget: int) -> int:
        """Up to ``budget`` datagrams; returns how many were fed."""
        fed = 0
        while fed < budget:
            fed += self._episode(budget - fed)
        return fed

    def _episode(self, budget: int) -> int:
        rng = self.rng
        sc = self._scenario()
        batch = rng.random() < 0.25
        chk = TwinChecker(sc.setup, self.factories, batch, random.Random(rng.getrandbits(32)))
        sc.fwd = chk.ref
        self.episodes += 1
        length = min(budget, rng.randrange(200, 3000))
        history: list[tuple[bytes, bool]] = []
        hints = sc.hints(self._donor)
        try:
            while chk.inputs < length:
                r = rng.random()
                if r < 0.006:
                    self._config(chk, sc)
                    hints = sc.hints(self._donor)
                    continue
                item: tuple[bytes, bool | None] | None = None
                if r < 0.30:
                    item = sc.next_valid()
                    if item is not None:
                        history.append(item)
                elif r < 0.34 and history:
                    item = rng.choice(history)  # a replay
                if item is None:
                    pool = sc.upcoming() if rng.random() < 0.5 or not history else history[-64:]
                    base, rtcp = rng.choice(pool)
                    item = self.mutator.mutate(base, rtcp, sc.layout(base, rtcp), hints)
                v = chk.packet(*item)
                self.outcomes[v.drop or ("switched" if v.switched else "forwarded")] += 1
            chk.flush()
        except FuzzFailure as failure:
            self.on_failure(
                failure,
                {
                    "target": self.name,
                    "scenario": sc.name,
                    "setup": sc.setup,
                    "implementations": chk.names,
                    "trace": encode_trace(chk.trace),
                },
            )
        if history:
            self.donors.extend(d for d, _ in rng.sample(history, min(8, len(history))))
            del self.donors[:-256]
        self.inputs += chk.inputs
        if chk.batched:
            self.batch_inputs += chk.inputs
        return max(chk.inputs, 1)

    def _config(self, chk: TwinChecker, sc: Scenario) -> None:
        """One configuration change the conference layer could make (or must be refused)."""
        self.configs += 1
        rng = self.rng
        fwd = chk.ref
        ssrcs = sorted(fwd.streams)
        spis = sorted(fwd.groups)
        fmt = sc.ekt_format
        receivers = [Receiver(r["id"], r["position"], r["spi"]) for r in sc.setup["receivers"]]
        r = rng.random()
        if r < 0.35 and ssrcs:  # a new route: subset, positions, SPIs, gated video
            ssrc = rng.choice(ssrcs)
            video = fwd.streams[ssrc].kind == "video"
            route = [
                Receiver(
                    x.id,
                    rng.choice([x.position, 1, 2, 3, 4]),
                    rng.choice([x.spi, 0, *spis]) if x.spi else 0,
                    gated=video and rng.random() < 0.4,
                )
                for x in receivers
                if rng.random() < 0.75
            ]
            chk.config("set_route", ssrc, route)
        elif r < 0.40 and ssrcs:  # a wide route: many positions, so many variants and tags
            route = [
                Receiver(f"m{i}", rng.randrange(256), rng.choice([0, *spis]))
                for i in range(rng.choice([16, 64, 300]))
            ]
            chk.config("set_route", rng.choice(ssrcs), route)
        elif r < 0.45 and ssrcs:  # a route the forwarder must refuse
            bad = rng.choice(
                [
                    [Receiver("x", 2, 0x7FFE)],
                    [Receiver("x", 2, 0), Receiver("x", 3, 0)],
                    [Receiver("x", 256, 0)],
                ]
            )
            chk.config("set_route", rng.choice(ssrcs), bad)
        elif r < 0.55:  # downgrade second, non-secure, back to secure (or refused)
            chk.config(
                "set_modes",
                *rng.choice(
                    [(True, True), (False, True), (True, False), (True, False), (False, False)]
                ),
            )
        elif r < 0.65:  # a new group appears (rekey), maybe with sizes that must be refused
            max_spi = 0x7FFF if fmt == "ctms" else 0xFFFF
            cipher = rng.choice([2, 3] if fmt == "rfc8870" else [1, 2, 3])
            kek = rng.randbytes(32 if cipher == 3 else 16)
            spi = rng.randrange(1, max_spi + 1)
            g0 = next(iter(fwd.groups.values()), None)
            salt = g0.salt if g0 is not None else rng.randbytes(14)
            profile = g0.profile if g0 is not None else AES_CM_128_HMAC_SHA1_80
            if rng.random() < 0.2:
                kek, cipher, spi = rng.choice(
                    [
                        (kek[:8], cipher, spi),
                        (kek, 1 if fmt == "rfc8870" else 9, spi),
                        (kek, cipher, max_spi + 1),
                    ]
                )
            ok = chk.config("add_group", spi, cipher, kek, salt, profile)
            if ok and isinstance(sc, GeneratedScenario):
                sc.groups.append(EktGroup(spi, cipher, kek, salt, profile, fmt))
        elif r < 0.75 and spis:  # a group goes (refused while a receiver holds it)
            chk.config("remove_group", rng.choice(spis))
        elif r < 0.9 and ssrcs:  # a room leaves and comes back: its keys are forgotten
            ssrc = rng.choice(ssrcs)
            st = fwd.streams[ssrc]
            kind, profile = st.kind, st.profile
            chk.config("remove_stream", ssrc)
            chk.config("add_stream", ssrc, kind, profile)
            chk.config("set_route", ssrc, receivers)
        elif ssrcs:  # declaring an SSRC twice, or an unknown kind: refused alike
            chk.config(
                "add_stream",
                rng.choice(ssrcs),
                rng.choice(["audio", "data"]),
                AES_CM_128_HMAC_SHA1_80,
            )
