"""The fuzzer in CI: a fixed-seed sample of every target, the stored regression inputs, and
proof that the fuzzer's own checks fire (planted bugs are caught and replay from the file).

The full run is ``ctms-media fuzz`` (1,000,000 inputs by default, docs/security.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ctms_media import cli
from ctms_media.conformance import implementations
from ctms_media.forward.forwarder import Forwarder
from ctms_media.forward.verdict import Verdict
from ctms_media.fuzz import FuzzOptions, minimize_file, replay_file, run
from ctms_media.fuzz.mutate import OP_NAMES, Hints, Mutator, layout_of
from ctms_media.server.relay import Relay
from ctms_media.wire import ekt
from ctms_media.wire.srtp import ReplayWindow

from .conftest import vector_dirs

CORPUS = Path(__file__).parent / "fuzz_corpus"
SAMPLE_INPUTS = 40_000
SAMPLE_SEED = 20_240_607


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    """One sample run shared by the checks below (a few seconds)."""
    crash_dir = tmp_path_factory.mktemp("fuzz-crashes")
    return run(
        FuzzOptions(
            inputs=SAMPLE_INPUTS,
            seed=SAMPLE_SEED,
            vector_dirs=vector_dirs(),
            crash_dir=crash_dir,
            progress=False,
            world_inputs=5_000,
        )
    )


def test_sample_run_finds_nothing(sample) -> None:
    assert sample.ok, "\n".join(sample.messages)
    assert sample.inputs == SAMPLE_INPUTS
    assert {name: t["inputs"] > 0 for name, t in sample.targets.items()} == {
        "parsers": True,
        "twins": True,
        "relay": True,
    }
    assert "cython" in sample.implementations or list(implementations()) == ["python"]


def test_sample_run_reaches_every_verdict(sample) -> None:
    """The inputs get deep: every drop reason of the forwarder, IDR switches, and on the
    relay every transport reason, accepted control and a relay crossing several worlds."""
    twins = sample.targets["twins"]
    assert set(twins["outcomes"]) >= {
        "forwarded",
        "malformed",
        "unknown_ssrc",
        "unknown_spi",
        "unwrap",
        "no_key",
        "replay",
        "auth",
    }
    assert twins["batch_inputs"] > 0 and twins["config_calls"] > 0
    relay = sample.targets["relay"]
    assert relay["worlds"] >= 2
    assert set(relay["outcomes"]) >= {
        "forwarded",
        "control",
        "drop:address",
        "drop:auth",
        "drop:control",
        "drop:dtls",
        "drop:malformed",
        "drop:replay",
        "drop:stun",
        "drop:unknown_ssrc",
    }
    parsers = sample.targets["parsers"]["outcomes"]
    for name in ("decode_control", "unwrap_ctms", "rfc8870_unwrap", "HopSrtcp.unprotect"):
        assert parsers.get(f"{name}:ok", 0) > 0, name  # seeds reach the success paths
    assert set(sample.mutations) >= set(OP_NAMES)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.json")), ids=lambda p: p.name)
def test_regression_inputs_pass(path: Path) -> None:
    """Every failure the fuzzer ever found, replayed from its reproducer, now passes."""
    assert replay_file(path) is None


def test_replay_window_survives_a_jump_to_the_top_of_the_index_space() -> None:
    """Found by the fuzzer (tests/fuzz_corpus/twins-replay-window-far-jump.json): an
    authenticated index 2^48 ahead made ``accept`` shift its bitmap by the jump."""
    w = ReplayWindow()
    w.accept(0x13)
    w.accept((1 << 48) - 4)
    assert (w.highest, w.bits) == ((1 << 48) - 4, 1)
    assert not w.check(0x13) and w.check((1 << 48) - 5) and not w.check((1 << 48) - 4)
    w.accept((1 << 31) + (1 << 48))  # an SRTCP-sized jump on top: still one bit
    assert w.bits == 1


def test_layout_aims_mutations_at_their_fields() -> None:
    """Field mutations land where the contract puts the field (tail byte, tag, SPI, ROC)."""
    vector = json.loads((vector_dirs()[0] / "01-video-frames-ctms-kw128-sha32.json").read_text())
    data = bytes.fromhex(vector["packets"][0]["in"])
    lay = layout_of(data, False, "ctms", lambda ssrc: 4, lambda spi: 2)
    assert lay is not None
    assert (lay.header, lay.tag_len, lay.trailer_len, lay.emk_len) == (16, 4, 32, 24)
    n = len(data)
    tail_at = n - lay.trailer_len - lay.tag_len - 1
    assert data[tail_at] == vector["packets"][0]["tail"]
    fields = {
        "tail_byte": range(tail_at, tail_at + 1),
        "tag": range(tail_at + 1, tail_at + 5),
        "emk": range(n - 32, n - 8),
        "roc": range(n - 8, n - 4),
        "isn": range(n - 4, n - 2),
        "spi": range(n - 2, n),
    }
    m = Mutator(random.Random(1))
    for name, where in fields.items():
        for _ in range(20):
            out = m.apply(name, data, lay, Hints(spis=(1, 2, 3)))
            assert out is not None
            if len(out) == n:  # (an EMK op may also change the EMK's size)
                assert {i for i in range(n) if out[i] != data[i]} <= set(where), name


# -- the fuzzer's own checks fire ---------------------------------------------------------------


class _PlantedTwin(Forwarder):
    """A twin with a planted bug: from its 20th accepted datagram on, frame starts report
    the tail byte off by one (a bug that needs state, as real ones do)."""

    accepted = 0

    def forward(self, datagram: bytes, rtcp: bool | None = None) -> Verdict:
        v = super().forward(datagram, rtcp)
        if v.drop is None:
            self.accepted += 1
            if self.accepted >= 20 and v.tail is not None and v.tail & 0x40:
                v.tail ^= 1
        return v


def test_a_twin_mismatch_fails_the_run_and_replays(tmp_path: Path) -> None:
    planted = {"python": Forwarder, "planted": _PlantedTwin}
    report = run(
        FuzzOptions(
            inputs=3_000,
            seed=5,
            targets=("twins",),
            vector_dirs=vector_dirs(),
            crash_dir=tmp_path,
            factories=planted,
            progress=False,
        )
    )
    assert not report.ok and report.mismatches > 0
    path = Path(report.reproducers[0])
    repro = json.loads(path.read_text())
    assert repro["target"] == "twins" and repro["trace"][-1][0] == "packet"
    assert "tail" in (replay_file(path, planted) or "")
    assert replay_file(path, {"python": Forwarder, "planted": Forwarder}) is None
    small = minimize_file(path, planted)  # the accepted datagrams it takes, no mutants
    assert len(json.loads(small.read_text())["trace"]) < len(repro["trace"])
    assert "tail" in (replay_file(small, planted) or "")


def test_a_parser_crash_fails_the_run_and_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ekt.rfc8870_tail

    def fragile(packet: bytes) -> object:
        if len(packet) % 7 == 3:
            raise IndexError("planted")
        return real(packet)

    monkeypatch.setattr(ekt, "rfc8870_tail", fragile)
    report = run(
        FuzzOptions(inputs=2_000, seed=6, targets=("parsers",), crash_dir=tmp_path, progress=False)
    )
    assert report.crashes > 0
    path = Path(report.reproducers[0])
    assert "IndexError" in (replay_file(path) or "")
    monkeypatch.setattr(ekt, "rfc8870_tail", real)
    assert replay_file(path) is None


def test_the_relay_accounting_catches_a_datagram_counted_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Relay._drop

    def forgetful(self: Relay, ep: object, reason: str, addr: object) -> None:
        if reason != "stun":  # a STUN datagram now vanishes without a count
            real(self, ep, reason, addr)  # type: ignore[arg-type]

    monkeypatch.setattr(Relay, "_drop", forgetful)
    report = run(
        FuzzOptions(inputs=3_000, seed=7, targets=("relay",), crash_dir=tmp_path, progress=False)
    )
    assert report.failures["accounting"] > 0
    assert any("neither dropped" in m for m in report.messages)


class _CrashingForwarder(Forwarder):
    """A forwarder with a planted crash on RTP datagrams whose CC is 2."""

    def forward(self, datagram: bytes, rtcp: bool | None = None) -> Verdict:
        if len(datagram) > 20 and datagram[0] & 0xCF == 0x82 and not rtcp:
            raise ValueError("planted")
        return super().forward(datagram, rtcp)


def test_a_forwarder_crash_inside_the_relay_replays_without_the_relay(tmp_path: Path) -> None:
    report = run(
        FuzzOptions(
            inputs=3_000,
            seed=8,
            targets=("relay",),
            crash_dir=tmp_path,
            factories={"python": _CrashingForwarder},
            progress=False,
        )
    )
    assert report.crashes > 0
    path = Path(report.reproducers[0])
    assert "forwarder" in json.loads(path.read_text())
    assert "planted" in (replay_file(path, {"python": _CrashingForwarder}) or "")
    assert replay_file(path, {"python": Forwarder}) is None


def test_a_relay_reproducer_replays_on_a_fresh_world(tmp_path: Path) -> None:
    """A relay reproducer names the world's seed, the endpoint and the source address by
    role; replaying a harmless one builds the world again and finds nothing."""
    path = tmp_path / "relay.json"
    sdes = "81ca000300001001" + "00" * 8
    repro = {
        "target": "relay",
        "world_seed": 3,
        "endpoint": "b1",
        "address": "stranger:0",
        "input": "16fefd" + "00" * 20,
        "recent": [["p3", "own", sdes], ["a3", "room:b1", sdes]],
    }
    path.write_text(json.dumps(repro))
    assert replay_file(path) is None


def test_cli_prints_one_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(
        [
            "fuzz",
            "--inputs",
            "3000",
            "--seed",
            "3",
            "--targets",
            "parsers,twins",
            "--json",
            "--crash-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    doc = json.loads(out)
    assert doc["inputs"] == 3000 and doc["crashes"] == 0 and doc["mismatches"] == 0
    assert set(doc["targets"]) == {"parsers", "twins"}
