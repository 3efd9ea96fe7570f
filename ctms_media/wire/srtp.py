"""The parts of RFC 3711 a relay that never decrypts needs: auth-key derivation, tags,
packet-index estimation and the replay window.

Only labels 0x01 (SRTP auth) and 0x04 (SRTCP auth) are ever derived: the relay is trusted
with integrity keys, never with the keys that would read the media.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ctms_media.errors import ConfigError

LABEL_RTP_AUTH = 0x01
LABEL_RTCP_AUTH = 0x04
AUTH_KEY_LEN = 20  # HMAC-SHA1 key, 160 bits
REPLAY_WINDOW = 1024
SRTCP_E_BIT = 0x80000000


@dataclass(frozen=True, slots=True)
class Profile:
    """An SRTP protection profile of wire.md §2."""

    name: str
    id: int
    rtp_tag_len: int
    rtcp_tag_len: int
    key_len: int
    salt_len: int


AES_CM_128_HMAC_SHA1_80 = Profile("AES_CM_128_HMAC_SHA1_80", 0x0001, 10, 10, 16, 14)
AES_CM_128_HMAC_SHA1_32 = Profile("AES_CM_128_HMAC_SHA1_32", 0x0002, 4, 10, 16, 14)
PROFILES: dict[str, Profile] = {
    p.name: p for p in (AES_CM_128_HMAC_SHA1_80, AES_CM_128_HMAC_SHA1_32)
}
PROFILES_BY_ID: dict[int, Profile] = {p.id: p for p in PROFILES.values()}
DEFAULT_PROFILE = AES_CM_128_HMAC_SHA1_80


def profile_named(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown SRTP profile {name!r}; known: {', '.join(PROFILES)}") from None


def derive_session_key(master_key: bytes, master_salt: bytes, label: int, length: int) -> bytes:
    """RFC 3711 §4.3.1 AES-CM PRF with key_derivation_rate 0 (so r = 0).

    x = (label << 48) XOR master_salt; the keystream of AES-CTR under the master key from
    IV = x * 2^16 is the session key.
    """
    if len(master_key) != 16:
        raise ConfigError(f"master key must be 16 bytes, got {len(master_key)}")
    if len(master_salt) != 14:
        raise ConfigError(f"master salt must be 14 bytes, got {len(master_salt)}")
    x = int.from_bytes(master_salt, "big") ^ (label << 48)
    iv = (x << 16).to_bytes(16, "big")
    enc = Cipher(algorithms.AES(master_key), modes.CTR(iv)).encryptor()
    return enc.update(bytes(length)) + enc.finalize()


def rtp_auth_key(master_key: bytes, master_salt: bytes) -> bytes:
    return derive_session_key(master_key, master_salt, LABEL_RTP_AUTH, AUTH_KEY_LEN)


def rtcp_auth_key(master_key: bytes, master_salt: bytes) -> bytes:
    return derive_session_key(master_key, master_salt, LABEL_RTCP_AUTH, AUTH_KEY_LEN)


def rtp_tag(
    auth_key: bytes, authenticated: bytes | bytearray | memoryview, roc: int, n: int
) -> bytes:
    """SRTP tag: HMAC-SHA1(k_a, authenticated portion || ROC) truncated to n bytes."""
    mac = hmac.new(auth_key, authenticated, hashlib.sha1)
    mac.update((roc & 0xFFFFFFFF).to_bytes(4, "big"))
    return mac.digest()[:n]


def rtcp_tag(auth_key: bytes, authenticated: bytes | bytearray | memoryview, n: int) -> bytes:
    """SRTCP tag: HMAC-SHA1(k_a, header .. E/index word) truncated to n bytes."""
    return hmac.new(auth_key, authenticated, hashlib.sha1).digest()[:n]


def tags_equal(a: bytes | memoryview, b: bytes | memoryview) -> bool:
    """Constant-time tag comparison."""
    return hmac.compare_digest(bytes(a), bytes(b))


def estimate_index(reference: int, seq: int) -> int:
    """RFC 3711 Appendix A: the packet index closest to ``reference`` with low bits ``seq``.

    May return a negative number (an estimate below index 0); the caller treats that as a
    replay, as libsrtp does.
    """
    roc = reference >> 16
    s_l = reference & 0xFFFF
    if s_l < 0x8000:
        v = roc - 1 if seq - s_l > 0x8000 else roc
    else:
        v = roc + 1 if s_l - 0x8000 > seq else roc
    return v * 0x10000 + seq


class ReplayWindow:
    """A 1024-entry sliding replay window over packet indices (libsrtp semantics).

    An index at or below ``highest - 1024`` is old; one inside the window already seen is a
    duplicate. ``check`` never mutates, ``accept`` is called only after authentication.
    """

    __slots__ = ("bits", "highest", "size")

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self.highest = -1  # nothing accepted yet
        self.bits = 0  # bit k set: index (highest - k) was accepted

    def check(self, index: int) -> bool:
        """True if ``index`` may be accepted."""
        if index < 0:
            return False
        if self.highest < 0 or index > self.highest:
            return True
        delta = self.highest - index
        if delta >= self.size:
            return False
        return not (self.bits >> delta) & 1

    def accept(self, index: int) -> None:
        if index > self.highest:
            shift = index - self.highest if self.highest >= 0 else self.size
            if shift >= self.size:
                # A jump past the window forgets it. Never shift by the jump itself: an
                # authenticated index may lie up to 2^48 ahead (a sender's own long trailer
                # names any ROC), and ``bits << 2**48`` is a MemoryError (found by fuzzing).
                self.bits = 1
            else:
                self.bits = ((self.bits << shift) | 1) & ((1 << self.size) - 1)
            self.highest = index
        else:
            self.bits |= 1 << (self.highest - index)

    def copy(self) -> ReplayWindow:
        w = ReplayWindow(self.size)
        w.highest = self.highest
        w.bits = self.bits
        return w

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReplayWindow) and (self.size, self.highest, self.bits) == (
            other.size,
            other.highest,
            other.bits,
        )

    def __repr__(self) -> str:
        return f"ReplayWindow(highest={self.highest}, bits={self.bits:#x})"
