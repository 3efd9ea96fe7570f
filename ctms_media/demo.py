"""``ctms-media demo``: a secure multipoint meeting through the real relay on loopback.

The relay (:class:`~ctms_media.server.relay.Relay` and its admin API) starts in this process
on 127.0.0.1 with ephemeral ports and a certificate in a temporary directory; then exactly
what ``ctms-media load`` runs (:mod:`ctms_media.sim.meeting`) runs against its URL: rooms do
DTLS, get GSP, send libsrtp media with tail bytes and EKT, the relay switches them, and every
room decrypts what it gets with keys it learnt only from EKT trailers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web
from rich.console import Console

from ctms_media.server.api import make_app
from ctms_media.server.config import RelayConfig
from ctms_media.server.relay import Relay
from ctms_media.sim.live import LiveView, run_and_report
from ctms_media.sim.meeting import RunOptions, RunView, run_meetings


async def run_demo(options: RunOptions, view: RunView | None = None) -> dict[str, Any]:
    """Start a relay, run the meetings against it, stop it; the report names its forwarder."""
    with tempfile.TemporaryDirectory(prefix="ctms-demo-") as tmp:
        relay = Relay(RelayConfig(certificate=str(Path(tmp) / "relay.pem"), api_port=0))
        await relay.start()
        runner = web.AppRunner(make_app(relay), access_log=None)
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            options.api = f"http://127.0.0.1:{runner.addresses[0][1]}"
            report = await run_meetings(options, view)
            report["relay"]["implementation"] = relay.implementation
            return report
        finally:
            await runner.cleanup()
            await relay.stop()


def main(args: argparse.Namespace) -> int:
    options = RunOptions(
        api="",
        conferences=args.load,
        rooms=args.rooms,
        seconds=args.seconds,
        prefix="demo",
        mode="demo",
    )
    view = LiveView(Console()) if sys.stdout.isatty() and not args.json else None
    return run_and_report("demo", run_demo(options, view), view, args.json)
