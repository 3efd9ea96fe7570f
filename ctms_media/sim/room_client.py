"""A synthetic room on the network: DTLS-SRTP client, control channel, media in and out.

It does what a CTS endpoint does against the relay (wire.md §8): handshake as the DTLS
client with its own certificate, check the relay's fingerprint, answer GSP with GSP-ACK,
obey DOWNGRADE, send SRTP media with tail bytes and EKT trailers (``srtp_room``), and
decrypt what it receives using only keys it unwraps from EKT trailers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from OpenSSL import SSL

from ctms_media.dtls.certificate import Fingerprint, RelayCertificate
from ctms_media.dtls.hop import HopSrtcp
from ctms_media.dtls.negotiator import PROFILES, HopKeys, split_records
from ctms_media.errors import CtmsError
from ctms_media.sim.srtp_room import EktGroup, EktReceiver
from ctms_media.wire.control import (
    Downgrade,
    Gsp,
    GspAck,
    RekeyDone,
    decode_control,
    decode_feedback,
    encode_control,
    is_control_packet,
)
from ctms_media.wire.ekt import FORMAT_CTMS, FORMAT_RFC8870
from ctms_media.wire.rtp import classify
from ctms_media.wire.srtp import PROFILES_BY_ID

log = logging.getLogger("ctms_media.sim.room")

_OPENSSL_PROFILES = {p.name: p.openssl_name for p in PROFILES}
_EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"


@dataclass
class RoomEvents:
    """What a room saw of the relay's control channel (tests and the demo read this)."""

    gsps: list[Gsp] = field(default_factory=list)
    downgrades: int = 0
    plis: list[int] = field(default_factory=list)
    firs: list[int] = field(default_factory=list)
    control_failures: int = 0


class RoomClient(asyncio.DatagramProtocol):
    """One room's UDP socket towards its relay port."""

    def __init__(
        self,
        room_id: str,
        relay_addr: tuple[str, int],
        relay_fingerprint: str | None,
        certificate: RelayCertificate | None = None,
        profile: str = "AES_CM_128_HMAC_SHA1_80",
        ack_gsp: bool = True,
        on_media: Callable[[bytes, bytes | None], None] | None = None,
        on_feedback: Callable[[str, int], None] | None = None,
        latency_from_payload: bool = True,
    ) -> None:
        self.room_id = room_id
        self.relay_addr = relay_addr
        self.relay_fingerprint = Fingerprint.parse(relay_fingerprint) if relay_fingerprint else None
        self.certificate = certificate
        self.profile = profile
        self.ack_gsp = ack_gsp
        self.on_media = on_media
        # ("pli" | "fir", media SSRC) as each arrives, so a sender can answer with an IDR at
        # once instead of at its next periodic one (wire.md §10).
        self.on_feedback = on_feedback
        # Payloads that end in a perf_counter_ns() stamp give a latency sample per packet;
        # senders that keep their own send-time ledger turn this off.
        self.latency_from_payload = latency_from_payload
        self.transport: asyncio.DatagramTransport | None = None
        self.control_ssrc = 0x7000_0000 | (hash(room_id) & 0x0FFF_FFFF)
        self.relay_ssrc = -1  # learnt from the first control message (wire.md §8)
        self.events = RoomEvents()
        self.groups: dict[int, EktGroup] = {}
        self.receiver: EktReceiver | None = None
        self.secure = certificate is not None
        self.hop: HopSrtcp | None = None
        self.connected = asyncio.Event()
        self.keyed = asyncio.Event()
        self.received = 0  # media datagrams (RTP and end-to-end SRTCP) from the relay
        self.sent = 0  # every datagram this room sent (DTLS, control, media)
        self.latencies_ns: list[int] = []
        self._conn: SSL.Connection | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.drop_outgoing: Callable[[bytes], bool] | None = None  # loss injection for tests

    @property
    def fingerprint(self) -> str | None:
        return str(self.certificate.fingerprint("sha-256")) if self.certificate else None

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes) -> None:
        if self.transport is None:
            return
        if self.drop_outgoing is not None and self.drop_outgoing(data):
            return
        self.sent += 1
        self.transport.sendto(data, self.relay_addr)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        kind = classify(data)
        if kind == "dtls":
            self._dtls_in(data)
        elif kind == "rtcp" and (
            is_control_packet(data) or int.from_bytes(data[4:8], "big") == self.relay_ssrc
        ):
            self._control_in(data)  # the relay's own RTCP: APP messages, PLI, FIR (§8)
        elif kind in ("rtp", "rtcp"):
            self._media_in(data, kind == "rtcp")

    # -- DTLS client -------------------------------------------------------------------------

    def start_dtls(self) -> None:
        assert self.certificate is not None
        ctx = SSL.Context(SSL.DTLS_METHOD)
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.use_certificate(self.certificate.certificate)
        ctx.use_privatekey(self.certificate.key)
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
        ctx.set_tlsext_use_srtp(_OPENSSL_PROFILES[self.profile])
        self._conn = SSL.Connection(ctx, None)
        self._conn.set_connect_state()
        self._handshake_step()

    def _flush(self) -> None:
        assert self._conn is not None
        out = b""
        while True:
            try:
                out += self._conn.bio_read(65536)
            except SSL.WantReadError:
                break
        for datagram in split_records(out) if out else []:
            self.send(datagram)
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._conn is None or self.connected.is_set():
            return
        remaining = self._conn.DTLSv1_get_timeout()
        if remaining is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(remaining + 0.005, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._conn is not None and not self.connected.is_set():
            with contextlib.suppress(SSL.Error):
                self._conn.DTLSv1_handle_timeout()
            self._flush()

    def _handshake_step(self) -> None:
        assert self._conn is not None
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error as exc:
            log.warning("room %s: DTLS handshake failed: %s", self.room_id, exc)
            self._flush()
            return
        self._flush()
        self._handshake_done()

    def _handshake_done(self) -> None:
        assert self._conn is not None
        peer = self._conn.get_peer_certificate(as_cryptography=True)
        if self.relay_fingerprint is not None and (
            peer is None or not self.relay_fingerprint.matches(peer)
        ):
            log.warning("room %s: relay certificate does not match its fingerprint", self.room_id)
            return
        name = self._conn.get_selected_srtp_profile()
        profile = next(p for p in PROFILES if p.openssl_name == name)
        k, s = profile.key_length, profile.salt_length
        m = self._conn.export_keying_material(_EXPORTER_LABEL, 2 * (k + s))
        relay_view = HopKeys(
            profile.name,
            profile.profile_id,
            m[:k],
            m[2 * k : 2 * k + s],
            m[k : 2 * k],
            m[2 * k + s :],
        )
        self.hop = HopSrtcp(relay_view.mirrored())
        self.connected.set()

    def _dtls_in(self, data: bytes) -> None:
        if self._conn is None:
            return
        self._conn.bio_write(data)
        if not self.connected.is_set():
            self._handshake_step()
        else:
            with contextlib.suppress(SSL.Error):
                self._conn.recv(65536)
            self._flush()

    # -- control -----------------------------------------------------------------------------

    def send_control(self, msg: GspAck | RekeyDone) -> None:
        plain = encode_control(msg, self.control_ssrc)
        self.send(self.hop.protect(plain) if self.hop is not None else plain)

    def _control_in(self, data: bytes) -> None:
        try:
            plain = self.hop.unprotect(data) if self.hop is not None else data
        except CtmsError:
            self.events.control_failures += 1
            return
        if len(plain) > 1 and plain[1] == 206:  # PSFB from the relay: PLI or FIR
            with contextlib.suppress(CtmsError):
                fb = decode_feedback(plain)
                target = getattr(fb, "media_ssrc", None) or getattr(fb, "target_ssrc", 0)
                pli = type(fb).__name__ == "Pli"
                (self.events.plis if pli else self.events.firs).append(target)
                if self.on_feedback is not None:
                    self.on_feedback("pli" if pli else "fir", target)
            return
        try:
            self.relay_ssrc, msg = decode_control(plain)
        except CtmsError:
            self.events.control_failures += 1
            return
        if isinstance(msg, Gsp):
            self._gsp(msg)
        elif isinstance(msg, Downgrade):
            self.events.downgrades += 1
            self.secure = False

    def _gsp(self, gsp: Gsp) -> None:
        self.events.gsps.append(gsp)
        fmt = FORMAT_CTMS if gsp.ekt_format == 1 else FORMAT_RFC8870
        group = EktGroup(
            gsp.spi, gsp.ekt_cipher, gsp.kek, gsp.salt, PROFILES_BY_ID[gsp.profile_id], fmt
        )
        self.groups[gsp.spi] = group
        if self.receiver is None:
            self.receiver = EktReceiver(self.groups)
        else:
            self.receiver.groups[gsp.spi] = group
        if self.ack_gsp:
            self.send_control(GspAck(gsp.spi))
        self.keyed.set()

    # -- media -------------------------------------------------------------------------------

    def _media_in(self, data: bytes, rtcp: bool) -> None:
        self.received += 1
        plain: bytes | None
        if self.secure:
            plain = self.receiver.receive(data, rtcp) if self.receiver is not None else None
        else:
            plain = data  # after a DOWNGRADE: plain RTP, nothing to decrypt
        if self.latency_from_payload and plain is not None and not rtcp and len(plain) >= 24:
            sent_ns = struct.unpack_from("!Q", plain, len(plain) - 8)[0]
            if 0 < time.perf_counter_ns() - sent_ns < 10_000_000_000:
                self.latencies_ns.append(time.perf_counter_ns() - sent_ns)
        if self.on_media is not None:
            self.on_media(data, plain)


async def open_room(room: RoomClient, host: str = "127.0.0.1") -> RoomClient:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: room, local_addr=(host, 0))
    return room
