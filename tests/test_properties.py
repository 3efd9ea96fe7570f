"""Property tests: no byte string makes a parser or a forwarder raise anything but the
project's own error, and a rejected packet leaves every piece of state as it was."""

from __future__ import annotations

import contextlib
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctms_media.errors import CtmsError
from ctms_media.forward.verdict import DROP_REASONS
from ctms_media.wire import ekt, rtp

from .conftest import IMPLEMENTATIONS
from .helpers import Meeting, sdes_packet

PARSERS = [
    rtp.RtpHeader.parse,
    rtp.rtp_header_length,
    rtp.RtcpHeader.parse,
    ekt.CtmsLong.decode,
    ekt.Rfc8870Full.decode,
    ekt.Rfc8870Plaintext.decode,
    ekt.ctms_tail_spi,
    ekt.rfc8870_tail,
    lambda b: ekt.unwrap_ctms(1, bytes(16), b),
    lambda b: ekt.unwrap_ctms(2, bytes(16), b),
    lambda b: ekt.rfc8870_unwrap(bytes(32), b),
]
try:
    from ctms_media.wire.control import decode_control

    PARSERS.append(decode_control)
except ImportError:  # pragma: no cover - the control codec lands with the DTLS work
    pass

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("parse", PARSERS, ids=lambda f: getattr(f, "__qualname__", "lambda"))
@SETTINGS
@given(data=st.binary(max_size=200))
def test_parsers_raise_only_project_errors(parse, data: bytes) -> None:
    with contextlib.suppress(CtmsError):
        parse(data)


@cache
def meeting(impl: str, fmt: str) -> tuple[Meeting, list[bytes]]:
    """A meeting with keys committed on two SPIs, and valid packets to mutate."""
    m = Meeting(IMPLEMENTATIONS[impl], fmt, 2 if fmt == "rfc8870" else 1)
    m.group(21)
    m.group(22, cipher=3)
    a = m.sender(0x100, "audio", spi=21, seq=65000)
    v = m.sender(0x200, "video", spi=22, seq=10)
    m.receiver("x", 1, 21)
    m.receiver("y", 2, 22)
    seeds = []
    for i in range(6):
        for s in (a, v):
            p = s.rtp(m.payload(), 0xC0, long=i % 2 == 0)[0]
            assert m.fwd.forward(p).drop is None
    for i in range(40):  # not yet forwarded: valid next packets, long and short, and SRTCP
        s = a if i % 2 else v
        seeds.append(s.rtp(m.payload(), 0x80, long=i % 3 == 0)[0])
    seeds.append(a.rtcp(sdes_packet(0x100)))
    seeds.append(v.rtcp(sdes_packet(0x200), long=False))
    return m, seeds


mutation = st.tuples(
    st.integers(0, 10_000),  # which seed
    st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), max_size=4),  # xor at offsets
    st.one_of(st.none(), st.integers(0, 400)),  # truncate
    st.binary(max_size=8),  # extra bytes
)


@pytest.mark.parametrize("fmt", ["ctms", "rfc8870"])
@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@SETTINGS
@given(mut=mutation)
def test_rejected_packets_change_no_state(impl: str, fmt: str, mut) -> None:
    m, seeds = meeting(impl, fmt)
    which, flips, cut, extra = mut
    packet = bytearray(seeds[which % len(seeds)])
    for off, x in flips:
        packet[off % len(packet)] ^= x
    if cut is not None:
        del packet[cut:]
    packet += extra
    before = m.fwd.state_snapshot()
    v = m.fwd.forward(bytes(packet))
    assert v.drop is None or v.drop in DROP_REASONS
    if v.drop is not None:
        assert v.outputs == []
        assert m.fwd.state_snapshot() == before


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@SETTINGS
@given(data=st.binary(max_size=300), rtcp=st.one_of(st.none(), st.booleans()))
def test_forwarder_never_raises_on_garbage(impl: str, data: bytes, rtcp) -> None:
    m, _ = meeting(impl, "ctms")
    before = m.fwd.state_snapshot()
    v = m.fwd.forward(data, rtcp)
    assert v.drop in DROP_REASONS
    assert m.fwd.state_snapshot() == before
