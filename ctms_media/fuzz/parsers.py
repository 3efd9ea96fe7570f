"""Fuzzing every wire parser on its own: each must either return or raise one of the
project's errors (``CtmsError``), never ``IndexError``/``struct.error``/``ValueError`` — the
relay counts a bad datagram with one ``except CtmsError`` (``ctms_media/errors.py``), so
anything else would escape to the event loop.

Beyond "no crash", the parsers are held to properties that must hold for *any* bytes:
the two RTP framing functions agree, decoders round-trip through their encoders, the replay
window matches a plain set-based model, index estimation lands within half a sequence cycle.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ctms_media.dtls.hop import HopSrtcp
from ctms_media.dtls.negotiator import HopKeys, split_records
from ctms_media.errors import CtmsError
from ctms_media.fuzz.mutate import Mutator
from ctms_media.fuzz.twins import SLOW, FuzzFailure
from ctms_media.wire import control, ekt, rtp, srtp

PARSERS = (
    "classify",
    "is_control_packet",
    "RtpHeader.parse",
    "rtp_header_length",
    "RtcpHeader.parse",
    "ctms_tail_spi",
    "rfc8870_tail",
    "CtmsLong.decode",
    "Rfc8870Full.decode",
    "Rfc8870Plaintext.decode",
    "unwrap_ctms",
    "rfc8870_unwrap",
    "decode_control",
    "decode_feedback",
    "rtcp_routing",
    "HopSrtcp.unprotect",
    "split_records",
    "estimate_index",
    "ReplayWindow",
    "tail/position codes",
)

KINDS = ("stun", "dtls", "rtp", "rtcp", "unknown")


class ParserTarget:
    """Feeds mutated datagrams to every parser of ``ctms_media/wire`` (and the two DTLS-side
    byte parsers the relay runs on received data)."""

    name = "parsers"

    def __init__(
        self,
        rng: random.Random,
        seeds: list[tuple[bytes, tuple[tuple[int, bytes], ...]]],
        on_failure: Callable[[FuzzFailure, dict[str, Any]], None],
    ) -> None:
        """``seeds``: datagrams, each with the (EKT cipher, KEK) pairs of its setup, so an
        unmutated EMK really unwraps and the unwrap round trip is exercised."""
        self.rng = rng
        self.seeds = seeds or [(b"\x80" * 12, ())]
        self.on_failure = on_failure
        self.mutator = Mutator(rng)
        self.outcomes: Counter[str] = Counter()
        self.inputs = 0
        self.dtls_added = False
        keys = HopKeys("AES_CM_128_HMAC_SHA1_80", 1, *(rng.randbytes(n) for n in (16, 14, 16, 14)))
        self.hop = HopSrtcp(keys)
        self.endpoint_hop = HopSrtcp(keys.mirrored())
        self.default_keks: tuple[tuple[int, bytes], ...] = (
            (1, rng.randbytes(16)),
            (2, rng.randbytes(16)),
            (3, rng.randbytes(32)),
        )
        # A few control packets under the hop keys: mutants of them reach libsrtp's checks.
        for msg in (control.GspAck(7), control.RekeyDone(7), control.Downgrade()):
            plain = control.encode_control(msg, 0x1234)
            self.seeds.append((plain, ()))
            self.seeds.append((self.endpoint_hop.protect(plain), ()))

    def add_seeds(self, datagrams: list[bytes]) -> None:
        """More starting points (the DTLS flights a relay world recorded)."""
        self.seeds.extend((d, ()) for d in datagrams)
        self.dtls_added = True

    def run(self, budget: int) -> int:
        rng = self.rng
        for _ in range(budget):
            data, keks = rng.choice(self.seeds)
            r = rng.random()
            if r < 0.05:
                data = rng.randbytes(rng.randrange(64))
            elif r < 0.12:
                data = self.endpoint_hop.protect(
                    control.encode_control(control.GspAck(rng.getrandbits(16)), 0x1234)
                )
            elif r < 0.97:
                data = self.mutator.mutate(data, None, None, _NO_HINTS)[0]
            self.check(data, keks or self.default_keks)
        self.inputs += budget
        return budget

    def check(self, data: bytes, keks: tuple[tuple[int, bytes], ...] = ()) -> None:
        """Every parser on ``data``; a failure is reported with ``data`` as the reproducer."""
        t0 = time.perf_counter()
        try:
            check_all(data, keks or self.default_keks, self.hop, self.outcomes)
            slow = time.perf_counter() - t0
            if slow > SLOW:
                raise FuzzFailure("slow", f"the parsers took {slow:.1f} s over one input")
        except FuzzFailure as failure:
            self.on_failure(
                failure,
                {
                    "target": self.name,
                    "input": data.hex(),
                    "keks": [[c, k.hex()] for c, k in keks],
                },
            )


class _NoHints:
    ssrcs = ()
    spis = ()
    donor = None


_NO_HINTS: Any = _NoHints()


def _call(name: str, fn: Callable[[], Any], out: Counter[str]) -> Any:
    """Run one parser: its result, or None when it refused the bytes with a CtmsError."""
    try:
        result = fn()
    except CtmsError:
        out[f"{name}:refused"] += 1
        return None
    except Exception as exc:
        raise FuzzFailure("crash", f"{name} raised {type(exc).__name__}: {exc}") from exc
    out[f"{name}:ok"] += 1
    return result


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise FuzzFailure("property", message)


def check_all(
    data: bytes,
    keks: tuple[tuple[int, bytes], ...],
    hop: HopSrtcp | None,
    out: Counter[str],
) -> None:
    """The parser checks on one datagram (also what a parsers reproducer replays)."""
    n = len(data)
    kind = _call("classify", lambda: rtp.classify(data), out)
    _expect(kind in KINDS, f"classify gave {kind!r}")
    is_ctl = _call("is_control_packet", lambda: control.is_control_packet(data), out)
    _expect(
        is_ctl == (n >= 8 and data[0] >> 6 == 2 and data[1] == control.RTCP_PT_APP),
        "is_control_packet disagrees with its definition",
    )

    # RTP framing: the full parser and the forwarder's fast check agree.
    hdr = _call("RtpHeader.parse", lambda: rtp.RtpHeader.parse(data), out)
    hlen = _call("rtp_header_length", lambda: rtp.rtp_header_length(data), out)
    if hlen is not None:
        _expect(hdr is not None and hdr.length == hlen and hlen <= n, "RTP framings disagree")
    elif hdr is not None:
        _expect(hdr.cc == 0, "rtp_header_length refused a header RtpHeader.parse framed")
    if hdr is not None:
        _expect(hdr.length <= n and len(hdr.csrcs) == hdr.cc, "RtpHeader fields out of range")
    rtcp_hdr = _call("RtcpHeader.parse", lambda: rtp.RtcpHeader.parse(data), out)
    if rtcp_hdr is not None:
        _expect(rtcp_hdr.length <= n and 192 <= rtcp_hdr.packet_type <= 223, "RtcpHeader range")

    # EKT trailers, read off the end of the datagram and of the bytes after the header.
    region = data[hlen:] if hlen is not None else data
    spi = _call("ctms_tail_spi", lambda: ekt.ctms_tail_spi(region), out)
    _call("rfc8870_tail", lambda: ekt.rfc8870_tail(region), out)
    for size in (24 + 8, 16 + 8, 40 + 8):
        t = data[-size:] if n >= size else data
        long = _call("CtmsLong.decode", lambda t=t: ekt.CtmsLong.decode(t), out)
        if long is not None:
            _expect(long.encode() == bytes(t), "CtmsLong decode/encode round trip")
            if len(t) == n:
                _expect(ekt.ctms_tail_spi(data) == long.spi, "CTMS SPI read two ways")
    if spi is not None and hlen is not None:
        _expect(0 <= spi <= ekt.MAX_CTMS_SPI, "CTMS SPI past 15 bits")
    full_len = ekt.rfc8870_full_length()
    f = data[-full_len:] if n >= full_len else data
    full = _call("Rfc8870Full.decode", lambda: ekt.Rfc8870Full.decode(f), out)
    if full is not None:
        _expect(full.encode() == bytes(f), "Rfc8870Full decode/encode round trip")
    plain = data[: 1 + data[0] + 8] if n else data
    pt = _call("Rfc8870Plaintext.decode", lambda: ekt.Rfc8870Plaintext.decode(plain), out)
    if pt is not None:
        _expect(pt.encode() == bytes(plain), "Rfc8870Plaintext decode/encode round trip")

    # EMK unwrap under the setup's KEKs: ECB always answers, key wrap checks integrity, and
    # what unwraps wraps back to the same bytes (both wraps are deterministic).
    for cipher, kek in keks:
        if cipher == ekt.EktCipher.AES_128_ECB:
            emk = data[-24:-8] if n >= 24 else data[:16]
        else:
            emk = data[-32:-8] if n >= 32 else data  # RFC 3394 of a 16-byte key: 24 B
        key = _call("unwrap_ctms", lambda c=cipher, k=kek, e=emk: ekt.unwrap_ctms(c, k, e), out)
        if key is not None:
            _expect(ekt.wrap_ctms(cipher, kek, key) == bytes(emk), "CTMS wrap(unwrap(x)) != x")
        if cipher != ekt.EktCipher.AES_128_ECB and full is not None:
            ct = full.ciphertext
            p = _call("rfc8870_unwrap", lambda k=kek, c=ct: ekt.rfc8870_unwrap(k, c), out)
            if p is not None:
                _expect(ekt.rfc8870_wrap(kek, p) == ct, "RFC 8870 wrap(unwrap(x)) != x")

    # Control and feedback codecs; plain control round-trips exactly.
    msg = _call("decode_control", lambda: control.decode_control(data), out)
    if msg is not None:
        _expect(control.encode_control(msg[1], msg[0]) == data, "control decode/encode round trip")
    _call("decode_feedback", lambda: control.decode_feedback(data), out)
    for encrypted in (True, False):
        routing = _call("rtcp_routing", lambda e=encrypted: control.rtcp_routing(data, e), out)
        _expect(routing is not None, "rtcp_routing refused bytes (it must classify anything)")
    if hop is not None:
        _call("HopSrtcp.unprotect", lambda: hop.unprotect(data), out)
    records = _call("split_records", lambda: split_records(data), out)
    _expect(records is not None and b"".join(records) == data, "split_records lost bytes")

    # Index estimation and the replay window, driven by the datagram's bytes.
    if n >= 8:
        reference = int.from_bytes(data[2:8], "big")
        seq = int.from_bytes(data[:2], "big")
        est = _call("estimate_index", lambda: srtp.estimate_index(reference, seq), out)
        _expect(
            est is not None and est & 0xFFFF == seq and abs(est - reference) <= 0x8000,
            f"estimate_index({reference}, {seq}) = {est}",
        )
    _replay_model(data, out)
    if n:
        b = data[-1]
        _expect(rtp.AudioTail.decode(b).encode() == b, "audio tail byte round trip")
        _expect(rtp.VideoTail.decode(b).encode() == b & 0xC0, "video tail byte round trip")
        _expect(
            rtp.split_position_code(rtp.position_code(data[0], b)) == (data[0], b),
            "position code round trip",
        )
        out["tail/position codes:ok"] += 1


def _replay_model(data: bytes, out: Counter[str]) -> None:
    """ReplayWindow against a set: old (<= highest - 1024), negative and seen indices are
    refused, everything else accepted, whatever order the indices come in."""
    window = srtp.ReplayWindow()
    seen: set[int] = set()
    base = 3000
    for i in range(0, min(len(data), 64) - 1, 2):
        step = int.from_bytes(data[i : i + 2], "big", signed=True)
        index = base + (step if data[i] & 0x40 else step % 2048 - 1024)
        highest = max(seen) if seen else -1
        model = index >= 0 and index not in seen and (highest < 0 or index > highest - 1024)
        got = window.check(index)
        _expect(got == model, f"ReplayWindow.check({index}) = {got}, model {model}")
        if got:
            window.accept(index)
            seen.add(index)
            base = index
    out["ReplayWindow:ok"] += 1
