"""The engine's routes and groups driving the real reference forwarder with libsrtp rooms:
a display switch lands exactly at the new source's IDR packet and the receiving room
decrypts that very packet; a rekey on leave keeps everyone decrypting."""

from __future__ import annotations

import os
import random

from ctms_media.conference import (
    Conference,
    ConferenceConfig,
    EktGroupSpec,
    GroupsChanged,
    SendGsp,
    SendPli,
)
from ctms_media.forward.forwarder import Forwarder
from ctms_media.forward.verdict import Verdict
from ctms_media.sim.srtp_room import EktGroup, EktReceiver, SenderStream

from .test_conference_support import aud, endpoint, vid

A, B, C, R = 100, 200, 300, 400
VOICE, FRAME, IDR = 0x80 | 10, 0x40, 0xC0


class Server:
    """The few lines of the server's loop that sit between the engine and the forwarder."""

    def __init__(self, conf: Conference) -> None:
        self.conf = conf
        self.fwd = Forwarder(conf.config.ekt_format)
        self.version = -1
        self.now = 0.0
        self.actions: list = []
        self.declared: set[int] = set()

    def sync(self) -> None:
        acts = self.conf.pop_actions()
        self.actions += acts
        if any(isinstance(a, GroupsChanged) for a in acts):
            for g in self.conf.groups():
                if g.spi not in self.fwd.groups:
                    self.fwd.add_group(*g.forwarder_args())
        for ssrc, (eid, stream) in self.conf.streams().items():
            if ssrc not in self.declared:
                cfg = self.conf.endpoint_config(eid)
                assert cfg is not None
                self.fwd.add_stream(ssrc, stream.kind, cfg.srtp_profile)
                self.declared.add(ssrc)
        for ssrc in self.declared - set(self.conf.streams()):
            self.fwd.remove_stream(ssrc)
            self.declared.discard(ssrc)
        if self.conf.routes_version != self.version:
            self.version = self.conf.routes_version
            for ssrc, receivers in self.conf.routes().items():
                self.fwd.set_route(ssrc, receivers)
        keep = {g.spi for g in self.conf.groups()}
        for spi in [s for s in self.fwd.groups if s not in keep]:
            self.fwd.remove_group(spi)

    def send(self, stream: SenderStream, tail: int, long: bool = False) -> tuple[Verdict, bytes]:
        packet, plain = stream.rtp(os.urandom(60), tail, long=long)
        v = self.fwd.forward(packet)
        assert v.drop is None, v.drop
        self.conf.on_tails([(v.ssrc, v.tail)], self.now)
        if v.switched:
            self.conf.on_switched(v.ssrc, v.switched, self.now)
        self.sync()
        return v, plain

    def tick(self, seconds: float = 0.02) -> None:
        self.now = round(self.now + seconds, 9)
        self.conf.tick(self.now)
        self.sync()

    def key(self, eid: str) -> None:
        """DTLS done, then the room ACKs the GSP it gets."""
        self.conf.endpoint_handshake_done(eid, self.now)
        self.sync()
        gsp = [a for a in self.actions if isinstance(a, SendGsp) and a.endpoint_id == eid][-1]
        self.conf.gsp_ack(eid, gsp.group.spi, self.now)
        self.sync()


def ekt_group(spec: EktGroupSpec | None) -> EktGroup:
    assert spec is not None
    return EktGroup(spec.spi, spec.cipher, spec.kek, spec.salt, spec.profile, spec.ekt_format)


def payload_of(plain: bytes) -> bytes:
    return plain[16:]  # after the 12-byte header and CSRC[0]


def test_display_switches_at_the_idr_and_the_room_decrypts_the_first_packet():
    conf = Conference(
        ConferenceConfig("c", "secure", "segment", ekt_cipher=2), 0.0, random.Random(9)
    )
    srv = Server(conf)
    for eid, base in (("A", A), ("B", B), ("R", R)):
        conf.add_endpoint(endpoint(eid, base, segments=1), srv.now)
        srv.key(eid)
    group = ekt_group(conf.current_group)
    rng = random.Random(4)

    def stream(ssrc: int, kind: str) -> SenderStream:
        return SenderStream(
            ssrc, kind, group, rng.randbytes(16), position=2, seq=rng.randint(0, 60000)
        )

    a_audio, a_video = stream(aud(A, 2), "audio"), stream(vid(A, 2), "video")
    b_audio, b_video = stream(aud(B, 2), "audio"), stream(vid(B, 2), "video")
    room = EktReceiver({group.spi: group})

    # A talks; R's display opens to A at A's IDR.
    for _ in range(20):
        srv.send(a_audio, VOICE)
        srv.send(b_audio, 0x7F)
        srv.tick()
    v, _ = srv.send(a_video, IDR)
    assert "R" in v.switched
    assert conf.snapshot({})["displays"]["R"] == {"2": {"endpoint": "A", "position": 2}}

    # B talks for a second: the engine decides to switch R's display and PLIs B.
    srv.actions.clear()
    for _ in range(50):
        srv.send(a_audio, 0x7F)
        srv.send(b_audio, VOICE)
        srv.send(a_video, FRAME)
        srv.tick()
    assert SendPli("B", vid(B, 2)) in srv.actions
    assert any(r.id == "R" and r.gated for r in srv.fwd.routes[vid(B, 2)])

    v, _ = srv.send(b_video, FRAME)  # B's frames before its IDR reach nobody
    assert v.for_receiver("R") is None and v.switched == ()
    v, plain = srv.send(a_video, FRAME)  # the old source flows until the switch
    assert v.for_receiver("R") is not None

    v, plain = srv.send(b_video, IDR)  # the IDR: R's display opens to B here
    assert "R" in v.switched
    out = v.for_receiver("R")
    assert out is not None and out[15] == 2  # CSRC destination: R's center display
    got = room.receive(out)
    assert got is not None and payload_of(got) == payload_of(plain) and room.failed == 0
    assert conf.snapshot({})["displays"]["R"] == {"2": {"endpoint": "B", "position": 2}}

    v, _ = srv.send(a_video, FRAME)  # and the old source is closed
    assert v.for_receiver("R") is None
    v, plain = srv.send(b_video, FRAME)
    assert payload_of(room.receive(v.for_receiver("R"))) == payload_of(plain)


def trailer_spi(packet: bytes) -> int | None:
    """SPI of a CTMS long trailer, None for the short form."""
    flag = int.from_bytes(packet[-2:], "big")
    return flag >> 1 if flag & 1 else None


def test_rekey_on_leave_with_the_real_forwarder():
    conf = Conference(ConferenceConfig("c", "secure", "segment"), 0.0, random.Random(2))
    srv = Server(conf)
    for eid, base in (("A", A), ("B", B), ("R", R)):
        conf.add_endpoint(endpoint(eid, base, segments=1), srv.now)
        srv.key(eid)
    old = ekt_group(conf.current_group)
    room = EktReceiver({old.spi: old})  # R, as it really works: keys only from trailers
    b_audio = SenderStream(aud(B, 2), "audio", old, os.urandom(16), position=2)
    srv.send(b_audio, VOICE)  # B's first words put it in the audio set
    for i in range(9):
        v, plain = srv.send(b_audio, VOICE, long=i % 3 == 0)
        assert payload_of(room.receive(v.for_receiver("R"))) == payload_of(plain)
        srv.tick()

    conf.remove_endpoint("A", srv.now)
    srv.sync()
    assert vid(A, 2) not in srv.fwd.streams and conf.rekeys == 1
    new = ekt_group(conf.current_group)
    assert set(srv.fwd.groups) == {old.spi, new.spi}

    # R takes the new SPI; B still sends under the old one: the relay re-wraps for R.
    conf.gsp_ack("R", new.spi, srv.now)
    srv.sync()
    room.groups[new.spi] = new
    v, plain = srv.send(b_audio, VOICE, long=True)
    out = v.for_receiver("R")
    assert trailer_spi(out) == new.spi
    only_new = EktReceiver({new.spi: new})  # the KEK the leaver never had is enough
    assert payload_of(only_new.receive(out)) == payload_of(plain)
    v, plain = srv.send(b_audio, VOICE)
    assert payload_of(room.receive(v.for_receiver("R"))) == payload_of(plain)

    # B moves to the new SPI and a new key; both report REKEY-DONE: the old group goes.
    conf.gsp_ack("B", new.spi, srv.now)
    b_audio.rekey(os.urandom(16), new)
    v, plain = srv.send(b_audio, VOICE)  # a new key is announced in the long form
    assert payload_of(only_new.receive(v.for_receiver("R"))) == payload_of(plain)
    conf.rekey_done("B", new.spi, srv.now)
    conf.rekey_done("R", new.spi, srv.now)
    srv.sync()
    assert set(srv.fwd.groups) == {new.spi} and [g.spi for g in conf.groups()] == [new.spi]
    v, plain = srv.send(b_audio, VOICE)
    assert payload_of(only_new.receive(v.for_receiver("R"))) == payload_of(plain)
