"""A relay with its admin API on loopback, for system tests (real sockets, real DTLS)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from ctms_media.dtls.certificate import RelayCertificate
from ctms_media.server.api import make_app
from ctms_media.server.config import RelayConfig
from ctms_media.server.relay import Relay
from ctms_media.sim.room_client import RoomClient, open_room


@dataclass
class Harness:
    relay: Relay
    url: str
    http: aiohttp.ClientSession

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        async with self.http.post(self.url + path, json=body) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else None)

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.url + path) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()

    async def delete(self, path: str) -> tuple[int, Any]:
        async with self.http.delete(self.url + path) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else None)

    async def conference(self, conf_id: str = "c1", **kw: Any) -> dict[str, Any]:
        status, body = await self.post("/v1/conferences", {"id": conf_id, **kw})
        assert status == 201, body
        return body

    async def join(
        self,
        conf_id: str,
        room_id: str,
        segments: int = 1,
        secure: bool = True,
        ssrc_base: int = 0,
        ack_gsp: bool = True,
        certificate: RelayCertificate | None = None,
        declared_fingerprint: str | None = None,
        start: bool = True,
    ) -> RoomClient:
        """Declare a room through the API, open its socket and (if secure) start DTLS."""
        cert = certificate or (RelayCertificate.generate() if secure else None)
        positions = [2] if segments == 1 else [1, 2, 3]
        streams = []
        for i, pos in enumerate(positions):
            streams.append({"ssrc": ssrc_base + 2 * i + 1, "kind": "audio", "position": pos})
            streams.append({"ssrc": ssrc_base + 2 * i + 2, "kind": "video", "position": pos})
        fp = declared_fingerprint or (str(cert.fingerprint()) if cert else None)
        status, answer = await self.post(
            f"/v1/conferences/{conf_id}/endpoints",
            {
                "id": room_id,
                "segments": segments,
                "secure": secure,
                "fingerprint": fp,
                "profile": "AES_CM_128_HMAC_SHA1_80",
                "streams": streams,
            },
        )
        assert status == 201, answer
        room = RoomClient(
            room_id,
            (answer["host"], answer["port"]),
            answer["fingerprint"],
            cert if secure else None,
            ack_gsp=ack_gsp,
        )
        room.answer = answer  # type: ignore[attr-defined]
        room.streams = streams  # type: ignore[attr-defined]
        await open_room(room)
        if secure and start:
            room.start_dtls()
        return room

    async def join_keyed(
        self, conf_id: str, rooms: dict[str, tuple[int, int]]
    ) -> dict[str, RoomClient]:
        """Secure rooms (id -> (segments, SSRC base)) joined, DTLS done, GSP received and
        every one of them ``active`` in the policy: the start of most meeting tests."""
        joined = {
            eid: await self.join(conf_id, eid, segments=segments, ssrc_base=base)
            for eid, (segments, base) in rooms.items()
        }
        for r in joined.values():
            await asyncio.wait_for(r.keyed.wait(), 10)
        policy = self.relay.conferences[conf_id].policy
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while not all(policy.endpoint_state(e) == "active" for e in joined):
            assert loop.time() < end, "rooms not active within 10 s"
            await asyncio.sleep(0.02)
        return joined


@contextlib.asynccontextmanager
async def running_relay(tmp_path: Path, **config: Any) -> AsyncIterator[Harness]:
    cfg = RelayConfig(certificate=str(tmp_path / "relay.pem"), api_port=0, **config)
    relay = Relay(cfg)
    await relay.start()
    runner = web.AppRunner(make_app(relay), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as http:
        try:
            yield Harness(relay, f"http://127.0.0.1:{port}", http)
        finally:
            await runner.cleanup()
            await relay.stop()
