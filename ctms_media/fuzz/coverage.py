"""Optional coverage-guided mode (``ctms-media fuzz --atheris``) on libFuzzer via atheris.

The default fuzzer is a seeded mutation fuzzer with no dependency beyond the project; this mode
trades its determinism for coverage feedback: libFuzzer keeps the inputs that reach new lines of
``ctms_media`` and mutates those. It runs the parser checks and the twin comparison (not the
relay, whose event loop does not fit libFuzzer's one-call-per-input model).

An input is laid out so that seeds are easy to write: byte 0 picks the target (even: parsers,
odd: twins), byte 1 a conformance vector, byte 2 how many of its packets run first (to reach
state), byte 3 the RTP/RTCP word (0 decide, 1 RTP, 2 RTCP), the rest is the datagram.
libFuzzer prints its own statistics and writes a crashing input under ``--crash-dir``; the
process ends inside libFuzzer, as atheris does.
"""

from __future__ import annotations

import inspect
import sys
from collections import Counter
from pathlib import Path
from types import FunctionType, ModuleType

from ctms_media.conformance import implementations, load_vector, vector_files

INSTRUMENTED = ("ctms_media.wire", "ctms_media.forward", "ctms_media.fuzz.parsers")


def _instrument(atheris: ModuleType, prefixes: tuple[str, ...]) -> int:
    """Add coverage counters to every function and method of the modules named: they were
    imported before atheris was, so its import hook cannot do it."""
    done = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefixes):
            continue
        for obj in list(vars(module).values()):
            functions: list[object] = []
            if isinstance(obj, FunctionType) and obj.__module__ == name:
                functions.append(obj)
            elif inspect.isclass(obj) and obj.__module__ == name:
                for member in vars(obj).values():
                    fn = getattr(member, "__func__", member)
                    if isinstance(member, property):
                        fn = member.fget
                    if isinstance(fn, FunctionType):
                        functions.append(fn)
            for fn in functions:
                atheris.instrument_func(fn)
                done += 1
    return done


def run_atheris(
    inputs: int,
    seed: int | None,
    crash_dir: Path = Path("fuzz-crashes"),
    vector_dirs: list[Path] | None = None,
) -> int:
    """Run libFuzzer for ``inputs`` executions; returns only when atheris is missing."""
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        print(
            "ctms-media fuzz --atheris needs atheris: python -m pip install 'ctms-media[fuzz]'",
            file=sys.stderr,
        )
        return 2
    from ctms_media.fuzz import default_vector_dirs
    from ctms_media.fuzz.parsers import check_all
    from ctms_media.fuzz.twins import TwinChecker

    dirs = vector_dirs if vector_dirs is not None else default_vector_dirs()
    vectors = [load_vector(p) for d in dirs for p in vector_files(d)]
    if not vectors:
        print("ctms-media fuzz --atheris: no conformance vectors to start from", file=sys.stderr)
        return 2
    factories = implementations()
    setups = [{k: v for k, v in vec.items() if k != "packets"} for vec in vectors]
    packets = [
        [(bytes.fromhex(p["in"]), bool(p.get("rtcp", False))) for p in vec["packets"]]
        for vec in vectors
    ]
    keks = tuple(
        (int(g["ekt_cipher"]), bytes.fromhex(g["kek"])) for vec in vectors for g in vec["groups"]
    )

    def one_input(data: bytes) -> None:
        if len(data) < 4:
            return
        if not data[0] & 1:
            check_all(data[4:], keks, None, Counter())  # a FuzzFailure is the crash
            return
        i = data[1] % len(setups)
        chk = TwinChecker(setups[i], factories)
        for p, rtcp in packets[i][: data[2] % (len(packets[i]) + 1)]:
            chk.packet(p, rtcp)
        chk.packet(data[4:], (None, False, True)[data[3] % 3])

    instrumented = _instrument(atheris, INSTRUMENTED)
    crash_dir.mkdir(parents=True, exist_ok=True)
    corpus = crash_dir / "atheris-corpus"  # libFuzzer adds what it finds: reused next run
    corpus.mkdir(exist_ok=True)
    for i, vec_packets in enumerate(packets):
        for k, (p, rtcp) in enumerate(vec_packets):
            (corpus / f"t{i}-{k}").write_bytes(bytes([1, i, k, 2 if rtcp else 1]) + p)
            (corpus / f"p{i}-{k}").write_bytes(bytes([0, 0, 0, 0]) + p)
    print(
        f"atheris: {instrumented} functions instrumented, {len(vectors)} vectors", file=sys.stderr
    )
    argv = [
        sys.argv[0],
        f"-runs={inputs}",
        f"-seed={seed or 0}",
        f"-artifact_prefix={crash_dir}/",
        str(corpus),
    ]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0
