"""Every conformance vector, through every twin; and the CLI that runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctms_media.cli import main
from ctms_media.conformance import implementations, run_vector, vector_files

from .conftest import SAMPLE_VECTORS, vector_dirs

VECTORS = [p for d in vector_dirs() for p in vector_files(d)]


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_vector(path: Path, make_forwarder) -> None:
    result = run_vector(path, "under-test", make_forwarder)
    assert result.packets > 0
    assert result.ok, "\n".join(result.failures)


def test_conformance_cli_passes_and_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", str(SAMPLE_VECTORS)]) == 0
    out = capsys.readouterr().out.splitlines()
    n = len(vector_files(SAMPLE_VECTORS)) * len(implementations())
    assert out[-1] == f"{n} passed, 0 failed"
    assert sum(line.startswith("PASS ") for line in out) == n


def test_conformance_cli_fails_on_a_wrong_expectation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vector = json.loads((SAMPLE_VECTORS / "00-audio-basic-ctms-ecb-sha80.json").read_text())
    out = vector["packets"][0]["out"]
    r1 = bytearray.fromhex(out["r1"])
    r1[20] ^= 0xFF
    out["r1"] = r1.hex()
    (tmp_path / "bad.json").write_text(json.dumps(vector))
    assert main(["conformance", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert "FAIL bad.json" in text and f"0 passed, {len(implementations())} failed" in text


def test_conformance_cli_rejects_missing_dir(tmp_path: Path) -> None:
    assert main(["conformance", str(tmp_path / "nope")]) == 2
