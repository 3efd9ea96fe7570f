"""Sans-IO DTLS-SRTP server: datagrams in, datagrams and events out, no sockets, no clock.

The relay is always the DTLS server (``a=setup:passive``, wire.md §8), one handshake per
endpoint port. Keeping the state machine free of I/O (in the manner of h11) lets the tests drive
a real OpenSSL handshake packet by packet, drop flights at will and move time by hand; the
asyncio glue in :mod:`ctms_media.dtls.driver` stays a dozen lines.

What this layer guarantees to the rest of the relay:

* ``CONNECTED`` only after the peer certificate's hash equals the declared fingerprint; on a
  mismatch or any other failure the reason is logged with the endpoint id and no address is
  ever reported (wire.md §1, §8).
* No exception from :meth:`DtlsServer.receive`, whatever bytes arrive: the port is open to the
  internet, so bad input is counted, not raised.
* Stateless cookies (RFC 6347 §4.2.1) before any per-peer state exists, so a spoofed source
  address can neither make the relay send a certificate flight to a victim nor latch itself as
  the endpoint.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import logging
import os
import struct
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Final

from OpenSSL import SSL, crypto

from ctms_media.dtls.certificate import Fingerprint, RelayCertificate
from ctms_media.errors import ConfigError

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_DATAGRAM",
    "PROFILES",
    "DtlsEvent",
    "DtlsServer",
    "DtlsState",
    "HandshakeComplete",
    "HandshakeFailed",
    "HopKeys",
    "PeerClosed",
    "SrtpProfile",
    "split_records",
]

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT: Final = 10.0
"""Seconds from the first ClientHello to a finished handshake before the attempt is dropped."""

MAX_DATAGRAM: Final = 1200
"""Largest datagram we emit: below any tunnel's MTU, so no flight depends on IP fragments."""

DTLS_RECORD_HEADER: Final = 13
_DTLS1_2_VERSION: Final = 0xFEFD
_EXPORTER_LABEL: Final = b"EXTRACTOR-dtls_srtp"

# ECDHE-ECDSA only: our key is P-256, and these are what WebRTC stacks offer for DTLS 1.2.
_CIPHERS: Final = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA"
)

# One secret per process: cookies only have to survive the one round trip of a
# HelloVerifyRequest, and a restart drops every handshake anyway.
_COOKIE_SECRET: Final = os.urandom(32)


@dataclass(frozen=True)
class SrtpProfile:
    """An SRTP protection profile of wire.md §2, under its contract, RFC 5764 and OpenSSL names."""

    name: str
    profile_id: int
    openssl_name: bytes
    key_length: int = 16
    salt_length: int = 14


PROFILES: Final = (
    SrtpProfile("AES_CM_128_HMAC_SHA1_80", 0x0001, b"SRTP_AES128_CM_SHA1_80"),
    SrtpProfile("AES_CM_128_HMAC_SHA1_32", 0x0002, b"SRTP_AES128_CM_SHA1_32"),
)
_BY_OPENSSL_NAME: Final = {p.openssl_name: p for p in PROFILES}


@dataclass(frozen=True)
class HopKeys:
    """The RFC 5764 keys of one relay<->endpoint hop, seen from the relay.

    rx = client write = endpoint -> relay; tx = server write = relay -> endpoint. The key
    material is kept out of ``repr`` so that logging the object cannot leak it.
    """

    profile: str
    profile_id: int
    rx_key: bytes = field(repr=False)
    rx_salt: bytes = field(repr=False)
    tx_key: bytes = field(repr=False)
    tx_salt: bytes = field(repr=False)

    def mirrored(self) -> HopKeys:
        """The same hop seen from the endpoint: what a test or simulated room needs."""
        return HopKeys(
            self.profile, self.profile_id, self.tx_key, self.tx_salt, self.rx_key, self.rx_salt
        )


class DtlsState(enum.Enum):
    HANDSHAKING = "handshaking"
    CONNECTED = "connected"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True)
class HandshakeComplete:
    """The fingerprint matched; ``peer_address`` is the address to latch (wire.md §1)."""

    keys: HopKeys
    peer_address: Hashable | None


@dataclass(frozen=True)
class HandshakeFailed:
    reason: str


@dataclass(frozen=True)
class PeerClosed:
    """The endpoint sent close_notify; its hop keys stay valid, the DTLS session does not."""


DtlsEvent = HandshakeComplete | HandshakeFailed | PeerClosed


def split_records(data: bytes, limit: int = MAX_DATAGRAM) -> list[bytes]:
    """Pack the records of a flight into datagrams of at most ``limit`` bytes.

    A memory BIO hands back a whole flight at once; sent as one datagram it could exceed the
    path MTU. A record is never split (DTLS cannot reassemble a record across datagrams), so a
    single record above ``limit`` goes out alone; OpenSSL's own MTU setting keeps that from
    happening for handshake messages.
    """
    records: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = pos + DTLS_RECORD_HEADER
        if end <= len(data):
            end += int.from_bytes(data[pos + 11 : pos + 13], "big")
        if end > len(data):  # never produced by OpenSSL; keep the bytes rather than lose them
            end = len(data)
        records.append(data[pos:end])
        pos = end
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > limit:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


_STAMP: Final = struct.Struct("!d")
_COOKIE_MAC_LENGTH: Final = 20


@dataclass
class _CookieContext:
    """What the cookie callbacks know of one datagram: set as the Connection's app data.

    The cookie carries the time it was issued (in the caller's clock), under the MAC. That is
    what lets the 10 s handshake limit start at the peer's first ClientHello without keeping
    anything per ClientHello: the time comes back with the cookie, from the one peer that
    proved it receives at its address. ``issued_at`` is filled in when a cookie verifies.
    """

    endpoint_id: str
    addr: Hashable | None
    now: float
    lifetime: float
    server_nonce: bytes = b""
    issued_at: float | None = None


def _cookie_mac(ctx: _CookieContext, stamp: bytes) -> bytes:
    # Binding the server's own nonce (and the endpoint id, for the logs' sake) keeps a cookie
    # earned on one endpoint's port from opening another's, even one with the same endpoint
    # id in another conference; binding the address keeps it from being replayed from
    # elsewhere.
    msg = ctx.server_nonce + repr((ctx.endpoint_id, ctx.addr)).encode() + stamp
    return hmac.new(_COOKIE_SECRET, msg, hashlib.sha256).digest()[:_COOKIE_MAC_LENGTH]


def _generate_cookie(conn: SSL.Connection) -> bytes:
    ctx: _CookieContext = conn.get_app_data()
    stamp = _STAMP.pack(ctx.now)
    return stamp + _cookie_mac(ctx, stamp)


def _verify_cookie(conn: SSL.Connection, cookie: bytes) -> bool:
    # Runs inside OpenSSL: must not raise. A cookie older than the handshake limit (or from
    # the future) is refused like a forged one, so the peer simply gets a fresh
    # HelloVerifyRequest and no cookie stays good for the life of the process.
    ctx: _CookieContext = conn.get_app_data()
    cookie = bytes(cookie)
    if len(cookie) != _STAMP.size + _COOKIE_MAC_LENGTH:
        return False
    stamp, mac = cookie[: _STAMP.size], cookie[_STAMP.size :]
    if not hmac.compare_digest(mac, _cookie_mac(ctx, stamp)):
        return False
    (issued,) = _STAMP.unpack(stamp)
    if not issued <= ctx.now < issued + ctx.lifetime:
        return False
    ctx.issued_at = issued
    return True


class DtlsServer:
    """One endpoint's DTLS-SRTP handshake, driven by :meth:`receive` and :meth:`handle_timeout`.

    ``now`` is the caller's monotonic clock, used for the 10 s abandonment and for
    :meth:`next_timeout`. Retransmission itself runs on OpenSSL's internal wall clock (pyOpenSSL
    offers no timer callback), so a simulated clock can move the abandonment deadline but
    cannot make OpenSSL resend early; :meth:`handle_timeout` before OpenSSL's timer has really
    expired is a harmless no-op.

    Only one peer address is served: the first whose cookie verifies. From then on datagrams
    from any other address are ignored (counted), so a stray or hostile sender cannot reset
    the handshake; before that, every ClientHello just gets a HelloVerifyRequest and leaves
    nothing behind. So the state one endpoint port holds is bounded by construction: at most
    one OpenSSL connection (:attr:`pending_handshakes`), whatever arrives.
    """

    def __init__(
        self,
        cert: RelayCertificate,
        expected_fingerprint: Fingerprint | str,
        endpoint_id: str,
        now: float,
        *,
        profiles: tuple[SrtpProfile, ...] = PROFILES,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_datagram: int = MAX_DATAGRAM,
    ) -> None:
        if isinstance(expected_fingerprint, str):
            expected_fingerprint = Fingerprint.parse(expected_fingerprint)
        if not profiles or any(p not in PROFILES for p in profiles):
            raise ConfigError("profiles must be a non-empty subset of wire.md §2")
        self.endpoint_id = endpoint_id
        self._nonce = os.urandom(16)  # this server's cookies are good on this server only
        self.expected_fingerprint = expected_fingerprint
        self.created_at = now
        self.handshake_timeout = handshake_timeout
        self.max_datagram = max_datagram

        self.state = DtlsState.HANDSHAKING
        self.failure_reason: str | None = None
        self.keys: HopKeys | None = None
        self.peer_address: Hashable | None = None
        self.first_datagram_at: float | None = None

        self.datagrams_ignored = 0
        self.cookies_sent = 0

        self._conn: SSL.Connection | None = None
        self._retransmit_at: float | None = None
        self._events: list[DtlsEvent] = []
        self._verify_rejected = False
        self._ctx = self._make_context(cert, profiles)

    # -- setup ---------------------------------------------------------------------------------

    def _make_context(
        self, cert: RelayCertificate, profiles: tuple[SrtpProfile, ...]
    ) -> SSL.Context:
        ctx = SSL.Context(SSL.DTLS_METHOD)
        # DTLSv1_listen and RFC 5764's exporter layout are DTLS 1.2 things; pin it so an
        # OpenSSL that grows DTLS 1.3 does not silently change the handshake under us.
        ctx.set_min_proto_version(_DTLS1_2_VERSION)
        ctx.set_max_proto_version(_DTLS1_2_VERSION)
        # No tickets and no session cache: a resumed session shows no certificate, and the
        # certificate is the only thing that authenticates the endpoint.
        ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_QUERY_MTU)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.use_certificate(cert.certificate)
        ctx.use_privatekey(cert.key)
        ctx.check_privatekey()
        ctx.set_cipher_list(_CIPHERS)
        ctx.set_tlsext_use_srtp(b":".join(p.openssl_name for p in profiles))
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify_peer)
        ctx.set_cookie_generate_callback(_generate_cookie)
        ctx.set_cookie_verify_callback(_verify_cookie)
        return ctx

    def _verify_peer(
        self, conn: SSL.Connection, x509: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        # The chain means nothing without a PKI (self-signed is the norm), so OpenSSL's verdict
        # is ignored. The leaf is checked here already, so a wrong certificate ends the
        # handshake with an alert instead of a Finished; _complete() checks again regardless.
        if depth != 0:
            return True
        try:
            if self.expected_fingerprint.matches(x509.to_cryptography()):
                return True
        except Exception:  # pyOpenSSL would re-raise it out of do_handshake, i.e. out of receive
            logger.debug(
                "endpoint %s: unreadable peer certificate", self.endpoint_id, exc_info=True
            )
        self._verify_rejected = True
        return False

    def _new_connection(self, addr: Hashable | None, now: float) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(
            _CookieContext(self.endpoint_id, addr, now, self.handshake_timeout, self._nonce)
        )
        # The ciphertext MTU is the UDP payload size. With OP_NO_QUERY_MTU (a memory BIO cannot
        # answer the query) OpenSSL fragments handshake messages to fit it, so every record
        # fits one of our datagrams.
        conn.set_ciphertext_mtu(self.max_datagram)
        conn.set_accept_state()
        return conn

    # -- public API ----------------------------------------------------------------------------

    def receive(self, datagram: bytes, now: float, addr: Hashable | None = None) -> list[bytes]:
        """Feed one datagram from ``addr``; return the datagrams to send back to ``addr``.

        Anything that is not DTLS (first byte outside 20..63, RFC 7983), arrives from an address
        other than the handshake's, or arrives after failure is ignored and counted.
        """
        datagram = bytes(datagram)
        if self.state is DtlsState.HANDSHAKING and self._expired(now):
            self._fail("handshake not finished 10 s after its first datagram")
        if self.state in (DtlsState.FAILED, DtlsState.CLOSED) or not (
            datagram and 20 <= datagram[0] <= 63
        ):
            self.datagrams_ignored += 1
            return []
        if self._conn is None:
            return self._listen(datagram, now, addr)
        if addr != self.peer_address:
            self.datagrams_ignored += 1
            return []
        try:
            self._conn.bio_write(datagram)
        except SSL.Error:
            self.datagrams_ignored += 1
            return []
        if self.state is DtlsState.HANDSHAKING:
            self._advance()
            return self._flush(now)
        ignored, events = self.datagrams_ignored, len(self._events)
        self._read_after_handshake()
        out = self._flush(now)
        if not out and ignored == self.datagrams_ignored and events == len(self._events):
            # OpenSSL drops a record it cannot authenticate without a word; after the
            # handshake, a datagram that neither made us resend our last flight nor closed
            # the session was of no use, and is counted as such.
            self.datagrams_ignored += 1
        return out

    def handle_timeout(self, now: float) -> list[bytes]:
        """Act on :meth:`next_timeout`: retransmit a flight, or abandon a stale handshake.

        Returns datagrams for :attr:`peer_address`.
        """
        if self.state is not DtlsState.HANDSHAKING:
            return []
        if self._expired(now):
            self._fail("handshake not finished 10 s after its first datagram")
            return self._flush(now)
        if self._conn is None:
            return []
        try:
            self._conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            self._fail(f"retransmission failed: {exc}")
        return self._flush(now)

    def next_timeout(self) -> float | None:
        """When :meth:`handle_timeout` should next run, in the caller's clock; None if never."""
        if self.state is not DtlsState.HANDSHAKING or self.first_datagram_at is None:
            return None
        deadline = self.first_datagram_at + self.handshake_timeout
        if self._retransmit_at is not None:
            return min(deadline, self._retransmit_at)
        return deadline

    def pop_events(self) -> list[DtlsEvent]:
        """Events since the last call, oldest first (h11 style: the caller pulls them)."""
        events, self._events = self._events, []
        return events

    @property
    def pending_handshakes(self) -> int:
        """Handshakes holding state (0 or 1): what a ClientHello flood must not grow."""
        return int(self._conn is not None and self.state is DtlsState.HANDSHAKING)

    @property
    def profile(self) -> SrtpProfile | None:
        if self.keys is None:
            return None
        return next(p for p in PROFILES if p.profile_id == self.keys.profile_id)

    # -- internals -----------------------------------------------------------------------------

    def _expired(self, now: float) -> bool:
        started = self.first_datagram_at
        return started is not None and now >= started + self.handshake_timeout

    def _listen(self, datagram: bytes, now: float, addr: Hashable | None) -> list[bytes]:
        # A fresh Connection per datagram is what makes the cookie exchange stateless: nothing
        # of a ClientHello without a valid cookie outlives this call, not even a timestamp (a
        # flood of spoofed ClientHellos used to start the 10 s clock, and its expiry then
        # failed whatever real handshake was in progress at that moment).
        conn = self._new_connection(addr, now)
        try:
            conn.bio_write(datagram)
            conn.DTLSv1_listen()
        except SSL.WantReadError:
            replies = self._drain(conn)
            if not replies:  # not a ClientHello at all
                self.datagrams_ignored += 1
                return []
            self.cookies_sent += 1
            return replies
        except SSL.Error:
            self.datagrams_ignored += 1
            return []
        issued = conn.get_app_data().issued_at
        self.first_datagram_at = now if issued is None else issued
        self._conn = conn
        self.peer_address = addr
        self._advance()
        return self._flush(now)

    def _advance(self) -> None:
        assert self._conn is not None
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as exc:
            if self._verify_rejected:
                self._fail("peer certificate does not match the declared fingerprint")
            else:
                self._fail(f"handshake error: {exc}")
            return
        self._complete()

    def _complete(self) -> None:
        assert self._conn is not None
        peer = self._conn.get_peer_certificate(as_cryptography=True)
        if peer is None or not self.expected_fingerprint.matches(peer):
            self._fail("peer certificate does not match the declared fingerprint")
            self._shutdown()
            return
        profile = _BY_OPENSSL_NAME.get(self._conn.get_selected_srtp_profile())
        if profile is None:
            self._fail("no SRTP profile negotiated")
            self._shutdown()
            return
        klen, slen = profile.key_length, profile.salt_length
        material = self._conn.export_keying_material(_EXPORTER_LABEL, 2 * (klen + slen))
        # RFC 5764 §4.2: client key | server key | client salt | server salt.
        self.keys = HopKeys(
            profile=profile.name,
            profile_id=profile.profile_id,
            rx_key=material[:klen],
            tx_key=material[klen : 2 * klen],
            rx_salt=material[2 * klen : 2 * klen + slen],
            tx_salt=material[2 * klen + slen :],
        )
        self.state = DtlsState.CONNECTED
        self._retransmit_at = None
        self._events.append(HandshakeComplete(self.keys, self.peer_address))
        logger.info(
            "DTLS handshake with endpoint %s complete from %s, profile %s",
            self.endpoint_id,
            self.peer_address,
            profile.name,
        )

    def _read_after_handshake(self) -> None:
        # Reading is what lets OpenSSL notice a retransmitted client Finished and resend our
        # last flight; DTLS application data has no use here and is dropped.
        assert self._conn is not None
        while True:
            try:
                self._conn.recv(65536)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self.state = DtlsState.CLOSED
                self._events.append(PeerClosed())
                logger.info("DTLS session of endpoint %s closed by the peer", self.endpoint_id)
                return
            except SSL.Error as exc:
                # Keep the hop keys: SRTCP does not depend on the DTLS session staying up, and
                # a bad record must not let anyone tear the endpoint down.
                self.datagrams_ignored += 1
                logger.debug("DTLS record from endpoint %s dropped: %s", self.endpoint_id, exc)
                return

    def _fail(self, reason: str) -> None:
        if self.state is DtlsState.FAILED:
            return
        self.state = DtlsState.FAILED
        self.failure_reason = reason
        self.keys = None
        self._retransmit_at = None
        self._events.append(HandshakeFailed(reason))
        logger.warning(
            "DTLS handshake with endpoint %s failed (peer %s): %s",
            self.endpoint_id,
            self.peer_address,
            reason,
        )

    def _shutdown(self) -> None:
        # The client may already believe it is connected; close_notify tells it otherwise.
        if self._conn is None:
            return
        with contextlib.suppress(SSL.Error):
            self._conn.shutdown()

    def _drain(self, conn: SSL.Connection) -> list[bytes]:
        data = b""
        while True:
            try:
                chunk = conn.bio_read(65536)
            except SSL.Error:
                break
            if not chunk:
                break
            data += chunk
        return split_records(data, self.max_datagram)

    def _flush(self, now: float) -> list[bytes]:
        if self._conn is None:
            return []
        out = self._drain(self._conn)
        if self.state is DtlsState.HANDSHAKING:
            try:
                remaining = self._conn.DTLSv1_get_timeout()
            except SSL.Error:
                remaining = None
            self._retransmit_at = None if remaining is None else now + remaining
        return out
