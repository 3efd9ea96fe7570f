"""SRTCP under the DTLS hop keys: the envelope of the control messages of wire.md §8.

Hop traffic is ordinary RFC 3711 SRTCP, so libsrtp (through pylibsrtp) does it: it is the
same code the endpoints run, which makes it both the implementation and the oracle, and the
control path is a few packets a second, far from the hot loop that needs our own HMAC code.
"""

from __future__ import annotations

from typing import Final

import pylibsrtp
from pylibsrtp import Policy, Session

from ctms_media.dtls.negotiator import HopKeys
from ctms_media.errors import ConfigError, CtmsError

__all__ = ["HopSrtcp"]

_LIBSRTP_PROFILE: Final = {
    0x0001: Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    # libsrtp keeps the 80-bit tag for SRTCP under this profile, as wire.md §2 requires.
    0x0002: Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}

REPLAY_WINDOW: Final = 1024


class HopSrtcp:
    """The two SRTCP contexts of one hop: protect with tx keys, unprotect with rx keys.

    Built from the relay's view of :class:`HopKeys`; pass ``keys.mirrored()`` for the endpoint's
    side. Each call to :meth:`protect` consumes a fresh SRTCP index, so a message that must be
    resent (GSP every 500 ms, DOWNGRADE three times) is protected anew each time rather than
    replayed byte for byte, which the receiver would drop as a replay.
    """

    def __init__(self, keys: HopKeys) -> None:
        profile = _LIBSRTP_PROFILE.get(keys.profile_id)
        if profile is None:
            raise ConfigError(f"no SRTP profile with id {keys.profile_id:#06x}")
        self.keys = keys
        self._tx = Session(
            self._policy(keys.tx_key + keys.tx_salt, Policy.SSRC_ANY_OUTBOUND, profile)
        )
        self._rx = Session(
            self._policy(keys.rx_key + keys.rx_salt, Policy.SSRC_ANY_INBOUND, profile)
        )

    @staticmethod
    def _policy(key: bytes, ssrc_type: int, profile: int) -> Policy:
        policy = Policy(key=bytes(key), ssrc_type=ssrc_type, srtp_profile=profile)
        policy.window_size = REPLAY_WINDOW
        return policy

    def protect(self, plain_rtcp: bytes) -> bytes:
        """SRTCP-protect one plain RTCP packet (e.g. from :func:`encode_control`)."""
        try:
            return self._tx.protect_rtcp(bytes(plain_rtcp))
        except (pylibsrtp.Error, ValueError, TypeError) as exc:
            raise CtmsError(f"SRTCP protect failed: {exc}") from None

    def unprotect(self, srtcp: bytes) -> bytes:
        """Verify, replay-check and decrypt one SRTCP packet; any failure is a CtmsError."""
        try:
            return self._rx.unprotect_rtcp(bytes(srtcp))
        except (pylibsrtp.Error, ValueError, TypeError) as exc:
            raise CtmsError(f"SRTCP unprotect failed: {exc}") from None
