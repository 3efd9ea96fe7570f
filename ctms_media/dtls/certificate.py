"""The relay's DTLS identity and the fingerprints that stand in for a PKI.

DTLS-SRTP has no certificate authority: each side's certificate is trusted because its hash
was declared out of band (here, the admin API's ``fingerprint`` field and answer). That makes
two things matter: the relay's own fingerprint must survive restarts, or every configured room
breaks, hence a key kept on disk; and the comparison must be exact and constant-time, since it
is the whole of the authentication.
"""

from __future__ import annotations

import datetime
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ctms_media.errors import ConfigError

__all__ = [
    "HASH_ALGORITHMS",
    "Fingerprint",
    "RelayCertificate",
    "fingerprint_of",
]

HASH_ALGORITHMS: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "sha-256": hashes.SHA256,
    "sha-384": hashes.SHA384,
    "sha-512": hashes.SHA512,
}

# Long enough that nobody has to rotate it by hand; the fingerprint, not the validity period,
# is what peers check, and a silent regeneration would break every configured endpoint.
_VALIDITY: Final = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class Fingerprint:
    """A certificate hash as SDP writes it (RFC 8122): ``sha-256 AA:BB:...``."""

    algorithm: str
    digest: bytes

    def __post_init__(self) -> None:
        algorithm = HASH_ALGORITHMS.get(self.algorithm)
        if algorithm is None:
            raise ConfigError(f"unsupported fingerprint algorithm {self.algorithm!r}")
        if len(self.digest) != algorithm.digest_size:
            raise ConfigError(f"a {self.algorithm} fingerprint has {algorithm.digest_size} bytes")

    @classmethod
    def parse(cls, text: str) -> Fingerprint:
        """Read ``"<algorithm> <hex pairs joined by ':'>"``, case-insensitively.

        Strict about the pair layout so that a truncated or mangled value in the admin API is
        a 400 there, rather than a handshake that fails later for a reason nobody sees.
        """
        parts = text.strip().split()
        if len(parts) != 2:
            raise ConfigError("fingerprint must be '<algorithm> <AA:BB:...>'")
        algorithm, value = parts[0].lower(), parts[1]
        pairs = value.split(":")
        if any(len(p) != 2 for p in pairs):
            raise ConfigError("fingerprint value must be colon-separated hex pairs")
        try:
            digest = bytes.fromhex("".join(pairs))
        except ValueError:
            raise ConfigError("fingerprint value is not hex") from None
        return cls(algorithm, digest)

    @property
    def value(self) -> str:
        """The hex part alone, upper case, as aiortc's ``RTCDtlsFingerprint.value``."""
        return ":".join(f"{b:02X}" for b in self.digest)

    def __str__(self) -> str:
        return f"{self.algorithm} {self.value}"

    def matches(self, certificate: x509.Certificate) -> bool:
        """Whether ``certificate`` hashes to this fingerprint, compared in constant time."""
        return self.equals(fingerprint_of(certificate, self.algorithm))

    def equals(self, other: Fingerprint) -> bool:
        """Constant-time equality; the algorithm name is public, the digest is the secret part."""
        same_digest = hmac.compare_digest(self.digest, other.digest)
        return same_digest and self.algorithm == other.algorithm


def fingerprint_of(certificate: x509.Certificate, algorithm: str = "sha-256") -> Fingerprint:
    """Hash a certificate's DER encoding, the only form RFC 8122 fingerprints are defined on."""
    hash_cls = HASH_ALGORITHMS.get(algorithm)
    if hash_cls is None:
        raise ConfigError(f"unsupported fingerprint algorithm {algorithm!r}")
    return Fingerprint(algorithm, certificate.fingerprint(hash_cls()))


class RelayCertificate:
    """The relay's ECDSA P-256 key and self-signed certificate.

    P-256 because every DTLS-SRTP stack in the field (browsers, aiortc, room systems) accepts
    ECDHE-ECDSA with it, and its certificate keeps the server's first flight well under one
    1200-byte datagram.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ConfigError("the relay key must be ECDSA P-256")
        if certificate.public_key() != key.public_key():
            raise ConfigError("certificate does not belong to the key")
        self.key = key
        self.certificate = certificate

    @classmethod
    def generate(cls) -> RelayCertificate:
        """A fresh identity that lives only in memory (tests, ``demo``)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [x509.NameAttribute(x509.NameOID.COMMON_NAME, f"ctms-media {secrets.token_hex(8)}")]
        )
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + _VALIDITY)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> RelayCertificate:
        """Load the PEM key+certificate at ``path``, creating it first if it does not exist.

        Creation writes a 0600 temporary file next to the target and hard-links it into place,
        so a reader never sees half a file and two relays starting together cannot end up with
        different identities: the loser of the link race loads the winner's file.
        """
        target = Path(path)
        try:
            return cls._load(target)
        except FileNotFoundError:
            pass
        target.parent.mkdir(parents=True, exist_ok=True)
        fresh = cls.generate()
        fd, tmp_name = tempfile.mkstemp(prefix=".ctms-cert-", dir=target.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(fresh.to_pem())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp_name, target)
            except FileExistsError:
                return cls._load(target)
        finally:
            os.unlink(tmp_name)
        return fresh

    @classmethod
    def _load(cls, path: Path) -> RelayCertificate:
        data = path.read_bytes()
        try:
            key = serialization.load_pem_private_key(data, password=None)
            certificate = x509.load_pem_x509_certificate(data)
        except ValueError as exc:
            raise ConfigError(f"{path}: not a PEM key and certificate ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{path}: the relay key must be ECDSA P-256")
        return cls(key, certificate)

    def to_pem(self) -> bytes:
        """Unencrypted PKCS#8 key followed by the certificate: one file, one permission to get
        right."""
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem + self.certificate.public_bytes(serialization.Encoding.PEM)

    def fingerprint(self, algorithm: str = "sha-256") -> Fingerprint:
        """What the admin API hands out as the relay's ``fingerprint``."""
        return fingerprint_of(self.certificate, algorithm)
