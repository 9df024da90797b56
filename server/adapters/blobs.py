"""Blob store interface: local content-addressed files (Walrus-shaped ids) or the Walrus HTTP API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Protocol

import aiohttp
import structlog
from aiohttp import web

from server.core.errors import Unavailable

if TYPE_CHECKING:
    from server.core.settings import Settings

log = structlog.get_logger(__name__)
CHUNK_BYTES = 256 * 1024
TRANSFER_WAIT_SECONDS = 30.0  # how long a Walrus transfer waits for one in flight to end

BLOB_ID = re.compile(r"^[A-Za-z0-9_-]{43}$")


def blob_id_for(data: bytes) -> str:
    """43-character unpadded base64url of a 32-byte digest, the shape of a Walrus blob id."""
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


class BlobStore(Protocol):
    """Where encrypted datasets and documents live."""

    async def put(self, data: bytes) -> str:
        """Store bytes; return the blob id."""

    async def get(self, blob_id: str) -> bytes:
        """The bytes of a blob; KeyError when unknown."""

    async def put_file(self, path: Path) -> str:
        """Store a file's bytes without loading them whole; the store may move the file away."""

    def stream(self, blob_id: str, chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
        """A blob's bytes in chunks; KeyError (on first iteration) when unknown."""

    async def close(self) -> None:
        """Release connections."""


BLOBS: web.AppKey[BlobStore] = web.AppKey("blobs", BlobStore)


class LocalBlobStore:
    """Files under DATA_DIR/blobs, named by content hash, so a repeated upload is stored once."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, blob_id: str) -> Path:
        if not BLOB_ID.match(blob_id):
            raise KeyError(blob_id)
        return self.root / blob_id[:2] / blob_id

    def _put(self, data: bytes) -> str:
        blob_id = blob_id_for(data)
        path = self._path(blob_id)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a reader never sees a half-written blob.
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return blob_id

    def _get(self, blob_id: str) -> bytes:
        try:
            return self._path(blob_id).read_bytes()
        except FileNotFoundError:
            raise KeyError(blob_id) from None

    async def put(self, data: bytes) -> str:
        """Store bytes off the event loop."""
        return await asyncio.to_thread(self._put, data)

    async def get(self, blob_id: str) -> bytes:
        """Read bytes off the event loop."""
        return await asyncio.to_thread(self._get, blob_id)

    def _put_file(self, path: Path) -> str:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
        blob_id = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
        target = self._path(blob_id)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            try:
                # A rename when both live under DATA_DIR; a copy across file systems.
                os.replace(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        return blob_id

    async def put_file(self, path: Path) -> str:
        """Store a file by content hash; the file is moved into the store when possible."""
        return await asyncio.to_thread(self._put_file, path)

    async def stream(self, blob_id: str, chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
        """A blob's bytes in chunks, read off the event loop."""
        try:
            handle = await asyncio.to_thread(self._path(blob_id).open, "rb")
        except FileNotFoundError:
            raise KeyError(blob_id) from None
        try:
            while chunk := await asyncio.to_thread(handle.read, chunk_bytes):
                yield chunk
        finally:
            handle.close()

    async def close(self) -> None:
        """Nothing to release."""


class WalrusBlobStore:
    """The Walrus HTTP API: a publisher stores blobs (PUT /v1/blobs), an aggregator serves them."""

    def __init__(self, publisher_url: str, aggregator_url: str, *, epochs: int = 5,
                 timeout: float = 300.0, session: aiohttp.ClientSession | None = None,
                 max_transfers: int = 100, transfer_wait: float = TRANSFER_WAIT_SECONDS) -> None:
        self.publisher_url = publisher_url.rstrip("/")
        self.aggregator_url = aggregator_url.rstrip("/")
        self.epochs = epochs
        # `connect` would also bound the wait for a free pooled connection, and a transfer queued
        # behind `max_transfers` long downloads then failed after 10 s as "unreachable": that wait
        # is `transfer_wait`, with an error of its own, and the pool itself has no cap.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout)
        self._session = session
        self._owns_session = session is None
        self.max_transfers = max_transfers
        self._transfer_wait = transfer_wait
        self._transfers = asyncio.Semaphore(max_transfers)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=aiohttp.TCPConnector(limit=0))
            self._owns_session = True
        return self._session

    @contextlib.asynccontextmanager
    async def _transfer(self) -> AsyncIterator[None]:
        """Hold one of the WALRUS_MAX_TRANSFERS places; Unavailable if none frees up in time."""
        try:
            async with asyncio.timeout(self._transfer_wait):
                await self._transfers.acquire()
        except TimeoutError:
            log.warning("walrus_transfers_busy", max_transfers=self.max_transfers)
            raise Unavailable(f"all {self.max_transfers} transfers to Walrus are in use; retry shortly") from None
        try:
            yield
        finally:
            self._transfers.release()

    @staticmethod
    def blob_id_from_response(body: object) -> str:
        """The blob id of a publisher answer: `newlyCreated.blobObject.blobId` or `alreadyCertified.blobId`."""
        blob_id = None
        if isinstance(body, dict):
            created, certified = body.get("newlyCreated"), body.get("alreadyCertified")
            if isinstance(created, dict) and isinstance(created.get("blobObject"), dict):
                blob_id = created["blobObject"].get("blobId")
            elif isinstance(certified, dict):
                blob_id = certified.get("blobId")
        if not isinstance(blob_id, str) or not BLOB_ID.match(blob_id):
            raise Unavailable("the Walrus publisher gave an answer without a blob id")
        return blob_id

    async def _store(self, data: object) -> str:
        url = f"{self.publisher_url}/v1/blobs"
        try:
            async with self._transfer(), self._client().put(url, params={"epochs": str(self.epochs)},
                                                            data=data) as response:
                if response.status != 200:
                    detail = (await response.text())[:200]
                    log.warning("walrus_store_failed", status=response.status, detail=detail)
                    raise Unavailable(f"the Walrus publisher answered {response.status}")
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("walrus_store_failed", error=type(exc).__name__)
            raise Unavailable("the Walrus publisher is unreachable") from exc
        blob_id = self.blob_id_from_response(body)
        log.info("walrus_stored", blob_id=blob_id, already_certified="alreadyCertified" in body)
        return blob_id

    async def put(self, data: bytes) -> str:
        """Store bytes through the publisher."""
        return await self._store(data)

    async def put_file(self, path: Path) -> str:
        """Stream a file to the publisher (the file stays where it is)."""
        with path.open("rb") as handle:
            return await self._store(handle)

    async def get(self, blob_id: str) -> bytes:
        """A blob's bytes from the aggregator; KeyError when it has none."""
        return b"".join([chunk async for chunk in self.stream(blob_id)])

    async def stream(self, blob_id: str, chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
        """A blob's bytes from the aggregator in chunks."""
        if not BLOB_ID.match(blob_id):
            raise KeyError(blob_id)
        try:
            async with self._transfer(), self._client().get(f"{self.aggregator_url}/v1/blobs/{blob_id}") as response:
                if response.status == 404:
                    raise KeyError(blob_id)
                if response.status != 200:
                    raise Unavailable(f"the Walrus aggregator answered {response.status}")
                async for chunk in response.content.iter_chunked(chunk_bytes):
                    yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise Unavailable("the Walrus aggregator is unreachable") from exc

    async def close(self) -> None:
        """Close the HTTP session this store opened."""
        if self._owns_session and self._session is not None:
            await self._session.close()


def create_blob_store(settings: "Settings") -> BlobStore:
    """Walrus when both of its URLs are set, else local files under DATA_DIR/blobs."""
    if settings.walrus_publisher_url and settings.walrus_aggregator_url:
        return WalrusBlobStore(settings.walrus_publisher_url, settings.walrus_aggregator_url,
                               epochs=settings.walrus_epochs, max_transfers=settings.walrus_max_transfers)
    if settings.walrus_publisher_url or settings.walrus_aggregator_url:
        log.warning("walrus_half_configured", hint="set both WALRUS_PUBLISHER_URL and WALRUS_AGGREGATOR_URL")
    return LocalBlobStore(settings.data_dir / "blobs")
