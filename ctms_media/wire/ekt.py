"""EKT trailers (wire.md §5 CTMS format, §6 RFC 8870 format) and the EKT key ciphers.

The trailer follows the base authentication tag and is not covered by it, so a relay can
rewrite it (upgrade, re-wrap) without touching the media bytes and libsrtp still verifies
the packet once the trailer is cut off.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap,
    aes_key_wrap_with_padding,
)

from ctms_media.errors import ConfigError, MalformedError, UnwrapError

FORMAT_CTMS = "ctms"
FORMAT_RFC8870 = "rfc8870"
EKT_FORMATS = (FORMAT_CTMS, FORMAT_RFC8870)
EKT_FORMAT_IDS = {FORMAT_CTMS: 1, FORMAT_RFC8870: 2}

CTMS_SHORT = 1
CTMS_FIXED = 8  # ROC (4) + ISN (2) + SPI|flag (2) after the EMK
RFC8870_FIXED = 7  # SPI (2) + Epoch (2) + Length (2) + type (1) after the ciphertext
RFC8870_SHORT_TYPE = 0x00
RFC8870_FULL_TYPE = 0x02
MAX_CTMS_SPI = 0x7FFF


class EktCipher(IntEnum):
    AES_128_ECB = 1
    AESKW_128 = 2
    AESKW_256 = 3


KEK_LENGTHS = {EktCipher.AES_128_ECB: 16, EktCipher.AESKW_128: 16, EktCipher.AESKW_256: 32}


def check_group(cipher: int, kek: bytes, ekt_format: str) -> EktCipher:
    """Validate an EKT parameter set's cipher against its KEK and format."""
    try:
        c = EktCipher(cipher)
    except ValueError:
        raise ConfigError(f"unknown EKT cipher id {cipher}") from None
    if ekt_format not in EKT_FORMATS:
        raise ConfigError(f"unknown EKT format {ekt_format!r}")
    if ekt_format == FORMAT_RFC8870 and c is EktCipher.AES_128_ECB:
        raise ConfigError("EKT cipher 1 (AES_128_ECB) is invalid in the RFC 8870 format")
    if len(kek) != KEK_LENGTHS[c]:
        raise ConfigError(f"{c.name} needs a {KEK_LENGTHS[c]}-byte KEK, got {len(kek)}")
    return c


def ctms_emk_length(cipher: int, key_len: int = 16) -> int:
    """Octets of the Encrypted Master Key for a cipher: one block for ECB, key + 8 for KW."""
    return 16 if cipher == EktCipher.AES_128_ECB else key_len + 8


def rfc8870_full_length(key_len: int = 16) -> int:
    """Octets of a full RFC 8870 EKTField for a key of ``key_len``: 47 for 16-byte keys."""
    plaintext = 1 + key_len + 4 + 4
    ciphertext = 8 + -(-plaintext // 8) * 8
    return ciphertext + RFC8870_FIXED


def wrap_ctms(cipher: int, kek: bytes, key: bytes) -> bytes:
    """Encrypt a master key under a KEK the CTMS way (ECB block or RFC 3394 key wrap)."""
    if cipher == EktCipher.AES_128_ECB:
        if len(key) != 16:
            raise ConfigError("AES_128_ECB wraps exactly one 16-byte key")
        enc = Cipher(algorithms.AES(kek), modes.ECB()).encryptor()
        return enc.update(key) + enc.finalize()
    return aes_key_wrap(kek, key)


def unwrap_ctms(cipher: int, kek: bytes, emk: bytes) -> bytes:
    """Inverse of :func:`wrap_ctms`; ECB cannot detect corruption, KW raises UnwrapError."""
    if cipher == EktCipher.AES_128_ECB:
        if len(emk) != 16:
            raise UnwrapError("AES_128_ECB EMK must be 16 bytes")
        dec = Cipher(algorithms.AES(kek), modes.ECB()).decryptor()
        return dec.update(emk) + dec.finalize()
    try:
        return aes_key_unwrap(kek, emk)
    except (InvalidUnwrap, ValueError) as exc:
        raise UnwrapError(f"RFC 3394 unwrap failed: {exc}") from None


@dataclass(frozen=True, slots=True)
class CtmsLong:
    """Long CTMS trailer: EMK | ROC | ISN | SPI(15) | 1."""

    emk: bytes
    roc: int
    isn: int
    spi: int

    def encode(self) -> bytes:
        if not 0 <= self.spi <= MAX_CTMS_SPI:
            raise ConfigError(f"CTMS SPI {self.spi} does not fit 15 bits")
        return self.emk + struct.pack(
            "!IHH", self.roc & 0xFFFFFFFF, self.isn & 0xFFFF, (self.spi << 1) | 1
        )

    @classmethod
    def decode(cls, trailer: bytes | memoryview) -> CtmsLong:
        if len(trailer) < CTMS_FIXED + 1:
            raise MalformedError("CTMS long trailer too short")
        roc, isn, spi_flag = struct.unpack_from("!IHH", trailer, len(trailer) - CTMS_FIXED)
        if not spi_flag & 1:
            raise MalformedError("CTMS long trailer must end in bit 1")
        return cls(bytes(trailer[: len(trailer) - CTMS_FIXED]), roc, isn, spi_flag >> 1)


def ctms_short(reserved: int = 0) -> bytes:
    """Short CTMS trailer: reserved(7) | 0."""
    return bytes([(reserved << 1) & 0xFE])


def ctms_tail_spi(packet: bytes | memoryview) -> int | None:
    """The SPI of a CTMS long trailer at the end of ``packet``, None for a short one.

    Raises MalformedError when there is not even a flag byte to read.
    """
    if not packet:
        raise MalformedError("no EKT trailer")
    if not packet[-1] & 1:
        return None
    if len(packet) < 2:
        raise MalformedError("CTMS long trailer too short for its SPI")
    return ((packet[-2] << 8) | packet[-1]) >> 1


@dataclass(frozen=True, slots=True)
class Rfc8870Plaintext:
    """EKTPlaintext: key length | master key | SSRC | ROC."""

    key: bytes
    ssrc: int
    roc: int

    def encode(self) -> bytes:
        return bytes([len(self.key)]) + self.key + struct.pack("!II", self.ssrc, self.roc)

    @classmethod
    def decode(cls, data: bytes) -> Rfc8870Plaintext:
        if not data:
            raise UnwrapError("empty EKTPlaintext")
        n = data[0]
        if len(data) != 1 + n + 8:
            raise UnwrapError(f"EKTPlaintext of {len(data)} bytes does not hold a {n}-byte key")
        ssrc, roc = struct.unpack_from("!II", data, 1 + n)
        return cls(bytes(data[1 : 1 + n]), ssrc, roc)


@dataclass(frozen=True, slots=True)
class Rfc8870Full:
    """Full RFC 8870 EKTField: EKTCiphertext | SPI | Epoch | Length | 0x02."""

    ciphertext: bytes
    spi: int
    epoch: int

    def encode(self) -> bytes:
        length = len(self.ciphertext) + RFC8870_FIXED
        return self.ciphertext + struct.pack(
            "!HHHB", self.spi, self.epoch & 0xFFFF, length, RFC8870_FULL_TYPE
        )

    @classmethod
    def decode(cls, field: bytes | memoryview) -> Rfc8870Full:
        if len(field) < RFC8870_FIXED + 1:
            raise MalformedError("RFC 8870 full EKTField too short")
        spi, epoch, length, mtype = struct.unpack_from("!HHHB", field, len(field) - RFC8870_FIXED)
        if mtype != RFC8870_FULL_TYPE or length != len(field):
            raise MalformedError("RFC 8870 EKTField type or Length mismatch")
        return cls(bytes(field[: len(field) - RFC8870_FIXED]), spi, epoch)


def rfc8870_wrap(kek: bytes, plaintext: Rfc8870Plaintext) -> bytes:
    """RFC 5649 AES key wrap with padding of an EKTPlaintext."""
    return aes_key_wrap_with_padding(kek, plaintext.encode())


def rfc8870_unwrap(kek: bytes, ciphertext: bytes) -> Rfc8870Plaintext:
    try:
        data = aes_key_unwrap_with_padding(kek, ciphertext)
    except (InvalidUnwrap, ValueError) as exc:
        raise UnwrapError(f"RFC 5649 unwrap failed: {exc}") from None
    return Rfc8870Plaintext.decode(data)


def rfc8870_tail(packet: bytes | memoryview) -> tuple[int, int, int, int] | None:
    """(spi, epoch, length, type) of a full RFC 8870 field at the end of ``packet``.

    None for a short field (type 0x00). MalformedError for any other type or too few bytes.
    """
    if not packet:
        raise MalformedError("no EKT field")
    mtype = packet[-1]
    if mtype == RFC8870_SHORT_TYPE:
        return None
    if mtype != RFC8870_FULL_TYPE:
        raise MalformedError(f"EKT message type {mtype:#04x}")
    if len(packet) < RFC8870_FIXED:
        raise MalformedError("RFC 8870 full EKTField too short")
    spi, epoch, length = struct.unpack_from("!HHH", packet, len(packet) - RFC8870_FIXED)
    return spi, epoch, length, mtype
