"""The admin API of wire.md §9 over aiohttp, and /metrics for Prometheus.

One process serves it straight from its :class:`Relay`. Under ``serve --workers N`` every
worker serves this same app on a private unix socket (plus ``GET /internal/stats``, the
counters as JSON) and the parent (``server/supervisor.py``) routes the public calls to it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from ctms_media.conference.model import ConferenceConfig, EndpointConfig, SecurityMismatch
from ctms_media.errors import ConfigError, CtmsError, LimitReached
from ctms_media.server.relay import Relay
from ctms_media.server.stats import RelayCollector, StatsSnapshot

log = logging.getLogger("ctms_media.api")

MAX_BODY = 64 * 1024  # the largest admin body (an endpoint with 8 streams) is under 1 KiB
RELAY_KEY = web.AppKey("relay", Relay)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body is not JSON"}), content_type="application/json"
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body must be a JSON object"}),
            content_type="application/json",
        )
    return body


async def create_conference(request: web.Request) -> web.Response:
    relay = request.app[RELAY_KEY]
    try:
        config = ConferenceConfig.from_json(await _body(request))
        if config.id in relay.conferences:
            return _error(409, f"conference {config.id} exists")
        relay.create_conference(config)
    except ConfigError as exc:
        return _error(400, str(exc))
    except LimitReached as exc:  # [limits] conferences: the relay is full, not the body wrong
        return _error(503, str(exc))
    return web.json_response(relay.snapshot(config.id), status=201)


async def list_conferences(request: web.Request) -> web.Response:
    relay = request.app[RELAY_KEY]
    return web.json_response([relay.snapshot(cid) for cid in relay.conferences])


async def get_conference(request: web.Request) -> web.Response:
    relay = request.app[RELAY_KEY]
    cid = request.match_info["id"]
    if cid not in relay.conferences:
        return _error(404, f"no conference {cid}")
    return web.json_response(relay.snapshot(cid))


async def delete_conference(request: web.Request) -> web.Response:
    relay = request.app[RELAY_KEY]
    cid = request.match_info["id"]
    if cid not in relay.conferences:
        return _error(404, f"no conference {cid}")
    relay.delete_conference(cid)
    return web.Response(status=204)


async def add_endpoint(request: web.Request) -> web.Response:
    relay = request.app[RELAY_KEY]
    cid = request.match_info["id"]
    if cid not in relay.conferences:
        return _error(404, f"no conference {cid}")
    try:
        config = EndpointConfig.from_json(await _body(request))
        if config.id in relay.conferences[cid].endpoints:
            return _error(409, f"endpoint {config.id} is already in conference {cid}")
        ep = await relay.add_endpoint(cid, config)
    except SecurityMismatch:
        return _error(409, "security mismatch")
    except ConfigError as exc:
        return _error(400, str(exc))
    except CtmsError as exc:  # ports exhausted and the like
        return _error(503, str(exc))
    except KeyError:  # the conference was deleted while the endpoint's port was bound
        return _error(404, f"no conference {cid}")
    return web.json_response(
        {
            "host": relay.config.media_host,
            "port": ep.port,
            "fingerprint": relay.fingerprint,
            "setup": "passive",
        },
        status=201,
    )


async def remove_endpoint(request: web.Request) -> web.Response:
    relay = request.app[RELAY_KEY]
    cid, eid = request.match_info["id"], request.match_info["eid"]
    conf = relay.conferences.get(cid)
    if conf is None:
        return _error(404, f"no conference {cid}")
    if eid not in conf.endpoints:
        return _error(404, f"no endpoint {eid} in conference {cid}")
    relay.remove_endpoint(cid, eid)
    return web.Response(status=204)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def internal_stats(request: web.Request) -> web.Response:
    """A worker's counters and gauges for the parent to add up (never on the public port)."""
    return web.json_response(StatsSnapshot.of_relay(request.app[RELAY_KEY]).to_json())


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error the API answers is ``{"error": ...}``, including aiohttp's own 404/405."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return _error(exc.status, exc.reason or "error")
    except Exception:  # a bug must still answer in the contract's shape, and be logged
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal error")


def make_app(relay: Relay, *, internal: bool = False) -> web.Application:
    """The API of one relay; ``internal`` adds the worker-only ``/internal/stats``."""
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)
    app[RELAY_KEY] = relay
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RelayCollector(relay))
    app[REGISTRY_KEY] = registry
    app.add_routes(
        [
            web.post("/v1/conferences", create_conference),
            web.get("/v1/conferences", list_conferences),
            web.get("/v1/conferences/{id}", get_conference),
            web.delete("/v1/conferences/{id}", delete_conference),
            web.post("/v1/conferences/{id}/endpoints", add_endpoint),
            web.delete("/v1/conferences/{id}/endpoints/{eid}", remove_endpoint),
            web.get("/metrics", metrics),
        ]
    )
    if internal:
        app.add_routes([web.get("/internal/stats", internal_stats)])
    return app
