"""``ctms-media serve``: the relay and its admin API in one process, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from ctms_media.server.api import make_app
from ctms_media.server.config import RelayConfig
from ctms_media.server.relay import Relay

log = logging.getLogger("ctms_media.serve")


async def serve(config: RelayConfig, ready: asyncio.Event | None = None) -> None:
    """Run until a signal; then close every port and drop all state."""
    relay = Relay(config)
    await relay.start()
    runner = web.AppRunner(make_app(relay), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.api_host, config.api_port)
    await site.start()
    log.info(
        "ctms-media relay: API on http://%s:%d, media ports %d-%d on %s, fingerprint %s",
        config.api_host,
        config.api_port,
        config.port_min,
        config.port_max,
        config.media_host,
        relay.fingerprint,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("ctms-media relay: shutting down")
        await runner.cleanup()
        await relay.stop()


def run(config: RelayConfig, workers: int = 1) -> int:
    if workers != 1:
        raise SystemExit("ctms-media serve: --workers other than 1 is not built yet")
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(config))
    return 0
