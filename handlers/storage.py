"""Storage REST routes: the caller's cloud files, with their mirrors, trackers, seeders and peers.

The routes are generic resources (server/edge/resources.py over server/services/resources.py).
Ownership rules are in docs/schema.md ("Storage and network").
"""

from __future__ import annotations

from aiohttp import web

from db import infra
from server.edge.resources import Resource, add_resource
from server.edge.schemas import obj, string, text, update_schema
from server.services.resources import Collection

routes = web.RouteTableDef()

STATUS = {"type": "string", "enum": ["active", "inactive"]}

FILES = "/api/v1/storage/files"
IN_FILE = ("file_id", "file")
FILE_FIELDS = {"file_path": text(), "size": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}}
MIRROR_FIELDS = {"mirror_path": text()}
TRACKER_URL = string(1, 255, pattern="^(https?|udp|wss?)://[^\\s\\u0000-\\u001f\\u007f]+$")
TRACKER_FIELDS = {"tracker_url": TRACKER_URL, "status": STATUS}
SWARM_FIELDS = {"status": STATUS}

RESOURCES = (
    Resource(FILES, Collection(infra.CLOUD, "files", "file"),
             create=obj(FILE_FIELDS, required=("file_path", "size")), update=update_schema(FILE_FIELDS)),
    Resource(FILES + "/{file_id}/mirrors", Collection(infra.MIRROR, "mirrors", "mirror", parent=IN_FILE),
             create=obj(MIRROR_FIELDS, required=("mirror_path",)), update=update_schema(MIRROR_FIELDS)),
    Resource(FILES + "/{file_id}/trackers", Collection(infra.TRACKER, "trackers", "tracker", parent=IN_FILE),
             create=obj(TRACKER_FIELDS, required=("tracker_url",)), update=update_schema(TRACKER_FIELDS)),
    Resource(FILES + "/{file_id}/seeders", Collection(infra.SEEDER, "seeders", "seeder", parent=IN_FILE),
             create=obj(SWARM_FIELDS), update=update_schema(SWARM_FIELDS)),
    Resource(FILES + "/{file_id}/peers", Collection(infra.PEER, "peers", "peer", parent=IN_FILE),
             create=obj(SWARM_FIELDS), update=update_schema(SWARM_FIELDS)),
)
for _resource in RESOURCES:
    add_resource(routes, _resource)
