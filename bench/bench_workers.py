"""Multi-core scaling of ``ctms-media serve --workers N``: forwarding rate and CPU cost.

For each N it starts the real server (``python -m ctms_media.cli serve --workers N``) with a
throw-away config, creates K secure conferences of R one-screen rooms through the admin API,
and lets :class:`~ctms_media.sim.room_client.RoomClient` do what a room does before media
flows (DTLS-SRTP handshake, GSP, GSP-ACK), so every room's address is latched the way a real
room's is. Then the asyncio side stops and one loop in this process sends each room's audio
from that room's own socket: SRTP packets with tail byte, real HMAC-SHA1-80 tags under a
fresh master key, EKT long trailer first and short trailers after (``fastpath/loadgen.py``:
one template per room, sequence number and tag stamped in C, ``sendmmsg`` in batches), at a
paced offered rate. The relay verifies, strips the tail byte, rewrites the CSRC, re-tags and
sends each packet to the R-1 other rooms (every room talks, all fit in the 3 loudest).

Measured over ``--seconds`` per offered rate, from the server's own ``/metrics`` and from
``/proc/<pid>/stat`` of the server's processes (parent and workers):
received and forwarded datagrams per second, drops, and relay CPU-seconds per forwarded
datagram. This process (the load) runs on the same cores; its CPU share is printed too.

    python bench/bench_workers.py --workers 1 2 --conferences 8 --rooms 3 \
        --rates 10000 20000 40000 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ctms_media._udpio import pack_address, send_batch
from prometheus_client.parser import text_string_to_metric_families

from ctms_media.dtls.certificate import RelayCertificate
from ctms_media.fastpath.loadgen import SyntheticGroup, SyntheticStream
from ctms_media.sim.room_client import RoomClient, open_room

LOCAL = "127.0.0.1"
ROWS = 32  # datagrams per sendmmsg batch, one room at a time
PAYLOAD = 160  # bytes of (pretend-encrypted) audio payload
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sender:
    sock: socket.socket  # a dup of the room's own socket: same port, so the latched address
    addr: bytes
    stream: SyntheticStream
    arena: np.ndarray
    lengths: np.ndarray
    next_index: int


def _free_udp_range(size: int) -> int:
    """The first port of ``size`` consecutive UDP ports nobody holds now."""
    for low in range(41000, 60000 - size, size):
        socks = []
        try:
            for port in range(low, low + size):
                socks.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                socks[-1].bind((LOCAL, port))
            return low
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free UDP port range")


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def _http(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            raw, ctype, status = r.read(), r.headers.get("Content-Type", ""), r.status
    except urllib.error.HTTPError as exc:
        raw, ctype, status = exc.read(), exc.headers.get("Content-Type", ""), exc.code
    return status, json.loads(raw) if ctype.startswith("application/json") else raw.decode()


def _metrics(api: str) -> dict[str, float]:
    """Samples by name, labelled ones as ``name{value}`` (one label per family here)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(_http(api + "/metrics")[1]):
        for s in fam.samples:
            labels = ",".join(s.labels.values())
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICK


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _setup_rooms(api: str, conferences: int, rooms: int) -> list[tuple[RoomClient, int]]:
    """K secure conferences of R rooms, each through DTLS and GSP: (room, audio SSRC)."""
    out: list[tuple[RoomClient, int]] = []
    for c in range(conferences):
        cid = f"bench-{c}"
        status, body = await asyncio.to_thread(
            _http, api + "/v1/conferences", "POST", {"id": cid, "security": "secure"}
        )
        assert status == 201, body
        for r in range(rooms):
            ssrc = (c + 1) * 1000 + r * 2 + 1
            cert = RelayCertificate.generate()
            status, ans = await asyncio.to_thread(
                _http,
                api + f"/v1/conferences/{cid}/endpoints",
                "POST",
                {
                    "id": f"{cid}-r{r}",
                    "segments": 1,
                    "secure": True,
                    "fingerprint": str(cert.fingerprint()),
                    "profile": "AES_CM_128_HMAC_SHA1_80",
                    "streams": [
                        {"ssrc": ssrc, "kind": "audio", "position": 2},
                        {"ssrc": ssrc + 1, "kind": "video", "position": 2},
                    ],
                },
            )
            assert status == 201, ans
            room = RoomClient(f"{cid}-r{r}", (ans["host"], ans["port"]), ans["fingerprint"], cert)
            await open_room(room)
            room.start_dtls()
            out.append((room, ssrc))
    await asyncio.wait_for(asyncio.gather(*(room.keyed.wait() for room, _ in out)), 60)
    await asyncio.sleep(0.5)  # GSP-ACKs reach the relay; every room turns active
    return out


def _senders(rooms: list[tuple[RoomClient, int]]) -> list[Sender]:
    """Each room's socket (dup'd out of asyncio) with its audio stream, key announced."""
    out = []
    for room, ssrc in rooms:
        g = room.groups[max(room.groups)]
        group = SyntheticGroup(g.spi, g.cipher, g.kek, g.salt, g.profile, g.ekt_format)
        stream = SyntheticStream(ssrc, group, position=2)
        sock = socket.socket(fileno=os.dup(room.transport.get_extra_info("socket").fileno()))
        sock.setblocking(True)
        for i in range(3):  # the key, in long trailers, before the short-trailer stream
            sock.sendto(stream.packet(i, PAYLOAD, 0x80, long=True), room.relay_addr)
        sock.setblocking(False)
        arena, lengths = np.zeros((ROWS, 512), np.uint8), np.zeros(ROWS, np.int32)
        stream.fill(arena, lengths, np.arange(3, 3 + ROWS), PAYLOAD, 0x80)
        addr = pack_address(*room.relay_addr)
        out.append(Sender(sock, addr, stream, arena, lengths, 3 + ROWS))
    return out


def _drive(senders: list[Sender], rate: float, seconds: float) -> int:
    """Offer ``rate`` datagrams/s in all, round-robin over the rooms; returns how many left."""
    t0 = time.perf_counter()
    end = t0 + seconds
    sent = k = 0
    while True:
        now = time.perf_counter()
        if now >= end:
            return sent
        if rate * (now - t0) - sent < ROWS:
            time.sleep(50e-6)
            continue
        s = senders[k]
        idx = np.arange(s.next_index, s.next_index + ROWS, dtype=np.int64)
        s.next_index += ROWS
        s.stream.restamp(s.arena, s.lengths, idx)
        sent += send_batch(s.sock.fileno(), s.arena, s.lengths, ROWS, 0, s.addr)
        k = (k + 1) % len(senders)


def run(workers: int, conferences: int, rooms: int, rates: list[float], seconds: float) -> list:
    tmp = Path(tempfile.mkdtemp(prefix="ctms-bench-"))
    api_port = _free_tcp_port()
    low = _free_udp_range(conferences * rooms + 2 * workers)
    high = low + conferences * rooms + 2 * workers - 1
    api = f"http://{LOCAL}:{api_port}"
    (tmp / "relay.toml").write_text(
        f'[media]\nhost = "{LOCAL}"\nport_min = {low}\nport_max = {high}\n'
        f'[api]\nhost = "{LOCAL}"\nport = {api_port}\n'
        f'[dtls]\ncertificate = "{(tmp / "relay.pem").as_posix()}"\n[log]\nlevel = "WARNING"\n'
    )
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115
    cmd = [sys.executable, "-m", "ctms_media.cli", "serve", "--config", str(tmp / "relay.toml")]
    proc = subprocess.Popen([*cmd, "--workers", str(workers)], stdout=log, stderr=log)
    results = []
    try:
        for _ in range(400):
            with contextlib.suppress(OSError):
                if _http(api + "/v1/conferences")[0] == 200:
                    break
            time.sleep(0.05)
        pids = [proc.pid]
        if workers > 1:
            pids += [w["pid"] for w in _http(api + "/v1/workers")[1]]
        loop = asyncio.new_event_loop()
        room_list = loop.run_until_complete(_setup_rooms(api, conferences, rooms))
        senders = _senders(room_list)
        for rate in rates:
            _drive(senders, rate, 1.0)  # warm-up: routes installed, speakers chosen
            m0, c0, s0, t0 = _metrics(api), _cpu_seconds(pids), _self_cpu(), time.perf_counter()
            offered = _drive(senders, rate, seconds)
            time.sleep(0.2)  # the relay drains its socket buffers
            m1, c1, s1, t1 = _metrics(api), _cpu_seconds(pids), _self_cpu(), time.perf_counter()
            # rates over the sending window: what arrives during the drain was sent in it
            dt = seconds
            fwd = m1["ctms_packets_forwarded_total"] - m0["ctms_packets_forwarded_total"]
            rx = m1["ctms_packets_received_total"] - m0["ctms_packets_received_total"]
            drops = {
                k.split("{")[1].rstrip("}"): m1[k] - m0[k]
                for k in m1
                if k.startswith("ctms_packets_dropped_total") and m1[k] - m0[k]
            }
            cpu = c1 - c0
            wall = t1 - t0
            results.append(
                {
                    "workers": workers,
                    "conferences": conferences,
                    "rooms": rooms,
                    "offered_pps": round(offered / seconds),
                    "received_pps": round(rx / dt),
                    "forwarded_pps": round(fwd / dt),
                    "lost_before_relay": round(1 - rx / offered, 4) if offered else 0.0,
                    "drops": drops,
                    "relay_cpu_s_per_s": round(cpu / wall, 2),
                    "relay_us_cpu_per_forwarded": round(1e6 * cpu / fwd, 2) if fwd else None,
                    "load_cpu_s_per_s": round((s1 - s0) / wall, 2),
                    "loadavg_1m": os.getloadavg()[0],
                }
            )
            print(json.dumps(results[-1]), file=sys.stderr)
        for s in senders:
            s.sock.close()
        for room, _ in room_list:
            room.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--conferences", type=int, default=8)
    p.add_argument("--rooms", type=int, default=3, help="rooms per conference")
    p.add_argument("--rates", type=float, nargs="+", default=[10000, 20000, 40000])
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    rows = []
    for n in args.workers:
        rows += run(n, args.conferences, args.rooms, args.rates, args.seconds)
    print(
        "| workers | offered pps | received pps | forwarded pps | relay CPU s/s "
        "| relay µs CPU / forwarded | load CPU s/s | drops |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['offered_pps']} | {r['received_pps']} | "
            f"{r['forwarded_pps']} | {r['relay_cpu_s_per_s']} | "
            f"{r['relay_us_cpu_per_forwarded']} | {r['load_cpu_s_per_s']} | "
            f"{r['drops'] or '-'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
