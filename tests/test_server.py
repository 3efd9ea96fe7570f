"""The relay server over real sockets: admin API (wire.md §9), DTLS latching, GSP and its
timeout, garbage, and an outside DTLS-SRTP peer (aiortc)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from aiortc import RTCCertificate, RTCDtlsFingerprint, RTCDtlsParameters, RTCDtlsTransport

from ctms_media.dtls.certificate import RelayCertificate
from ctms_media.wire.control import GspAck, decode_control, encode_control, is_control_packet

from .server_harness import Harness, running_relay


def run(coro, timeout: float = 40):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate, timeout: float = 10.0, step: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(step)


async def endpoint_state(h: Harness, conf: str, eid: str) -> str | None:
    _, body = await h.get(f"/v1/conferences/{conf}")
    return next((e["state"] for e in body["endpoints"] if e["id"] == eid), None)


def test_admin_api_calls_and_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path, port_min=20000, port_max=20009) as h:
            body = await h.conference(
                "c1", security="secure", switching="segment", audio_streams=3, ekt_format="ctms"
            )
            assert body["id"] == "c1" and body["security"] == "secure"
            assert (await h.post("/v1/conferences", {"id": "c1"}))[0] == 409
            for bad in (
                {"security": "secure"},
                {"id": "x", "security": "maybe"},
                {"id": "x", "switching": "hyper"},
                {"id": 5},
                [1, 2],
            ):
                status, err = await h.post("/v1/conferences", bad)
                assert status == 400 and "error" in err, bad
            async with h.http.post(h.url + "/v1/conferences", data=b"{nope") as r:
                assert r.status == 400 and "error" in await r.json()

            room = await h.join("c1", "room-a", segments=3, ssrc_base=100, start=False)
            assert room.answer["setup"] == "passive"  # type: ignore[attr-defined]
            assert 20000 <= room.answer["port"] <= 20009  # type: ignore[attr-defined]
            assert room.answer["fingerprint"] == h.relay.fingerprint  # type: ignore[attr-defined]
            status, err = await h.post(
                "/v1/conferences/c1/endpoints",
                {
                    "id": "room-a",
                    "segments": 1,
                    "secure": True,
                    "fingerprint": room.fingerprint,
                    "streams": [{"ssrc": 900, "kind": "audio", "position": 2}],
                },
            )
            assert status == 409 and "error" in err
            status, err = await h.post(
                "/v1/conferences/c1/endpoints",
                {
                    "id": "room-b",
                    "segments": 1,
                    "secure": True,
                    "fingerprint": room.fingerprint,
                    "streams": [{"ssrc": 101, "kind": "audio", "position": 2}],
                },
            )
            assert status == 400 and "SSRC" in err["error"]  # SSRCs are unique per conference
            status, err = await h.post(
                "/v1/conferences/c1/endpoints",
                {
                    "id": "room-b",
                    "segments": 1,
                    "secure": True,
                    "fingerprint": room.fingerprint,
                    "streams": [{"ssrc": 901, "kind": "audio", "position": 1}],
                },
            )
            assert status == 400  # a 1-segment room's streams sit at position 2
            with caplog.at_level(logging.INFO):
                status, err = await h.post(
                    "/v1/conferences/c1/endpoints",
                    {
                        "id": "plain-1",
                        "segments": 1,
                        "secure": False,
                        "streams": [{"ssrc": 902, "kind": "audio", "position": 2}],
                    },
                )
            assert (status, err) == (409, {"error": "security mismatch"})
            assert "received error from Confmgr with error='security mismatch'" in caplog.text
            assert (await h.post("/v1/conferences/nope/endpoints", {"id": "x"}))[0] == 404

            status, listing = await h.get("/v1/conferences")
            assert status == 200 and [c["id"] for c in listing] == ["c1"]
            status, one = await h.get("/v1/conferences/c1")
            assert status == 200 and [e["id"] for e in one["endpoints"]] == ["room-a"]
            ep = one["endpoints"][0]
            assert ep["segments"] == 3 and ep["secure"] is True
            assert ep["port"] == room.answer["port"]  # type: ignore[attr-defined]
            assert ep["state"] == "handshaking"
            assert set(one) >= {
                "id",
                "security",
                "switching",
                "spi",
                "endpoints",
                "speakers",
                "displays",
            }
            assert (await h.get("/v1/conferences/nope"))[0] == 404

            await h.conference("be", security="best-effort")
            await h.join("be", "secure-1", ssrc_base=300)
            with caplog.at_level(logging.INFO):
                await h.join("be", "plain-2", secure=False, ssrc_base=400)
            assert "will downgrade security from secure to non-secure" in caplog.text

            assert (await h.delete("/v1/conferences/c1/endpoints/room-a"))[0] == 204
            assert (await h.delete("/v1/conferences/c1/endpoints/room-a"))[0] == 404
            assert room.answer["port"] not in h.relay.ports.in_use  # type: ignore[attr-defined]
            assert (await h.delete("/v1/conferences/c1"))[0] == 204
            assert (await h.delete("/v1/conferences/c1"))[0] == 404
            status, err = await h.get("/v1/nothing-here")
            assert status == 404 and "error" in err
            status, text = await h.get("/metrics")
            assert status == 200
            for name in (
                "ctms_packets_received_total",
                "ctms_packets_forwarded_total",
                'ctms_packets_dropped_total{reason="auth"}',
                'ctms_packets_dropped_total{reason="address"}',
                'ctms_handshakes_total{result="ok"}',
                "ctms_gsp_timeouts_total",
                "ctms_switches_total",
                "ctms_rekeys_total",
                "ctms_conferences",
                "ctms_endpoints",
            ):
                assert name in text, name
            room.close()

    run(scenario())


def test_room_handshakes_gets_gsp_and_becomes_active(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("c1")
            room = await h.join("c1", "room-a", ssrc_base=10)
            await asyncio.wait_for(room.keyed.wait(), 10)
            gsp = room.events.gsps[0]
            assert gsp.ekt_format == 1 and gsp.profile_id == 1 and len(gsp.salt) == 14
            await until(lambda: h.relay.conferences["c1"].endpoints["room-a"].peer is not None)
            for _ in range(100):
                if await endpoint_state(h, "c1", "room-a") == "active":
                    break
                await asyncio.sleep(0.05)
            assert await endpoint_state(h, "c1", "room-a") == "active"
            _, body = await h.get("/v1/conferences/c1")
            assert body["spi"] == gsp.spi
            assert h.relay.stats.handshakes["ok"] == 1
            room.close()

    run(scenario())


def test_wrong_fingerprint_never_latches(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("c1")
            other = str(RelayCertificate.generate().fingerprint())
            with caplog.at_level(logging.INFO):
                room = await h.join("c1", "room-x", ssrc_base=10, declared_fingerprint=other)
                await until(lambda: h.relay.stats.handshakes["failed"] >= 1)
            ep = h.relay.conferences["c1"].endpoints["room-x"]
            assert ep.peer is None and ep.hop is None
            assert "room-x" in caplog.text and "fingerprint" in caplog.text
            assert await endpoint_state(h, "c1", "room-x") == "handshaking"
            before = h.relay.stats.dropped["address"]
            room.send(bytes([0x81, 96, 0, 1]) + bytes(30))
            await until(lambda: h.relay.stats.dropped["address"] > before)
            assert not room.events.gsps
            room.close()

    run(scenario())


def test_gsp_resent_then_spimap_timeout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("c1")
            with caplog.at_level(logging.INFO):
                room = await h.join("c1", "silent", ssrc_base=10, ack_gsp=False)
                await asyncio.wait_for(room.keyed.wait(), 10)
                await until(lambda: "silent" not in h.relay.conferences["c1"].endpoints, 8)
            assert "SPIMAP timeout, Dropping the call" in caplog.text
            assert len(room.events.gsps) >= 2  # resent while unacknowledged
            assert h.relay.stats.gsp_timeouts == 1
            assert room.answer["port"] not in h.relay.ports.in_use  # type: ignore[attr-defined]
            _, text = await h.get("/metrics")
            assert "ctms_gsp_timeouts_total 1.0" in text
            room.close()

    run(scenario(), timeout=30)


def test_lost_flights_are_recovered(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("c1")
            dropped: list[int] = []

            def lose(data: bytes) -> bool:  # the first ClientHello and the first flight after
                if data[0] == 22 and len(dropped) < 2 and data[13] in (1, 16, 11):
                    dropped.append(data[13])
                    return True
                return False

            cert = RelayCertificate.generate()
            room = await h.join("c1", "lossy", ssrc_base=10, certificate=cert)
            room.drop_outgoing = lose
            await asyncio.wait_for(room.keyed.wait(), 20)
            assert len(dropped) == 2
            room.close()

    run(scenario())


def test_garbage_of_every_class_is_counted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("c1")
            room = await h.join("c1", "room-a", ssrc_base=10)
            await asyncio.wait_for(room.keyed.wait(), 10)
            stats = h.relay.stats
            before = sum(stats.dropped.values())
            garbage = [
                b"\x00\x01\x00\x00" + os.urandom(16),
                b"\x16\xfe\xfd" + os.urandom(40),
                b"\x80\x60" + os.urandom(30),
                b"\x80\xc8" + os.urandom(30),
                b"\x81\xcc\x00\x02" + os.urandom(20),
                b"\x40" + os.urandom(10),
                b"",
                os.urandom(2000),
            ]
            for g in garbage:
                room.send(g)
            await until(lambda: sum(stats.dropped.values()) - before >= len(garbage) - 1)
            for reason in ("stun", "dtls", "malformed", "control"):
                assert stats.dropped[reason] >= 1, reason
            # still serving: a second room completes its handshake and is keyed
            room2 = await h.join("c1", "room-b", ssrc_base=20)
            await asyncio.wait_for(room2.keyed.wait(), 10)
            room.close()
            room2.close()

    run(scenario())


def test_aiortc_peer_through_the_relay(tmp_path: Path) -> None:
    """aiortc's DTLS transport as the room: handshake, GSP in, GSP-ACK out, SRTCP both ways."""

    class Inbox(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.dtls: asyncio.Queue[bytes] = asyncio.Queue()
            self.srtcp: asyncio.Queue[bytes] = asyncio.Queue()

        def datagram_received(self, data: bytes, addr) -> None:
            (self.dtls if 20 <= data[0] <= 63 else self.srtcp).put_nowait(data)

    class NoIce:
        role = "controlled"

        def __init__(self, transport, inbox: Inbox, remote) -> None:
            self.transport, self.inbox, self.remote = transport, inbox, remote

        async def _recv(self) -> bytes:
            return await self.inbox.dtls.get()

        async def _send(self, data: bytes) -> None:
            self.transport.sendto(data, self.remote)

    async def scenario() -> None:
        async with running_relay(tmp_path) as h:
            await h.conference("c1")
            cert = RTCCertificate.generateCertificate()
            fp = next(f for f in cert.getFingerprints() if f.algorithm == "sha-256")
            status, answer = await h.post(
                "/v1/conferences/c1/endpoints",
                {
                    "id": "aiortc",
                    "segments": 1,
                    "secure": True,
                    "fingerprint": f"sha-256 {fp.value}",
                    "profile": "AES_CM_128_HMAC_SHA1_80",
                    "streams": [{"ssrc": 77, "kind": "audio", "position": 2}],
                },
            )
            assert status == 201
            loop = asyncio.get_running_loop()
            inbox = Inbox()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: inbox, local_addr=("127.0.0.1", 0)
            )
            remote = (answer["host"], answer["port"])
            dtls = RTCDtlsTransport(NoIce(transport, inbox, remote), [cert])
            algorithm, value = answer["fingerprint"].split(" ", 1)
            await asyncio.wait_for(
                dtls.start(RTCDtlsParameters(fingerprints=[RTCDtlsFingerprint(algorithm, value)])),
                10,
            )
            assert dtls.state == "connected"
            srtcp = await asyncio.wait_for(inbox.srtcp.get(), 5)
            assert is_control_packet(srtcp)
            _, gsp = decode_control(dtls._rx_srtp.unprotect_rtcp(srtcp))
            ack = encode_control(GspAck(gsp.spi), 0xABCD)
            transport.sendto(dtls._tx_srtp.protect_rtcp(ack), remote)
            for _ in range(100):
                if await endpoint_state(h, "c1", "aiortc") == "active":
                    break
                await asyncio.sleep(0.05)
            assert await endpoint_state(h, "c1", "aiortc") == "active"
            assert h.relay.conferences["c1"].endpoints["aiortc"].control_ssrc == 0xABCD
            await dtls.stop()
            transport.close()

    run(scenario())
