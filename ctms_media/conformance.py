"""Runs conformance vectors (spec/vectors.md) through a forwarding implementation.

Kept apart from the CLI so the test suite runs exactly the check that
``ctms-media conformance`` prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctms_media.forward.verdict import Receiver
from ctms_media.wire.srtp import profile_named

ForwarderFactory = Callable[[str], Any]


@dataclass
class VectorResult:
    """The outcome of one vector file under one implementation."""

    path: Path
    name: str
    implementation: str
    packets: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def load_vector(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_forwarder(vector: dict[str, Any], factory: ForwarderFactory) -> Any:
    """A forwarder configured as the vector says: every receiver gets every stream."""
    fwd = factory(vector.get("ekt_format", "ctms"))
    for g in vector["groups"]:
        fwd.add_group(
            int(g["spi"]),
            int(g["ekt_cipher"]),
            bytes.fromhex(g["kek"]),
            bytes.fromhex(g["salt"]),
            profile_named(g["profile"]),
        )
    receivers = [
        Receiver(str(r["id"]), int(r["position"]), int(r["spi"])) for r in vector["receivers"]
    ]
    for s in vector["streams"]:
        fwd.add_stream(int(s["ssrc"]), s["kind"], profile_named(s["profile"]))
        fwd.set_route(int(s["ssrc"]), receivers)
    return fwd


def run_vector(path: Path, implementation: str, factory: ForwarderFactory) -> VectorResult:
    vector = load_vector(path)
    result = VectorResult(path, vector.get("name", path.stem), implementation)
    try:
        fwd = build_forwarder(vector, factory)
    except Exception as exc:  # a vector the implementation refuses is a failure, not a crash
        result.failures.append(f"setup: {type(exc).__name__}: {exc}")
        return result
    for i, p in enumerate(vector["packets"]):
        result.packets += 1
        try:
            v = fwd.forward(bytes.fromhex(p["in"]), bool(p.get("rtcp", False)))
        except Exception as exc:
            result.failures.append(f"packet {i}: raised {type(exc).__name__}: {exc}")
            continue
        if v.drop != p.get("drop"):
            result.failures.append(f"packet {i}: drop {v.drop!r}, expected {p.get('drop')!r}")
            continue
        if v.tail != p.get("tail"):
            result.failures.append(f"packet {i}: tail {v.tail!r}, expected {p.get('tail')!r}")
        got = {rid: data.hex() for rid, data in v.by_receiver().items()}
        want = p.get("out", {})
        for rid in sorted(set(got) | set(want)):
            if got.get(rid) != want.get(rid):
                result.failures.append(
                    f"packet {i}: receiver {rid}: bytes differ "
                    f"(got {len(got.get(rid, '')) // 2} B, "
                    f"expected {len(want.get(rid, '')) // 2} B)"
                )
    return result


def vector_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).rglob("*.json"))


def implementations() -> dict[str, ForwarderFactory]:
    """Every forwarding implementation that imports here: the reference, then its twins."""
    from ctms_media.forward.forwarder import Forwarder

    impls: dict[str, ForwarderFactory] = {"python": Forwarder}
    try:
        from ctms_media._fastforward import FastForwarder  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        impls["cython"] = FastForwarder
    return impls


def run_all(directory: Path) -> Iterator[VectorResult]:
    for path in vector_files(directory):
        for name, factory in implementations().items():
            yield run_vector(path, name, factory)
