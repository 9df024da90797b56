"""Network REST routes: the caller's channels, bandwidth usage records and gateways, the DNS
records administrators manage, and the totals the bandwidth and gateway triggers keep.

The routes are generic resources (server/edge/resources.py); docs/protocol.md lists them.
"""

from __future__ import annotations

from aiohttp import web

from db import infra
from db.pool import POOL
from server.core.identity import Identity
from server.edge.resources import Resource, add_resource
from server.edge.rest import endpoint, ok_response
from server.edge.schemas import MAX_INTEGER_ID, obj, string, text, update_schema
from server.services.resources import Collection, network_usage

routes = web.RouteTableDef()

NETWORK = "/api/v1/network"
# Lower-case only: domain_name is UNIQUE as written, so one spelling per name.
DOMAIN = string(3, 253, pattern="^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
IP_ADDRESS = {"anyOf": [{"type": "string", "maxLength": 45, "format": "ipv4"},
                        {"type": "string", "maxLength": 45, "format": "ipv6"}, {"type": "null"}]}
AMOUNT = {"type": "integer", "minimum": 0, "maximum": MAX_INTEGER_ID}

CHANNEL_FIELDS = {"access_point": text()}
DNS_FIELDS = {"domain_name": DOMAIN, "ip_address": IP_ADDRESS}

RESOURCES = (
    Resource(NETWORK + "/channels", Collection(infra.CHANNEL, "channels", "channel"),
             create=obj(CHANNEL_FIELDS, required=("access_point",)), update=update_schema(CHANNEL_FIELDS)),
    Resource(NETWORK + "/dns", Collection(infra.DNS, "records", "dns record"),
             create=obj(DNS_FIELDS, required=("domain_name",)), update=update_schema(DNS_FIELDS), writer="admin"),
    # Usage records and gateways are facts the triggers total on insert and delete; they are not edited.
    Resource(NETWORK + "/bandwidth", Collection(infra.BANDWIDTH, "records", "bandwidth record"),
             create=obj({"bandwidth_limit": AMOUNT, "usage": AMOUNT}, required=("bandwidth_limit", "usage"))),
    Resource(NETWORK + "/gateways", Collection(infra.GATEWAY, "gateways", "gateway"),
             create=obj({"share_point": text()}, required=("share_point",))),
)


@routes.get(NETWORK + "/usage")
@endpoint(auth="user")
async def handle_usage(request: web.Request, identity: Identity) -> web.Response:
    """The caller's bandwidth totals and gateway share, as the triggers keep them (null when none)."""
    return ok_response(await network_usage(request.app[POOL], identity.user_id))


for _resource in RESOURCES:
    add_resource(routes, _resource)
