"""Conference configuration values and group parameter sets (conference/model.py)."""

from __future__ import annotations

import random

import pytest

from ctms_media.conference import (
    Conference,
    ConferenceConfig,
    EndpointConfig,
    StreamConfig,
    new_group,
)
from ctms_media.errors import ConfigError, CtmsError
from ctms_media.wire.control import Gsp, decode_control, encode_control
from ctms_media.wire.srtp import AES_CM_128_HMAC_SHA1_32, AES_CM_128_HMAC_SHA1_80

from .test_conference_support import FINGERPRINT, endpoint


def streams(*spec: tuple[int, str, int]) -> tuple[StreamConfig, ...]:
    return tuple(StreamConfig(*s) for s in spec)


# -- streams and endpoints ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, "data", 2), "kind must be 'audio' or 'video'"),
        ((1, "audio", 0), "position must be 1..4"),
        ((1, "audio", 5), "position must be 1..4"),
        ((-1, "audio", 2), "does not fit 32 bits"),
        ((1 << 32, "audio", 2), "does not fit 32 bits"),
        (("1", "audio", 2), "ssrc must be an integer"),
    ],
)
def test_stream_validation(args, message):
    with pytest.raises(ConfigError, match=message):
        StreamConfig(*args)


@pytest.mark.parametrize("pos", [2, 4])
def test_one_segment_streams_sit_at_center_or_aux(pos):
    EndpointConfig("e", 1, False, None, streams=streams((1, "audio", pos), (2, "video", pos)))


@pytest.mark.parametrize("pos", [1, 3])
def test_one_segment_endpoint_refuses_side_positions(pos):
    with pytest.raises(ConfigError, match="a 1-segment endpoint's streams sit at position 2, 4"):
        EndpointConfig("e", 1, False, None, streams=streams((7, "audio", pos)))


def test_three_segment_endpoint_takes_every_position():
    spec = [(p, "audio", p) for p in (1, 2, 3, 4)] + [(10 + p, "video", p) for p in (1, 2, 3, 4)]
    ep = EndpointConfig("e", 3, True, FINGERPRINT, streams=streams(*spec))
    assert ep.stream_at("video", 3) == StreamConfig(13, "video", 3)
    assert ep.stream_at("audio", 4) == StreamConfig(4, "audio", 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"segments": 2}, "segments must be 1 or 3"),
        ({"segments": True}, "segments must be an integer"),
        ({"id": ""}, "endpoint id must be a non-empty string"),
        ({"secure": "yes"}, "secure must be true or false"),
        ({"secure": True, "fingerprint": None}, "a secure endpoint needs a fingerprint"),
        ({"fingerprint": "AB:CD"}, "fingerprint must read like"),
        ({"profile": "AES_GCM"}, "unknown SRTP profile"),
        ({"streams": streams((5, "audio", 1), (5, "video", 2))}, "SSRC 5 is declared twice"),
        ({"streams": streams((5, "audio", 1), (6, "audio", 1))}, "two audio streams at position 1"),
    ],
)
def test_endpoint_validation(kwargs, message):
    base = {"id": "e1", "segments": 3, "secure": False, "fingerprint": None, "streams": ()}
    with pytest.raises(ConfigError, match=message):
        EndpointConfig(**{**base, **kwargs})


def test_endpoint_from_json():
    ep = EndpointConfig.from_json(
        {
            "id": "room-7",
            "segments": 1,
            "secure": True,
            "fingerprint": FINGERPRINT,
            "streams": [
                {"ssrc": 70, "kind": "audio", "position": 2},
                {"ssrc": 71, "kind": "video", "position": 2},
            ],
        }
    )
    assert ep.profile == "AES_CM_128_HMAC_SHA1_80"
    assert ep.srtp_profile is AES_CM_128_HMAC_SHA1_80
    assert ep.streams == streams((70, "audio", 2), (71, "video", 2))
    with pytest.raises(ConfigError, match="unknown endpoint field"):
        EndpointConfig.from_json({"id": "x", "segments": 1, "secure": False, "colour": 1})
    with pytest.raises(ConfigError, match="endpoint needs 'segments'"):
        EndpointConfig.from_json({"id": "x", "secure": False})
    with pytest.raises(ConfigError, match="stream needs 'kind'"):
        EndpointConfig.from_json(
            {"id": "x", "segments": 1, "secure": False, "streams": [{"ssrc": 1, "position": 2}]}
        )


# -- conferences -------------------------------------------------------------------------------


def test_conference_config_defaults_and_validation():
    c = ConferenceConfig.from_json({"id": "c", "security": "secure", "switching": "segment"})
    assert (c.audio_streams, c.ekt_format, c.cipher) == (3, "ctms", 1)
    assert ConferenceConfig("c", "secure", "room", ekt_format="rfc8870").cipher == 2
    for kwargs, message in [
        ({"security": "maybe"}, "security must be one of"),
        ({"switching": "voice"}, "switching must be 'segment' or 'room'"),
        ({"audio_streams": 0}, "audio_streams must be at least 1"),
        ({"ekt_format": "sdes"}, "ekt_format must be"),
        ({"ekt_format": "rfc8870", "ekt_cipher": 1}, "AES_128_ECB.*invalid"),
        ({"ekt_cipher": 9}, "unknown EKT cipher"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ConferenceConfig(**{"id": "c", "security": "secure", "switching": "room", **kwargs})
    with pytest.raises(ConfigError, match="unknown conference field"):
        ConferenceConfig.from_json({"id": "c", "security": "secure", "switchng": "room"})


def test_ssrcs_are_unique_across_the_conference_and_ids_too():
    conf = Conference(ConferenceConfig("c", "non-secure", "segment"), 0.0, random.Random(1))
    conf.add_endpoint(endpoint("A", 100, secure=False), 0.0)
    clash = EndpointConfig("B", 1, False, None, streams=streams((102, "audio", 2)))
    with pytest.raises(ConfigError, match="SSRC 102 is already used by endpoint A"):
        conf.add_endpoint(clash, 0.0)
    with pytest.raises(ConfigError, match="endpoint A is already in conference c"):
        conf.add_endpoint(endpoint("A", 500, secure=False), 0.0)
    assert conf.endpoint_ids() == ["A"]


def test_one_srtp_profile_per_secure_conference():
    conf = Conference(ConferenceConfig("c", "secure", "segment"), 0.0, random.Random(1))
    conf.add_endpoint(endpoint("A", 100), 0.0)
    with pytest.raises(ConfigError, match="SRTP profile AES_CM_128_HMAC_SHA1_32 differs"):
        conf.add_endpoint(endpoint("B", 200, profile="AES_CM_128_HMAC_SHA1_32"), 0.0)


# -- group parameter sets ----------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "top"), [("ctms", 0x7FFF), ("rfc8870", 0xFFFF)])
def test_spi_range(fmt, top):
    rng = random.Random(5)
    spis = [new_group(rng, fmt, 2, "AES_CM_128_HMAC_SHA1_80").spi for _ in range(400)]
    assert all(1 <= s <= top for s in spis)
    assert max(spis) > top // 2  # the whole field is used, not just its low half


@pytest.mark.parametrize(("cipher", "kek_len"), [(1, 16), (2, 16), (3, 32)])
def test_kek_length_follows_the_cipher(cipher, kek_len):
    g = new_group(random.Random(1), "ctms", cipher, AES_CM_128_HMAC_SHA1_32)
    assert len(g.kek) == kek_len and len(g.salt) == 14
    assert g.profile is AES_CM_128_HMAC_SHA1_32


def test_rekey_keeps_salt_and_avoids_spis():
    rng = random.Random(2)
    first = new_group(rng, "ctms", 2, "AES_CM_128_HMAC_SHA1_80")
    avoid = set(range(1, 0x7FFF)) - {0x7FFF}  # only 0x7FFF is left
    second = new_group(rng, "ctms", 2, first.profile, salt=first.salt, avoid_spis=avoid)
    assert second.spi == 0x7FFF
    assert second.salt == first.salt and second.kek != first.kek
    with pytest.raises(ConfigError, match="every SPI value is in use"):
        new_group(rng, "ctms", 2, first.profile, avoid_spis=range(1, 0x8000))


def test_group_as_gsp_and_for_the_forwarder():
    g = new_group(random.Random(3), "rfc8870", 3, "AES_CM_128_HMAC_SHA1_80")
    msg = g.gsp()
    assert msg == Gsp(g.spi, 3, 2, 0x0001, g.kek, g.salt)
    assert decode_control(encode_control(msg, 0x1234)) == (0x1234, msg)
    assert g.forwarder_args() == (g.spi, 3, g.kek, g.salt, AES_CM_128_HMAC_SHA1_80)
    assert g.kek.hex() not in repr(g)
    with pytest.raises(CtmsError):
        new_group(random.Random(3), "rfc8870", 1, "AES_CM_128_HMAC_SHA1_80")
