"""One worker process of ``ctms-media serve --workers N``.

A worker is an ordinary single-process relay (:class:`Relay` with the admin app of
``api.py``) restricted to its own slice of the media port range, answering its parent on a
private unix socket instead of a TCP port. It is started by ``server/supervisor.py`` as
``python -m ctms_media.server.worker`` (a fresh interpreter, not a fork, so no event loop,
socket or lock of the parent is ever shared) and:

- ignores SIGINT: a Ctrl-C in a terminal reaches the whole process group, and the parent
  alone decides the order of shutdown;
- stops cleanly on SIGTERM (the parent's stop request): API closed, every media port
  closed, all state dropped, exit status 0;
- stops the same way when its stdin reaches end of file, which is how it learns that the
  parent died without a chance to stop it (no orphan keeps ports of the range bound);
- writes one line ``{"ready": PID}`` on stdout once its socket answers; stdout then points
  at stderr, where the logs go, each line tagged with the worker id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys

from aiohttp import web

from ctms_media.server.api import make_app
from ctms_media.server.config import RelayConfig
from ctms_media.server.relay import Relay

log = logging.getLogger("ctms_media.worker")

SHUTDOWN_TIMEOUT = 0.5  # an admin call in flight gets this long once SIGTERM arrived


async def run_worker(config: RelayConfig, worker_id: int, socket_path: str) -> None:
    """Serve until SIGTERM or the parent's end of stdin; then close every port."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    orphaned: list[bool] = []

    def parent_gone() -> None:
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(sys.stdin.fileno())
            log.warning("worker %d: parent process is gone; stopping", worker_id)
            orphaned.append(True)
            stop.set()

    loop.add_reader(sys.stdin.fileno(), parent_gone)

    relay = Relay(config)
    await relay.start()
    runner = web.AppRunner(
        make_app(relay, internal=True), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # a predecessor's socket, if this worker is a restart
    site = web.UnixSite(runner, socket_path)
    await site.start()
    log.info(
        "worker %d: media ports %d-%d on %s",
        worker_id,
        config.port_min,
        config.port_max,
        config.media_host,
    )
    sys.stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
    sys.stdout.flush()
    # Nobody reads the pipe after this line: a stray print must not fill it and block us.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        await stop.wait()
    finally:
        conferences = len(relay.conferences)
        await runner.cleanup()
        await relay.stop()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        if orphaned:  # nobody else will remove the private directory; the last one out does
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(socket_path))
        log.info("worker %d: stopped, %d conference(s) dropped", worker_id, conferences)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C
    parser = argparse.ArgumentParser(prog="python -m ctms_media.server.worker")
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--config", required=True, help="RelayConfig as JSON")
    args = parser.parse_args(argv)
    config = RelayConfig.from_json(json.loads(args.config))
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s [worker {args.id}]: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(run_worker(config, args.id, args.socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())
