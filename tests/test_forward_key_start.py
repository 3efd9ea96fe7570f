"""Where a key starts and which index a packet has (wire.md §5–§7), crossed with every case
the text allows: both EKT formats, every EKT cipher, both SRTP profiles, ROC 0 and ROC > 0,
SEQ in either half of the sequence space and just before a rollover, keys first seen on RTP
and first seen on SRTCP, and a second key announced on SRTCP across a rollover.

The receiving rooms are :class:`EktReceiver`: they learn keys only from the trailers the
relay sends them and decrypt with libsrtp, so a wrong ROC, ISN, SPI or Epoch in an upgraded
or re-wrapped trailer fails here as it would in a room. Both twins run every case.
"""

from __future__ import annotations

import pytest

from ctms_media.sim.srtp_room import EktReceiver, SenderStream
from ctms_media.wire.ekt import CtmsLong, Rfc8870Full, rfc8870_unwrap
from ctms_media.wire.srtp import AES_CM_128_HMAC_SHA1_32, AES_CM_128_HMAC_SHA1_80

from .helpers import Meeting, sdes_packet

FORMATS = [
    ("ctms", 1, AES_CM_128_HMAC_SHA1_80),
    ("ctms", 2, AES_CM_128_HMAC_SHA1_32),
    ("ctms", 3, AES_CM_128_HMAC_SHA1_80),
    ("rfc8870", 2, AES_CM_128_HMAC_SHA1_32),
    ("rfc8870", 3, AES_CM_128_HMAC_SHA1_80),
]
FORMAT_IDS = [f"{f}-c{c}-{p.rtp_tag_len * 8}" for f, c, p in FORMATS]
SSRC = 0x5EED0001


def _meeting(make_forwarder, fmt: str, cipher: int, profile) -> Meeting:
    """Two groups (a receiver on another SPI gets re-wrapped trailers) and two receivers."""
    m = Meeting(make_forwarder, fmt, cipher, profile, seed=11)
    m.group(100)
    m.group(200)
    m.receiver("same-spi", 1, 100)
    m.receiver("other-spi", 2, 200)
    return m


def _rooms(m: Meeting) -> dict[str, EktReceiver]:
    return {r.id: EktReceiver({r.spi: m.groups[r.spi]}) for r in m.receivers}


def _check_trailer(m: Meeting, out: bytes, spi: int, sender: SenderStream, roc: int) -> None:
    """An upgraded or re-wrapped trailer: the receiver's SPI, the packet's ROC, the key's
    ISN (CTMS) or the sender's Epoch (RFC 8870)."""
    g = m.groups[spi]
    if m.ekt_format == "ctms":
        if not out[-1] & 1:
            raise AssertionError("expected a long CTMS trailer")
        n = {1: 16, 2: 24, 3: 24}[g.cipher] + 8
        t = CtmsLong.decode(out[-n:])
        assert (t.spi, t.roc, t.isn) == (spi, roc, sender.key_start & 0xFFFF)
    else:
        assert out[-1] == 0x02, "expected a full RFC 8870 trailer"
        f = Rfc8870Full.decode(out[-47:])
        pt = rfc8870_unwrap(g.kek, f.ciphertext)
        assert (f.spi, f.epoch, pt.roc, pt.ssrc) == (spi, sender.epoch, roc, SSRC)


def _forward_rtp(m, rooms, sender, long=False, expect_long_for=()) -> bytes:
    """One RTP packet of ``sender``: forwarded to every receiver, each decrypts it."""
    roc = sender.roc
    packet, plain = sender.rtp(m.payload(), tail=0x85, long=long)
    v = m.fwd.forward(packet)
    assert v.drop is None, f"dropped as {v.drop} at ROC {roc} SEQ {plain[2] << 8 | plain[3]}"
    assert v.tail == 0x85
    got = v.by_receiver()
    assert set(got) == {r.id for r in m.receivers}
    for r in m.receivers:
        if r.id in expect_long_for:
            _check_trailer(m, got[r.id], r.spi, sender, roc)
        dec = rooms[r.id].receive(got[r.id])
        assert dec is not None, rooms[r.id].failure_reasons
        assert dec[16:] == plain[16:] and dec[:15] == plain[:15]
    return packet


def _forward_sdes(m: Meeting, sender: SenderStream) -> None:
    v = m.fwd.forward(sender.rtcp(sdes_packet(SSRC), long=True), rtcp=True)
    assert v.drop is None, f"SDES dropped as {v.drop}"
    assert {rid for _, ids in v.outputs for rid in ids} == {r.id for r in m.receivers}


@pytest.mark.parametrize("first", ["rtp", "srtcp"])
@pytest.mark.parametrize("seq", [1000, 40000, 65530], ids=["low-half", "high-half", "pre-wrap"])
@pytest.mark.parametrize("roc", [0, 3], ids=["roc0", "roc3"])
@pytest.mark.parametrize(("fmt", "cipher", "profile"), FORMATS, ids=FORMAT_IDS)
def test_a_first_key_covers_the_stream_from_its_first_rtp_packet(
    make_forwarder, fmt, cipher, profile, roc, seq, first
):
    """wire.md §5/§6: the ROC comes from the first long trailer that verifies; a key first
    seen on SRTCP starts at ``ROC << 16 | ISN`` (CTMS) or ``ROC << 16`` (RFC 8870), so the
    following short-trailer RTP is index ``ROC << 16 | SEQ``, covered and forwarded, each
    receiver's first packet upgraded for its own SPI with the packet's ROC."""
    m = _meeting(make_forwarder, fmt, cipher, profile)
    s = m.sender(SSRC, "audio", seq=seq, roc=roc)
    rooms = _rooms(m)
    if first == "srtcp":
        _forward_sdes(m, s)
        s._announce = False  # the RTP that follows carries short trailers only
    everyone = {r.id for r in m.receivers}
    _forward_rtp(m, rooms, s, expect_long_for=everyone)
    for _ in range(11):  # crosses the rollover from the pre-wrap SEQ
        _forward_rtp(m, rooms, s)
    assert all(r.failed == 0 for r in rooms.values())


@pytest.mark.parametrize("roc", [0, 3], ids=["roc0", "roc3"])
@pytest.mark.parametrize(("fmt", "cipher", "profile"), FORMATS, ids=FORMAT_IDS)
def test_a_key_first_seen_on_srtcp_does_not_cover_rtp_before_its_ctms_isn(
    make_forwarder, fmt, cipher, profile, roc
):
    """A short-trailer packet below the first key's start is ``no_key`` (CTMS: the SDES
    names ISN 40000, so SEQ 39990 of the same ROC is before the key); in RFC 8870 the key
    starts at ``ROC << 16`` and covers it."""
    m = _meeting(make_forwarder, fmt, cipher, profile)
    s = m.sender(SSRC, "audio", seq=40000, roc=roc)
    _forward_sdes(m, s)
    s._announce = False
    s.seq = 39990
    before = m.fwd.state_snapshot()
    v = m.fwd.forward(s.rtp(m.payload(), tail=0)[0])
    if fmt == "ctms":
        assert v.drop == "no_key"
        assert m.fwd.state_snapshot() == before
    else:
        assert v.drop is None


@pytest.mark.parametrize("announce", ["rtp", "srtcp"])
@pytest.mark.parametrize("roc", [0, 3], ids=["roc0", "roc3"])
@pytest.mark.parametrize(("fmt", "cipher", "profile"), FORMATS, ids=FORMAT_IDS)
def test_a_rekey_across_a_rollover_keeps_late_packets_under_the_old_key(
    make_forwarder, fmt, cipher, profile, roc, announce
):
    """A second key starts at SEQ 0 of ROC r + 1 (announced on SRTCP or on RTP); a late
    packet of ROC r arriving after it still verifies under the old key and goes out in its
    own (short) form; the new key is upgraded to every receiver."""
    m = _meeting(make_forwarder, fmt, cipher, profile)
    s = m.sender(SSRC, "video", seq=65528, roc=roc)
    rooms = _rooms(m)
    everyone = {r.id for r in m.receivers}
    _forward_rtp(m, rooms, s, expect_long_for=everyone)
    for _ in range(4):  # 65529 .. 65532
        _forward_rtp(m, rooms, s)
    late, late_plain = s.rtp(m.payload(), tail=0x40)  # 65533, held back
    _forward_rtp(m, rooms, s)  # 65534
    _forward_rtp(m, rooms, s)  # 65535
    assert s.seq == 0 and s.roc == roc + 1
    old_key, old_start = s.master_key, s.key_start
    s.rekey(m.rand(16))
    if announce == "srtcp":
        _forward_sdes(m, s)
        s._announce = False
    _forward_rtp(m, rooms, s, expect_long_for=everyone)
    _forward_rtp(m, rooms, s)
    v = m.fwd.forward(late)
    assert v.drop is None, f"late packet dropped as {v.drop}"
    got = v.by_receiver()
    assert set(got) == everyone
    for out in got.values():  # its own (short) form, the tail byte gone, the old key's tag
        assert out.endswith(late[-1:]) and len(out) == len(late) - 1
        # (a room holds one key per SSRC, so the old key's oracle is a session of its own)
        dec = m.oracle().unprotect(out, SSRC, old_key, m.salt, profile, start_index=old_start)
        assert dec[16:] == late_plain[16:]
    for _ in range(3):
        _forward_rtp(m, rooms, s)
    assert all(r.failed == 0 for r in rooms.values())


@pytest.mark.parametrize(
    ("isn", "seq"), [(1000, 40000), (20000, 65530)], ids=["isn-low-seq-high", "isn-mid-pre-wrap"]
)
@pytest.mark.parametrize("roc", [0, 3], ids=["roc0", "roc3"])
@pytest.mark.parametrize(("fmt", "cipher", "profile"), FORMATS, ids=FORMAT_IDS)
def test_a_key_announced_on_srtcp_long_after_its_start_covers_the_current_rtp(
    make_forwarder, fmt, cipher, profile, roc, isn, seq
):
    """The key started at ``isn`` (its RTP never reached the relay); the first thing the
    relay sees is an SRTCP SDES naming it, then short-trailer RTP more than 2^15 past the
    key's start. The packet is ``ROC << 16 | SEQ`` (the ROC from the trailer), not an
    estimate against the key's start one ROC back."""
    m = _meeting(make_forwarder, fmt, cipher, profile)
    s = m.sender(SSRC, "video", seq=isn, roc=roc)
    s.skip_to(seq)
    assert (s.key_start, s.roc) == ((roc << 16) | isn, roc)
    rooms = _rooms(m)
    _forward_sdes(m, s)
    s._announce = False
    _forward_rtp(m, rooms, s, expect_long_for={r.id for r in m.receivers})
    for _ in range(9):
        _forward_rtp(m, rooms, s)
    assert all(r.failed == 0 for r in rooms.values())
