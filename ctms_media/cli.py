"""Command line: ``ctms-media demo | load | serve | bench | conformance | vectors | fuzz |
soak``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _conformance(args: argparse.Namespace) -> int:
    from ctms_media.conformance import run_all

    directory = Path(args.directory)
    if not directory.is_dir():
        print(f"ctms-media conformance: {directory} is not a directory", file=sys.stderr)
        return 2
    passed = failed = 0
    for r in run_all(directory):
        status = "PASS" if r.ok else "FAIL"
        print(f"{status} {r.path.name} [{r.implementation}] {r.packets} packets")
        for f in r.failures[: args.max_failures]:
            print(f"    {f}")
        if len(r.failures) > args.max_failures:
            print(f"    ... {len(r.failures) - args.max_failures} more")
        if r.ok:
            passed += 1
        else:
            failed += 1
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


def _demo(args: argparse.Namespace) -> int:
    from ctms_media.demo import main as demo_main

    return demo_main(args)


def _load(args: argparse.Namespace) -> int:
    from ctms_media.loadtest import main as load_main

    return load_main(args)


def _fuzz(args: argparse.Namespace) -> int:
    from ctms_media.fuzz import main as fuzz_main

    return fuzz_main(args)


def _soak(args: argparse.Namespace) -> int:
    from ctms_media.soak import main as soak_main

    return soak_main(args)


def _serve(args: argparse.Namespace) -> int:
    from ctms_media.errors import ConfigError
    from ctms_media.server.app import run
    from ctms_media.server.config import RelayConfig

    try:
        config = RelayConfig.from_toml(args.config) if args.config else RelayConfig()
    except ConfigError as exc:
        print(f"ctms-media serve: {exc}", file=sys.stderr)
        return 2
    return run(config, workers=args.workers)


def _vectors(args: argparse.Namespace) -> int:
    from ctms_media.sim.vectors import generate

    paths = generate(Path(args.directory), seed=args.seed)
    print(f"wrote {len(paths)} vectors to {args.directory}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ctms_media.benchmark import run_bench

    return run_bench(quick=args.quick, as_json=args.json, plot=args.plot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctms-media", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("conformance", help="run conformance vectors through every forwarder")
    p.add_argument("directory", help="folder of *.json vectors (searched recursively)")
    p.add_argument("--max-failures", type=int, default=5, help="failure lines shown per file")
    p.set_defaults(func=_conformance)

    p = sub.add_parser(
        "vectors", help="write the crossed conformance set (formats, ciphers, ROC, SEQ, keys)"
    )
    p.add_argument("directory", help="folder to write *.json into (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed for keys and payloads")
    p.set_defaults(func=_vectors)

    # -- demo (owner: ctms_media/demo.py) --
    p = sub.add_parser("demo", help="a simulated secure meeting through the relay on loopback")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of media")
    p.add_argument("--rooms", type=int, default=4, help="rooms (the first one has 3 screens)")
    p.add_argument(
        "--load",
        type=int,
        default=1,
        metavar="N",
        help="run N meetings at once, each its own conference",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_demo)

    # -- load (owner: ctms_media/loadtest.py) --
    p = sub.add_parser("load", help="synthetic rooms against any relay's admin API")
    p.add_argument("--api", required=True, metavar="URL", help="e.g. http://127.0.0.1:8080")
    p.add_argument(
        "--rooms", type=int, default=4, help="rooms per conference (the first has 3 screens)"
    )
    p.add_argument("--conferences", type=int, default=1, help="conferences run at once")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of media")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_load)

    # -- serve (owner: ctms_media/server/app.py) --
    p = sub.add_parser("serve", help="run the relay and its admin API")
    p.add_argument("--config", metavar="FILE", help="TOML configuration (docs/operations.md)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="relay processes, each with a slice of the media ports (one per core); "
        "1 = a single process, no proxy",
    )
    p.set_defaults(func=_serve)

    # -- fuzz (owner: ctms_media/fuzz.py) --
    p = sub.add_parser("fuzz", help="fuzz the parsers, both forwarders and the relay's demux")
    p.add_argument("--inputs", type=int, default=1_000_000, help="inputs in all")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--targets", default=None, help="comma-separated subset of parsers,twins,relay")
    p.add_argument(
        "--vectors", action="append", metavar="DIR", help="more conformance vectors as seeds"
    )
    p.add_argument(
        "--crash-dir", default="fuzz-crashes", metavar="DIR", help="where reproducers go"
    )
    p.add_argument("--replay", metavar="FILE", help="run one reproducer again and exit")
    p.add_argument(
        "--minimize", action="store_true", help="with --replay: write a shortest FILE.min.json"
    )
    p.add_argument(
        "--atheris", action="store_true", help="coverage-guided mode (needs the atheris extra)"
    )
    p.add_argument(
        "--memory-limit",
        type=int,
        default=4096,
        metavar="MB",
        help="address-space cap, so a blow-up is a MemoryError, not the OOM killer (0: none)",
    )
    p.set_defaults(func=_fuzz)

    # -- soak (owner: ctms_media/soak.py) --
    p = sub.add_parser("soak", help="long run with loss, reordering and duplication injected")
    p.add_argument("--seconds", type=float, default=600.0, help="seconds of media (10 min)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--conferences",
        type=int,
        default=None,
        metavar="N",
        help="run N conferences and skip the capacity probe (default: half the capacity)",
    )
    p.add_argument("--rooms", type=int, default=4, help="rooms per conference (first: 3 screens)")
    p.add_argument("--loss", type=float, default=0.05, help="share lost, each direction")
    p.add_argument("--reorder", type=float, default=0.05, help="share held back, each direction")
    p.add_argument("--duplicate", type=float, default=0.05, help="share sent twice, each way")
    p.add_argument("--hold-min-ms", type=float, default=5.0, help="shortest reorder hold")
    p.add_argument("--hold-max-ms", type=float, default=40.0, help="longest reorder hold")
    p.add_argument("--probe-seconds", type=float, default=4.0, help="media seconds per step")
    p.add_argument("--probe-max", type=int, default=48, help="most conferences probed")
    p.add_argument("--seed", type=int, default=None, help="seed of the injected faults")
    p.add_argument("--log", metavar="FILE", help="keep the relay's log here")
    p.set_defaults(func=_soak)

    p = sub.add_parser("bench", help="measure the forwarders against the floor and libsrtp")
    p.add_argument("--quick", action="store_true", help="finish in under 60 s")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="draw cost against fan-out and latency")
    p.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
