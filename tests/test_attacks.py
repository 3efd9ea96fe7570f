"""Attacks at the system level: real UDP on loopback against a running relay (issue 7).

Every media attack is sent between valid packets of the same sender, so each test shows
three things at once: the bad datagram reaches no receiver (the receiving room gets exactly
the valid packets, once each), it is counted under its contract drop reason and under no
other (``relay.stats.dropped`` and ``/metrics``), and the valid traffic around it is still
forwarded and decrypts at a room that learns keys only from EKT trailers (libsrtp).
The DTLS attacks check latching, the failure count and that the relay keeps no state per
ClientHello. The reasons are those of spec/vectors.md and wire.md §9; docs/security.md
("Attacks at the system level") lists every test here with what the relay does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL

from ctms_media.conformance import implementations
from ctms_media.dtls.certificate import RelayCertificate
from ctms_media.dtls.negotiator import DtlsServer, DtlsState
from ctms_media.forward.verdict import Receiver
from ctms_media.sim.room_client import RoomClient, open_room
from ctms_media.sim.srtp_room import EktGroup, SenderStream
from ctms_media.wire.ekt import CtmsLong, ctms_emk_length, ctms_short, wrap_ctms
from ctms_media.wire.rtp import AudioTail, position_code
from ctms_media.wire.srtp import AES_CM_128_HMAC_SHA1_80, rtp_auth_key, rtp_tag

from .server_harness import Harness, running_relay
from .test_server import run, until

SENDER_AUDIO = 101  # room "a" declares 101 (audio) and 102 (video); room "b" 201 and 202
OTHER_ROOMS_AUDIO = 201
LOUD = AudioTail(True, 3).encode()
TAG = AES_CM_128_HMAC_SHA1_80.rtp_tag_len


def seq_of(packet: bytes) -> int:
    return (packet[2] << 8) | packet[3]


@dataclass
class Meeting:
    """Two secure rooms through a running relay: ``a`` sends audio, ``b`` receives it."""

    h: Harness
    a: RoomClient
    b: RoomClient
    audio: SenderStream
    got: Counter[tuple[int, int]] = field(default_factory=Counter)  # (SSRC, SEQ) decrypted

    @property
    def group(self) -> EktGroup:
        return self.audio.group

    def packet(self, long: bool = False) -> bytes:
        """The sender's next valid uplink packet (libsrtp, tail byte, EKT trailer)."""
        data, _ = self.audio.rtp(os.urandom(40), LOUD, long=long)
        return data

    def send_valid(self) -> int:
        data = self.packet()
        self.a.send(data)
        return seq_of(data)

    def on_media(self, data: bytes, plain: bytes | None) -> None:
        if plain is not None and not 192 <= data[1] <= 223:
            self.got[(int.from_bytes(plain[8:12], "big"), seq_of(plain))] += 1

    def dropped(self) -> Counter[str]:
        return Counter(self.h.relay.stats.dropped)

    def current_key(self) -> bytes:
        """The sender's committed master key, as the relay's forwarder holds it."""
        fwd = self.h.relay.conferences["c"].forwarder
        return fwd.state_snapshot()[SENDER_AUDIO][0][0]


@contextlib.asynccontextmanager
async def meeting(
    tmp_path: Path, relay: dict[str, Any] | None = None, **conference: Any
) -> AsyncIterator[Meeting]:
    """A relay, a secure conference ``c`` with rooms ``a`` and ``b`` keyed and active, and
    ``a``'s audio already reaching ``b`` (so every route is installed before an attack)."""
    async with running_relay(tmp_path, **(relay or {})) as h:
        await h.conference("c", **conference)
        a = await h.join("c", "a", ssrc_base=100)
        b = await h.join("c", "b", ssrc_base=200)
        try:
            for room in (a, b):
                await asyncio.wait_for(room.keyed.wait(), 10)
            conf = h.relay.conferences["c"]
            await until(lambda: all(conf.policy.endpoint_state(e) == "active" for e in "ab"))
            group = a.groups[a.events.gsps[-1].spi]
            m = Meeting(h, a, b, SenderStream(SENDER_AUDIO, "audio", group, os.urandom(16)))
            b.on_media = m.on_media
            for _ in range(250):
                m.send_valid()
                await asyncio.sleep(0.02)
                if m.got:
                    break
            assert m.got, "the sender's audio never reached the receiver"
            yield m
        finally:
            a.close()
            b.close()


async def intruder(m: Meeting) -> RoomClient:
    """A socket of its own aimed at room ``a``'s relay port."""
    return await open_room(RoomClient("intruder", m.a.relay_addr, None))


@dataclass
class Attack:
    """Datagrams for one attack: ``bad`` must be dropped; ``pre``/``post`` are valid packets
    sent before and after them that must be forwarded (once); ``via`` sends ``bad`` from
    another socket than the sender's."""

    bad: list[bytes]
    pre: list[bytes] = field(default_factory=list)
    post: list[bytes] = field(default_factory=list)
    via: RoomClient | None = None


async def check_attack(m: Meeting, attack: Attack, reason: str) -> None:
    """Valid, bad, valid: only the valid ones arrive and decrypt; each bad one is one drop
    under ``reason``, visible in /metrics."""
    assert m.b.receiver is not None
    dropped, got, failed = m.dropped(), Counter(m.got), m.b.receiver.failed
    received = m.b.received
    expected = []
    for p in attack.pre:
        m.a.send(p)
        expected.append(seq_of(p))
    expected.append(m.send_valid())
    for p in attack.bad:
        (attack.via or m.a).send(p)
    for p in attack.post:
        m.a.send(p)
        expected.append(seq_of(p))
    expected.append(m.send_valid())
    await until(lambda: all(m.got[(SENDER_AUDIO, s)] > got[(SENDER_AUDIO, s)] for s in expected))
    await asyncio.sleep(0.15)  # room for anything wrongly forwarded to arrive as well
    assert m.got - got == Counter({(SENDER_AUDIO, s): 1 for s in expected})
    assert m.b.received - received == len(expected)  # nothing else reached the receiver
    assert m.b.receiver.failed == failed  # and everything it got decrypted
    delta = m.dropped()
    delta.subtract(dropped)
    assert +delta == Counter({reason: len(attack.bad)})
    _, metrics = await m.h.get("/metrics")
    line = f'ctms_packets_dropped_total{{reason="{reason}"}} {float(m.dropped()[reason])}'
    assert line in metrics


# -- the attacks; each returns the datagrams, built from the meeting's live sender ---------------


def forged_tag(m: Meeting) -> Attack:
    bad = bytearray(m.packet())
    bad[-2] ^= 0x80  # the tag's last bit (only the short trailer follows it)
    return Attack([bytes(bad)])


def exact_replay(m: Meeting) -> Attack:
    p = m.packet()
    return Attack(bad=[p], pre=[p])


def old_index_replay(m: Meeting) -> Attack:
    held = [m.packet(), m.packet(long=True)]  # never sent: short and long trailer
    m.audio.seq += 1100  # the next valid packet moves the window past them (> 1024 behind)
    return Attack(held)


def other_address(m: Meeting, via: RoomClient) -> Attack:
    p = m.packet()  # a valid packet, from the wrong address first, then from the room
    return Attack(bad=[p], post=[p], via=via)


def undeclared_ssrc(m: Meeting) -> Attack:
    stranger = SenderStream(0xDEADBEEF, "audio", m.group, os.urandom(16))
    # Room b's own SSRC, under a key a room holds (every room holds the group KEK).
    impostor = SenderStream(OTHER_ROOMS_AUDIO, "audio", m.group, os.urandom(16))
    return Attack([stranger.rtp(b"x" * 40, LOUD, long=True)[0], impostor.rtp(b"x" * 40, LOUD)[0]])


def unknown_spi(m: Meeting) -> Attack:
    p = m.packet(long=True)
    spi = m.group.spi % 0x7FFF + 1  # any SPI the relay did not hand out
    return Attack([p[:-2] + ((spi << 1) | 1).to_bytes(2, "big")])


def other_key_in_trailer(m: Meeting) -> Attack:
    """A packet of the sender, but its trailer carries another key: the tag cannot verify
    under that key, and the key must not replace the committed one."""
    p = m.packet()  # short trailer, valid under the committed key
    g = m.group
    other = CtmsLong(wrap_ctms(g.cipher, g.kek, os.urandom(16)), 0, seq_of(p), g.spi).encode()
    return Attack(bad=[p[:-1] + other], post=[p])


def cc15_too_short(m: Meeting) -> Attack:
    header = struct.pack("!BBHII", 0x8F, 96, m.audio.seq, 0, SENDER_AUDIO)
    return Attack([header + os.urandom(40)])  # 15 CSRCs need 60 bytes


def cc0(m: Meeting) -> Attack:
    return Attack([struct.pack("!BBHII", 0x80, 96, m.audio.seq, 0, SENDER_AUDIO) + bytes(40)])


def malformed_with_another_rooms_ssrc(m: Meeting) -> Attack:
    """Framing wins over ownership (vectors.md's order): these are `malformed`, not
    `unknown_ssrc`, though the SSRC is room b's."""
    cc0 = struct.pack("!BBHII", 0x80, 96, m.audio.seq, 0, OTHER_ROOMS_AUDIO) + bytes(40)
    cc15 = struct.pack("!BBHII", 0x8F, 96, m.audio.seq, 0, OTHER_ROOMS_AUDIO) + bytes(20)
    rtcp = struct.pack("!BBHI", 0x80, 200, 40, OTHER_ROOMS_AUDIO) + bytes(8)  # length past end
    return Attack([cc0, cc15, rtcp])


def extension_past_end(m: Meeting) -> Attack:
    base = struct.pack("!BBHIII", 0x91, 96, m.audio.seq, 0, SENDER_AUDIO, position_code(2, 0))
    return Attack(
        [
            base + b"\xbe\xde\x01\x00" + os.urandom(60),  # 256 words announced, 60 bytes there
            base + b"\xbe",  # the extension header itself cut short
        ]
    )


def oversize(m: Meeting) -> Attack:
    p = m.packet()
    return Attack(
        [
            p[:16] + os.urandom(65507 - 16 - len(p)) + p[16:],  # the largest UDP/IPv4 payload
            p[:16] + os.urandom(2049 - len(p)) + p[16:],  # one byte above the limit
            b"\x16\xfe\xfd" + os.urandom(65000),  # DTLS-looking
        ]
    )


ATTACKS: dict[str, tuple[Callable[..., Attack], str]] = {
    "forged_tag": (forged_tag, "auth"),
    "exact_replay": (exact_replay, "replay"),
    "old_index_replay": (old_index_replay, "replay"),
    "other_address": (other_address, "address"),
    "undeclared_ssrc": (undeclared_ssrc, "unknown_ssrc"),
    "unknown_spi": (unknown_spi, "unknown_spi"),
    "other_key_in_trailer": (other_key_in_trailer, "auth"),
    "cc15_too_short": (cc15_too_short, "malformed"),
    "cc0": (cc0, "malformed"),
    "malformed_with_another_rooms_ssrc": (malformed_with_another_rooms_ssrc, "malformed"),
    "extension_past_end": (extension_past_end, "malformed"),
    "oversize": (oversize, "malformed"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_media_attack(tmp_path: Path, name: str) -> None:
    make, reason = ATTACKS[name]

    async def scenario() -> None:
        async with meeting(tmp_path) as m:
            key = m.current_key()
            attack = make(m, await intruder(m)) if make is other_address else make(m)
            await check_attack(m, attack, reason)
            assert m.current_key() == key  # no attack moved the committed key
            assert m.current_key() == m.audio.master_key

    run(scenario())


@pytest.mark.parametrize(
    ("ekt_format", "cipher", "reason"),
    [("ctms", 1, "auth"), ("ctms", 2, "unwrap"), ("ctms", 3, "unwrap"), ("rfc8870", 2, "unwrap")],
)
def test_corrupted_emk(tmp_path: Path, ekt_format: str, cipher: int, reason: str) -> None:
    """wire.md §5: AES_128_ECB cannot tell a corrupted EMK (a wrong key, then `auth`); the
    key-wrap ciphers fail their integrity check (`unwrap`)."""

    async def scenario() -> None:
        async with meeting(tmp_path, ekt_format=ekt_format, ekt_cipher=cipher) as m:
            bad = bytearray(m.packet(long=True))
            if ekt_format == "ctms":
                bad[-8 - ctms_emk_length(cipher)] ^= 0x01  # the EMK's first byte
            else:
                bad[-8] ^= 0x01  # the EKTCiphertext's last byte
            await check_attack(m, Attack([bytes(bad)]), reason)
            assert m.current_key() == m.audio.master_key

    run(scenario())


# -- DTLS -----------------------------------------------------------------------------------------


def test_wrong_certificate_never_latches(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Someone with another certificate handshakes on a room's port first: the handshake
    fails, is logged with the endpoint id and counted, latches nothing, and the room itself
    then completes its handshake on the same port and is latched at its own address."""

    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("c")
            room = await h.join("c", "room-x", ssrc_base=10, start=False)
            ep = h.relay.conferences["c"].endpoints["room-x"]
            fake = RoomClient(
                "fake", room.relay_addr, h.relay.fingerprint, RelayCertificate.generate()
            )
            await open_room(fake)
            with caplog.at_level(logging.WARNING):
                fake.start_dtls()
                await until(lambda: h.relay.stats.handshakes["failed"] == 1)
            assert ep.peer is None and ep.hop is None
            assert any(
                "room-x" in r.getMessage() and "fingerprint" in r.getMessage()
                for r in caplog.records
                if r.name.startswith("ctms_media.relay")
            )
            assert not fake.events.gsps
            fake.send(bytes([0x81, 96, 0, 1]) + bytes(40))  # its media: no address latched
            await until(lambda: h.relay.stats.dropped["address"] == 1)

            room.start_dtls()
            await asyncio.wait_for(room.keyed.wait(), 10)
            assert ep.peer == room.transport.get_extra_info("sockname")  # type: ignore[union-attr]
            assert h.relay.stats.handshakes == Counter({"ok": 1, "failed": 1})
            _, metrics = await h.get("/metrics")
            assert 'ctms_handshakes_total{result="failed"} 1.0' in metrics
            assert 'ctms_handshakes_total{result="ok"} 1.0' in metrics
            fake.close()
            room.close()

    run(scenario())


def client_hello(cert: RelayCertificate) -> bytes:
    """A real first ClientHello (no cookie) from a fresh pyOpenSSL DTLS client."""
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.use_certificate(cert.certificate)
    ctx.use_privatekey(cert.key)
    ctx.set_tlsext_use_srtp(b"SRTP_AES128_CM_SHA1_80")
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


def test_client_hello_flood_keeps_no_state(tmp_path: Path) -> None:
    """ClientHellos from many source ports, before, during and after the room's handshake:
    each gets a stateless HelloVerifyRequest (or is ignored once a peer is chosen), the
    port's DTLS state stays at most one handshake, no clock is started and nothing fails, and
    the room completes its handshake in the middle of the flood."""

    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("c")
            room = await h.join("c", "room-f", ssrc_base=10, start=False)
            ep = h.relay.conferences["c"].endpoints["room-f"]
            dtls = ep.dtls
            assert dtls is not None
            cert = RelayCertificate.generate()
            flooders = [
                await open_room(RoomClient(f"flood-{i}", room.relay_addr, None)) for i in range(24)
            ]
            hellos = [client_hello(cert) for _ in range(4)]
            pending: list[int] = []

            async def flood(rounds: int) -> None:
                for r in range(rounds):
                    for i, f in enumerate(flooders):
                        f.send(hellos[(i + r) % len(hellos)])
                    pending.append(dtls.pending_handshakes)
                    await asyncio.sleep(0.005)

            await flood(10)  # 240 ClientHellos before the room starts
            await until(lambda: dtls.cookies_sent >= 200)
            assert dtls.next_timeout() is None  # no cookieless ClientHello started a clock
            assert dtls.pending_handshakes == 0 and dtls.peer_address is None
            during = asyncio.create_task(flood(60))
            room.start_dtls()
            await asyncio.wait_for(room.keyed.wait(), 10)
            await during
            await flood(10)  # and after the handshake
            await asyncio.sleep(0.1)

            assert ep.dtls is dtls and dtls.state is DtlsState.CONNECTED  # never recycled
            assert max(pending) <= 1  # the only connection ever held was the room's
            assert ep.peer == room.transport.get_extra_info("sockname")  # type: ignore[union-attr]
            assert h.relay.stats.handshakes == Counter({"ok": 1})
            assert h.relay.stats.dropped["dtls"] >= 240  # after the room's cookie: ignored
            for f in flooders:
                f.close()
            room.close()

    run(scenario(), timeout=60)


def test_stale_or_foreign_cookie_earns_only_a_new_hello_verify_request() -> None:
    """Sans-IO: a cookie is bound to the server that issued it (one endpoint's port) and to
    the address, and lives as long as a handshake may take; a late or moved one, or one
    taken to another port (even of an endpoint with the same id), starts nothing."""
    relay_cert, client_cert = RelayCertificate.generate(), RelayCertificate.generate()
    addr = ("192.0.2.1", 5000)

    def second_hello(server: DtlsServer, now: float) -> list[bytes]:
        ctx = SSL.Context(SSL.DTLS_METHOD)
        ctx.use_certificate(client_cert.certificate)
        ctx.use_privatekey(client_cert.key)
        ctx.set_tlsext_use_srtp(b"SRTP_AES128_CM_SHA1_80")
        conn = SSL.Connection(ctx, None)
        conn.set_connect_state()
        with contextlib.suppress(SSL.WantReadError):
            conn.do_handshake()
        for hvr in server.receive(conn.bio_read(65536), now, addr):
            conn.bio_write(hvr)
        with contextlib.suppress(SSL.WantReadError):
            conn.do_handshake()
        return [conn.bio_read(65536)]

    for label, late, where, endpoint in (
        ("stale", 10.0, addr, "room"),
        ("moved", 0.5, ("192.0.2.1", 5001), "room"),
        ("other endpoint", 0.5, addr, "other"),
        ("same id, other port", 0.5, addr, "room (another conference)"),
    ):
        issuer = DtlsServer(relay_cert, client_cert.fingerprint(), "room", 100.0)
        hello2 = second_hello(issuer, 100.0)
        endpoint_id = endpoint.split(" ")[0]
        target = (
            issuer
            if endpoint == "room"
            else DtlsServer(relay_cert, client_cert.fingerprint(), endpoint_id, 100.0)
        )
        replies = [d for h in hello2 for d in target.receive(h, 100.0 + late, where)]
        assert replies and replies[0][13] == 3, label  # HelloVerifyRequest again
        assert target.pending_handshakes == 0 and target.next_timeout() is None, label
    fresh = DtlsServer(relay_cert, client_cert.fingerprint(), "room", 100.0)
    hello2 = second_hello(fresh, 100.0)
    assert [d for h in hello2 for d in fresh.receive(h, 109.0, addr)]
    assert fresh.pending_handshakes == 1
    assert fresh.first_datagram_at == 100.0  # the clock started at the first ClientHello
    deadline = fresh.next_timeout()
    assert deadline is not None and deadline <= 110.0


# -- the forwarder itself with an oversize datagram (both twins) ---------------------------------


def test_forwarders_handle_64k_datagrams() -> None:
    """The relay never hands the forwarder more than ``[limits] datagram_bytes``, but the
    forwarder must not depend on that: an authentic 60 KB packet comes out whole and equal
    from both twins, and 64 KB of garbage is an ordinary drop."""
    group = EktGroup(7, 2, os.urandom(16), os.urandom(14), AES_CM_128_HMAC_SHA1_80)
    key = os.urandom(16)
    junk = b"\x81\x60" + os.urandom(6) + (5).to_bytes(4, "big") + os.urandom(65000)
    results = {}
    for name, factory in sorted(implementations().items()):
        fwd = factory("ctms")
        fwd.add_group(group.spi, group.cipher, group.kek, group.salt, group.profile)
        fwd.add_stream(5, "audio", group.profile)
        fwd.set_route(5, [Receiver("r", 2, group.spi)])
        s = SenderStream(5, "audio", replace(group), key)
        first = fwd.forward(s.rtp(b"hello", LOUD, long=True)[0])
        assert first.drop is None, name
        body = struct.pack("!BBHIII", 0x81, 96, s.seq, s.timestamp, 5, position_code(2, 0))
        body += os.urandom(60_000) + bytes([LOUD])
        big = body + rtp_tag(rtp_auth_key(key, group.salt), body, 0, TAG) + ctms_short()
        verdict = fwd.forward(big)
        assert verdict.drop is None, name
        out = verdict.for_receiver("r")
        assert out is not None and len(out) == len(big) - 1, name  # only the tail byte gone
        garbage = fwd.forward(junk)
        results[name] = (out[:16], out[16 : -TAG - 1] == body[16:-1], garbage.drop)
    assert len(set(results.values())) == 1, results
    _, intact, garbage_drop = next(iter(results.values()))
    assert intact and garbage_drop is not None
