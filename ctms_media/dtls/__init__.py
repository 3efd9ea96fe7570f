"""DTLS-SRTP towards the endpoints: the relay's identity, the handshake, and the hop keys.

The handshake is a sans-IO state machine (:mod:`.negotiator`); :mod:`.driver` puts it on an
event loop and :mod:`.hop` turns its exported keys into the SRTCP contexts that carry the
control messages of wire.md §8.
"""

from ctms_media.dtls.certificate import Fingerprint, RelayCertificate, fingerprint_of
from ctms_media.dtls.driver import DtlsDriver
from ctms_media.dtls.hop import HopSrtcp
from ctms_media.dtls.negotiator import (
    DtlsEvent,
    DtlsServer,
    DtlsState,
    HandshakeComplete,
    HandshakeFailed,
    HopKeys,
    PeerClosed,
)

__all__ = [
    "DtlsDriver",
    "DtlsEvent",
    "DtlsServer",
    "DtlsState",
    "Fingerprint",
    "HandshakeComplete",
    "HandshakeFailed",
    "HopKeys",
    "HopSrtcp",
    "PeerClosed",
    "RelayCertificate",
    "fingerprint_of",
]
