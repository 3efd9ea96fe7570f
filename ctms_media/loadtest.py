"""``ctms-media load --api URL``: synthetic secure meetings against any running relay.

It creates ``--conferences`` conferences (ids ``load-<random>-<n>``, so runs never collide)
through the admin API, joins ``--rooms`` rooms to each (one 3-screen, the rest 1-screen),
runs the meeting script for ``--seconds`` and deletes its conferences again, also on Ctrl-C.
The rooms, the script and the report are :mod:`ctms_media.sim.meeting`, shared with ``demo``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import sys
from typing import Any

from rich.console import Console

from ctms_media.sim.live import ProgressView, run_and_report
from ctms_media.sim.meeting import (
    RunOptions,
    RunView,
    run_meetings,
)


async def _run(options: RunOptions, view: RunView | None) -> dict[str, Any]:
    """SIGTERM cancels the run like Ctrl-C does, so its conferences are deleted either way."""
    task = asyncio.current_task()
    assert task is not None
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_meetings(options, view)


def main(args: argparse.Namespace) -> int:
    options = RunOptions(
        api=args.api,
        conferences=args.conferences,
        rooms=args.rooms,
        seconds=args.seconds,
        prefix=f"load-{secrets.token_hex(4)}",
        mode="load",
    )
    view = ProgressView(Console(stderr=True), args.seconds) if sys.stderr.isatty() else None
    return run_and_report(
        "load", _run(options, view), view, args.json, "; its conferences were deleted"
    )
