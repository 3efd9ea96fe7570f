"""What a conference is made of (wire.md §9): its configuration, its endpoints and their
streams, and the group EKT parameter sets it hands out (§5, §8).

Everything here is a frozen value checked on construction, so the policy engine never has
to re-validate: a bad admin request fails with one :class:`ConfigError` whose message can go
straight into the 400 answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ctms_media.errors import ConfigError, CtmsError
from ctms_media.wire.control import Gsp
from ctms_media.wire.ekt import EKT_FORMAT_IDS, EKT_FORMATS, KEK_LENGTHS, check_group
from ctms_media.wire.rtp import Position
from ctms_media.wire.srtp import DEFAULT_PROFILE, Profile, profile_named

__all__ = [
    "DEFAULT_EKT_CIPHER",
    "MAX_ID_LENGTH",
    "SECURITY_MODES",
    "SWITCHING_MODES",
    "ConferenceConfig",
    "EktGroupSpec",
    "EndpointConfig",
    "SecurityMismatch",
    "StreamConfig",
    "new_group",
]

SECURITY_MODES: Final = ("secure", "non-secure", "best-effort")
SWITCHING_MODES: Final = ("segment", "room")
STREAM_KINDS: Final = ("audio", "video")
SEGMENT_COUNTS: Final = (1, 3)

# Positions a stream may sit at, by the endpoint's segment count (wire.md §9).
ALLOWED_POSITIONS: Final = {
    1: (Position.CENTER, Position.AUX),
    3: (Position.LEFT, Position.CENTER, Position.RIGHT, Position.AUX),
}

# The EKT cipher a conference uses when its configuration names none: AES_128_ECB is the
# CTMS default (wire.md §5); it is invalid in RFC 8870, where AESKW_128 is the smallest.
DEFAULT_EKT_CIPHER: Final = {"ctms": 1, "rfc8870": 2}

MAX_SPI: Final = {"ctms": 0x7FFF, "rfc8870": 0xFFFF}  # the trailer's SPI field width
SALT_LENGTH: Final = 14
MAX_ID_LENGTH: Final = 128

_FINGERPRINT = re.compile(r"^[A-Za-z0-9-]+ [0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})+$")


class SecurityMismatch(CtmsError):
    """A non-secure endpoint asked to join a secure conference (the admin API answers 409)."""

    def __init__(self, message: str = "security mismatch") -> None:
        super().__init__(message)


def _require_str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _require_id(value: Any, what: str) -> str:
    """Ids go into URLs, log lines and metrics: bounded in length, printable (a newline in an
    id would forge a log line), and without '/' (such a conference could be created but never
    addressed again by ``GET``/``DELETE /v1/conferences/{id}``)."""
    _require_str(value, what)
    if len(value) > MAX_ID_LENGTH:
        raise ConfigError(f"{what} must be at most {MAX_ID_LENGTH} characters, got {len(value)}")
    if not value.isprintable() or "/" in value:
        raise ConfigError(f"{what} must be printable and without '/', got {value!r}")
    return value


def _require_int(value: Any, what: str) -> int:
    # bool is an int subclass; `true` as a segment count is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    return value


def _check_fields(data: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a JSON object")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown {what} field(s): {', '.join(unknown)}")


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """One declared sender SSRC of an endpoint: audio or video, from camera/mic ``position``."""

    ssrc: int
    kind: str
    position: int

    def __post_init__(self) -> None:
        ssrc = _require_int(self.ssrc, "stream ssrc")
        if not 0 <= ssrc <= 0xFFFFFFFF:
            raise ConfigError(f"stream ssrc {ssrc} does not fit 32 bits")
        if self.kind not in STREAM_KINDS:
            raise ConfigError(f"stream kind must be 'audio' or 'video', got {self.kind!r}")
        pos = _require_int(self.position, "stream position")
        if not Position.LEFT <= pos <= Position.AUX:
            raise ConfigError(f"stream position must be 1..4, got {pos}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StreamConfig:
        _check_fields(data, ("ssrc", "kind", "position"), "stream")
        try:
            return cls(data["ssrc"], data["kind"], data["position"])
        except KeyError as exc:
            raise ConfigError(f"stream needs {exc.args[0]!r}") from None


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """A room system as declared through the admin API (wire.md §9).

    A 1-segment endpoint's streams sit at position 2, a 3-segment endpoint's at 1, 2, 3, and
    either may add aux (4). At most one audio and one video stream per position: the policy
    pairs a segment's video with the audio at the same position to know who is speaking, and
    a second stream there would make that pairing ambiguous.
    """

    id: str
    segments: int
    secure: bool
    fingerprint: str | None = None
    profile: str = DEFAULT_PROFILE.name
    streams: tuple[StreamConfig, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _require_id(self.id, "endpoint id")
        segments = _require_int(self.segments, f"endpoint {self.id}: segments")
        if segments not in SEGMENT_COUNTS:
            raise ConfigError(f"endpoint {self.id}: segments must be 1 or 3, got {segments}")
        if not isinstance(self.secure, bool):
            raise ConfigError(f"endpoint {self.id}: secure must be true or false")
        if self.fingerprint is not None and not _FINGERPRINT.match(str(self.fingerprint)):
            raise ConfigError(
                f"endpoint {self.id}: fingerprint must read like 'sha-256 AA:BB:..', "
                f"got {self.fingerprint!r}"
            )
        if self.secure and self.fingerprint is None:
            # The relay latches a secure endpoint's address only when its DTLS certificate
            # matches this fingerprint (wire.md §1); without one it could never latch.
            raise ConfigError(f"endpoint {self.id}: a secure endpoint needs a fingerprint")
        profile_named(self.profile)  # raises ConfigError naming the known profiles
        streams = tuple(self.streams)
        object.__setattr__(self, "streams", streams)
        allowed = ALLOWED_POSITIONS[segments]
        seen_ssrc: set[int] = set()
        seen_slot: set[tuple[str, int]] = set()
        for s in streams:
            if not isinstance(s, StreamConfig):
                raise ConfigError(f"endpoint {self.id}: streams must be StreamConfig values")
            if s.position not in allowed:
                names = ", ".join(str(int(p)) for p in allowed)
                raise ConfigError(
                    f"endpoint {self.id}: a {segments}-segment endpoint's streams sit at "
                    f"position {names}; SSRC {s.ssrc} is at {s.position}"
                )
            if s.ssrc in seen_ssrc:
                raise ConfigError(f"endpoint {self.id}: SSRC {s.ssrc} is declared twice")
            if (s.kind, s.position) in seen_slot:
                raise ConfigError(
                    f"endpoint {self.id}: two {s.kind} streams at position {s.position}"
                )
            seen_ssrc.add(s.ssrc)
            seen_slot.add((s.kind, s.position))

    @property
    def srtp_profile(self) -> Profile:
        return profile_named(self.profile)

    def stream_at(self, kind: str, position: int) -> StreamConfig | None:
        for s in self.streams:
            if s.kind == kind and s.position == position:
                return s
        return None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EndpointConfig:
        """The body of ``POST /v1/conferences/{id}/endpoints``; ``profile`` defaults to
        AES_CM_128_HMAC_SHA1_80, ``fingerprint`` may be absent for a non-secure endpoint."""
        _check_fields(
            data, ("id", "segments", "secure", "fingerprint", "profile", "streams"), "endpoint"
        )
        for key in ("id", "segments", "secure"):
            if key not in data:
                raise ConfigError(f"endpoint needs {key!r}")
        streams = data.get("streams", [])
        if not isinstance(streams, list):
            raise ConfigError("endpoint streams must be a list")
        return cls(
            id=data["id"],
            segments=data["segments"],
            secure=data["secure"],
            fingerprint=data.get("fingerprint"),
            profile=data.get("profile", DEFAULT_PROFILE.name),
            streams=tuple(StreamConfig.from_json(s) for s in streams),
        )


@dataclass(frozen=True, slots=True)
class ConferenceConfig:
    """A conference as created through ``POST /v1/conferences`` (wire.md §9).

    ``ekt_cipher`` is not part of the admin body; None picks :data:`DEFAULT_EKT_CIPHER` for
    the format. It is here so tests and deployments can run every cipher of §5/§6.
    """

    id: str
    security: str
    switching: str
    audio_streams: int = 3
    ekt_format: str = "ctms"
    ekt_cipher: int | None = None

    def __post_init__(self) -> None:
        _require_id(self.id, "conference id")
        if self.security not in SECURITY_MODES:
            raise ConfigError(
                f"security must be one of {', '.join(SECURITY_MODES)}, got {self.security!r}"
            )
        if self.switching not in SWITCHING_MODES:
            raise ConfigError(f"switching must be 'segment' or 'room', got {self.switching!r}")
        n = _require_int(self.audio_streams, "audio_streams")
        if n < 1:
            raise ConfigError(f"audio_streams must be at least 1, got {n}")
        if self.ekt_format not in EKT_FORMATS:
            raise ConfigError(f"ekt_format must be 'ctms' or 'rfc8870', got {self.ekt_format!r}")
        if self.ekt_cipher is not None:
            cipher = _require_int(self.ekt_cipher, "ekt_cipher")
            if cipher not in KEK_LENGTHS:
                raise ConfigError(f"unknown EKT cipher id {cipher}")
            check_group(cipher, bytes(KEK_LENGTHS[cipher]), self.ekt_format)

    @property
    def cipher(self) -> int:
        """The EKT cipher id every group of this conference uses."""
        if self.ekt_cipher is not None:
            return self.ekt_cipher
        return DEFAULT_EKT_CIPHER[self.ekt_format]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConferenceConfig:
        """The body of ``POST /v1/conferences``; unknown fields are refused (a typo such as
        ``"switchng"`` would otherwise silently pick the default). Only ``id`` is required:
        security defaults to "secure" (the safe side), switching to "segment";
        ``ekt_cipher`` is an extension of the contract's body for running every cipher."""
        _check_fields(
            data,
            ("id", "security", "switching", "audio_streams", "ekt_format", "ekt_cipher"),
            "conference",
        )
        if "id" not in data:
            raise ConfigError("conference needs 'id'")
        return cls(
            id=data["id"],
            security=data.get("security", "secure"),
            switching=data.get("switching", "segment"),
            audio_streams=data.get("audio_streams", 3),
            ekt_format=data.get("ekt_format", "ctms"),
            ekt_cipher=data.get("ekt_cipher"),
        )


@dataclass(frozen=True, slots=True)
class EktGroupSpec:
    """A group EKT parameter set (wire.md §5): what one SPI names.

    The salt and profile stay the same for a conference's whole life; a rekey changes only
    the SPI and the KEK, which is what lets the relay re-wrap a sender's key for a receiver
    on the other SPI without touching the media.
    """

    spi: int
    cipher: int
    kek: bytes
    salt: bytes
    profile: Profile
    ekt_format: str = "ctms"

    def __post_init__(self) -> None:
        if not 1 <= self.spi <= MAX_SPI.get(self.ekt_format, 0):
            raise ConfigError(f"SPI {self.spi} out of range for the {self.ekt_format} format")
        check_group(self.cipher, self.kek, self.ekt_format)
        if len(self.salt) != self.profile.salt_len:
            raise ConfigError(f"{self.profile.name} needs a {self.profile.salt_len}-byte salt")

    def gsp(self) -> Gsp:
        """The GSP control message (wire.md §8) that hands this set to a room."""
        return Gsp(
            spi=self.spi,
            ekt_cipher=self.cipher,
            ekt_format=EKT_FORMAT_IDS[self.ekt_format],
            profile_id=self.profile.id,
            kek=self.kek,
            salt=self.salt,
        )

    def forwarder_args(self) -> tuple[int, int, bytes, bytes, Profile]:
        """Arguments of ``Forwarder.add_group``: ``fwd.add_group(*spec.forwarder_args())``."""
        return (self.spi, self.cipher, self.kek, self.salt, self.profile)

    def __repr__(self) -> str:  # never print a KEK into a log
        return (
            f"EktGroupSpec(spi={self.spi}, cipher={self.cipher}, profile={self.profile.name}, "
            f"ekt_format={self.ekt_format!r})"
        )


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return rng.getrandbits(8 * n).to_bytes(n, "big")


def new_group(
    rng: random.Random,
    ekt_format: str,
    cipher: int,
    profile: Profile | str,
    salt: bytes | None = None,
    avoid_spis: Iterable[int] = (),
) -> EktGroupSpec:
    """A fresh parameter set: random SPI (1..0x7FFF for CTMS's 15-bit field, 1..0xFFFF for
    RFC 8870; never 0, so 0 can mean "no SPI" for a non-secure receiver) not in
    ``avoid_spis``, and a random KEK of the cipher's length. Pass the conference's ``salt``
    on a rekey; None draws a new 14-byte one (first group only).

    ``rng`` must be a cryptographic source in production (``random.SystemRandom``); tests
    pass a seeded ``random.Random`` to make runs repeatable.
    """
    if ekt_format not in EKT_FORMATS:
        raise ConfigError(f"unknown EKT format {ekt_format!r}")
    if isinstance(profile, str):
        profile = profile_named(profile)
    if cipher not in KEK_LENGTHS:
        raise ConfigError(f"unknown EKT cipher id {cipher}")
    avoid = set(avoid_spis)
    top = MAX_SPI[ekt_format]
    if sum(1 for s in avoid if 1 <= s <= top) >= top:
        raise ConfigError("every SPI value is in use")
    spi = rng.randint(1, top)
    while spi in avoid:
        spi = rng.randint(1, top)
    kek = _random_bytes(rng, KEK_LENGTHS[cipher])
    if salt is None:
        salt = _random_bytes(rng, profile.salt_len)
    return EktGroupSpec(spi, cipher, kek, bytes(salt), profile, ekt_format)
