"""What a person watching ``ctms-media demo`` or ``load`` sees: a rich live view of the
meeting (who speaks, what every display shows, packets and decryption), a progress bar, and
the text form of the final report.

Views are refreshed by the run's monitor (twice a second), never by a thread of their own,
so they cost nothing between updates and never write while the run prints its report.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ctms_media.sim.meeting import LoadError, Meeting, RunStatus, exit_status

POSITION_NAMES = {1: "left", 2: "center", 3: "right", 4: "aux"}
_SHORT = {1: "L", 2: "C", 3: "R", 4: "aux"}


def _source(meeting: Meeting, endpoint: str, position: int) -> str:
    room = next((r for r in meeting.rooms if r.id == endpoint), None)
    if room is not None and room.segments == 1:
        return endpoint
    return f"{endpoint}·{_SHORT.get(position, position)}"


class LiveView:
    """The demo's view on a terminal: the first meeting in detail, the others summed."""

    wants_state = True

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = Live(console=console, auto_refresh=False, transient=False)
        self.live.start()

    def update(self, status: RunStatus) -> None:
        self.live.update(self._render(status), refresh=True)

    def close(self) -> None:
        self.live.stop()

    def _render(self, status: RunStatus) -> Group:
        opts = status.options
        m = status.meetings[0]
        state = status.states.get(m.id, {})
        head = Text.assemble(
            (f"ctms-media {opts.mode}", "bold"),
            f"  conference {m.id}  ",
            (status.phase, "cyan"),
            f"  {status.elapsed:4.1f}/{opts.seconds:g} s",
        )
        top = Table.grid(padding=(0, 2))
        top.add_row(
            head,
            ProgressBar(total=opts.seconds, completed=min(status.elapsed, opts.seconds), width=40),
        )
        holder = m.script.holder(status.elapsed) if status.phase == "media" else None
        speakers = ", ".join(state.get("speakers", [])) or "—"
        floor = Text.assemble(
            "floor (script): ",
            (f"{holder[0]} {POSITION_NAMES[holder[1]]}" if holder else "—", "bold green"),
            "    relay's speakers, loudest first: ",
            (speakers, "green"),
        )
        table = Table(expand=False, pad_edge=False, box=None, header_style="bold")
        for col in ("room", "screens", "speaking", "displays show", "sent", "received"):
            table.add_column(col, justify="right" if col in ("sent", "received") else "left")
        table.add_column("decrypted", justify="right")
        table.add_column("failed", justify="right")
        displays = state.get("displays", {})
        for r in m.rooms:
            speaking = ""
            if holder is not None and holder[0] == r.id:
                speaking = f"● {POSITION_NAMES[holder[1]]}" if r.segments == 3 else "●"
            shows = displays.get(r.id, {})
            cells = []
            for pos in r.positions:
                d = shows.get(str(pos))
                src = _source(m, d["endpoint"], d["position"]) if d else "—"
                cells.append(f"{_SHORT[pos]}: {src}" if r.segments == 3 else src)
            failed = r.decrypt_failed if status.phase != "joining" else 0
            table.add_row(
                r.id,
                str(r.segments),
                Text(speaking, "bold green"),
                "  ".join(cells),
                str(r.media_sent),
                str(r.received if status.phase != "joining" else 0),
                str(r.decrypt_ok if status.phase != "joining" else 0),
                Text(str(failed), "bold red" if failed else ""),
            )
        parts: list[Any] = [top, floor, table]
        metrics = status.metrics
        if metrics is not None:
            lat = sorted(status.ledger.latency.values)
            p50 = f"{lat[len(lat) // 2] / 1e3:.0f} µs" if lat else "—"
            drops = ", ".join(f"{k} {v}" for k, v in metrics.drops().items()) or "none"
            parts.append(
                Text(
                    f"relay: forwarded {int(metrics.forwarded)}, switches "
                    f"{int(metrics.switches)}, drops {drops}; latency p50 {p50}; "
                    f"IDR answers delivered {len(status.ledger.switch_ns)}"
                )
            )
        if len(status.meetings) > 1 and status.phase != "joining":
            others = [r for mm in status.meetings[1:] for r in mm.rooms]
            parts.append(
                Text(
                    f"+ {len(status.meetings) - 1} more meetings ({len(others)} rooms): "
                    f"received {sum(r.received for r in others)}, decrypted "
                    f"{sum(r.decrypt_ok for r in others)}, failed "
                    f"{sum(r.decrypt_failed for r in others)}"
                )
            )
        return Group(*parts)


class ProgressView:
    """``load``'s progress bar on stderr: phase, seconds, rooms' totals."""

    wants_state = False

    def __init__(self, console: Console, seconds: float) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            TextColumn("{task.completed:5.1f}/{task.total:g} s"),
            TextColumn("{task.fields[info]}"),
            console=console,
            auto_refresh=False,
        )
        self.progress.start()
        self.task: TaskID = self.progress.add_task("joining", total=seconds, info="")

    def update(self, status: RunStatus) -> None:
        rooms = [r for m in status.meetings for r in m.rooms]
        if status.phase == "joining":
            keyed = sum(1 for r in rooms if r.client is not None and r.client.keyed.is_set())
            info = f"{keyed}/{len(rooms)} rooms keyed"
        else:
            got = sum(r.received for r in rooms)
            rate = got / status.elapsed if status.elapsed > 0 else 0.0
            info = (
                f"{len(status.meetings)} conf, {len(rooms)} rooms, received {got} "
                f"({rate:,.0f}/s), decrypt failed {sum(r.decrypt_failed for r in rooms)}"
            )
        self.progress.update(
            self.task,
            description=status.phase,
            completed=min(status.elapsed, status.options.seconds),
            info=info,
        )
        self.progress.refresh()

    def close(self) -> None:
        self.progress.stop()


def print_report(report: dict[str, Any], console: Console) -> None:
    """The report as text: totals, then one row per room."""

    def p(*objects: Any) -> None:
        console.print(*objects, soft_wrap=True)

    lat, sw, loss = report["latency_us"], report["switch_ms"], report["loss"]
    p(
        f"[bold]ctms-media {report['mode']}[/]: {report['conferences']} conference(s) x "
        f"{report['rooms_per_conference']} rooms, {report['seconds']:g} s of media"
    )
    p(
        f"  rooms received {report['forwarded']} packets from the relay "
        f"({report['forwarded_per_s']:,.0f}/s); relay counted {report['relay']['received']} in, "
        f"{report['relay']['forwarded']} forwarded"
    )
    p(
        f"  decrypted {report['decrypt_ok']}, [bold]failed {report['decrypt_failed']}[/]; "
        f"drops {report['drops'] or 'none'}"
    )
    p(
        f"  switches {report['switches']}; PLI/FIR -> IDR delivered: p50 {sw['p50']} ms, "
        f"max {sw['max']} ms ({sw['count']} answers)"
    )
    p(
        f"  latency (send -> decrypted at a receiver): p50 {lat['p50']} µs, "
        f"p99 {lat['p99']} µs ({lat['count']} packets)"
    )
    p(
        f"  loss: uplink {loss['uplink']['ratio']:.4%} "
        f"({loss['uplink']['sent']} sent, {loss['uplink']['relay_received']} at the relay), "
        f"downlink {loss['downlink']['ratio']:.4%} ({loss['downlink']['relay_forwarded']} "
        f"forwarded, {loss['downlink']['received']} received)"
    )
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("room", "screens", "sent", "received", "decrypted", "failed", "IDR asks"):
        table.add_column(col, justify="left" if col == "room" else "right")
    for rid, r in report["rooms"].items():
        table.add_row(
            rid,
            str(r["segments"]),
            str(r["sent"]),
            str(r["received"]),
            str(r["decrypt_ok"]),
            str(r["decrypt_failed"]),
            str(r["idr_requests"]),
        )
    p(table)


def emit_report(report: dict[str, Any], as_json: bool) -> None:
    """``--json``: exactly one JSON object on stdout and nothing else; else the text form."""
    if as_json:
        print(json.dumps(report), flush=True)
    else:
        print_report(report, Console())


def run_and_report(
    command: str,
    run: Coroutine[Any, Any, dict[str, Any]],
    view: LiveView | ProgressView | None,
    as_json: bool,
    interrupted: str = "",
) -> int:
    """The end of ``demo`` and ``load`` alike: run, close the view, print the report, and
    answer the exit status (2 setup failed, 130 interrupted, else the report's verdict)."""
    try:
        report = asyncio.run(run)
    except LoadError as exc:
        print(f"ctms-media {command}: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"ctms-media {command}: interrupted{interrupted}", file=sys.stderr)
        return 130
    finally:
        if view is not None:
            view.close()
    emit_report(report, as_json)
    return exit_status(report)
