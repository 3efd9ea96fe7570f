"""Known answers from the RFCs: key derivation (RFC 3711 B.3), key wrap (RFC 3394 §4,
RFC 5649 §6), and the codecs' round trips."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from ctms_media.errors import ConfigError, MalformedError, UnwrapError
from ctms_media.wire import ekt, rtp, srtp

H = bytes.fromhex

RFC3711_KEY = H("E1F97A0D3E018BE0D64FA32C06DE4139")
RFC3711_SALT = H("0EC675AD498AFEEBB6960B3AABE6")


def test_rfc3711_b3_session_keys() -> None:
    assert srtp.derive_session_key(RFC3711_KEY, RFC3711_SALT, 0x00, 16) == H(
        "C61E7A93744F39EE10734AFE3FF7A087"
    )
    assert srtp.derive_session_key(RFC3711_KEY, RFC3711_SALT, 0x02, 14) == H(
        "30CBBC08863D8C85D49DB34A9AE1"
    )
    auth = srtp.derive_session_key(RFC3711_KEY, RFC3711_SALT, 0x01, 94)
    assert auth == H(
        "CEBE321F6FF7716B6FD4AB49AF256A156D38BAA48F0A0ACF3C34E2359E6CDBCE"
        "E049646C43D9327AD175578EF72270986371C10C9A369AC2F94A8C5FBCDDDC25"
        "6D6E919A48B610EF17C2041E474035766B68642C59BBFC2F34DB60DBDFB2"
    )
    assert srtp.rtp_auth_key(RFC3711_KEY, RFC3711_SALT) == auth[:20]


@pytest.mark.parametrize(
    ("kek", "key", "wrapped"),
    [
        (  # RFC 3394 §4.1: 128-bit KEK, 128-bit key
            "000102030405060708090A0B0C0D0E0F",
            "00112233445566778899AABBCCDDEEFF",
            "1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5",
        ),
        (  # RFC 3394 §4.3: 256-bit KEK, 128-bit key
            "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F",
            "00112233445566778899AABBCCDDEEFF",
            "64E8C3F9CE0F5BA263E9777905818A2A93C8191E7D6E8AE7",
        ),
    ],
)
def test_rfc3394_key_wrap(kek: str, key: str, wrapped: str) -> None:
    cipher = ekt.EktCipher.AESKW_128 if len(kek) == 32 else ekt.EktCipher.AESKW_256
    assert ekt.wrap_ctms(cipher, H(kek), H(key)) == H(wrapped)
    assert ekt.unwrap_ctms(cipher, H(kek), H(wrapped)) == H(key)
    bad = bytearray(H(wrapped))
    bad[3] ^= 1
    with pytest.raises(UnwrapError):
        ekt.unwrap_ctms(cipher, H(kek), bytes(bad))


def test_rfc5649_vectors() -> None:
    kek = H("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")
    assert aes_key_unwrap_with_padding(
        kek, H("138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a")
    ) == H("c37b7e6492584340bed12207808941155068f738")
    assert aes_key_unwrap_with_padding(kek, H("afbeb0f07dfbf5419200f2ccb50bb24f")) == H(
        "466f7250617369"
    )


def test_rfc8870_wrap_round_trip_and_length() -> None:
    kek = bytes(range(32))
    pt = ekt.Rfc8870Plaintext(bytes(range(16)), 0xDEADBEEF, 7)
    ct = ekt.rfc8870_wrap(kek, pt)
    field = ekt.Rfc8870Full(ct, 0x1234, 3).encode()
    assert len(field) == ekt.rfc8870_full_length(16) == 47
    assert ekt.rfc8870_tail(field) == (0x1234, 3, 47, 2)
    assert ekt.rfc8870_unwrap(kek, ekt.Rfc8870Full.decode(field).ciphertext) == pt
    with pytest.raises(UnwrapError):
        ekt.rfc8870_unwrap(bytes(32), ct)
    assert ekt.rfc8870_tail(b"\x00") is None
    with pytest.raises(MalformedError):
        ekt.rfc8870_tail(b"\x01")


def test_ecb_wrap_is_one_block_and_cannot_detect_corruption() -> None:
    kek, key = bytes(16), bytes(range(16))
    emk = ekt.wrap_ctms(ekt.EktCipher.AES_128_ECB, kek, key)
    assert len(emk) == 16 == ekt.ctms_emk_length(ekt.EktCipher.AES_128_ECB)
    assert ekt.unwrap_ctms(1, kek, emk) == key
    assert ekt.unwrap_ctms(1, kek, bytes(16)) != key  # garbage in, wrong key out


def test_ctms_trailer_codec() -> None:
    t = ekt.CtmsLong(bytes(24), 0x01020304, 0xBEEF, 0x7ABC)
    raw = t.encode()
    assert len(raw) == 32 and raw[-1] & 1
    assert ekt.CtmsLong.decode(raw) == t
    assert ekt.ctms_tail_spi(raw) == 0x7ABC
    assert ekt.ctms_tail_spi(ekt.ctms_short(5)) is None
    with pytest.raises(ConfigError):
        ekt.CtmsLong(bytes(16), 0, 0, 0x8000).encode()


def test_group_checks() -> None:
    with pytest.raises(ConfigError):
        ekt.check_group(1, bytes(16), "rfc8870")
    with pytest.raises(ConfigError):
        ekt.check_group(3, bytes(16), "ctms")
    with pytest.raises(ConfigError):
        ekt.check_group(9, bytes(16), "ctms")
    assert ekt.check_group(3, bytes(32), "rfc8870") is ekt.EktCipher.AESKW_256


def test_rtp_header_parse_and_position_code() -> None:
    hdr = bytes([0x92, 0xE0, 0x12, 0x34]) + (5).to_bytes(4, "big") + (9).to_bytes(4, "big")
    hdr += (0x0102).to_bytes(4, "big") + (7).to_bytes(4, "big")
    ext_ = (0xBEDE).to_bytes(2, "big") + (1).to_bytes(2, "big") + b"abcd"
    h = rtp.RtpHeader.parse(hdr + ext_ + b"payload")
    assert (h.cc, h.marker, h.payload_type, h.sequence, h.timestamp, h.ssrc) == (
        2,
        True,
        0x60,
        0x1234,
        5,
        9,
    )
    assert h.csrcs == (0x0102, 7) and h.extension_profile == 0xBEDE and h.length == 12 + 8 + 8
    assert rtp.rtp_header_length(hdr + ext_) == h.length
    assert rtp.split_position_code(h.csrcs[0]) == (1, 2)
    assert rtp.position_code(3, 2) == 0x0302
    with pytest.raises(MalformedError):
        rtp.rtp_header_length(hdr + ext_[:6])  # extension past the end
    with pytest.raises(MalformedError):
        rtp.rtp_header_length(bytes([0x80]) + hdr[1:])  # CC = 0


def test_tail_bytes() -> None:
    assert rtp.AudioTail.decode(0x85) == rtp.AudioTail(True, 5)
    assert rtp.AudioTail(False, 127).encode() == 0x7F
    assert rtp.VideoTail.decode(0xC0) == rtp.VideoTail(True, True)
    assert rtp.VideoTail.decode(0x40).encode() == 0x40


def test_demux_classes() -> None:
    assert rtp.classify(b"\x00\x01") == "stun"
    assert rtp.classify(b"\x16\xfe\xfd") == "dtls"
    assert rtp.classify(b"\x80\x60") == "rtp"
    assert rtp.classify(b"\x80\xc8") == "rtcp"
    assert rtp.classify(b"\x40") == "unknown"
    assert rtp.classify(b"") == "unknown"


def test_index_estimate_and_replay_window() -> None:
    assert srtp.estimate_index(0x1FFFE, 1) == 0x20001  # wraps forward
    assert srtp.estimate_index(0x20001, 0xFFFE) == 0x1FFFE  # late from the previous ROC
    assert srtp.estimate_index(100, 40000) < 0  # would fall below index 0
    w = srtp.ReplayWindow()
    assert w.check(0)
    w.accept(5000)
    assert not w.check(5000)
    assert w.check(4999)
    assert w.check(5000 - 1023)
    assert not w.check(5000 - 1024)  # index <= highest - 1024 is old
    w.accept(4999)
    assert not w.check(4999)
    w.accept(7000)
    assert not w.check(5000) and w.check(6999)
