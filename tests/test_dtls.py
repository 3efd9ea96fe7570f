"""DTLS-SRTP server: certificates, the sans-IO handshake, hop SRTCP, and aiortc as outside peer.

Everything here is real crypto: the client is a pyOpenSSL DTLS connection over memory BIOs (or
aiortc over real UDP sockets), never a mock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiortc.rtcdtlstransport import (
    RTCCertificate,
    RTCDtlsFingerprint,
    RTCDtlsParameters,
    RTCDtlsTransport,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from pylibsrtp import Policy, Session

from ctms_media.dtls import (
    DtlsDriver,
    DtlsServer,
    DtlsState,
    Fingerprint,
    HandshakeComplete,
    HandshakeFailed,
    HopSrtcp,
    PeerClosed,
    RelayCertificate,
    fingerprint_of,
)
from ctms_media.dtls.negotiator import MAX_DATAGRAM, split_records
from ctms_media.errors import ConfigError, CtmsError
from ctms_media.wire.control import (
    Gsp,
    GspAck,
    decode_control,
    encode_control,
    is_control_packet,
)

ADDR = ("192.0.2.10", 40000)
OTHER = ("198.51.100.7", 40001)
P80 = b"SRTP_AES128_CM_SHA1_80"
P32 = b"SRTP_AES128_CM_SHA1_32"
LABEL = b"EXTRACTOR-dtls_srtp"


@pytest.fixture(scope="module")
def relay_cert() -> RelayCertificate:
    return RelayCertificate.generate()


@pytest.fixture(scope="module")
def client_cert() -> RelayCertificate:
    # Any P-256 self-signed identity does for the endpoint; reuse the relay's generator.
    return RelayCertificate.generate()


# -- certificate ---------------------------------------------------------------------------------


def test_certificate_persists_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "state" / "relay.pem"
    first = RelayCertificate.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["relay.pem"]  # the temporary file is gone
    second = RelayCertificate.load_or_create(path)
    assert second.fingerprint().equals(first.fingerprint())
    assert second.certificate == first.certificate


def test_certificate_rejects_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.pem"
    path.write_bytes(b"not pem")
    with pytest.raises(ConfigError):
        RelayCertificate.load_or_create(path)


def test_fingerprint_format_and_parse(relay_cert: RelayCertificate) -> None:
    for algorithm, size in (("sha-256", 32), ("sha-384", 48), ("sha-512", 64)):
        fp = relay_cert.fingerprint(algorithm)
        text = str(fp)
        assert text.startswith(f"{algorithm} ") and text.count(":") == size - 1
        assert text == text.split()[0] + " " + text.split()[1].upper()
        assert Fingerprint.parse(text).equals(fp)
        assert Fingerprint.parse(text.lower().replace(" ", "  ")).equals(fp)
        assert fp.matches(relay_cert.certificate)
    other = RelayCertificate.generate()
    assert not relay_cert.fingerprint().matches(other.certificate)
    assert not relay_cert.fingerprint("sha-256").equals(
        Fingerprint("sha-384", relay_cert.fingerprint("sha-384").digest)
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha-256",
        "md5 AA:BB",
        "sha-1 " + ":".join(["AA"] * 20),
        "sha-256 " + ":".join(["AA"] * 31),
        "sha-256 " + ":".join(["AA"] * 33),
        "sha-256 " + ":".join(["GG"] * 32),
        "sha-256 " + "AA" * 32,
        "sha-256 " + ":".join(["A"] * 64),
    ],
)
def test_fingerprint_parse_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        Fingerprint.parse(text)


# -- a pyOpenSSL DTLS client over memory BIOs ----------------------------------------------------


class Client:
    """The endpoint's side of the handshake, driven by hand."""

    def __init__(self, cert: RelayCertificate, profiles: bytes = P80) -> None:
        ctx = SSL.Context(SSL.DTLS_METHOD)
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.use_certificate(cert.certificate)
        ctx.use_privatekey(cert.key)
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
        ctx.set_tlsext_use_srtp(profiles)
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.done = False
        self.error: SSL.Error | None = None

    def step(self) -> list[bytes]:
        if not self.done and self.error is None:
            try:
                self.conn.do_handshake()
                self.done = True
            except SSL.WantReadError:
                pass
            except SSL.Error as exc:
                self.error = exc
        return self.drain()

    def drain(self) -> list[bytes]:
        out = b""
        while True:
            try:
                chunk = self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
            out += chunk
        return split_records(out) if out else []

    def feed(self, datagrams: list[bytes]) -> list[bytes]:
        for datagram in datagrams:
            self.conn.bio_write(datagram)
        if self.done:
            with contextlib.suppress(SSL.Error):
                self.conn.recv(65536)
            return self.drain()
        return self.step()

    def retransmit(self) -> list[bytes]:
        remaining = self.conn.DTLSv1_get_timeout()
        assert remaining is not None
        time.sleep(remaining + 0.02)
        self.conn.DTLSv1_handle_timeout()
        return self.drain()


def make_server(
    cert: RelayCertificate, expected: Fingerprint, now: float = 0.0, endpoint: str = "room-7"
) -> DtlsServer:
    return DtlsServer(cert, expected, endpoint, now)


Drop = Callable[[str, int], bool]


def run_handshake(
    server: DtlsServer, client: Client, now: Callable[[], float] = time.monotonic
) -> list[int]:
    """Shuttle flights until nothing moves; returns the sizes of the server's datagrams."""
    sizes: list[int] = []
    to_server = client.step()
    for _ in range(20):
        to_client: list[bytes] = []
        for datagram in to_server:
            to_client += server.receive(datagram, now(), ADDR)
        sizes += [len(d) for d in to_client]
        to_server = client.feed(to_client) if to_client else []
        if not to_server and not to_client:
            break
    return sizes


def split_material(material: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    return material[:16], material[16:32], material[32:46], material[46:60]


# -- the sans-IO handshake -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offer", "expected_profile", "profile_id"),
    [
        (P80, "AES_CM_128_HMAC_SHA1_80", 1),
        (P32, "AES_CM_128_HMAC_SHA1_32", 2),
        (b"SRTP_AEAD_AES_128_GCM:" + P32 + b":" + P80, "AES_CM_128_HMAC_SHA1_80", 1),
    ],
)
def test_handshake_exports_the_same_keys(
    relay_cert: RelayCertificate,
    client_cert: RelayCertificate,
    offer: bytes,
    expected_profile: str,
    profile_id: int,
) -> None:
    server = make_server(relay_cert, client_cert.fingerprint())
    client = Client(client_cert, offer)
    sizes = run_handshake(server, client)

    assert client.done and client.error is None
    assert server.state is DtlsState.CONNECTED and server.failure_reason is None
    assert server.cookies_sent == 1  # one HelloVerifyRequest before any state
    assert max(sizes) <= MAX_DATAGRAM
    assert server.peer_address == ADDR
    keys = server.keys
    assert keys is not None
    assert (keys.profile, keys.profile_id) == (expected_profile, profile_id)
    assert repr(keys.rx_key) not in repr(keys)  # keys never reach a log line by accident
    events = server.pop_events()
    assert events == [HandshakeComplete(keys, ADDR)]
    assert server.pop_events() == []
    assert server.next_timeout() is None

    # The client derives the same material independently.
    assert client.conn.get_selected_srtp_profile() == {1: P80, 2: P32}[profile_id]
    c_key, s_key, c_salt, s_salt = split_material(client.conn.export_keying_material(LABEL, 60))
    assert (keys.rx_key, keys.rx_salt, keys.tx_key, keys.tx_salt) == (c_key, c_salt, s_key, s_salt)
    # And the relay's certificate is the one it announces.
    peer = client.conn.get_peer_certificate(as_cryptography=True)
    assert peer is not None and relay_cert.fingerprint().matches(peer)

    # SRTCP both ways: the relay's HopSrtcp against a libsrtp session keyed by the client alone.
    libsrtp_profile = {
        1: Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
        2: Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
    }
    client_tx = Session(
        Policy(c_key + c_salt, Policy.SSRC_ANY_OUTBOUND, libsrtp_profile[profile_id])
    )
    client_rx = Session(
        Policy(s_key + s_salt, Policy.SSRC_ANY_INBOUND, libsrtp_profile[profile_id])
    )
    hop = HopSrtcp(keys)
    ack = encode_control(GspAck(9), 0x1111)
    protected = client_tx.protect_rtcp(ack)
    assert len(protected) == len(ack) + 4 + 10  # E/index word + 80-bit tag for both profiles
    assert is_control_packet(protected)
    assert decode_control(hop.unprotect(protected)) == (0x1111, GspAck(9))
    with pytest.raises(CtmsError):
        hop.unprotect(protected)  # replay
    gsp = Gsp(3, 1, 1, profile_id, bytes(16), bytes(14))
    assert decode_control(client_rx.unprotect_rtcp(hop.protect(encode_control(gsp, 2)))) == (2, gsp)
    # The mirrored view is the endpoint's: it talks to the relay's view.
    # (fresh contexts: the client's session above already used SSRC 0x1111's index 1)
    relay, endpoint = HopSrtcp(keys), HopSrtcp(keys.mirrored())
    assert relay.unprotect(endpoint.protect(ack)) == ack
    assert endpoint.unprotect(relay.protect(ack)) == ack


def test_sha512_declared_fingerprint(
    relay_cert: RelayCertificate, client_cert: RelayCertificate
) -> None:
    server = DtlsServer(relay_cert, str(client_cert.fingerprint("sha-512")), "room-7", 0.0)
    client = Client(client_cert)
    run_handshake(server, client)
    assert server.state is DtlsState.CONNECTED


def test_fingerprint_mismatch_fails_and_is_logged(
    relay_cert: RelayCertificate, client_cert: RelayCertificate, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = RelayCertificate.generate().fingerprint()
    server = make_server(relay_cert, wrong, endpoint="room-mismatch")
    client = Client(client_cert)
    with caplog.at_level(logging.WARNING, logger="ctms_media.dtls"):
        run_handshake(server, client)
    assert server.state is DtlsState.FAILED
    assert server.keys is None
    assert "fingerprint" in (server.failure_reason or "")
    events = server.pop_events()
    assert len(events) == 1 and isinstance(events[0], HandshakeFailed)
    assert not client.done  # the client got an alert, not a Finished
    assert any(
        "room-mismatch" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )
    # A dead handshake stays dead and stays quiet.
    for datagram in Client(client_cert).step():
        assert server.receive(datagram, time.monotonic(), ADDR) == []
    assert server.next_timeout() is None


def test_no_common_srtp_profile_fails(
    relay_cert: RelayCertificate, client_cert: RelayCertificate, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server(relay_cert, client_cert.fingerprint(), endpoint="room-gcm")
    client = Client(client_cert, b"SRTP_AEAD_AES_128_GCM")
    with caplog.at_level(logging.WARNING, logger="ctms_media.dtls"):
        run_handshake(server, client)
    assert server.state is DtlsState.FAILED and server.keys is None
    assert "room-gcm" in caplog.text


def test_lost_flights_are_retransmitted(
    relay_cert: RelayCertificate, client_cert: RelayCertificate
) -> None:
    """Loss of the first ClientHello, of the server's first flight and of its last flight.

    OpenSSL's retransmission timer runs on its own clock, so this waits for real (about 3 s),
    without asserting anything about timing.
    """
    now = time.monotonic
    server = make_server(relay_cert, client_cert.fingerprint())
    client = Client(client_cert)

    client.step()  # ClientHello, lost
    hello = client.retransmit()  # the client's timer resends it
    hvr = [d for h in hello for d in server.receive(h, now(), ADDR)]
    assert hvr and server.peer_address is None  # still stateless
    hello2 = client.feed(hvr)
    flight4 = [d for h in hello2 for d in server.receive(h, now(), ADDR)]
    assert flight4 and server.peer_address == ADDR
    # ServerHello..ServerHelloDone lost; the server's own timer resends it.
    deadline = server.next_timeout()
    assert deadline is not None
    time.sleep(max(0.0, deadline - now()) + 0.02)
    flight4 = server.handle_timeout(now())
    assert flight4
    flight5 = client.feed(flight4)
    flight6 = [d for f in flight5 for d in server.receive(f, now(), ADDR)]
    assert server.state is DtlsState.CONNECTED and flight6
    # ChangeCipherSpec+Finished lost: the client resends its flight, the server answers again.
    resent5 = client.retransmit()
    flight6 = [d for f in resent5 for d in server.receive(f, now(), ADDR)]
    assert flight6
    client.feed(flight6)
    assert client.done
    c_key, _, _, s_salt = split_material(client.conn.export_keying_material(LABEL, 60))
    assert server.keys is not None and (server.keys.rx_key, server.keys.tx_salt) == (c_key, s_salt)


def test_abandoned_after_ten_seconds_simulated_clock(
    relay_cert: RelayCertificate, client_cert: RelayCertificate, caplog: pytest.LogCaptureFixture
) -> None:
    t0 = 1000.0
    server = make_server(relay_cert, client_cert.fingerprint(), now=t0, endpoint="room-slow")
    assert server.next_timeout() is None  # nothing started yet: no deadline
    client = Client(client_cert)
    hvr = [d for h in client.step() for d in server.receive(h, t0, ADDR)]
    flight4 = [d for h in client.feed(hvr) for d in server.receive(h, t0 + 1, ADDR)]
    assert flight4
    deadline = server.next_timeout()
    assert deadline is not None and deadline <= t0 + 10
    server.handle_timeout(t0 + 9.9)
    assert server.state is DtlsState.HANDSHAKING
    with caplog.at_level(logging.WARNING, logger="ctms_media.dtls"):
        server.handle_timeout(t0 + 10)
    assert server.state is DtlsState.FAILED and "10 s" in (server.failure_reason or "")
    assert "room-slow" in caplog.text
    assert server.next_timeout() is None
    # The client's next flight arrives too late and is ignored.
    for datagram in client.feed(flight4):
        assert server.receive(datagram, t0 + 11, ADDR) == []
    assert server.state is DtlsState.FAILED


def test_other_address_cannot_take_over(
    relay_cert: RelayCertificate, client_cert: RelayCertificate
) -> None:
    server = make_server(relay_cert, client_cert.fingerprint())
    client = Client(client_cert)
    hvr = [d for h in client.step() for d in server.receive(h, 0.0, ADDR)]
    hello2 = client.feed(hvr)
    # A cookie is bound to its address: replayed from elsewhere it only earns a new HVR.
    replies = [d for h in hello2 for d in server.receive(h, 0.0, OTHER)]
    assert replies and server.peer_address is None
    flight4 = [d for h in hello2 for d in server.receive(h, 0.0, ADDR)]
    assert flight4 and server.peer_address == ADDR
    intruder = Client(client_cert)
    ignored = server.datagrams_ignored
    assert [d for h in intruder.step() for d in server.receive(h, 0.0, OTHER)] == []
    assert server.datagrams_ignored == ignored + 1
    client_flight = client.feed(flight4)
    for datagram in client_flight:
        server.receive(datagram, 0.0, ADDR)
    assert server.state is DtlsState.CONNECTED


GARBAGE = [
    b"",
    b"\x00",
    b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12),  # STUN binding request
    b"\x03" * 40,
    b"\x10" * 40,  # reserved range
    b"\x14\xfe\xfd",  # truncated DTLS header
    b"\x16\xfe\xfd" + bytes(8) + b"\xff\xff" + bytes(20),  # record length past the end
    b"\x16\xfe\xff" + bytes(8) + b"\x00\x0c" + b"\x01" + bytes(11),  # bogus ClientHello
    b"\x17\xfe\xfd" + bytes(8) + b"\x00\x10" + os.urandom(16),  # application data
    b"\x15\xfe\xfd" + bytes(8) + b"\x00\x02\x02\x28",  # a fatal alert at epoch 0
    b"\x3f" + os.urandom(60),
    b"\x40" + os.urandom(60),
    b"\x80\x60" + os.urandom(30),  # RTP
    b"\x81\xcc" + os.urandom(30),  # RTCP APP
    b"\xff" * 50,
]


@pytest.mark.parametrize("phase", ["listening", "handshaking", "connected"])
def test_garbage_never_raises(
    relay_cert: RelayCertificate, client_cert: RelayCertificate, phase: str
) -> None:
    server = make_server(relay_cert, client_cert.fingerprint())
    client = Client(client_cert)
    flight4: list[bytes] = []
    if phase == "handshaking":
        hvr = [d for h in client.step() for d in server.receive(h, 0.0, ADDR)]
        flight4 = [d for h in client.feed(hvr) for d in server.receive(h, 0.0, ADDR)]
        assert flight4 and server.peer_address == ADDR
    elif phase == "connected":
        run_handshake(server, client, now=lambda: 0.0)
        assert server.state is DtlsState.CONNECTED
    for datagram in GARBAGE:
        out = server.receive(datagram, 0.0, ADDR)
        assert isinstance(out, list)
        server.handle_timeout(0.0)
    assert server.datagrams_ignored > 0
    # None of it derails the handshake or tears down an established hop.
    if phase == "listening":
        assert server.peer_address is None
        run_handshake(server, client, now=lambda: 0.0)
    elif phase == "handshaking":
        for datagram in client.feed(flight4):
            server.receive(datagram, 0.0, ADDR)
    assert server.state is DtlsState.CONNECTED and server.keys is not None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_listening_server(data: bytes) -> None:
    server = _FUZZ_SERVER
    server.receive(data, 0.0, ADDR)
    server.receive(b"\x16\xfe\xfd" + data, 0.0, ADDR)
    assert server.peer_address is None


_FUZZ_SERVER = DtlsServer(
    RelayCertificate.generate(), RelayCertificate.generate().fingerprint(), "fuzz", 0.0
)


def test_split_records_packs_whole_records() -> None:
    def record(n: int) -> bytes:
        return b"\x16\xfe\xfd" + bytes(8) + n.to_bytes(2, "big") + b"x" * n

    records = [record(500), record(500), record(100), record(1300), record(10)]
    out = split_records(b"".join(records))
    assert b"".join(out) == b"".join(records)
    assert [len(d) for d in out] == [513 + 513 + 113, 1313, 23]
    assert split_records(b"\x16\xfe") == [b"\x16\xfe"]  # a stub is kept, not lost


def test_hop_rejects_bad_input(relay_cert: RelayCertificate, client_cert: RelayCertificate) -> None:
    server = make_server(relay_cert, client_cert.fingerprint())
    run_handshake(server, Client(client_cert))
    assert server.keys is not None
    hop = HopSrtcp(server.keys)
    for bad in (b"", b"\x80\xcc", bytes(40), b"\x80\xcc\x00\x03" + bytes(40), bytes(3000)):
        with pytest.raises(CtmsError):
            hop.unprotect(bad)
    with pytest.raises(CtmsError):
        hop.protect(bytes(3000))
    sealed = bytearray(HopSrtcp(server.keys.mirrored()).protect(encode_control(GspAck(1), 5)))
    sealed[-1] ^= 1
    with pytest.raises(CtmsError):
        hop.unprotect(bytes(sealed))


# -- aiortc as the endpoint, over real UDP -------------------------------------------------------


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))


class _NoIce:
    """What RTCDtlsTransport needs of an ICE transport: a role, _recv and _send.

    DTLS goes to aiortc; SRTCP is diverted to ``srtcp`` so the test reads it with aiortc's own
    SRTP sessions.
    """

    role = "controlled"  # aiortc makes the controlled side the DTLS client

    def __init__(
        self, transport: asyncio.DatagramTransport, inbox: _Inbox, remote: tuple[str, int]
    ) -> None:
        self._transport = transport
        self._inbox = inbox
        self._remote = remote
        self.srtcp: asyncio.Queue[bytes] = asyncio.Queue()

    async def _recv(self) -> bytes:
        while True:
            data, _ = await self._inbox.queue.get()
            if data and 20 <= data[0] <= 63:
                return data
            self.srtcp.put_nowait(data)

    async def _send(self, data: bytes) -> None:
        self._transport.sendto(data, self._remote)


class _Relay(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.driver: DtlsDriver | None = None
        self.srtcp: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data and 20 <= data[0] <= 63 and self.driver is not None:
            self.driver.datagram_received(data, addr)
        elif data and 128 <= data[0] <= 191:
            self.srtcp.put_nowait((data, addr))


async def _aiortc_session(relay_cert: RelayCertificate) -> None:
    loop = asyncio.get_running_loop()
    client_cert = RTCCertificate.generateCertificate()
    client_fp = next(f for f in client_cert.getFingerprints() if f.algorithm == "sha-256")

    relay = _Relay()
    relay_transport, _ = await loop.create_datagram_endpoint(
        lambda: relay, local_addr=("127.0.0.1", 0)
    )
    inbox = _Inbox()
    client_transport, _ = await loop.create_datagram_endpoint(
        lambda: inbox, local_addr=("127.0.0.1", 0)
    )
    relay_addr = relay_transport.get_extra_info("sockname")
    client_addr = client_transport.get_extra_info("sockname")

    server = DtlsServer(
        relay_cert,
        Fingerprint.parse(f"{client_fp.algorithm} {client_fp.value}"),
        "room-aiortc",
        loop.time(),
    )
    events: list[object] = []
    relay.driver = DtlsDriver(server, relay_transport.sendto, events.append)  # type: ignore[arg-type]
    ice = _NoIce(client_transport, inbox, relay_addr)
    client = RTCDtlsTransport(ice, [client_cert])  # type: ignore[arg-type]
    try:
        relay_fp = relay_cert.fingerprint()
        params = RTCDtlsParameters(
            fingerprints=[RTCDtlsFingerprint(relay_fp.algorithm, relay_fp.value)]
        )
        await asyncio.wait_for(client.start(params), 10)
        assert client.state == "connected"
        assert server.state is DtlsState.CONNECTED
        keys = server.keys
        assert keys is not None and keys.profile == "AES_CM_128_HMAC_SHA1_80"
        assert events == [HandshakeComplete(keys, client_addr)]

        hop = HopSrtcp(keys)
        # Endpoint -> relay: an RR under aiortc's own SRTP session.
        rr = b"\x80\xc9\x00\x01\x00\x00\x0a\xbc"
        ice._transport.sendto(client._tx_srtp.protect_rtcp(rr), relay_addr)
        data, addr = await asyncio.wait_for(relay.srtcp.get(), 5)
        assert addr == client_addr and not is_control_packet(data)
        assert hop.unprotect(data) == rr
        # Relay -> endpoint: the same the other way.
        relay_transport.sendto(hop.protect(rr), client_addr)
        assert client._rx_srtp.unprotect_rtcp(await asyncio.wait_for(ice.srtcp.get(), 5)) == rr

        # GSP down, GSP-ACK up, both as hop-keyed control packets.
        gsp = Gsp(
            spi=0x0101,
            ekt_cipher=1,
            ekt_format=1,
            profile_id=1,
            kek=os.urandom(16),
            salt=os.urandom(14),
        )
        relay_ssrc, room_ssrc = 0x5E1A7000, 0x00C0FFEE
        relay_transport.sendto(hop.protect(encode_control(gsp, relay_ssrc)), client_addr)
        received = await asyncio.wait_for(ice.srtcp.get(), 5)
        assert is_control_packet(received)
        assert decode_control(client._rx_srtp.unprotect_rtcp(received)) == (relay_ssrc, gsp)
        ack = encode_control(GspAck(gsp.spi), room_ssrc)
        ice._transport.sendto(client._tx_srtp.protect_rtcp(ack), relay_addr)
        data, _ = await asyncio.wait_for(relay.srtcp.get(), 5)
        assert is_control_packet(data)
        assert decode_control(hop.unprotect(data)) == (room_ssrc, GspAck(0x0101))

        # aiortc's close_notify reaches the relay as PeerClosed.
        await client.stop()
        for _ in range(100):
            if server.state is DtlsState.CLOSED:
                break
            await asyncio.sleep(0.01)
        assert server.state is DtlsState.CLOSED and isinstance(events[-1], PeerClosed)
    finally:
        await client.stop()
        relay.driver.close()
        relay_transport.close()
        client_transport.close()


def test_aiortc_endpoint_over_udp(relay_cert: RelayCertificate) -> None:
    asyncio.run(asyncio.wait_for(_aiortc_session(relay_cert), 20))


def test_driver_abandons_on_the_loop_clock(
    relay_cert: RelayCertificate, client_cert: RelayCertificate
) -> None:
    """The driver's timer, not a test, is what ends a handshake whose client went silent."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = DtlsServer(
            relay_cert,
            client_cert.fingerprint(),
            "room-quiet",
            loop.time(),
            handshake_timeout=0.3,
        )
        sent: list[tuple[bytes, object]] = []
        events: list[object] = []
        driver = DtlsDriver(server, lambda d, a: sent.append((d, a)), events.append)
        client = Client(client_cert)
        for datagram in client.step():
            driver.datagram_received(datagram, ADDR)
        assert sent and sent[0][1] == ADDR  # the HelloVerifyRequest goes back to the sender
        assert server.next_timeout() is None  # a cookieless ClientHello starts no clock
        for datagram in client.feed([d for d, _ in sent]):  # ClientHello with the cookie
            driver.datagram_received(datagram, ADDR)
        assert server.pending_handshakes == 1
        await asyncio.sleep(0.5)
        assert server.state is DtlsState.FAILED
        assert len(events) == 1 and isinstance(events[0], HandshakeFailed)
        driver.close()

    asyncio.run(scenario())


def test_fingerprint_of_matches_aiortc() -> None:
    cert = RTCCertificate.generateCertificate()
    for fp in cert.getFingerprints():
        ours = fingerprint_of(cert._cert, fp.algorithm)
        assert ours.value == fp.value
