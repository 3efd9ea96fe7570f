"""``ctms-media fuzz``: a seeded, structure-aware mutation fuzzer over the relay's input side.

Three targets share one budget of inputs (one input = one datagram fed to one target):

* ``parsers`` — every wire parser on its own (:mod:`.parsers`): only ``CtmsError`` may come
  out, and decoders/encoders, the two RTP framings, the replay window and index estimation
  must keep their properties for any bytes;
* ``twins`` — the pure-Python reference forwarder and the Cython twin (one by one and through
  the batch API) fed the same configuration and datagrams, with equal verdicts and state
  demanded after every datagram (:mod:`.twins`);
* ``relay`` — ``Relay.datagram`` on a real relay with DTLS-keyed rooms, fuzzed bytes and source
  addresses, every datagram accounted for exactly once (:mod:`.relay`).

Inputs start from the conformance vectors and from fresh libsrtp-protected packets, and are
mutated by :mod:`.mutate`. The run is deterministic for a given ``--seed`` except for the
relay's DTLS keys and timing. Any failure is written as a JSON reproducer that
``ctms-media fuzz --replay FILE`` runs again, and makes the exit status non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctms_media.conformance import ForwarderFactory, implementations, load_vector, vector_files
from ctms_media.fuzz.twins import (
    GENERATED_CASES,
    FuzzFailure,
    GeneratedScenario,
    TwinTarget,
)

__all__ = ["FuzzOptions", "FuzzReport", "main", "minimize_file", "replay_file", "run"]

DEFAULT_INPUTS = 1_000_000
WEIGHTS = {"parsers": 0.25, "twins": 0.5, "relay": 0.25}
ROUND = 20_000  # inputs per round; each round gives every target its share
MAX_REPRODUCERS = 20


def default_vector_dirs() -> list[Path]:
    """The conformance vectors shipped beside the package (a source checkout's
    ``tests/vectors``) and any set named by ``CTMS_VECTORS``."""
    dirs = []
    here = Path(__file__).resolve().parents[2] / "tests" / "vectors"
    if here.is_dir():
        dirs.append(here)
    extra = os.environ.get("CTMS_VECTORS")
    if extra and Path(extra).is_dir():
        dirs.append(Path(extra))
    return dirs


@dataclass
class FuzzOptions:
    """What one run does; the CLI fills it from its arguments, tests build it directly."""

    inputs: int = DEFAULT_INPUTS
    seed: int | None = None
    targets: tuple[str, ...] = ("parsers", "twins", "relay")
    vector_dirs: list[Path] | None = None
    crash_dir: Path = Path("fuzz-crashes")
    factories: dict[str, ForwarderFactory] | None = None
    progress: bool = True
    world_inputs: int = 25_000


@dataclass
class FuzzReport:
    """The outcome of a run: counts per target, failures, and where the reproducers went."""

    seed: int
    inputs: int = 0
    seconds: float = 0.0
    implementations: list[str] = field(default_factory=list)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    mutations: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # by kind
    reproducers: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def crashes(self) -> int:
        return self.failures["crash"]

    @property
    def mismatches(self) -> int:
        return self.failures["mismatch"]

    @property
    def ok(self) -> bool:
        return not sum(self.failures.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "inputs": self.inputs,
            "seconds": round(self.seconds, 2),
            "exec_per_s": round(self.inputs / self.seconds) if self.seconds else 0,
            "implementations": self.implementations,
            "targets": self.targets,
            "mutations": dict(sorted(self.mutations.items())),
            "crashes": self.crashes,
            "mismatches": self.mismatches,
            "violations": sum(self.failures.values()) - self.crashes - self.mismatches,
            "failures": dict(self.failures),
            "reproducers": self.reproducers,
            "failure_messages": self.messages[:MAX_REPRODUCERS],
        }


class _Failures:
    """Counts failures, keeps one reproducer per distinct failure, says how to replay it."""

    def __init__(self, report: FuzzReport, crash_dir: Path, seed: int, say: Any) -> None:
        self.report = report
        self.crash_dir = crash_dir
        self.seed = seed
        self.say = say
        self.seen: set[tuple[str, str, str]] = set()

    def __call__(self, failure: FuzzFailure, repro: dict[str, Any]) -> None:
        self.report.failures[failure.kind] += 1
        target = repro.get("target", "?")
        signature = (target, failure.kind, re.sub(r"\d+", "N", failure.message)[:120])
        if signature in self.seen or len(self.seen) >= MAX_REPRODUCERS:
            return
        self.seen.add(signature)
        doc = {"kind": failure.kind, "message": failure.message, "seed": self.seed, **repro}
        text = json.dumps(doc, indent=1)
        self.crash_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        path = self.crash_dir / f"{target}-{failure.kind}-{digest}.json"
        path.write_text(text + "\n", encoding="utf-8")
        self.report.reproducers.append(str(path))
        line = f"{target} {failure.kind}: {failure.message}"
        self.report.messages.append(line)
        self.say(
            f"[red]FAIL[/red] {line}\n  reproducer: {path}\n"
            f"  replay: ctms-media fuzz --replay {path}"
        )


def parser_seeds(
    vector_paths: list[Path], rng: random.Random
) -> list[tuple[bytes, tuple[tuple[int, bytes], ...]]]:
    """Datagrams to start the parser target from, each with its setup's (cipher, KEK)s."""
    from ctms_media.sim.srtp_room import sdes_packet
    from ctms_media.wire import control

    seeds: list[tuple[bytes, tuple[tuple[int, bytes], ...]]] = []
    for path in vector_paths:
        v = load_vector(path)
        keks = tuple((int(g["ekt_cipher"]), bytes.fromhex(g["kek"])) for g in v["groups"])
        seeds.extend((bytes.fromhex(p["in"]), keks) for p in v["packets"])
    for fmt, cipher, profile in GENERATED_CASES:
        sc = GeneratedScenario(random.Random(rng.getrandbits(64)), fmt, cipher, profile)
        keks = tuple((g.cipher, g.kek) for g in sc.groups)
        for s in sc.senders:
            seeds.append((s.rtp(rng.randbytes(40), 0xC0, long=True)[0], keks))
            seeds.append((s.rtp(rng.randbytes(40), 0x80)[0], keks))
            seeds.append((s.rtcp(sdes_packet(s.ssrc)), keks))
        g = sc.groups[0]
        gsp = control.Gsp(g.spi, g.cipher, 1 if fmt == "ctms" else 2, profile.id, g.kek, g.salt)
        seeds.append((control.encode_control(gsp, rng.getrandbits(32)), keks))
    seeds.append((control.encode_pli(1, 2), ()))
    seeds.append((control.encode_fir(1, 2, 3), ()))
    seeds.append((sdes_packet(5), ()))
    return seeds


class _Progress:
    """A rich progress view on stderr when it is a terminal; a line every 15 s otherwise
    (a long run's log), nothing at all when disabled."""

    def __init__(self, enabled: bool, shares: dict[str, int]) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.shares = shares
        self.total = sum(shares.values())
        self.start = time.perf_counter()
        self.last_line = self.start
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _Progress:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description:>8}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>9} exec/s"),
                TextColumn("{task.fields[fails]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            for name, n in [("all", self.total), *self.shares.items()]:
                self._tasks[name] = self._progress.add_task(name, total=n, rate="-", fails="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def say(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def update(self, done: dict[str, int], seconds: dict[str, float], failures: int) -> None:
        now = time.perf_counter()
        total = sum(done.values())
        fails = f"[red]{failures} failures[/red]" if failures else ""
        if self._progress is not None:
            for name, n in done.items():
                rate = n / seconds[name] if seconds.get(name) else 0.0
                self._progress.update(self._tasks[name], completed=n, rate=f"{rate:,.0f}")
            rate = total / (now - self.start) if now > self.start else 0.0
            self._progress.update(
                self._tasks["all"], completed=total, rate=f"{rate:,.0f}", fails=fails
            )
        elif self.enabled and now - self.last_line >= 15:
            self.last_line = now
            parts = " ".join(f"{k}={v}" for k, v in done.items())
            self.console.print(
                f"fuzz: {total}/{self.total} inputs ({parts}), {now - self.start:.0f} s, "
                f"{total / (now - self.start):,.0f} exec/s, failures {failures}",
                highlight=False,
            )


def _shares(options: FuzzOptions) -> dict[str, int]:
    targets = [t for t in WEIGHTS if t in options.targets]
    total_w = sum(WEIGHTS[t] for t in targets)
    shares = {t: int(options.inputs * WEIGHTS[t] / total_w) for t in targets}
    if targets:
        shares[targets[-1]] += options.inputs - sum(shares.values())
    return shares


@contextlib.contextmanager
def _quiet_logs(handler: logging.Handler) -> Iterator[None]:
    """The relay logs every first drop of a kind and every failed handshake: useful in
    production, noise at a million inputs. Errors are kept (and count as crashes)."""
    loggers = [logging.getLogger("ctms_media"), logging.getLogger("asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
            lg.removeHandler(handler)


async def run_async(options: FuzzOptions) -> FuzzReport:
    """One fuzzing run (inside a running event loop: the relay target needs one)."""
    from ctms_media.fuzz.parsers import ParserTarget
    from ctms_media.fuzz.relay import RelayTarget

    seed = options.seed if options.seed is not None else random.SystemRandom().getrandbits(32)
    rng = random.Random(seed)
    factories = options.factories if options.factories is not None else implementations()
    report = FuzzReport(seed=seed, implementations=list(factories))
    dirs = options.vector_dirs if options.vector_dirs is not None else default_vector_dirs()
    vectors = [p for d in dirs for p in vector_files(d)]
    shares = _shares(options)
    done = dict.fromkeys(shares, 0)
    seconds = dict.fromkeys(shares, 0.0)
    start = time.perf_counter()
    with (
        _Progress(options.progress, shares) as progress,
        tempfile.TemporaryDirectory(prefix="ctms-fuzz-") as tmp,
    ):
        on_failure = _Failures(report, options.crash_dir, seed, progress.say)
        twins = TwinTarget(random.Random(rng.getrandbits(64)), factories, vectors, on_failure)
        parsers = ParserTarget(
            random.Random(rng.getrandbits(64)),
            parser_seeds(vectors, random.Random(rng.getrandbits(64))),
            on_failure,
        )
        relay = RelayTarget(
            random.Random(rng.getrandbits(64)),
            Path(tmp),
            factories,
            on_failure,
            options.world_inputs,
        )
        with _quiet_logs(relay.errors):
            try:
                while sum(done.values()) < sum(shares.values()):
                    for name in shares:
                        n = min(shares[name] - done[name], int(ROUND * WEIGHTS[name]) or 1)
                        if n <= 0:
                            continue
                        t0 = time.perf_counter()
                        if name == "relay":
                            await relay.run(n)
                            if relay.world is not None and not parsers.dtls_added:
                                parsers.add_seeds(relay.world.dtls_seeds)
                        elif name == "twins":
                            twins.run(n)
                        else:
                            parsers.run(n)
                        seconds[name] += time.perf_counter() - t0
                        done[name] += n
                        progress.update(done, seconds, sum(report.failures.values()))
                        await asyncio.sleep(0)
            finally:
                await relay.close()
    report.seconds = time.perf_counter() - start
    report.inputs = sum(done.values())
    for name in shares:
        entry: dict[str, Any] = {
            "inputs": done[name],
            "seconds": round(seconds[name], 2),
            "exec_per_s": round(done[name] / seconds[name]) if seconds[name] else 0,
        }
        if name == "twins":
            entry.update(
                outcomes=dict(twins.outcomes.most_common()),
                episodes=twins.episodes,
                batch_inputs=twins.batch_inputs,
                config_calls=twins.configs,
            )
            report.mutations.update(twins.mutator.counts)
        elif name == "parsers":
            entry.update(outcomes=dict(sorted(parsers.outcomes.items())))
            report.mutations.update(parsers.mutator.counts)
        else:
            entry.update(
                outcomes=dict(relay.outcomes.most_common()),
                worlds=relay.worlds,
                churns=relay.churns,
            )
            report.mutations.update(relay.mutations)
        report.targets[name] = entry
    return report


def run(options: FuzzOptions) -> FuzzReport:
    """One fuzzing run on a fresh event loop."""
    return asyncio.run(run_async(options))


def replay_file(path: Path, factories: dict[str, ForwarderFactory] | None = None) -> str | None:
    """Run a reproducer again: the failure it still shows, or None when it passes."""
    from ctms_media.fuzz.parsers import check_all
    from ctms_media.fuzz.relay import replay_relay
    from ctms_media.fuzz.twins import replay

    repro = json.loads(Path(path).read_text(encoding="utf-8"))
    factories = factories if factories is not None else implementations()
    target = repro.get("target")
    failure: FuzzFailure | None = None
    if target == "twins":
        wanted = [n for n in repro.get("implementations", factories) if n in factories]
        failure = replay(repro, {n: factories[n] for n in wanted})
    elif target == "parsers":
        keks = tuple((int(c), bytes.fromhex(k)) for c, k in repro.get("keks", []))
        try:
            check_all(bytes.fromhex(repro["input"]), keks, None, Counter())
        except FuzzFailure as exc:
            failure = exc
    elif target == "relay" and "forwarder" in repro:  # exact: the forwarder's own history
        fwd = repro["forwarder"]
        failure = replay(fwd, {n: factories[n] for n in fwd["implementations"] if n in factories})
    elif target == "relay" and "input" in repro:  # best effort: a new world, same seed
        with tempfile.TemporaryDirectory(prefix="ctms-fuzz-") as tmp:
            failure = asyncio.run(replay_relay(repro, Path(tmp), factories))
    else:
        return f"cannot replay a reproducer of target {target!r}"
    return None if failure is None else f"{failure.kind}: {failure.message}"


def minimize_file(path: Path, factories: dict[str, ForwarderFactory] | None = None) -> Path:
    """Shrink a twins reproducer's trace to what still fails the same way, written beside
    it as ``NAME.min.json`` (a regression test wants the two packets, not the 1,500)."""
    from ctms_media.fuzz.twins import minimize

    repro = json.loads(Path(path).read_text(encoding="utf-8"))
    if repro.get("target") != "twins":
        raise SystemExit(f"{path}: only twins reproducers have a trace to minimize")
    factories = factories if factories is not None else implementations()
    wanted = {n: factories[n] for n in repro.get("implementations", factories) if n in factories}
    out = Path(path).with_suffix(".min.json")
    out.write_text(json.dumps(minimize(repro, wanted), indent=1) + "\n", encoding="utf-8")
    return out


def _print_summary(report: FuzzReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    doc = report.to_json()
    table = Table(title=f"ctms-media fuzz, seed {report.seed}")
    table.add_column("target")
    table.add_column("inputs", justify="right")
    table.add_column("exec/s", justify="right")
    table.add_column("outcomes (most frequent)")
    for name, entry in doc["targets"].items():
        outcomes = entry.get("outcomes", {})
        if name == "parsers":
            refused = sum(v for k, v in outcomes.items() if k.endswith(":refused"))
            accepted = sum(v for k, v in outcomes.items() if k.endswith(":ok"))
            text = f"parser calls: {accepted} returned, {refused} refused (CtmsError)"
        else:
            text = ", ".join(f"{k} {v}" for k, v in list(outcomes.items())[:8])
        table.add_row(name, f"{entry['inputs']:,}", f"{entry['exec_per_s']:,}", text)
    console.print(table)
    console.print(
        f"{doc['inputs']:,} inputs in {doc['seconds']:.1f} s ({doc['exec_per_s']:,} exec/s), "
        f"implementations {', '.join(report.implementations)}: "
        f"crashes {doc['crashes']}, twin mismatches {doc['mismatches']}, "
        f"other violations {doc['violations']}",
        highlight=False,
    )
    for path in report.reproducers:
        console.print(
            f"reproducer {path}: replay with ctms-media fuzz --replay {path}", highlight=False
        )


def _limit_memory(megabytes: int) -> None:
    """Cap the process's address space: an input that makes some code allocate without
    bound then fails with MemoryError, which the checks report with a reproducer, instead
    of the kernel's OOM killer ending the run (and whatever else shares the machine)."""
    if megabytes <= 0:
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = megabytes << 20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main(args: argparse.Namespace) -> int:
    """The ``ctms-media fuzz`` command: 0 when nothing failed, 1 otherwise."""
    _limit_memory(getattr(args, "memory_limit", 0))
    replay_path = getattr(args, "replay", None)
    if replay_path:
        result = replay_file(Path(replay_path))
        print(f"{replay_path}: {'still fails: ' + result if result else 'passes'}")
        if result and getattr(args, "minimize", False):
            print(f"minimized: {minimize_file(Path(replay_path))}")
        return 1 if result else 0
    if getattr(args, "atheris", False):
        from ctms_media.fuzz.coverage import run_atheris

        crash_dir = Path(getattr(args, "crash_dir", None) or "fuzz-crashes")
        return run_atheris(args.inputs, args.seed, crash_dir)
    targets = tuple(args.targets.split(",")) if getattr(args, "targets", None) else tuple(WEIGHTS)
    unknown = set(targets) - set(WEIGHTS)
    if unknown or args.inputs <= 0:
        print(f"ctms-media fuzz: unknown target(s) {sorted(unknown)} or no inputs", file=sys.stderr)
        return 2
    vector_dirs = default_vector_dirs() + [Path(d) for d in getattr(args, "vectors", None) or []]
    options = FuzzOptions(
        inputs=args.inputs,
        seed=args.seed,
        targets=targets,
        vector_dirs=vector_dirs,
        crash_dir=Path(getattr(args, "crash_dir", None) or "fuzz-crashes"),
    )
    report = run(options)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        _print_summary(report)
    return 0 if report.ok else 1
