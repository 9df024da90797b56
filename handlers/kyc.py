"""KYC REST routes: a user submits an identity document and reads their status; administrators
list submissions, read a document and approve or reject it.

The user hears of every change of their status on `user:{user_id}` (`kyc_status_changed`,
queued through the outbox by server/services/kyc.py).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from db.pool import POOL
from server.adapters.blobs import BLOBS
from server.core.crypto import MASTER_KEY
from server.core.errors import InvalidPayload, PayloadTooLarge
from server.core.identity import Identity
from server.core.settings import SETTINGS
from server.edge.rest import FORM_OVERHEAD_BYTES, endpoint, form_parts, int_query, ok_response, path_int
from server.edge.schemas import (
    DEFAULT_PAGE,
    INTEGER_ID,
    MAX_INTEGER_ID,
    MAX_PAGE,
    PAGE_LIMIT,
    compile_schema,
    obj,
    string,
    validate,
)
from server.services import kyc as service
from server.services.datasets import CHUNK_BYTES

routes = web.RouteTableDef()

STATUSES = (service.PENDING, service.APPROVED, service.REJECTED)
SUBMIT_SCHEMA = obj({"document_type": {"type": "string", "enum": list(service.DOCUMENT_TYPES)}},
                    required=("document_type",))
REASON = string(1, 1000, pattern=r"\S")  # not blank: the user is shown it
APPROVE_SCHEMA = obj({"reason": REASON})
REJECT_SCHEMA = obj({"reason": REASON}, required=("reason",))
LIST_QUERY = obj({"status": {"enum": list(STATUSES)},
                  "after_id": {"type": "integer", "minimum": 0, "maximum": MAX_INTEGER_ID}, "limit": PAGE_LIMIT})
KYC_PATH = {"kyc_id": INTEGER_ID}
_SUBMIT = compile_schema(SUBMIT_SCHEMA)


def _kyc_id(request: web.Request) -> int:
    return path_int(request, "kyc_id", "no such KYC submission")


async def _read_submission(request: web.Request) -> tuple[dict[str, Any], bytes]:
    """The multipart body: the document (bounded by KYC_MAX_BYTES, held in memory) and its fields."""
    limit = request.app[SETTINGS].kyc_max_bytes
    if request.content_length is not None and request.content_length > limit + FORM_OVERHEAD_BYTES:
        raise PayloadTooLarge(f"the document exceeds the limit of {limit} bytes", field="file")
    fields: dict[str, Any] = {}
    document: bytearray | None = None
    async for name, part in form_parts(request, SUBMIT_SCHEMA["properties"],
                                       "a 'file' part and 'document_type'"):
        if name == "file":
            if document is not None:
                raise InvalidPayload("send one file", field="file")
            document = bytearray()
            # read_chunk is not bounded by client_max_size (part.read() is): our own limit applies.
            while chunk := await part.read_chunk(CHUNK_BYTES):
                document += chunk
                if len(document) > limit:
                    raise PayloadTooLarge(f"the document exceeds the limit of {limit} bytes", field="file")
        else:
            if name in fields:
                raise InvalidPayload(f"'{name}' is given twice", field=name)
            fields[name] = (await part.text()).strip()  # small fields: bounded by MAX_PAYLOAD_BYTES
    if not document:
        raise InvalidPayload("'file' is required and must not be empty", field="file")
    return validate(_SUBMIT, fields), bytes(document)


@routes.post("/api/v1/me/kyc")
@endpoint(auth="user", form=SUBMIT_SCHEMA)
async def handle_submit(request: web.Request, identity: Identity) -> web.Response:
    """Submit an identity document (multipart: file + document_type); `201` with the submission."""
    fields, document = await _read_submission(request)
    async with request.app[POOL].acquire() as conn:
        submission = await service.submit(conn, request.app[BLOBS], request.app[MASTER_KEY], identity.user_id,
                                          document_type=fields["document_type"], document=document)
    return ok_response(submission.to_public(), status=201)


@routes.get("/api/v1/me/kyc")
@endpoint(auth="user")
async def handle_own_status(request: web.Request, identity: Identity) -> web.Response:
    """The caller's KYC status and their own submissions, newest first."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.own_status(conn, identity.user_id))


@routes.get("/api/v1/admin/kyc")
@endpoint(auth="admin", query=LIST_QUERY)
async def handle_list(request: web.Request, identity: Identity) -> web.Response:
    """Submissions of one status (`status`, default Pending), oldest first (`after_id`, `limit` up to 100)."""
    status = request.query.get("status") or service.PENDING
    if status not in STATUSES:
        raise InvalidPayload(f"'status' must be one of {', '.join(STATUSES)}", field="status")
    after = int_query(request, "after_id", minimum=0, maximum=MAX_INTEGER_ID)
    limit = int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or DEFAULT_PAGE
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.list_submissions(conn, status, after, limit))


@routes.get("/api/v1/admin/kyc/{kyc_id}/document")
@endpoint(auth="admin", path=KYC_PATH)
async def handle_document(request: web.Request, identity: Identity) -> web.Response:
    """A submission's document, decrypted and authenticated, as an attachment (every read is logged)."""
    kyc_id = _kyc_id(request)
    async with request.app[POOL].acquire() as conn:
        media_type, document = await service.read_document(conn, request.app[BLOBS], request.app[MASTER_KEY], kyc_id,
                                                           admin_user_id=identity.user_id)
    return web.Response(body=document, content_type=media_type, headers={
        "Content-Disposition": f'attachment; filename="kyc-{kyc_id}.{service.EXTENSIONS[media_type]}"',
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


@routes.post("/api/v1/admin/kyc/{kyc_id}/approve")
@endpoint(auth="admin", body=APPROVE_SCHEMA, path=KYC_PATH)
async def handle_approve(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Approve a Pending submission (`reason` optional); the user becomes verified."""
    async with request.app[POOL].acquire() as conn:
        submission = await service.decide(conn, identity.user_id, _kyc_id(request), approve=True,
                                          remarks=body.get("reason"))
    return ok_response(submission.to_public())


@routes.post("/api/v1/admin/kyc/{kyc_id}/reject")
@endpoint(auth="admin", body=REJECT_SCHEMA, path=KYC_PATH)
async def handle_reject(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Reject a Pending submission with a `reason` the user is shown."""
    async with request.app[POOL].acquire() as conn:
        submission = await service.decide(conn, identity.user_id, _kyc_id(request), approve=False,
                                          remarks=body["reason"])
    return ok_response(submission.to_public())
