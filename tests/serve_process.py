"""``ctms-media serve`` as a real child process, for the worker, shutdown and metrics tests.

Everything is synchronous on purpose: the relay runs in other processes, so the test side
needs only blocking HTTP (urllib) and blocking UDP sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ctms_media.server.config import RelayConfig

LOCAL = "127.0.0.1"


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def udp_range_free(low: int, high: int) -> bool:
    socks = []
    try:
        for port in range(low, high + 1):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.bind((LOCAL, port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_udp_range(size: int) -> tuple[int, int]:
    """A run of ``size`` UDP ports nobody holds now (other test runs share the machine)."""
    rng = random.Random()
    for _ in range(200):
        low = rng.randrange(30000, 40000 - size)
        if udp_range_free(low, low + size - 1):
            return low, low + size - 1
    raise RuntimeError("no free UDP port range")


def plain_rtp(ssrc: int, seq: int, position: int = 2, payload: bytes = b"p" * 100) -> bytes:
    """A non-secure uplink packet (wire.md §3-4): RTP with CC=1 whose CSRC is the position
    code (source position, destination 0), the payload, then the tail byte (voice, -10 dBov)."""
    header = struct.pack("!BBHIII", 0x81, 96, seq & 0xFFFF, seq * 960, ssrc, position << 8)
    return header + payload + bytes([0x80 | 10])


class ServeProcess:
    """One ``ctms-media serve`` with its own TOML config, certificate and log file."""

    def __init__(self, tmp: Path, workers: int = 1, ports: int = 20, **settings: Any) -> None:
        self.tmp = tmp
        self.workers = workers
        self.port_min, self.port_max = free_udp_range(ports)
        self.api_port = free_tcp_port()
        self.url = f"http://{LOCAL}:{self.api_port}"
        self.config = tmp / "relay.toml"
        config = RelayConfig.on_loopback(
            tmp, self.port_min, self.port_max, self.api_port, **settings
        )
        self.config.write_text(config.to_toml())
        self.log_path = tmp / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 25.0) -> ServeProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "ctms_media.cli", "serve", "--config", str(self.config)]
        cmd += ["--workers", str(self.workers)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/v1/conferences")[0] == 200:
                    return self
            time.sleep(0.05)
        raise AssertionError(f"serve did not answer in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    # -- HTTP --------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, ctype, raw = r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as exc:
            status, ctype, raw = exc.code, exc.headers.get("Content-Type", ""), exc.read()
        if ctype.startswith("application/json"):
            return status, json.loads(raw)
        return status, raw.decode()

    def conference(self, conf_id: str, **kw: Any) -> dict[str, Any]:
        status, body = self.request("POST", "/v1/conferences", {"id": conf_id, **kw})
        assert status == 201, body
        return body

    def endpoint(self, conf_id: str, eid: str, ssrc: int) -> dict[str, Any]:
        """A non-secure one-screen room with one audio stream at the center position."""
        status, body = self.request(
            "POST",
            f"/v1/conferences/{conf_id}/endpoints",
            {
                "id": eid,
                "segments": 1,
                "secure": False,
                "streams": [{"ssrc": ssrc, "kind": "audio", "position": 2}],
            },
        )
        assert status == 201, body
        return body

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name and labels, e.g. ``ctms_endpoints`` or
        ``ctms_packets_dropped_total{reason="auth"}``."""
        status, text = self.request("GET", "/metrics")
        assert status == 200
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out


@contextlib.contextmanager
def serving(
    tmp: Path, workers: int = 1, ports: int = 20, **settings: Any
) -> Iterator[ServeProcess]:
    sp = ServeProcess(tmp, workers, ports, **settings).start()
    try:
        yield sp
    finally:
        sp.stop()


class PlainPair:
    """Two non-secure rooms of one conference on blocking UDP sockets."""

    def __init__(self, sp: ServeProcess, conf_id: str, ssrc_base: int) -> None:
        self.answers = {
            "a": sp.endpoint(conf_id, f"{conf_id}-a", ssrc_base + 1),
            "b": sp.endpoint(conf_id, f"{conf_id}-b", ssrc_base + 2),
        }
        self.ssrc = {"a": ssrc_base + 1, "b": ssrc_base + 2}
        self.socks = {}
        for k in ("a", "b"):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((LOCAL, 0))
            s.settimeout(0.01)
            self.socks[k] = s
        self.seq = {"a": 0, "b": 0}

    @property
    def ports(self) -> list[int]:
        return [a["port"] for a in self.answers.values()]

    def send(self, who: str, count: int) -> None:
        ans = self.answers[who]
        for _ in range(count):
            self.seq[who] += 1
            self.socks[who].sendto(
                plain_rtp(self.ssrc[who], self.seq[who]), (ans["host"], ans["port"])
            )

    def drain(self, who: str) -> list[bytes]:
        got = []
        with contextlib.suppress(TimeoutError, BlockingIOError):
            while True:
                got.append(self.socks[who].recv(2048))
        return got

    def exchange(self, rounds: int = 30, per_round: int = 2) -> tuple[int, int]:
        """Both rooms talk (each latches on its first packet); datagrams each one received."""
        got = {"a": 0, "b": 0}
        for _ in range(rounds):
            self.send("a", per_round)
            self.send("b", per_round)
            time.sleep(0.01)
            got["a"] += len(self.drain("a"))
            got["b"] += len(self.drain("b"))
        time.sleep(0.05)
        got["a"] += len(self.drain("a"))
        got["b"] += len(self.drain("b"))
        return got["a"], got["b"]

    def close(self) -> None:
        for s in self.socks.values():
            s.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True
