"""``ctms-media serve``: the relay and its admin API until SIGTERM/SIGINT.

``--workers 1`` (the default) is one process: the relay, its media ports and the API on one
event loop, no proxy in between. ``--workers N`` hands over to ``server/supervisor.py``:
N relay processes, each with its own slice of the media port range, behind one API.
Either way SIGTERM or SIGINT closes every port, drops all state and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from ctms_media.errors import ConfigError, CtmsError
from ctms_media.server.api import make_app
from ctms_media.server.config import RelayConfig
from ctms_media.server.relay import Relay

log = logging.getLogger("ctms_media.serve")

SHUTDOWN_TIMEOUT = 0.5  # an admin call in flight gets this long once a stop signal arrived


def stop_on_signals() -> tuple[asyncio.Event, list[str]]:
    """An event SIGTERM or SIGINT sets, and the names of the signals that came: the one way
    both the single process and the supervisor learn it is time to stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop, received


async def serve(config: RelayConfig, ready: asyncio.Event | None = None) -> int:
    """Run until a signal; then close every port and drop all state. Returns the exit status."""
    stop, received = stop_on_signals()
    try:
        relay = Relay(config)  # loads or creates the certificate
    except (OSError, CtmsError) as exc:
        log.error("ctms-media relay: cannot start: %s", exc)
        return 1
    await relay.start()
    runner = web.AppRunner(make_app(relay), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    site = web.TCPSite(runner, config.api_host, config.api_port)
    try:
        await site.start()
    except OSError as exc:
        log.error(
            "ctms-media relay: cannot listen on %s:%d: %s",
            config.api_host,
            config.api_port,
            exc.strerror or exc,
        )
        await runner.cleanup()
        await relay.stop()
        return 1
    log.info(
        "ctms-media relay: API on http://%s:%d, media ports %d-%d on %s, fingerprint %s",
        config.api_host,
        runner.addresses[0][1] if runner.addresses else config.api_port,
        config.port_min,
        config.port_max,
        config.media_host,
        relay.fingerprint,
    )
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info(
            "ctms-media relay: %s received, shutting down", received[0] if received else "stop"
        )
        conferences = len(relay.conferences)
        await runner.cleanup()
        await relay.stop()
        log.info("ctms-media relay: stopped, %d conference(s) dropped", conferences)
    return 0


def run(config: RelayConfig, workers: int = 1) -> int:
    """Entry of ``ctms-media serve``: the exit status (0 after a signal, 1 if it cannot start,
    2 for a configuration error)."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if workers == 1:
        return asyncio.run(serve(config))
    from ctms_media.server.supervisor import serve_workers, split_ports

    try:
        split_ports(config, workers)  # a bad --workers is a usage error, before any process
    except ConfigError as exc:
        log.error("ctms-media serve: %s", exc)
        return 2
    return asyncio.run(serve_workers(config, workers))
