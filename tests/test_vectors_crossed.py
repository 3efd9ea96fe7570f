"""The crossed conformance set (``ctms_media.sim.vectors``): every rule of wire.md §5–§7 with
both EKT formats, every EKT cipher, both profiles, ROC 0 and ROC > 0, SEQ low, high and just
before a rollover, the first key on RTP or on SRTCP, and a rekey with a late packet of the
old key. Generated here (its expected bytes come from libsrtp and the §7 model, and each was
decrypted by a room at generation), then run through both twins as ``ctms-media
conformance`` runs them."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctms_media.conformance import implementations, run_vector
from ctms_media.sim.vectors import (
    FIRSTS,
    FORMAT_CIPHERS,
    PROFILES,
    ROCS,
    SEQS,
    build,
    crossed_cases,
    generate,
)

ALL_DROPS = {"no_key", "replay", "auth", "unknown_spi", "malformed"}


@pytest.fixture(scope="module")
def crossed(tmp_path_factory) -> list[Path]:
    return generate(tmp_path_factory.mktemp("crossed"))


def test_the_set_crosses_every_case_the_text_allows(crossed):
    names = {p.stem for p in crossed}
    assert len(names) == len(FORMAT_CIPHERS) * len(PROFILES) * len(ROCS) * len(SEQS) * 2
    seen = {
        (c.ekt_format, c.cipher, c.profile.name, c.roc, c.seq, c.first) for c in crossed_cases()
    }
    want = {
        (f, c, p.name, r, s, first)
        for (f, c), p, r, s, first in itertools.product(
            FORMAT_CIPHERS, PROFILES, ROCS, SEQS, FIRSTS
        )
    }
    assert seen == want


@pytest.mark.parametrize("impl", sorted(implementations()))
def test_both_twins_pass_every_crossed_vector(crossed, impl):
    factory = implementations()[impl]
    failed = {}
    for path in crossed:
        r = run_vector(path, impl, factory)
        assert r.packets > 20
        if not r.ok:
            failed[path.stem] = r.failures[:3]
    assert not failed, failed


def test_each_vector_holds_every_drop_an_upgrade_a_rewrap_and_a_late_packet(crossed):
    for path in crossed:
        v = json.loads(path.read_text())
        drops = {p["drop"] for p in v["packets"]} - {None}
        kw = v["groups"][0]["ekt_cipher"] != 1
        assert drops == ALL_DROPS | ({"unwrap"} if kw else set()), path.stem
        accepted = [p for p in v["packets"] if p["drop"] is None and not p["rtcp"]]
        spi_of = {r["id"]: r["spi"] for r in v["receivers"]}
        for rid in ("r1", "r3"):  # r3 sits on another SPI: every long trailer re-wrapped
            spis = [_long_spi(v["ekt_format"], bytes.fromhex(p["out"][rid])) for p in accepted]
            longs = [s for s in spis if s is not None]
            assert len(longs) >= 2 and set(longs) == {spi_of[rid]}, (path.stem, rid)
            # the first packet of each key reaches every receiver with a long trailer
            assert spis[0] is not None, (path.stem, rid)
        rtcp = [p for p in v["packets"] if p["rtcp"] and p["drop"] is None]
        assert rtcp and all(set(p["out"].values()) == {p["in"]} for p in rtcp)


def _long_spi(fmt: str, packet: bytes) -> int | None:
    if fmt == "ctms":
        return (packet[-2] << 8 | packet[-1]) >> 1 if packet[-1] & 1 else None
    return packet[-7] << 8 | packet[-6] if packet[-1] == 0x02 else None


def test_generation_is_reproducible():
    case = next(iter(crossed_cases()))
    assert build(case, seed=5) == build(case, seed=5)
    assert build(case, seed=5) != build(case, seed=6)


def test_the_cli_writes_the_set_and_conformance_passes_it(tmp_path):
    out = tmp_path / "v"
    w = subprocess.run(
        [sys.executable, "-m", "ctms_media.cli", "vectors", str(out), "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert w.returncode == 0, w.stderr
    assert len(list(out.glob("*.json"))) == len(list(crossed_cases()))
    c = subprocess.run(
        [sys.executable, "-m", "ctms_media.cli", "conformance", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert c.returncode == 0, c.stdout[-2000:]
    assert c.stdout.strip().splitlines()[-1].endswith(" 0 failed")
