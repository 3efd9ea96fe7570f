"""``ctms-media serve --workers N``: N relay processes behind one admin API.

Why processes: the packet path is Python (plus the Cython forwarder) on one event loop, so
one process uses one core. A conference cannot be split across processes (its forwarder
holds every sender's key state and every receiver's route), so the unit of placement is the
conference: each one lives wholly in one worker, with all its endpoints' ports in that
worker's slice of the media port range, and the workers share nothing at run time.

The parent:

- creates the DTLS certificate before any worker starts, so all of them load the same file
  and announce one fingerprint;
- splits ``[media] port_min..port_max`` into N disjoint contiguous slices (worker i gets
  slice i; sizes differ by at most one port);
- starts each worker (``server/worker.py``) as a fresh interpreter answering on a unix
  socket in a private directory (mode 0700), so the internal API is reachable by nobody
  else and needs no TCP port;
- serves the public API of wire.md §9 on ``[api] host:port`` and routes it: a new
  conference goes to the least-loaded running worker (fewest endpoints, then fewest
  conferences, then lowest id), every call naming a conference goes to the worker that holds
  it, the list is the union in creation order, ``/metrics`` is the sum of all workers;
- owns SIGTERM and SIGINT: on either it closes the public API, sends SIGTERM to every
  worker, waits for them (SIGKILL after :data:`STOP_GRACE`), and exits 0;
- notices a worker that exits on its own, logs it with its id and the conferences that went
  with it, forgets those conferences (their calls answer 404) and starts a replacement on
  the same port slice after a back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import yarl
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ctms_media.conference.model import ConferenceConfig
from ctms_media.dtls.certificate import RelayCertificate
from ctms_media.errors import ConfigError, CtmsError
from ctms_media.server.api import MAX_BODY, json_errors
from ctms_media.server.config import RelayConfig
from ctms_media.server.stats import StatsSnapshot, families, merge

log = logging.getLogger("ctms_media.serve")

READY_TIMEOUT = 20.0  # a worker imports the relay, binds its socket, says ready
STOP_GRACE = 1.5  # SIGTERM -> SIGKILL for a worker that does not stop (the 2 s budget)
CALL_TIMEOUT = 10.0  # one proxied admin call
RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before restart k (last repeats)


def _backoff(failures: int) -> float:
    """The wait before a restart after ``failures`` short lives in a row: 1 s for the first
    death (or one after a stable run), then 2, 5, 10 and every 30 s."""
    return RESTART_BACKOFF[min(max(failures - 1, 0), len(RESTART_BACKOFF) - 1)]


STABLE_AFTER = 30.0  # a worker up this long resets the back-off


def split_ports(config: RelayConfig, workers: int) -> list[RelayConfig]:
    """N configs with disjoint contiguous slices of the media range, sizes within one port."""
    span = config.port_max - config.port_min + 1
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}")
    if span < workers:
        raise ConfigError(
            f"media port range {config.port_min}-{config.port_max} has {span} port(s), "
            f"fewer than --workers {workers}"
        )
    out = []
    low = config.port_min
    for i in range(workers):
        size = span // workers + (1 if i < span % workers else 0)
        out.append(replace(config, port_min=low, port_max=low + size - 1))
        low += size
    return out


class WorkerUnavailable(Exception):
    """The worker does not answer (it died, or is restarting). ``sent``: the request may
    have reached it (a timeout after connecting), so its effect is unknown."""

    def __init__(self, worker_id: int, sent: bool = False) -> None:
        super().__init__(worker_id)
        self.sent = sent


@dataclass(eq=False)
class Worker:
    id: int
    config: RelayConfig
    socket: str
    proc: asyncio.subprocess.Process | None = None
    http: aiohttp.ClientSession | None = None
    running: bool = False
    started_at: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive short lives, for the back-off
    last: StatsSnapshot | None = None  # at the last successful fetch
    watcher: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def call(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, str | None, bytes]:
        """One admin call on the worker's socket: (status, content type, body)."""
        if not self.running or self.http is None:
            raise WorkerUnavailable(self.id)
        headers = {"Content-Type": "application/json"} if body is not None else None
        # ``path`` is raw (still percent-encoded): an id such as "a?b" or "50%41" must reach
        # the worker as the same id, exactly as it would reach a single process.
        url = yarl.URL("http://worker" + path, encoded=True)
        try:
            async with self.http.request(method, url, data=body, headers=headers) as r:
                data = await r.read()
                return r.status, r.headers.get("Content-Type"), data
        except (aiohttp.ClientConnectorError, ConnectionRefusedError, FileNotFoundError) as exc:
            raise WorkerUnavailable(self.id) from exc  # never reached the worker
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise WorkerUnavailable(self.id, sent=True) from exc

    async def snapshot(self) -> StatsSnapshot:
        status, _, data = await self.call("GET", "/internal/stats")
        if status != 200:
            raise WorkerUnavailable(self.id)
        self.last = StatsSnapshot.from_json(json.loads(data))
        return self.last


def _json(status: int, doc: Any) -> web.Response:
    return web.json_response(doc, status=status)


def _error(status: int, message: str) -> web.Response:
    return _json(status, {"error": message})


class Supervisor:
    """The parent process of ``serve --workers N`` (see the module docstring)."""

    def __init__(self, config: RelayConfig, workers: int) -> None:
        self.config = config
        self.slices = split_ports(config, workers)
        self.workers: list[Worker] = []
        self.where: dict[str, int] = {}  # conference id -> worker id, in creation order
        self.placement = asyncio.Lock()  # one placement decision at a time
        self.retired = StatsSnapshot()  # counters of workers that died (kept monotonic)
        self.stopping = False
        self.fingerprint = ""
        self._dir = ""
        self._runner: web.AppRunner | None = None
        self._restarts: set[asyncio.Task[None]] = set()
        self._merged = StatsSnapshot()
        self.registry = CollectorRegistry()
        self.registry.register(_SupervisorCollector(self))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        cert_path = Path(self.config.certificate).resolve()
        certificate = RelayCertificate.load_or_create(str(cert_path))  # before any worker
        self.fingerprint = str(certificate.fingerprint("sha-256"))
        self._dir = tempfile.mkdtemp(prefix="ctms-workers-")  # mode 0700
        for i, cfg in enumerate(self.slices):
            cfg = replace(cfg, certificate=str(cert_path))
            self.workers.append(Worker(i, cfg, os.path.join(self._dir, f"w{i}.sock")))
        results = await asyncio.gather(
            *(self._spawn(w) for w in self.workers), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:  # every spawn has finished: stop() sees all the processes there are
            await self.stop()
            raise failed[0]
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.api_host, self.config.api_port)
        try:
            await site.start()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "ctms-media relay: API on http://%s:%d, %d workers, media ports %d-%d on %s, "
            "fingerprint %s",
            self.config.api_host,
            self.api_port,
            len(self.workers),
            self.config.port_min,
            self.config.port_max,
            self.config.media_host,
            self.fingerprint,
        )

    @property
    def api_port(self) -> int:
        if self._runner is not None and self._runner.addresses:
            return int(self._runner.addresses[0][1])
        return self.config.api_port

    async def _spawn(self, w: Worker) -> None:
        """Start worker ``w`` and wait for its ready line."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ctms_media.server.worker",
            "--id",
            str(w.id),
            "--socket",
            w.socket,
            "--config",
            json.dumps(w.config.to_json()),
            stdin=asyncio.subprocess.PIPE,  # its end of file tells the worker we are gone
            stdout=asyncio.subprocess.PIPE,
        )
        w.proc = proc
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
        except TimeoutError:
            line = b""
        if not line.startswith(b'{"ready"'):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError(
                f"worker {w.id} did not start (exit status {proc.returncode}); see its log above"
            )
        w.http = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=w.socket),
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
        )
        w.running = True
        w.started_at = asyncio.get_running_loop().time()
        w.last = None
        w.watcher = asyncio.create_task(self._watch(w, proc), name=f"ctms-worker-{w.id}")
        log.info(
            "worker %d: started, pid %d, media ports %d-%d",
            w.id,
            proc.pid,
            w.config.port_min,
            w.config.port_max,
        )

    async def _watch(self, w: Worker, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self.stopping or w.proc is not proc:
            return
        w.running = False
        if w.http is not None:
            await w.http.close()
            w.http = None
        lost = [cid for cid, wid in self.where.items() if wid == w.id]
        for cid in lost:
            del self.where[cid]
        if w.last is not None:  # keep the counters monotonic across the restart
            self.retired.stats.add(w.last.stats)
            w.last = None
        loop = asyncio.get_running_loop()
        w.failures = 0 if loop.time() - w.started_at >= STABLE_AFTER else w.failures + 1
        delay = _backoff(w.failures)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        log.error(
            "worker %d (pid %d) %s; its %d conference(s) are gone: %s; restarting it in %.0f s",
            w.id,
            proc.pid,
            how,
            len(lost),
            ", ".join(lost) if lost else "none",
            delay,
        )
        task = asyncio.create_task(self._restart(w, delay))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, w: Worker, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.stopping:
            return
        try:
            await self._spawn(w)
            w.restarts += 1  # a worker running again, not an attempt
        except Exception as exc:  # counted as another short life: back off further
            log.error("worker %d: restart failed: %s", w.id, exc)
            w.failures += 1
            delay = _backoff(w.failures)
            task = asyncio.create_task(self._restart(w, delay))
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

    async def stop(self) -> None:
        """Close the public API, stop every worker (SIGTERM, then SIGKILL), clean up."""
        self.stopping = True
        for task in list(self._restarts):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for w in self.workers:
            if w.http is not None:
                await w.http.close()
                w.http = None
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), STOP_GRACE)
        except TimeoutError:
            for w in self.workers:
                if w.proc is not None and w.proc.returncode is None:
                    log.warning("worker %d (pid %d) did not stop in time; killed", w.id, w.pid)
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for w in self.workers:
            w.running = False
            if w.watcher is not None:
                w.watcher.cancel()
        self.where.clear()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- routing ---------------------------------------------------------------------------

    def _running(self) -> list[Worker]:
        return [w for w in self.workers if w.running]

    async def _loads(self) -> list[tuple[Worker, StatsSnapshot]]:
        """Fresh counters of every running worker that answers."""
        workers = self._running()
        results = await asyncio.gather(*(w.snapshot() for w in workers), return_exceptions=True)
        return [
            (w, r) for w, r in zip(workers, results, strict=True) if isinstance(r, StatsSnapshot)
        ]

    @staticmethod
    def _relay(status: int, ctype: str | None, data: bytes, worker: int | None) -> web.Response:
        """A worker's answer as ours; a conference object gets its ``worker`` field."""
        if ctype and ctype.startswith("application/json") and data:
            doc = json.loads(data)
            if worker is not None and isinstance(doc, dict) and "endpoints" in doc:
                doc["worker"] = worker
            return _json(status, doc)
        return web.Response(status=status, body=data or None)

    async def create_conference(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        try:  # the same answer as one process: a bad body is 400 before any 409
            cid = ConferenceConfig.from_json(body).id
        except ConfigError as exc:
            return _error(400, str(exc))
        async with self.placement:
            if cid in self.where:
                return _error(409, f"conference {cid} exists")
            loads = await self._loads()
            if not loads:
                return _error(503, "no worker is running")
            loads.sort(key=lambda ws: (ws[1].endpoints, ws[1].conferences, ws[0].id))
            answer = _error(503, "no worker is available")
            for w, _ in loads:  # the least loaded first; a full one ([limits]) passes it on
                proc = w.proc
                try:
                    status, ctype, data = await w.call("POST", "/v1/conferences", raw)
                except WorkerUnavailable as exc:
                    answer = _error(503, f"worker {w.id} is not available")
                    if not exc.sent:
                        continue
                    # It may have created the conference: remember it there (a later call
                    # that the worker answers 404 forgets it) rather than create a twin
                    # on another worker.
                    self.where[cid] = w.id
                    break
                answer = self._relay(status, ctype, data, w.id)
                if status == 201:
                    if w.running and w.proc is proc:  # not lost in a restart meanwhile
                        self.where[cid] = w.id
                        log.info("conference %s: placed on worker %d", cid, w.id)
                    else:
                        answer = _error(503, f"worker {w.id} is not available")
                if status != 503:
                    break
        return answer

    async def list_conferences(self, request: web.Request) -> web.Response:
        workers = self._running()
        answers = await asyncio.gather(
            *(w.call("GET", "/v1/conferences") for w in workers), return_exceptions=True
        )
        merged: list[dict[str, Any]] = []
        for w, answer in zip(workers, answers, strict=True):
            if isinstance(answer, BaseException) or answer[0] != 200:
                continue  # a worker that just died: its conferences are gone anyway
            for doc in json.loads(answer[2]):
                doc["worker"] = w.id
                merged.append(doc)
        order = {cid: i for i, cid in enumerate(self.where)}
        merged.sort(key=lambda d: order.get(d.get("id"), len(order)))
        return _json(200, merged)

    async def conference_call(self, request: web.Request) -> web.Response:
        """Every call naming a conference: to the worker that holds it, or 404."""
        cid = request.match_info["id"]
        wid = self.where.get(cid)
        if wid is None:
            return _error(404, f"no conference {cid}")
        w = self.workers[wid]
        body = await request.read() if request.can_read_body else None
        try:
            status, ctype, data = await w.call(request.method, request.rel_url.raw_path_qs, body)
        except WorkerUnavailable:
            return _error(503, f"worker {w.id} is not available")
        whole = "eid" not in request.match_info and not request.path.endswith("/endpoints")
        if whole and (status == 404 or (request.method == "DELETE" and status == 204)):
            self.where.pop(cid, None)  # deleted, or the worker no longer has it
        return self._relay(status, ctype, data, w.id)

    async def list_workers(self, request: web.Request) -> web.Response:
        loads = dict(await self._loads())
        out = []
        for w in self.workers:
            snap = loads.get(w)
            out.append(
                {
                    "id": w.id,
                    "pid": w.pid if w.running else None,
                    "running": w.running,
                    "port_min": w.config.port_min,
                    "port_max": w.config.port_max,
                    "conferences": [cid for cid, wid in self.where.items() if wid == w.id],
                    "endpoints": snap.endpoints if snap is not None else 0,
                    "restarts": w.restarts,
                }
            )
        return _json(200, out)

    async def metrics(self, request: web.Request) -> web.Response:
        await self._loads()  # refreshes every answering worker's ``last``
        live = [w.last for w in self.workers if w.running and w.last is not None]
        retired = StatsSnapshot(self.retired.stats)  # counters only: its gauges are gone
        self._merged = merge([retired, *live])
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)
        app.add_routes(
            [
                web.post("/v1/conferences", self.create_conference),
                web.get("/v1/conferences", self.list_conferences),
                web.get("/v1/conferences/{id}", self.conference_call),
                web.delete("/v1/conferences/{id}", self.conference_call),
                web.post("/v1/conferences/{id}/endpoints", self.conference_call),
                web.delete("/v1/conferences/{id}/endpoints/{eid}", self.conference_call),
                web.get("/v1/workers", self.list_workers),
                web.get("/metrics", self.metrics),
            ]
        )
        return app


class _SupervisorCollector(Collector):
    """The workers' sum under the single-process names, plus the supervisor's own."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        yield from families(self.sup._merged)
        yield GaugeMetricFamily(
            "ctms_workers", "Worker processes running", value=len(self.sup._running())
        )
        yield CounterMetricFamily(
            "ctms_worker_restarts",
            "Worker processes restarted after they exited on their own",
            value=sum(w.restarts for w in self.sup.workers),
        )


async def serve_workers(config: RelayConfig, workers: int) -> int:
    """Run the supervisor until SIGTERM/SIGINT; exit status 0 after a clean stop."""
    from ctms_media.server.app import stop_on_signals  # app imports this module lazily

    stop, received = stop_on_signals()
    sup = Supervisor(config, workers)
    try:
        await sup.start()
    except (OSError, RuntimeError, CtmsError) as exc:
        log.error("ctms-media relay: cannot start: %s", exc)
        return 1
    try:
        await stop.wait()
    finally:
        log.info(
            "ctms-media relay: %s received, shutting down %d workers",
            received[0] if received else "stop",
            len(sup.workers),
        )
        conferences = len(sup.where)
        await sup.stop()
        log.info("ctms-media relay: stopped, %d conference(s) dropped", conferences)
    return 0


__all__ = ["Supervisor", "Worker", "serve_workers", "split_ports"]
