"""Relay configuration: a TOML file, every key optional, defaults that run on loopback.

```toml
[media]
host = "127.0.0.1"        # address the endpoints' UDP ports bind to and are announced at
port_min = 16384          # the RTP range of the source's Table A-6
port_max = 32768

[api]
host = "127.0.0.1"
port = 8080

[dtls]
certificate = "ctms-relay.pem"   # created on first start; its fingerprint survives restarts

[log]
level = "INFO"

[limits]                  # bounds on what one relay process holds (docs/security.md)
conferences = 64
endpoints_per_conference = 48
streams_per_endpoint = 8  # 4 positions x (audio, video) is the most a room can declare
streams_per_conference = 256
datagram_bytes = 2048     # larger datagrams are dropped as malformed, unread
```
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ctms_media.errors import ConfigError

# Setting -> its (section, key) in the TOML file: read by ``from_mapping``, written by
# ``to_toml``, so the file format lives in one place.
TOML_KEYS: dict[str, tuple[str, str]] = {
    "media_host": ("media", "host"),
    "port_min": ("media", "port_min"),
    "port_max": ("media", "port_max"),
    "api_host": ("api", "host"),
    "api_port": ("api", "port"),
    "certificate": ("dtls", "certificate"),
    "log_level": ("log", "level"),
    "max_conferences": ("limits", "conferences"),
    "max_endpoints_per_conference": ("limits", "endpoints_per_conference"),
    "max_streams_per_endpoint": ("limits", "streams_per_endpoint"),
    "max_streams_per_conference": ("limits", "streams_per_conference"),
    "max_datagram": ("limits", "datagram_bytes"),
}


@dataclass(frozen=True)
class RelayConfig:
    """Every setting of one relay process. A new setting is a field with its default plus a
    row in ``from_mapping``'s ``known`` table; it then reaches ``serve --workers`` workers
    through :meth:`to_json` without further code (fields must stay JSON scalars)."""

    media_host: str = "127.0.0.1"
    port_min: int = 16384
    port_max: int = 32768
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    certificate: str = "ctms-relay.pem"
    log_level: str = "INFO"
    max_conferences: int = 64
    max_endpoints_per_conference: int = 48
    max_streams_per_endpoint: int = 8
    max_streams_per_conference: int = 256
    max_datagram: int = 2048

    def __post_init__(self) -> None:
        if not 1 <= self.port_min <= self.port_max <= 65535:
            raise ConfigError(f"media port range {self.port_min}-{self.port_max} is not valid")
        if not 0 <= self.api_port <= 65535:
            raise ConfigError(f"api port {self.api_port} is not valid")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(
                f"log level {self.log_level!r} is not one of DEBUG INFO WARNING ERROR"
            )
        counts = (self.max_conferences, self.max_endpoints_per_conference)
        counts += (self.max_streams_per_endpoint, self.max_streams_per_conference)
        if min(counts) < 1:
            raise ConfigError("config: every [limits] count must be at least 1")
        if not 1200 <= self.max_datagram <= 65535:  # 1200: a DTLS flight's datagram must fit
            raise ConfigError(
                f"config: limits.datagram_bytes {self.max_datagram} is not in 1200..65535"
            )

    @classmethod
    def from_toml(cls, path: str | Path) -> RelayConfig:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not TOML: {exc}") from None
        return cls.from_mapping(doc)

    @classmethod
    def from_mapping(cls, doc: dict[str, Any]) -> RelayConfig:
        known = {key: name for name, key in TOML_KEYS.items()}
        values: dict[str, Any] = {}
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"config: [{section}] must be a table")
            for key, value in table.items():
                name = known.get((section, key))
                if name is None:
                    raise ConfigError(f"config: unknown key {section}.{key}")
                want = {f.name: f.type for f in fields(cls)}[name]
                kind = int if want == "int" else str
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise ConfigError(f"config: {section}.{key} must be {want}")
                values[name] = value
        return cls(**values)

    @classmethod
    def on_loopback(
        cls, directory: Path, port_min: int, port_max: int, api_port: int, **settings: Any
    ) -> RelayConfig:
        """A relay on 127.0.0.1 with its certificate in ``directory``: what tools that run
        ``ctms-media serve`` beside themselves (the soak, the tests) write with ``to_toml``."""
        return cls(
            media_host="127.0.0.1",
            port_min=port_min,
            port_max=port_max,
            api_host="127.0.0.1",
            api_port=api_port,
            certificate=(Path(directory) / "relay.pem").as_posix(),
            **settings,
        )

    def to_toml(self) -> str:
        """The settings as a TOML file ``from_toml`` reads back (tools that start
        ``ctms-media serve`` as a subprocess write their config with it)."""
        sections: dict[str, list[str]] = {}
        for name, (section, key) in TOML_KEYS.items():
            sections.setdefault(section, []).append(f"{key} = {json.dumps(getattr(self, name))}")
        return "".join(f"[{sec}]\n" + "\n".join(lines) + "\n" for sec, lines in sections.items())

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON, to hand to a worker process (``serve --workers``)."""
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RelayConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(doc) - names
        if unknown:
            raise ConfigError(f"config: unknown settings {sorted(unknown)}")
        return cls(**doc)
