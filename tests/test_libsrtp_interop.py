"""Our tag code against libsrtp: what libsrtp protects, we verify; what we re-tag, libsrtp
accepts (the forwarder side of that is in test_forward.py)."""

from __future__ import annotations

import os
import struct

import pytest

from ctms_media.sim.srtp_room import libsrtp_session, sdes_packet
from ctms_media.wire.srtp import (
    AES_CM_128_HMAC_SHA1_32,
    AES_CM_128_HMAC_SHA1_80,
    Profile,
    estimate_index,
    rtcp_auth_key,
    rtcp_tag,
    rtp_auth_key,
    rtp_tag,
    tags_equal,
)


@pytest.mark.parametrize(
    "profile", [AES_CM_128_HMAC_SHA1_80, AES_CM_128_HMAC_SHA1_32], ids=lambda p: p.name
)
def test_libsrtp_rtp_tags_verify_across_rollover(profile: Profile) -> None:
    key, salt, ssrc = os.urandom(16), os.urandom(14), 0x01020304
    tx = libsrtp_session(key, salt, profile, outbound=True)
    k_a = rtp_auth_key(key, salt)
    n = profile.rtp_tag_len
    reference = None
    rollovers = 0
    for i in range(300):
        seq = (65400 + i) & 0xFFFF
        plain = struct.pack("!BBHII", 0x80, 96, seq, i * 3000, ssrc) + os.urandom(50)
        srtp = tx.protect(plain)
        index = seq if reference is None else estimate_index(reference, seq)
        reference = index
        roc = index >> 16
        rollovers = roc
        assert tags_equal(rtp_tag(k_a, srtp[:-n], roc, n), srtp[-n:])
        assert not tags_equal(rtp_tag(k_a, srtp[:-n], roc + 1, n), srtp[-n:])
    assert rollovers == 1


@pytest.mark.parametrize(
    "profile", [AES_CM_128_HMAC_SHA1_80, AES_CM_128_HMAC_SHA1_32], ids=lambda p: p.name
)
def test_libsrtp_srtcp_tags_verify(profile: Profile) -> None:
    key, salt, ssrc = os.urandom(16), os.urandom(14), 0x0A0B0C0D
    tx = libsrtp_session(key, salt, profile, outbound=True)
    k_a = rtcp_auth_key(key, salt)
    for i in range(1, 20):
        srtcp = tx.protect_rtcp(sdes_packet(ssrc, b"room-%d" % i))
        assert profile.rtcp_tag_len == 10
        assert tags_equal(rtcp_tag(k_a, srtcp[:-10], 10), srtcp[-10:])
        e_index = struct.unpack_from("!I", srtcp, len(srtcp) - 14)[0]
        assert e_index == 0x80000000 | i  # E bit set, index counts from 1


def test_our_tag_is_what_libsrtp_checks() -> None:
    profile = AES_CM_128_HMAC_SHA1_80
    key, salt, ssrc = os.urandom(16), os.urandom(14), 77
    tx = libsrtp_session(key, salt, profile, outbound=True)
    rx = libsrtp_session(key, salt, profile, outbound=False)
    plain = struct.pack("!BBHII", 0x80, 96, 5, 0, ssrc) + b"hello"
    srtp = tx.protect(plain)
    retagged = srtp[:-10] + rtp_tag(rtp_auth_key(key, salt), srtp[:-10], 0, 10)
    assert rx.unprotect(retagged) == plain
