"""Datasets: format detection, schema and sample inference, encryption into the blob store.

Seller uploads and the demo data take the same path. The plaintext streams through a
`DatasetSpool`: it is hashed (sha256, the seed's data_hash), encrypted with a fresh dataset key
(AES-256-GCM, the pod id as associated data) and written as ciphertext to a temp file under
DATA_DIR. The profile (schema and first rows) is then read by decrypting that file chunk by
chunk, and the ciphertext file goes to the blob store. No plaintext touches the disk and memory
holds one chunk at a time, whatever the size of the dataset.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, TextIO

import structlog
from aiohttp import web

from db.marketplace import SealedDataset
from server.adapters.blobs import BLOBS, BlobStore, create_blob_store
from server.core.crypto import TAG_BYTES, StreamDecryptor, StreamEncryptor, wrap_key
from server.core.errors import InvalidPayload, PayloadTooLarge
from server.core.settings import SETTINGS

log = structlog.get_logger(__name__)

CHUNK_BYTES = 256 * 1024
SAMPLE_ROWS = 10
MAX_COLUMNS = 1000
MAX_CELL_CHARS = 1_000_000  # one CSV field; csv's default (128 KiB) refuses legitimate wide cells

CSV, JSONL = "csv", "jsonl"
MEDIA_TYPES = {CSV: "text/csv", JSONL: "application/x-ndjson"}
_EXTENSIONS = {".csv": CSV, ".jsonl": JSONL, ".ndjson": JSONL}
_CONTENT_TYPES = {"text/csv": CSV, "application/csv": CSV, "application/x-ndjson": JSONL,
                  "application/ndjson": JSONL, "application/jsonl": JSONL, "application/x-jsonlines": JSONL,
                  "application/jsonlines": JSONL}
_INTEGER = re.compile(r"^[+-]?\d{1,18}$")  # fits int64, so JSON readers everywhere keep it exact
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_BOOLEAN = {"true": True, "false": False}


def associated_data(pod_id: uuid.UUID) -> bytes:
    """What a pod's ciphertext is bound to (ARCHITECTURE.md: the pod id)."""
    return str(pod_id).encode()


def detect_format(filename: str | None, content_type: str | None) -> str:
    """CSV or JSON lines, by file extension first, then by the part's content type."""
    suffix = Path(filename or "").suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    media = (content_type or "").split(";")[0].strip().lower()
    if media in _CONTENT_TYPES:
        return _CONTENT_TYPES[media]
    raise InvalidPayload("the file must be CSV (.csv) or JSON lines (.jsonl, .ndjson)", field="file")


# --- profiling --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    """What a dataset looks like: its schema (columns, types, counts) and first rows."""

    schema: dict[str, Any]
    sample: list[dict[str, Any]]


class _Column:
    def __init__(self, name: str) -> None:
        self.name = name
        self.kinds: set[str] = set()
        self.null_count = 0

    def observe(self, kind: str) -> None:
        if kind == "null":
            self.null_count += 1
        else:
            self.kinds.add(kind)

    def type(self, mixed: str) -> str:
        if not self.kinds:
            return "null"
        if len(self.kinds) == 1:
            return next(iter(self.kinds))
        if self.kinds <= {"integer", "number"}:
            return "number"
        return mixed

    def describe(self, mixed: str, missing: int) -> dict[str, Any]:
        # A JSON-lines row without the key counts as null for that column.
        return {"name": self.name, "type": self.type(mixed), "null_count": self.null_count + missing}


def _csv_kind(value: str) -> str:
    if value == "":
        return "null"
    if _INTEGER.match(value):
        return "integer"
    if _NUMBER.match(value) and math.isfinite(float(value)):
        return "number"
    if value.lower() in _BOOLEAN:
        return "boolean"
    return "string"


def _csv_value(value: str, column_type: str) -> Any:
    if value == "":
        return None
    if column_type == "integer":
        return int(value)
    if column_type == "number":
        return float(value)
    if column_type == "boolean":
        return _BOOLEAN[value.lower()]
    return value


def profile_csv(text: TextIO) -> Profile:
    """Profile a CSV file with a header row; every row must have the header's number of fields."""
    csv.field_size_limit(MAX_CELL_CHARS)
    reader = csv.reader(text)
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            raise InvalidPayload("the CSV file is empty", field="file")
        if len(header) > MAX_COLUMNS:
            raise InvalidPayload(f"the CSV file has more than {MAX_COLUMNS} columns", field="file")
        names = [name.strip() or f"column_{i + 1}" for i, name in enumerate(header)]
        if len(set(names)) != len(names):
            raise InvalidPayload("the CSV header repeats a column name", field="file")
        columns = [_Column(name) for name in names]
        raw_sample: list[list[str]] = []
        rows = 0
        for row in reader:
            if not row:
                continue  # blank line
            if len(row) != len(columns):
                raise InvalidPayload(f"CSV row {rows + 1} has {len(row)} fields, the header has {len(columns)}",
                                     field="file")
            for column, value in zip(columns, row):
                column.observe(_csv_kind(value))
            if rows < SAMPLE_ROWS:
                raw_sample.append(row)
            rows += 1
    except csv.Error as exc:
        raise InvalidPayload(f"the CSV file is malformed: {exc}", field="file") from None
    if rows == 0:
        raise InvalidPayload("the CSV file has no data rows", field="file")
    types = [column.type("string") for column in columns]
    sample = [{c.name: _csv_value(v, t) for c, v, t in zip(columns, row, types)} for row in raw_sample]
    described = [column.describe("string", 0) for column in columns]
    return Profile({"format": CSV, "columns": described, "row_count": rows, "column_count": len(columns)},
                   sample)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def profile_jsonl(text: TextIO) -> Profile:
    """Profile JSON lines: one JSON object per line; columns are the union of their keys."""
    columns: dict[str, _Column] = {}
    seen_in: dict[str, int] = {}
    sample: list[dict[str, Any]] = []
    rows = 0
    for line_number, line in enumerate(text, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_refuse_constant)
        except ValueError:
            raise InvalidPayload(f"line {line_number} is not valid JSON", field="file") from None
        if not isinstance(record, dict):
            raise InvalidPayload(f"line {line_number} is not a JSON object", field="file")
        for key, value in record.items():
            column = columns.get(key)
            if column is None:
                if len(columns) >= MAX_COLUMNS:
                    raise InvalidPayload(f"the rows have more than {MAX_COLUMNS} distinct keys", field="file")
                column = columns[key] = _Column(key)
                seen_in[key] = 0
            column.observe(_json_kind(value))
            seen_in[key] += 1
        if rows < SAMPLE_ROWS:
            sample.append(record)
        rows += 1
    if rows == 0:
        raise InvalidPayload("the JSON lines file has no rows", field="file")
    described = [column.describe("mixed", rows - seen_in[key]) for key, column in columns.items()]
    return Profile({"format": JSONL, "columns": described, "row_count": rows, "column_count": len(columns)},
                   sample)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def profile(fmt: str, text: TextIO) -> Profile:
    """Profile a decoded text stream of the given format."""
    try:
        return profile_csv(text) if fmt == CSV else profile_jsonl(text)
    except UnicodeDecodeError:
        raise InvalidPayload("the file is not UTF-8 text", field="file") from None


# --- streaming encryption ---------------------------------------------------------------------


class _DecryptingReader(io.RawIOBase):
    """Reads a spooled ciphertext file back as plaintext; checks the GCM tag at the end."""

    def __init__(self, path: Path, key: bytes, nonce: bytes, aad: bytes) -> None:
        super().__init__()
        self._file = path.open("rb")
        body_size = path.stat().st_size - TAG_BYTES
        self._file.seek(body_size)
        tag = self._file.read(TAG_BYTES)
        self._file.seek(0)
        self._remaining = body_size
        self._decryptor = StreamDecryptor(key, nonce, tag, aad)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self._remaining <= 0:
                if self._decryptor is not None:
                    tail = self._decryptor.finalize()
                    self._decryptor = None
                    if tail:  # GCM is a stream mode: nothing is ever held back, but be exact
                        buffer[:len(tail)] = tail
                        return len(tail)
                return 0
            chunk = self._file.read(min(len(buffer), self._remaining))
            if not chunk:
                raise OSError("the spooled dataset is shorter than written")
            self._remaining -= len(chunk)
            plain = self._decryptor.update(chunk)  # type: ignore[union-attr]
            if plain:
                buffer[:len(plain)] = plain
                return len(plain)

    def close(self) -> None:
        self._file.close()
        super().close()


class DatasetSpool:
    """A dataset being received: hashed and encrypted chunk by chunk into a temp file."""

    def __init__(self, tmp_dir: Path, pod_id: uuid.UUID, limit: int | None = None) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".enc", dir=tmp_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self.pod_id = pod_id
        self.limit = limit
        self.size = 0
        self.stored_size = 0
        self._hash = hashlib.sha256()
        self._encryptor = StreamEncryptor(associated_data(pod_id))

    def write(self, chunk: bytes) -> None:
        """Take the next plaintext chunk; PayloadTooLarge past the limit (blocking: call off the loop)."""
        self.size += len(chunk)
        if self.limit is not None and self.size > self.limit:
            raise PayloadTooLarge(f"the file exceeds the upload limit of {self.limit} bytes", field="file")
        self._hash.update(chunk)
        encrypted = self._encryptor.update(chunk)
        self._file.write(encrypted)
        self.stored_size += len(encrypted)

    def finish(self) -> None:
        """Write the GCM tag and close the file."""
        tail = self._encryptor.finalize()
        self._file.write(tail)
        self.stored_size += len(tail)
        self._file.close()

    @property
    def data_hash(self) -> str:
        """SHA-256 (hex) of the plaintext."""
        return self._hash.hexdigest()

    @property
    def key(self) -> bytes:
        """The fresh dataset key (only ever stored wrapped)."""
        return self._encryptor.key

    @property
    def key_hash(self) -> str:
        """SHA-256 of the dataset key."""
        return self._encryptor.key_hash

    @property
    def iv_hex(self) -> str:
        """The GCM nonce as hex."""
        return self._encryptor.iv_hex

    def profile(self, fmt: str) -> Profile:
        """Decrypt the spooled file chunk by chunk and profile it (blocking: call off the loop)."""
        raw = _DecryptingReader(self.path, self._encryptor.key, self._encryptor.nonce, associated_data(self.pod_id))
        with io.TextIOWrapper(io.BufferedReader(raw, CHUNK_BYTES), encoding="utf-8-sig", newline="") as text:
            return profile(fmt, text)

    def discard(self) -> None:
        """Remove the temp file (it may already have been moved into the blob store)."""
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


async def seal(spool: DatasetSpool, fmt: str, blobs: BlobStore, master_key: bytes) -> SealedDataset:
    """Profile a finished spool, store its ciphertext, wrap its key under MASTER_KEY."""
    found = await asyncio.to_thread(spool.profile, fmt)
    blob_id = await blobs.put_file(spool.path)
    log.info("dataset_sealed", pod_id=str(spool.pod_id), blob_id=blob_id, size=spool.size,
             rows=found.schema["row_count"])
    return SealedDataset(
        pod_id=spool.pod_id, blob_id=blob_id, storage_size=spool.stored_size, file_size=spool.size,
        file_type=MEDIA_TYPES[fmt], data_hash=spool.data_hash, key_hash=spool.key_hash,
        iv_hex=spool.iv_hex, wrapped_key=wrap_key(master_key, spool.key, associated_data(spool.pod_id)),
        schema=found.schema, sample=found.sample)


async def seal_chunks(chunks: Iterable[bytes], *, fmt: str, pod_id: uuid.UUID, blobs: BlobStore,
                      master_key: bytes, tmp_dir: Path) -> SealedDataset:
    """Seal a dataset that is already at hand (the demo data) the way uploads are sealed."""
    spool = DatasetSpool(tmp_dir, pod_id)
    try:
        for chunk in chunks:
            spool.write(chunk)
        spool.finish()
        return await seal(spool, fmt, blobs, master_key)
    finally:
        spool.discard()


def upload_dir(data_dir: Path) -> Path:
    """Where uploads are spooled (under DATA_DIR, so the local blob store can take them by rename)."""
    return data_dir / "tmp" / "uploads"


def sweep_stale_uploads(data_dir: Path, max_age_seconds: float = 86_400) -> int:
    """Remove spool files a crashed process left behind (older than any upload can take)."""
    import time

    root = upload_dir(data_dir)
    if not root.is_dir():
        return 0
    cutoff, removed = time.time() - max_age_seconds, 0
    for path in root.iterdir():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # another process swept it first
    if removed:
        log.info("stale_uploads_removed", count=removed)
    return removed


async def blobs_ctx(app: web.Application) -> AsyncIterator[None]:
    """The application's blob store (an aiohttp cleanup context)."""
    await asyncio.to_thread(sweep_stale_uploads, app[SETTINGS].data_dir)
    app[BLOBS] = create_blob_store(app[SETTINGS])
    yield
    await app[BLOBS].close()
