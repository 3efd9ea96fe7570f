"""The APP 'CTMS' control codec (wire.md §8) and the PLI/FIR the relay originates."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctms_media.errors import ConfigError, CtmsError, MalformedError
from ctms_media.wire.control import (
    ControlMessage,
    Downgrade,
    Fir,
    Gsp,
    GspAck,
    Pli,
    RekeyDone,
    decode_control,
    decode_feedback,
    encode_control,
    encode_fir,
    encode_pli,
    is_control_packet,
)

SSRC = 0xC0FFEE01
GSP_CTMS = Gsp(
    spi=0x1234,
    ekt_cipher=1,
    ekt_format=1,
    profile_id=1,
    kek=bytes(range(16)),
    salt=bytes(range(100, 114)),
)
GSP_8870 = Gsp(
    spi=0xFFFF, ekt_cipher=3, ekt_format=2, profile_id=2, kek=b"\xaa" * 32, salt=b"\x55" * 14
)

MESSAGES = [
    GSP_CTMS,
    GSP_8870,
    Gsp(spi=0, ekt_cipher=2, ekt_format=1, profile_id=1, kek=b"k" * 16, salt=b"s" * 14),
    GspAck(spi=0x1234),
    RekeyDone(spi=0xFFFF),
    Downgrade(),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: ControlMessage) -> None:
    data = encode_control(msg, SSRC)
    assert len(data) % 4 == 0
    assert data[1] == 204 and data[8:12] == b"CTMS"
    assert (struct.unpack_from("!H", data, 2)[0] + 1) * 4 == len(data)
    assert is_control_packet(data)
    assert decode_control(data) == (SSRC, msg)


def test_gsp_layout_by_hand() -> None:
    # 8 fixed + 16 KEK + 14 salt = 38 body bytes -> 2 bytes of pad.
    data = encode_control(GSP_CTMS, SSRC)
    assert data[:4] == bytes([0x81, 204, 0, (12 + 40) // 4 - 1])
    assert data[4:8] == SSRC.to_bytes(4, "big")
    body = data[12:]
    assert body[:7] == bytes([0x12, 0x34, 1, 1, 0, 1, 16])
    assert body[7:23] == bytes(range(16))
    assert body[23] == 14 and body[24:38] == bytes(range(100, 114))
    assert body[38:] == b"\x00\x00"


def test_small_messages_by_hand() -> None:
    assert encode_control(GspAck(0xABCD), 7) == bytes.fromhex("82cc0003 00000007 43544d53 abcd0000")
    assert encode_control(RekeyDone(1), 7) == bytes.fromhex("83cc0003 00000007 43544d53 00010000")
    assert encode_control(Downgrade(), 7) == bytes.fromhex("84cc0003 00000007 43544d53 00000000")


def _with(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


ACK = encode_control(GspAck(5), SSRC)
GSP = encode_control(GSP_CTMS, SSRC)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(ACK[:11], id="short-header"),
        pytest.param(ACK[:-1], id="truncated"),
        pytest.param(ACK + bytes(4), id="trailing"),
        pytest.param(_with(ACK, 0, b"\x42"), id="version"),
        pytest.param(_with(ACK, 0, b"\xa2"), id="padding-bit"),
        pytest.param(_with(ACK, 1, b"\xc9"), id="pt-rr"),
        pytest.param(_with(ACK, 8, b"ctms"), id="name"),
        pytest.param(_with(ACK, 0, b"\x80"), id="subtype-0"),
        pytest.param(_with(ACK, 0, b"\x85"), id="subtype-5"),
        pytest.param(_with(ACK, 0, b"\x9f"), id="subtype-31"),
        pytest.param(_with(ACK, 3, b"\x04"), id="length-too-big"),
        pytest.param(_with(ACK, 14, b"\x00\x01"), id="ack-pad"),
        pytest.param(ACK[:3] + b"\x04" + ACK[4:] + bytes(4), id="ack-long-body"),
        pytest.param(_with(encode_control(Downgrade(), 1), 15, b"\x01"), id="downgrade-nonzero"),
        pytest.param(_with(GSP, 12 + 38, b"\x01"), id="gsp-pad"),
        pytest.param(_with(GSP, 12 + 6, b"\x40"), id="gsp-kek-len-past-end"),
        pytest.param(_with(GSP, 12 + 6, b"\x0f"), id="gsp-kek-len-wrong-for-cipher"),
        pytest.param(_with(GSP, 12 + 23, b"\x10"), id="gsp-salt-len"),
        pytest.param(_with(GSP, 12 + 23, b"\x0a"), id="gsp-salt-short"),
        pytest.param(_with(GSP, 12 + 2, b"\x09"), id="gsp-cipher"),
        pytest.param(_with(GSP, 12 + 3, b"\x03"), id="gsp-format"),
        pytest.param(_with(GSP, 12 + 3, b"\x02"), id="gsp-ecb-in-rfc8870"),
        pytest.param(_with(GSP, 12 + 4, b"\x00\x07"), id="gsp-profile"),
        pytest.param(_with(GSP, 12, b"\x80\x00"), id="gsp-ctms-spi-16-bits"),
        pytest.param(GSP[:3] + b"\x04" + GSP[4:20], id="gsp-body-short"),
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(MalformedError):
        decode_control(data)


def test_invalid_messages_cannot_be_built() -> None:
    with pytest.raises(ConfigError):
        Gsp(spi=1, ekt_cipher=1, ekt_format=2, profile_id=1, kek=bytes(16), salt=bytes(14))
    with pytest.raises(ConfigError):
        Gsp(spi=1, ekt_cipher=3, ekt_format=1, profile_id=1, kek=bytes(16), salt=bytes(14))
    with pytest.raises(ConfigError):
        GspAck(0x10000)
    with pytest.raises(ConfigError):
        encode_control(Downgrade(), 1 << 32)


def test_is_control_packet() -> None:
    assert not is_control_packet(b"")
    assert not is_control_packet(ACK[:7])
    assert not is_control_packet(_with(ACK, 1, b"\xc8"))  # SR
    assert not is_control_packet(_with(ACK, 0, b"\x02"))  # not version 2
    # Only the clear SRTCP header is looked at: the encrypted rest may be anything.
    assert is_control_packet(ACK[:8] + bytes(30))


def test_pli_and_fir() -> None:
    pli = encode_pli(1, 0xDEADBEEF)
    assert pli == bytes.fromhex("81ce0002 00000001 deadbeef")
    assert decode_feedback(pli) == Pli(1, 0xDEADBEEF)
    fir = encode_fir(1, 0xDEADBEEF, 9)
    # RFC 5104: media source 0, FCI = target SSRC, seq nr, 24 reserved bits.
    assert fir == bytes.fromhex("84ce0004 00000001 00000000 deadbeef 09000000")
    assert decode_feedback(fir) == Fir(1, 0xDEADBEEF, 9)
    assert not is_control_packet(pli) and not is_control_packet(fir)
    with pytest.raises(ConfigError):
        encode_fir(1, 2, 256)
    with pytest.raises(MalformedError):
        decode_feedback(pli[:-1])
    with pytest.raises(MalformedError):
        decode_feedback(_with(pli, 0, b"\x83"))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_only_raise_ctms_errors(data: bytes) -> None:
    try:
        ssrc, msg = decode_control(data)
    except CtmsError:
        return
    assert encode_control(msg, ssrc) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=12, max_size=60), st.integers(0, 31))
def test_app_shaped_bytes_only_raise_ctms_errors(body: bytes, subtype: int) -> None:
    # Random bytes rarely get past the header; these do, and exercise the body parsers.
    body = body[: len(body) // 4 * 4]
    data = bytes([0x80 | subtype, 204]) + ((len(body) + 12) // 4 - 1).to_bytes(2, "big")
    data += b"\x00\x00\x00\x01CTMS" + body
    try:
        ssrc, msg = decode_control(data)
    except CtmsError:
        return
    assert encode_control(msg, ssrc) == data


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 0x7FFF),
    st.sampled_from([(1, 16), (2, 16), (3, 32)]),
    st.sampled_from([1, 2]),
    st.sampled_from([1, 2]),
    st.binary(min_size=14, max_size=14),
    st.integers(0, 0xFFFFFFFF),
)
def test_gsp_round_trip_property(
    spi: int, cipher: tuple[int, int], fmt: int, profile: int, salt: bytes, ssrc: int
) -> None:
    ekt_cipher, kek_len = cipher
    if ekt_cipher == 1:
        fmt = 1  # AES_128_ECB exists only in the CTMS format
    msg = Gsp(spi, ekt_cipher, fmt, profile, bytes(range(kek_len)), salt)
    assert decode_control(encode_control(msg, ssrc)) == (ssrc, msg)
