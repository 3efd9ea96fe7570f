"""Command line: ``ctms-media demo | conformance``."""

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
    from ctms_media.demo import run_demo

    return run_demo(seconds=args.seconds, rooms=args.rooms, as_json=args.json)


def _serve(args: argparse.Namespace) -> int:
    from ctms_media.errors import ConfigError
    from ctms_media.server.app import run
    from ctms_media.server.config import RelayConfig

    try:
        config = RelayConfig.from_toml(args.config) if args.config else RelayConfig()
    except ConfigError as exc:
        print(f"ctms-media serve: {exc}", file=sys.stderr)
        return 2
    return run(config)


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

    p = sub.add_parser("demo", help="a simulated secure meeting through the relay on loopback")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rooms", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_demo)

    p = sub.add_parser("serve", help="run the relay and its admin API")
    p.add_argument("--config", metavar="FILE", help="TOML configuration (see docs)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("bench", help="measure the forwarders against the floor and libsrtp")
    p.add_argument("--quick", action="store_true", help="finish in under 60 s")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="draw cost against fan-out and latency")
    p.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
