"""Seeded, structure-aware mutations of (S)RTP/(S)RTCP datagrams.

Random bytes almost never get past the framing checks, so most of a plain byte fuzzer's
inputs would exercise the first twenty lines of the forwarder. The mutations here know where
each field of an uplink datagram sits (:class:`Layout`): header, CSRC position code, tail
byte, tag, and the EKT trailer's SPI, EMK, ROC, ISN, Epoch, Length and type byte, so a
mutated packet usually fails exactly one late check, which is where the interesting code is.
Generic byte-level mutations (flips, sets, truncation, extension, splices) run beside them so
that nothing depends on the layout being right.

Everything is driven by one :class:`random.Random`, so a seed reproduces a run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ctms_media.wire.ekt import CTMS_FIXED, RFC8870_FIXED, ctms_emk_length
from ctms_media.wire.rtp import RTP_FIXED_HEADER

INTERESTING_8 = (
    0x00,
    0x01,
    0x02,
    0x03,
    0x3F,
    0x40,
    0x7F,
    0x80,
    0x81,
    0xBF,
    0xC0,
    0xC8,
    0xCC,
    0xCE,
    0xDF,
    0xE0,
    0xFE,
    0xFF,
)
INTERESTING_16 = (0, 1, 2, 7, 46, 47, 48, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF)
INTERESTING_32 = (0, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF)
SEQ_DELTAS = (1, -1, 2, -2, 1023, 1024, 1025, -1023, -1024, -1025, 0x7FFF, 0x8000, 0x8001)
MAX_LEN = 4096  # inputs never grow past this: larger than any datagram a socket delivers


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the fields of one uplink datagram sit, as far as its seed's setup tells.

    Offsets from the start (``header``) stay right after the tail is mutated, offsets from
    the end (tag, trailer) after the front is; the mutations clamp to the bytes they find.
    """

    rtcp: bool
    header: int  # RTP header with CSRCs and extension; 8 for (S)RTCP
    tag_len: int  # 0 for plain RTP/RTCP
    trailer_len: int  # 0 for plain; 1 for a short EKT trailer
    ekt_format: str  # "ctms", "rfc8870" or "plain"
    emk_len: int = 0  # CTMS long trailer: octets of the EMK


def layout_of(
    data: bytes,
    rtcp: bool,
    ekt_format: str,
    tag_len_of: Callable[[int], int | None],
    cipher_of: Callable[[int], int | None],
) -> Layout | None:
    """The layout of a datagram of a known setup; None when it does not frame.

    ``tag_len_of(ssrc)`` gives the stream's RTP/RTCP tag length (None: undeclared SSRC),
    ``cipher_of(spi)`` a group's EKT cipher (None: unknown SPI).
    """
    n = len(data)
    if rtcp:
        if n < 8:
            return None
        ssrc = int.from_bytes(data[4:8], "big")
        header = 8
    else:
        if n < RTP_FIXED_HEADER:
            return None
        cc = data[0] & 0x0F
        header = RTP_FIXED_HEADER + 4 * cc
        if data[0] & 0x10 and n >= header + 4:
            header += 4 + 4 * int.from_bytes(data[header + 2 : header + 4], "big")
        if header > n:
            return None
        ssrc = int.from_bytes(data[8:12], "big")
    if ekt_format == "plain":
        return Layout(rtcp, header, 0, 0, "plain")
    tag = tag_len_of(ssrc)
    if tag is None:
        return None
    if rtcp:
        tag = 10
    last = data[-1]
    emk = 0
    if ekt_format == "ctms":
        if last & 1:
            cipher = cipher_of(((data[-2] << 8) | last) >> 1) if n >= 2 else None
            if cipher is None:
                return None
            emk = ctms_emk_length(cipher)
            trailer = emk + CTMS_FIXED
        else:
            trailer = 1
    elif last == 0x02 and n >= RFC8870_FIXED:
        trailer = int.from_bytes(data[-3:-1], "big")
    else:
        trailer = 1
    if header + tag + trailer > n:
        return None
    return Layout(rtcp, header, tag, trailer, ekt_format, emk)


@dataclass
class Hints:
    """What the mutations may plant: the setup's SSRCs and SPIs, and a donor of other
    datagrams for splices and trailer grafts."""

    ssrcs: Sequence[int] = ()
    spis: Sequence[int] = ()
    donor: Callable[[], bytes] | None = None


def _put(buf: bytearray, off: int, value: int, width: int) -> None:
    if off >= 0 and off + width <= len(buf):
        buf[off : off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")


def _get(buf: bytearray, off: int, width: int) -> int:
    if off >= 0 and off + width <= len(buf):
        return int.from_bytes(buf[off : off + width], "big")
    return 0


Op = Callable[["Mutator", bytearray, Layout | None, Hints], bytearray | None]


@dataclass
class Mutator:
    """Applies one to a few weighted mutations to a datagram.

    Each op returns the new bytes, or None when it does not apply to this datagram (then a
    generic op runs instead), so the weights say how often an op is *tried*.
    """

    rng: random.Random
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._names = [name for name, _, _ in _OPS]
        self._ops = [op for _, op, _ in _OPS]
        self._cum: list[float] = []
        total = 0.0
        for _, _, w in _OPS:
            total += w
            self._cum.append(total)

    def mutate(
        self, data: bytes, rtcp: bool | None, layout: Layout | None, hints: Hints
    ) -> tuple[bytes, bool | None]:
        """A mutant of ``data`` and the RTP/RTCP word the demultiplexer would pass with it."""
        rng = self.rng
        buf = bytearray(data)
        rounds = 1
        while rounds < 4 and rng.random() < 0.35:
            rounds += 1
        for _ in range(rounds):
            i = rng.choices(range(len(self._ops)), cum_weights=self._cum)[0]
            name = self._names[i]
            out = self._ops[i](self, buf, layout, hints)
            if out is None:
                name = "bitflip"
                out = _bitflip(self, buf, layout, hints)
                if out is None:
                    out = bytearray(rng.randbytes(rng.randrange(1, 64)))
                    name = "random"
            if name == "rtcp_word":
                rtcp = self.rng.choice([None, True, False])
            buf = out[:MAX_LEN]
            self.counts[name] = self.counts.get(name, 0) + 1
        return bytes(buf), rtcp

    def apply(self, name: str, data: bytes, layout: Layout | None, hints: Hints) -> bytes | None:
        """One named op on ``data``; None when it does not apply (tests aim ops with it)."""
        out = self._ops[self._names.index(name)](self, bytearray(data), layout, hints)
        return None if out is None else bytes(out)

    # helpers for ops
    def pick_ssrc(self, hints: Hints) -> int:
        if hints.ssrcs and self.rng.random() < 0.7:
            return self.rng.choice(list(hints.ssrcs))
        return self.rng.choice([self.rng.getrandbits(32), *INTERESTING_32])

    def pick_spi(self, hints: Hints, bits: int) -> int:
        r = self.rng.random()
        if hints.spis and r < 0.6:
            return self.rng.choice(list(hints.spis))
        if r < 0.8:
            return self.rng.choice([0, 1, (1 << bits) - 1, 1 << (bits - 1)])
        return self.rng.getrandbits(bits)


# -- generic byte-level ops ---------------------------------------------------------------


def _bitflip(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if not buf:
        return None
    for _ in range(1 if m.rng.random() < 0.7 else m.rng.randrange(2, 9)):
        buf[m.rng.randrange(len(buf))] ^= 1 << m.rng.randrange(8)
    return buf


def _byteset(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if not buf:
        return None
    i = m.rng.randrange(len(buf))
    buf[i] = m.rng.choice(INTERESTING_8) if m.rng.random() < 0.6 else m.rng.getrandbits(8)
    return buf


def _random_run(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if not buf:
        return None
    i = m.rng.randrange(len(buf))
    n = min(len(buf) - i, m.rng.randrange(1, 33))
    buf[i : i + n] = (
        m.rng.randbytes(n) if m.rng.random() < 0.7 else bytes([m.rng.getrandbits(8)]) * n
    )
    return buf


def _truncate(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if not buf:
        return None
    r = m.rng.random()
    if r < 0.5:  # near the end: where the trailer, tag and tail byte are
        return buf[: max(0, len(buf) - m.rng.randrange(1, min(len(buf), 64) + 1))]
    if r < 0.85:
        return buf[: m.rng.randrange(len(buf))]
    return buf[m.rng.randrange(1, len(buf) + 1) :]  # lose the front


def _extend(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    n = m.rng.choice([1, 2, 3, 4, 7, 8, 16, m.rng.randrange(1, 300), m.rng.randrange(1000, 3000)])
    fill = m.rng.randbytes(n) if m.rng.random() < 0.7 else bytes(n)
    return buf + fill


def _insert(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    i = m.rng.randrange(len(buf) + 1)
    return buf[:i] + m.rng.randbytes(m.rng.randrange(1, 17)) + buf[i:]


def _delete(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if len(buf) < 2:
        return None
    i = m.rng.randrange(len(buf))
    return buf[:i] + buf[i + m.rng.randrange(1, min(32, len(buf) - i) + 1) :]


def _duplicate(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if not buf:
        return None
    i = m.rng.randrange(len(buf))
    n = m.rng.randrange(1, min(64, len(buf) - i) + 1)
    return buf[: i + n] + buf[i : i + n] + buf[i + n :]


def _splice(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if h.donor is None:
        return None
    other = h.donor()
    if not other:
        return None
    a = m.rng.randrange(len(buf) + 1)
    b = m.rng.randrange(len(other) + 1)
    if m.rng.random() < 0.5:
        return buf[:a] + other[b:]
    return bytearray(other[:b]) + buf[a:]


# -- header fields ---------------------------------------------------------------------------


def _version(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if not buf:
        return None
    buf[0] = (buf[0] & 0x3F) | (m.rng.randrange(4) << 6)
    return buf


def _cc(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if not buf:
        return None
    buf[0] = (buf[0] & 0xF0) | m.rng.choice([0, 0, 1, 2, 15, m.rng.randrange(16)])
    return buf


def _x_bit(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if not buf:
        return None
    buf[0] ^= 0x10
    if buf[0] & 0x10 and lay is not None and not lay.rtcp and m.rng.random() < 0.7:
        at = RTP_FIXED_HEADER + 4 * (buf[0] & 0x0F)
        words = m.rng.choice([0, 1, 2, m.rng.randrange(64), 0xFFFF])
        ext = (0xBEDE).to_bytes(2, "big") + words.to_bytes(2, "big") + bytes(4 * min(words, 64))
        if m.rng.random() < 0.5:
            buf[at:at] = ext  # a real extension: the packet stays otherwise intact
        else:
            _put(buf, at + 2, words, 2)  # the length word of whatever sits there
    return buf


def _ext_len(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if len(buf) < 1 or not buf[0] & 0x10:
        return None
    at = RTP_FIXED_HEADER + 4 * (buf[0] & 0x0F) + 2
    words = _get(buf, at, 2)
    _put(buf, at, m.rng.choice([words + 1, words - 1, 0, 0xFFFF, m.rng.randrange(512)]), 2)
    return buf


def _padding_marker(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if len(buf) < 2:
        return None
    if m.rng.random() < 0.5:
        buf[0] ^= 0x20
    else:
        buf[1] ^= 0x80
    return buf


def _payload_type(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if len(buf) < 2:
        return None
    # RTP PTs, the RTCP range (RFC 5761: 192-223 turns RTP into RTCP) and its edges
    buf[1] = m.rng.choice(
        [96, 0, 127, 191, 192, 200, 201, 202, 203, 204, 205, 206, 223, 224, m.rng.getrandbits(8)]
    )
    return buf


def _seq(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if len(buf) < 4:
        return None
    seq = _get(buf, 2, 2)
    if m.rng.random() < 0.7:
        seq += m.rng.choice(SEQ_DELTAS)
    else:
        seq = m.rng.choice(INTERESTING_16)
    _put(buf, 2, seq, 2)
    return buf


def _ssrc(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    rtcp = lay.rtcp if lay is not None else len(buf) >= 2 and 192 <= buf[1] <= 223
    at = 4 if rtcp else 8
    if len(buf) < at + 4:
        return None
    _put(buf, at, m.pick_ssrc(h), 4)
    return buf


def _csrc0(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if len(buf) < 16:
        return None
    r = m.rng.random()
    if r < 0.5:
        buf[15] = m.rng.choice([0, 1, 2, 3, 4, 5, 0xFF])  # destination position
    elif r < 0.8:
        buf[14] = m.rng.choice([0, 1, 2, 3, 4, 5, 0xFF])  # source position
    else:
        _put(buf, 12, m.rng.choice(INTERESTING_32), 4)
    return buf


def _rtcp_length(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if len(buf) < 4:
        return None
    words = _get(buf, 2, 2)
    fit = len(buf) // 4 - 1
    _put(buf, 2, m.rng.choice([words + 1, words - 1, 0, 1, 0xFFFF, fit, fit + 1]), 2)
    return buf


def _srtcp_index(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if lay is None or not lay.rtcp or lay.ekt_format == "plain":
        return None
    at = len(buf) - lay.trailer_len - lay.tag_len - 4
    if at < 8:
        return None
    word = _get(buf, at, 4)
    r = m.rng.random()
    if r < 0.3:
        word ^= 0x8000_0000  # the E bit
    elif r < 0.7:
        word = (word & 0x8000_0000) | ((word + m.rng.choice(SEQ_DELTAS)) & 0x7FFF_FFFF)
    else:
        word = m.rng.choice(INTERESTING_32)
    _put(buf, at, word, 4)
    return buf


# -- the SRTP tail: tail byte, tag, EKT trailer -----------------------------------------------


def _tail_byte(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if lay is None or lay.rtcp:
        return None
    at = len(buf) - lay.trailer_len - lay.tag_len - 1
    if at < 0:
        return None
    buf[at] = m.rng.choice([0x00, 0x40, 0x80, 0xC0, 0x7F, 0xFF, m.rng.getrandbits(8)])
    return buf


def _tag(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if lay is None or not lay.tag_len:
        return None
    start = len(buf) - lay.trailer_len - lay.tag_len
    if start < 0:
        return None
    i = start + m.rng.randrange(lay.tag_len)
    buf[i] ^= 1 << m.rng.randrange(8)
    return buf


def _trailer_type(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if not buf:
        return None
    if lay is not None and lay.ekt_format == "ctms" and m.rng.random() < 0.6:
        buf[-1] ^= 0x01  # long <-> short flag
    else:
        buf[-1] = m.rng.choice([0x00, 0x01, 0x02, 0x03, 0xFF, m.rng.getrandbits(8)])
    return buf


def _spi(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if lay is None or lay.ekt_format == "plain" or len(buf) < 8:
        return None
    if lay.ekt_format == "ctms":
        spi = m.pick_spi(h, 15)
        _put(buf, len(buf) - 2, (spi << 1) | 1, 2)
    else:
        _put(buf, len(buf) - RFC8870_FIXED, m.pick_spi(h, 16), 2)
        if m.rng.random() < 0.5:
            buf[-1] = 0x02
    return buf


def _emk(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if lay is None or lay.trailer_len <= 1:
        return None
    fixed = CTMS_FIXED if lay.ekt_format == "ctms" else RFC8870_FIXED
    n = lay.trailer_len - fixed
    start = len(buf) - lay.trailer_len
    if n <= 0 or start < 0:
        return None
    r = m.rng.random()
    if r < 0.6:
        buf[start + m.rng.randrange(n)] ^= 1 << m.rng.randrange(8)
    elif r < 0.8:
        buf[start : start + n] = bytes(n)
    else:  # a longer or shorter EMK: the sizes no longer match the cipher
        cut = m.rng.choice([1, 8, -1, -8])
        if cut > 0:
            buf[start:start] = m.rng.randbytes(cut)
        else:
            del buf[start : start - cut]
    return buf


def _roc(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if lay is None or lay.trailer_len <= 1 or lay.ekt_format != "ctms":
        return None
    at = len(buf) - CTMS_FIXED
    roc = _get(buf, at, 4)
    _put(buf, at, m.rng.choice([roc + 1, roc - 1, 0, 0xFFFF, *INTERESTING_32]), 4)
    return buf


def _isn(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if lay is None or lay.trailer_len <= 1 or lay.ekt_format != "ctms":
        return None
    at = len(buf) - 4
    seq = _get(buf, 2, 2)
    _put(buf, at, m.rng.choice([seq, seq + 1, seq - 1, 0, 0xFFFF, m.rng.getrandbits(16)]), 2)
    return buf


def _epoch_length(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    if lay is None or lay.trailer_len <= 1 or lay.ekt_format != "rfc8870":
        return None
    if m.rng.random() < 0.5:
        at = len(buf) - 5  # Epoch
        _put(buf, at, _get(buf, at, 2) + m.rng.choice([1, -1, 0x8000]), 2)
    else:
        at = len(buf) - 3  # Length
        _put(buf, at, m.rng.choice([0, 7, 8, 46, 47, 48, 55, 0xFFFF, len(buf), len(buf) + 1]), 2)
    return buf


def _long_short(m: Mutator, buf: bytearray, lay: Layout | None, h: Hints) -> bytearray | None:
    """Swap the trailer's form: cut a long one to short, or graft a donor's long one."""
    if lay is None or lay.ekt_format == "plain" or lay.trailer_len > len(buf):
        return None
    body = buf[: len(buf) - lay.trailer_len]
    r = m.rng.random()
    if lay.trailer_len > 1 and r < 0.5:
        short = (m.rng.getrandbits(7) << 1) if lay.ekt_format == "ctms" else 0
        return body + bytes([short])
    if r < 0.65:
        return body  # no trailer at all
    if h.donor is None:
        return None
    other = h.donor()
    n = m.rng.choice([24, 32, 40, 47, 55, 1]) if len(other) > 60 else 1
    return body + other[-n:]


_OPS: list[tuple[str, Op, float]] = [
    ("bitflip", _bitflip, 8.0),
    ("byteset", _byteset, 5.0),
    ("random_run", _random_run, 2.0),
    ("truncate", _truncate, 4.0),
    ("extend", _extend, 3.0),
    ("insert", _insert, 2.0),
    ("delete", _delete, 2.0),
    ("duplicate", _duplicate, 1.0),
    ("splice", _splice, 3.0),
    ("version", _version, 1.0),
    ("cc", _cc, 3.0),
    ("x_bit", _x_bit, 3.0),
    ("ext_len", _ext_len, 2.0),
    ("padding_marker", _padding_marker, 1.0),
    ("payload_type", _payload_type, 2.0),
    ("seq", _seq, 3.0),
    ("ssrc", _ssrc, 3.0),
    ("csrc0", _csrc0, 1.5),
    ("rtcp_length", _rtcp_length, 2.0),
    ("srtcp_index", _srtcp_index, 2.0),
    ("tail_byte", _tail_byte, 3.0),
    ("tag", _tag, 3.0),
    ("trailer_type", _trailer_type, 3.0),
    ("spi", _spi, 4.0),
    ("emk", _emk, 3.0),
    ("roc", _roc, 3.0),
    ("isn", _isn, 2.0),
    ("epoch_length", _epoch_length, 2.0),
    ("long_short", _long_short, 3.0),
    ("rtcp_word", lambda m, b, lay, h: b, 1.5),
]

OP_NAMES = tuple(name for name, _, _ in _OPS)
