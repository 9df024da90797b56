"""Ask your data: read-only SQL (DuckDB) over one dataset the user bought or sells.

Who: the buyer of a completed purchase, or the pod's seller; anyone else gets `forbidden` (a draft
or deleted pod they do not hold: `not_found`, as elsewhere). The blob is checked and decrypted by
the download's own path (purchases.verified_dataset, delivery.decrypt_to) into memory, never to
disk, and loaded into a fresh in-memory DuckDB database as one table, `data`.

The sandbox: the connection is opened with bounded memory (DATASET_QUERY_MEMORY_MB), one thread
and no temp directory (nothing spills to disk), then extension autoload/autoinstall, community
extensions and external access (files, URLs, ATTACH, COPY, INSTALL) are switched off and the
configuration is locked before any data is loaded, so no statement can switch them back. The
dataset is loaded from Python lists bound as parameters (no file is read). Only one statement
whose DuckDB statement type is SELECT is run (DuckDB's own parser decides, no regexes); a timer
interrupts it after DATASET_QUERY_TIMEOUT seconds; at most DATASET_QUERY_MAX_ROWS rows come back
(`truncated` says when there were more). Each query loads the dataset afresh and the database is
closed after it: no plaintext is cached. DuckDB blocks, so every call runs in a worker thread;
DATASET_QUERY_CONCURRENCY bounds how many run at once, DATASET_QUERIES_PER_MINUTE per user.

The plaintext and the rows are never logged: only ids, sizes, counts and timings.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import datetime as dt
import decimal
import io
import json
import math
import re
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar

import asyncpg
import duckdb
import structlog
from aiohttp import web

from db import dataset_query as queries
from db import purchases as purchase_queries
from db.pool import POOL
from server.core.errors import Forbidden, HubError, InvalidPayload, NotFound, PayloadTooLarge, RateLimited
from server.core.settings import SETTINGS, Settings
from server.realtime.ratelimit import AttemptLimiter
from server.realtime.redis import REDIS, REDIS_HEALTH
from server.services import datasets, delivery, purchases

log = structlog.get_logger(__name__)

TABLE = "data"
MAX_SQL_CHARS = 10_000
MAX_RESULT_CELL_CHARS = 2_000  # one cell in a result (a string_agg of the whole table is not sent)
MAX_RESULT_CHARS = 1_000_000  # a result's rows past this are left out (truncated)
MARKDOWN_CELL_CHARS = 60
INSERT_BATCH_ROWS = 20_000
BUILTIN_ROWS = 20  # rows a built-in question shows
MAX_STATS_COLUMNS = 50
MAX_KEYWORD_CHARS = 100
_DUCK_TYPES = {"integer": "BIGINT", "number": "DOUBLE", "boolean": "BOOLEAN"}  # anything else: VARCHAR
_FORMATS = {media: fmt for fmt, media in datasets.MEDIA_TYPES.items()}
_NUMERIC = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
            "UBIGINT", "FLOAT", "DOUBLE", "DECIMAL")

T = TypeVar("T")


# --- results ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class QueryResult:
    """A query's answer: column names, rows (JSON-ready values), whether rows were left out, time taken."""

    columns: list[str]
    rows: list[list[Any]]
    truncated: bool
    elapsed_ms: float

    def to_public(self) -> dict[str, Any]:
        """The REST and tool form: {columns, rows, truncated, elapsed_ms}."""
        return {"columns": self.columns, "rows": self.rows, "truncated": self.truncated,
                "elapsed_ms": self.elapsed_ms}

    @classmethod
    def from_public(cls, data: dict[str, Any]) -> "QueryResult":
        """Rebuild a result from its public form (the assistant renders a tool's result)."""
        return cls(columns=list(data["columns"]), rows=[list(row) for row in data["rows"]],
                   truncated=bool(data["truncated"]), elapsed_ms=float(data["elapsed_ms"]))

    def to_markdown(self, max_cell_chars: int = MARKDOWN_CELL_CHARS) -> str:
        """A markdown table (`|` and newlines escaped, cells cut at `max_cell_chars`), with a note when cut."""
        def line(cells: list[Any]) -> str:
            return "| " + " | ".join(markdown_cell(cell, max_cell_chars) for cell in cells) + " |"

        lines = [line(self.columns), "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += [line(row) for row in self.rows]
        if not self.rows:
            lines.append("\n*No rows.*")
        elif self.truncated:
            lines.append(f"\n*Showing the first {len(self.rows)} rows; there are more.*")
        return "\n".join(lines)


def markdown_cell(value: Any, max_chars: int = MARKDOWN_CELL_CHARS) -> str:
    """One table cell: NULL as empty, newlines as spaces, `|` and `\\` escaped, cut at `max_chars`."""
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, default=str, ensure_ascii=False)
    else:
        text = str(value)
    text = " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text
    if len(text) > max_chars:
        text = text[:max_chars - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|")


def _jsonable(value: Any) -> Any:
    """A DuckDB value as JSON can carry it (long strings cut, non-finite floats as null)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_RESULT_CELL_CHARS else value[:MAX_RESULT_CELL_CHARS - 1] + "…"
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _jsonable(bytes(value).hex())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return _jsonable(str(value))  # uuid, timedelta, intervals...


# --- the sandbox (blocking: worker threads only) ----------------------------------------------------

def _quote(identifier: str) -> str:
    """A column name as a DuckDB identifier (names come from the dataset's own header)."""
    return '"' + identifier.replace('"', '""') + '"'


def _sandbox(memory_mb: int) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory database, external access off and configuration locked before any data."""
    # temp_directory '': an in-memory database would otherwise spill plaintext to ./.tmp.
    con = duckdb.connect(":memory:", config={"threads": 1, "memory_limit": f"{max(16, memory_mb)}MB",
                                             "temp_directory": ""})
    try:
        con.execute("SET enable_progress_bar = false")  # it would be drawn on the server's stdout
        for name in ("autoload_known_extensions", "autoinstall_known_extensions", "allow_community_extensions",
                     "enable_external_access"):
            con.execute(f"SET {name} = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def select_statement(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The SQL's one statement if DuckDB parses it as a SELECT (WITH, FROM-first, VALUES included)."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise InvalidPayload(f"the SQL does not parse: {_first_line(exc)}", field="sql") from None
    if len(statements) != 1:
        raise InvalidPayload(f"send exactly one statement (got {len(statements)})", field="sql")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise InvalidPayload(f"only a read-only SELECT is allowed, not {kind.name}", field="sql")
    return sql


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def check_sql(sql: str) -> None:
    """Refuse anything but one SELECT statement before any dataset is decrypted (blocking)."""
    if len(sql) > MAX_SQL_CHARS:
        raise PayloadTooLarge(f"the SQL may hold at most {MAX_SQL_CHARS} characters", field="sql")
    if not sql.strip():
        raise InvalidPayload("the SQL is empty", field="sql")
    con = _sandbox(16)
    try:
        select_statement(con, sql)
    finally:
        con.close()


@dataclasses.dataclass(frozen=True, slots=True)
class Column:
    """A loaded column: its name in `data`, its DuckDB type, the profile's kind, its key in the file."""

    name: str
    duck_type: str
    kind: str
    source: str


def _columns(fmt: str, plaintext: bytes) -> list[Column]:
    """The table's columns from the dataset's profile (the upload's own type inference)."""
    with _text(plaintext) as text:
        found = datasets.profile(fmt, text)
    columns, taken = [], set()
    for described in found.schema["columns"]:
        name, n = described["name"], 1
        # DuckDB identifiers ignore case: "City" and "city" would collide.
        while name.lower() in taken:
            n += 1
            name = f"{described['name']}_{n}"
        taken.add(name.lower())
        columns.append(Column(name, _DUCK_TYPES.get(described["type"], "VARCHAR"), described["type"],
                              described["name"]))
    return columns


def _text(plaintext: bytes) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(plaintext), encoding="utf-8-sig", newline="")


def _csv_value(value: str, column: Column) -> Any:
    if value == "":
        return None
    if column.duck_type == "BIGINT":
        return int(value)
    if column.duck_type == "DOUBLE":
        return float(value)
    if column.duck_type == "BOOLEAN":
        return value.lower() == "true"
    return value


def _json_value(value: Any, column: Column) -> Any:
    if value is None:
        return None
    if column.duck_type == "VARCHAR" and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # objects, arrays, mixed columns: their JSON text
    if column.duck_type == "DOUBLE":
        return float(value)
    return value


def _records(fmt: str, plaintext: bytes, columns: list[Column]) -> Iterator[list[Any]]:
    """The dataset's rows as typed values, in file order."""
    with _text(plaintext) as text:
        if fmt == datasets.CSV:
            csv.field_size_limit(datasets.MAX_CELL_CHARS)
            rows = (row for row in csv.reader(text) if row)
            next(rows, None)  # the header
            for row in rows:
                yield [_csv_value(value, column) for value, column in zip(row, columns)]
        else:
            for line in text:
                if line.strip():
                    record = json.loads(line)
                    yield [_json_value(record.get(column.source), column) for column in columns]


def _load(con: duckdb.DuckDBPyConnection, fmt: str, plaintext: bytes) -> list[Column]:
    """Create `data` and fill it in batches of column lists bound as parameters (no file is read)."""
    columns = _columns(fmt, plaintext)
    con.execute(f"CREATE TABLE {TABLE} (" + ", ".join(f"{_quote(c.name)} {c.duck_type}" for c in columns) + ")")
    insert = (f"INSERT INTO {TABLE} SELECT "
              + ", ".join(f"unnest(${n}::{c.duck_type}[])" for n, c in enumerate(columns, 1)))
    batch: list[list[Any]] = []

    def flush() -> None:
        con.execute(insert, [list(values) for values in zip(*batch)])
        batch.clear()

    for record in _records(fmt, plaintext, columns):
        batch.append(record)
        if len(batch) >= INSERT_BATCH_ROWS:
            flush()
    if batch:
        flush()
    return columns


class QueryTimeout(InvalidPayload):
    """The query ran past DATASET_QUERY_TIMEOUT and was interrupted."""


def run_select(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None, *, max_rows: int,
               timeout: float) -> QueryResult:
    """Run one SELECT with the time and row limits (blocking); DuckDB's errors become domain errors."""
    timer = threading.Timer(timeout, con.interrupt)
    timer.daemon = True
    started = time.perf_counter()
    timer.start()
    try:
        relation = con.sql(sql, params=params)
        columns = list(relation.columns)
        fetched = relation.limit(max_rows + 1).fetchall()
    except duckdb.InterruptException:
        raise QueryTimeout(f"the query was stopped at its time limit of {timeout:g} s", field="sql",
                           reason="timeout") from None
    except duckdb.PermissionException as exc:
        raise Forbidden(f"the query may read only the table `{TABLE}`: {_first_line(exc)}", field="sql") from None
    except duckdb.OutOfMemoryException:
        raise InvalidPayload("the query needs more memory than a dataset query may use", field="sql",
                             reason="memory") from None
    except duckdb.Error as exc:
        raise InvalidPayload(f"the query failed: {_first_line(exc)}", field="sql") from None
    finally:
        timer.cancel()
    elapsed = round((time.perf_counter() - started) * 1000, 1)
    truncated = len(fetched) > max_rows
    rows, size = [], 0
    for raw in fetched[:max_rows]:
        row = [_jsonable(value) for value in raw]
        size += len(json.dumps(row, default=str))
        if size > MAX_RESULT_CHARS and rows:
            truncated = True
            break
        rows.append(row)
    return QueryResult(columns=columns, rows=rows, truncated=truncated, elapsed_ms=elapsed)


def _in_sandbox(settings: Settings, fmt: str, plaintext: bytes,
                work: Callable[[duckdb.DuckDBPyConnection, list[Column]], T]) -> T:
    """Load the dataset into a fresh locked database, run `work` on it, close it (blocking)."""
    con = _sandbox(settings.dataset_query_memory_mb)
    try:
        try:
            columns = _load(con, fmt, plaintext)
        except duckdb.OutOfMemoryException:
            raise PayloadTooLarge("the dataset does not fit the memory a dataset query may use",
                                  field="datapod_id") from None
        except (duckdb.Error, ValueError) as exc:
            log.warning("dataset_query_load_failed", error=type(exc).__name__)
            raise InvalidPayload("the dataset could not be loaded for querying", field="datapod_id") from None
        return work(con, columns)
    finally:
        con.close()


# --- access, limits, decryption --------------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class _Gate:
    running: asyncio.Semaphore
    per_user: AttemptLimiter


DATASET_QUERY_GATE: web.AppKey[_Gate] = web.AppKey("dataset_query_gate", _Gate)


async def dataset_query_ctx(app: web.Application) -> AsyncIterator[None]:
    """The process's query slots and the per-user limiter (counted in Redis when there is one)."""
    settings = app[SETTINGS]
    app[DATASET_QUERY_GATE] = _Gate(
        running=asyncio.Semaphore(max(1, settings.dataset_query_concurrency)),
        per_user=AttemptLimiter("dataset_query", max(1, settings.dataset_queries_per_minute), 60.0,
                                redis=app[REDIS], prefix=settings.redis_prefix, health=app[REDIS_HEALTH]))
    yield


async def _admit(app: web.Application, user_id: uuid.UUID) -> None:
    retry_after = await app[DATASET_QUERY_GATE].per_user.hit(str(user_id))
    if retry_after:
        raise RateLimited(f"at most {app[SETTINGS].dataset_queries_per_minute} dataset queries per minute",
                          retry_after=retry_after)


async def _held_pod(app: web.Application, user_id: uuid.UUID,
                    datapod_id: uuid.UUID) -> tuple[purchase_queries.PodForSale, uuid.UUID | None]:
    """The pod and the user's completed purchase of it (None for its seller); forbidden for anyone else."""
    async with app[POOL].acquire() as conn:
        held = await queries.holding(conn, datapod_id, user_id)
        pod = await purchase_queries.get_pod(conn, datapod_id) if held is not None else None
    if held is None or pod is None:
        raise NotFound("no such DataPod", field="datapod_id")
    if held.purchase_id is not None or (held.is_seller and not held.deleted):
        return pod, held.purchase_id
    if held.deleted or not pod.published:
        raise NotFound("no such DataPod", field="datapod_id")  # as elsewhere: drafts and deleted pods are not shown
    raise Forbidden("you can query only the DataPods you bought or sell", field="datapod_id")


async def _plaintext(app: web.Application, pod: purchase_queries.PodForSale,
                     purchase_id: uuid.UUID | None) -> tuple[str, bytes]:
    """The dataset's format and decrypted bytes (in memory), checked by the download's own two passes."""
    limit = app[SETTINGS].dataset_query_max_bytes
    fmt = _FORMATS.get((pod.file_type or "").split(";")[0].strip())
    if fmt is None:
        raise InvalidPayload("only CSV and JSON lines datasets can be queried", field="datapod_id")
    if pod.file_size is not None and pod.file_size > limit:
        raise PayloadTooLarge(f"the dataset is larger than the {limit} bytes a query may load", field="datapod_id")
    download = await purchases.verified_dataset(app, pod, purchase_id)
    if download.size > limit:
        raise PayloadTooLarge(f"the dataset is larger than the {limit} bytes a query may load", field="datapod_id")
    chunks: list[bytes] = []

    async def keep(plain: bytes) -> None:
        chunks.append(plain)

    try:
        await delivery.decrypt_to(download.stream, download.key, download.nonce, download.aad,
                                  download.expected_hash, keep)
    except (delivery.IntegrityError, KeyError):
        log.error("dataset_query_blob_failed", datapod_id=str(pod.id))
        raise purchases.IntegrityFailed("the stored dataset failed its integrity check") from None
    plaintext = b"".join(chunks)
    chunks.clear()
    return fmt, plaintext


async def _with_dataset(app: web.Application, user_id: uuid.UUID, datapod_id: uuid.UUID,
                        work: Callable[[duckdb.DuckDBPyConnection, list[Column]], T]) -> T:
    """Check access, take a slot, decrypt, and run `work` in a worker thread on the loaded sandbox."""
    pod, purchase_id = await _held_pod(app, user_id, datapod_id)
    settings = app[SETTINGS]
    running = app[DATASET_QUERY_GATE].running
    try:
        async with asyncio.timeout(settings.dataset_query_timeout):
            await running.acquire()
    except TimeoutError:
        raise RateLimited("too many dataset queries are running; retry shortly", retry_after=1.0) from None
    try:
        fmt, plaintext = await _plaintext(app, pod, purchase_id)
        return await asyncio.to_thread(_in_sandbox, settings, fmt, plaintext, work)
    finally:
        running.release()


# --- commands --------------------------------------------------------------------------------------

async def run_query(app: web.Application, user_id: uuid.UUID, datapod_id: uuid.UUID, sql: str) -> QueryResult:
    """Run the user's one read-only SELECT over a dataset they bought or sell (table `data`)."""
    await asyncio.to_thread(check_sql, sql)  # refused statements cost no decryption and no quota
    await _admit(app, user_id)
    settings = app[SETTINGS]

    def work(con: duckdb.DuckDBPyConnection, _: list[Column]) -> QueryResult:
        select_statement(con, sql)  # on the sandbox itself as well: what runs is what was checked
        return run_select(con, sql, None, max_rows=max(1, settings.dataset_query_max_rows),
                          timeout=settings.dataset_query_timeout)

    result = await _with_dataset(app, user_id, datapod_id, work)
    log.info("dataset_queried", datapod_id=str(datapod_id), rows=len(result.rows), truncated=result.truncated,
             elapsed_ms=result.elapsed_ms)
    return result


async def holds_data(conn: asyncpg.Connection, user_id: uuid.UUID) -> bool:
    """Whether the user has a dataset to query (a completed purchase, or a pod they sell)."""
    return bool(await queries.held_pods(conn, user_id, limit=1))


async def tool_result(app: web.Application, user_id: uuid.UUID, args: dict[str, Any]) -> dict[str, Any]:
    """The assistant's query_dataset tool: the result's public form with the pod's id; ValueError on refusal."""
    try:
        datapod_id = uuid.UUID(args["datapod_id"])
        result = await run_query(app, user_id, datapod_id, args["sql"])
    except HubError as exc:
        raise ValueError(f"{exc.code.value}: {exc.message}") from None
    return {"datapod_id": str(datapod_id), **result.to_public()}


# --- built-in questions (no model) ----------------------------------------------------------------

_UUID_IN_TEXT = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
_STATS = re.compile(r"^(?:(?:show|give|get|what are)(?: me)? )?(?:the )?(?:column )?"
                    r"(?:stats|statistics|summary|summarize|summarise|describe|profile)(?: of| for| on| about)?$")
_TOP = re.compile(r"^(?:(?:show|give|get|what are)(?: me)? )?(?:the )?(?:top|most common|most frequent)"
                  r"(?: (?P<n>\d{1,2}))?(?: values?)?(?: of| for| in)? (?P<column>.+?)(?: values?)?$")
_ROWS = re.compile(r"^(?:(?:show|give|get|find|list)(?: me)? )?(?:the |all )?rows? "
                   r"(?:matching|containing|that contain|which contain|with|mentioning|about|for) (?P<keyword>.+)$")
_TRAILING = re.compile(r"(?:\s+(?:in|of|from|for|on|about|inside|within|the))+$")
_POD_WORDS = re.compile(r"\b(?:dataset|datapod|data pod)\b")
_INTENT_WORDS = re.compile(r"\b(?:stats|statistics|summary|summari[sz]e|describe|profile|top|most common|"
                           r"most frequent|rows?)\b")


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _question_parts(question: str, pods: list[queries.HeldPod]) -> tuple[queries.HeldPod, str] | None:
    """The held pod the question names (by id or whole title) and the question without it."""
    text = " ".join(question.split()).rstrip("?!. ")
    match = _UUID_IN_TEXT.search(text)
    if match:
        wanted = uuid.UUID(match.group())
        for pod in pods:
            if pod.datapod_id == wanted:
                return pod, (text[:match.start()] + " " + text[match.end():]).strip()
        return None
    lowered = text.lower()
    for pod in sorted(pods, key=lambda p: len(p.title), reverse=True):  # the longest title that fits
        title = _normal(pod.title)
        at = lowered.find(title) if title else -1
        if at >= 0:
            return pod, (text[:at] + " " + text[at + len(title):]).strip()
    return None


async def builtin_answer(app: web.Application, user_id: uuid.UUID, question: str) -> str | None:
    """A markdown answer to a data question about a dataset the user holds; None when it is not one.

    Recognised (case-insensitive, the pod named by its whole title or its id anywhere in the text):
    "stats of <pod>" (per column: count of values, nulls, distinct, and min/max/avg of numbers),
    "top [N] values of <column> in <pod>" (the N, default 10, commonest values with counts) and
    "rows matching <keyword> in <pod>" (up to 20 rows where a text column contains the keyword).
    """
    question = question[:1000]
    if not _INTENT_WORDS.search(question.lower()):
        return None
    async with app[POOL].acquire() as conn:
        pods = await queries.held_pods(conn, user_id)
    parts = _question_parts(question, pods)
    if parts is None:
        return None
    pod, rest = parts
    rest = _TRAILING.sub("", _normal(_POD_WORDS.sub(" ", _normal(rest))))
    if _STATS.match(rest):
        kind, argument = "stats", None
    elif (top := _TOP.match(rest)) is not None:
        kind, argument = "top", (top.group("column").strip(" '\"`"), int(top.group("n") or 10))
    elif (rows := _ROWS.match(rest)) is not None:
        kind, argument = "rows", rows.group("keyword").strip(" '\"`“”")
    else:
        return None
    title = pod.title.replace("|", "\\|").replace("*", "\\*")
    try:
        await _admit(app, user_id)
        body = await _with_dataset(app, user_id, pod.datapod_id,
                                   lambda con, columns: _builtin(app[SETTINGS], con, columns, kind, argument))
    except HubError as exc:
        return f"I could not query **{title}**: {exc.message}."
    log.info("dataset_builtin_answered", datapod_id=str(pod.datapod_id), kind=kind)
    heading, table = body
    return f"{heading.replace('{title}', title)} [datapod:{pod.datapod_id}]\n\n{table}".rstrip()


def _builtin(settings: Settings, con: duckdb.DuckDBPyConnection, columns: list[Column], kind: str,
             argument: Any) -> tuple[str, str]:
    """(heading with a {title} slot, markdown table) of one built-in question (blocking)."""
    timeout = settings.dataset_query_timeout
    if kind == "stats":
        return _stats(con, columns, timeout)
    if kind == "top":
        name, n = argument
        column = next((c for c in columns if c.name.lower() == name.lower()), None)
        if column is None:
            known = ", ".join(f"`{c.name}`" for c in columns[:MAX_STATS_COLUMNS])
            return f"**{{title}}** has no column `{markdown_cell(name)}`; its columns are {known}.", ""
        n = max(1, min(n, 50))
        found = run_select(con, f"SELECT {_quote(column.name)} AS value, count(*) AS count FROM {TABLE} "
                                "GROUP BY ALL ORDER BY count DESC, value ASC NULLS LAST LIMIT ?",
                           [n], max_rows=n, timeout=timeout)
        return f"Top values of `{markdown_cell(column.name)}` in **{{title}}**:", found.to_markdown()
    keyword = argument[:MAX_KEYWORD_CHARS]
    texts = [c for c in columns if c.duck_type == "VARCHAR"]
    if not texts or not keyword:
        return "**{title}** has no text column to search.", ""
    pattern = "%" + keyword.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    where = " OR ".join(f"{_quote(c.name)} ILIKE ? ESCAPE '\\'" for c in texts)
    limit = max(1, min(BUILTIN_ROWS, settings.dataset_query_max_rows))
    found = run_select(con, f"SELECT * FROM {TABLE} WHERE {where}", [pattern] * len(texts), max_rows=limit,
                       timeout=timeout)
    return f"Rows of **{{title}}** matching “{markdown_cell(keyword)}”:", found.to_markdown()


def _stats(con: duckdb.DuckDBPyConnection, columns: list[Column], timeout: float) -> tuple[str, str]:
    """Per column: values, nulls, distinct values, and min/max/avg of numeric columns."""
    total = run_select(con, f"SELECT count(*) FROM {TABLE}", None, max_rows=1, timeout=timeout).rows[0][0]
    rows = []
    for column in columns[:MAX_STATS_COLUMNS]:
        name = _quote(column.name)
        numeric = column.duck_type.startswith(_NUMERIC)
        extra = f"min({name}), max({name}), round(avg({name}), 4)" if numeric else "NULL, NULL, NULL"
        found = run_select(con, f"SELECT count({name}), count(*) - count({name}), count(DISTINCT {name}), {extra} "
                                f"FROM {TABLE}", None, max_rows=1, timeout=timeout)
        rows.append([column.name, column.kind if column.kind != "null" else "empty", *found.rows[0]])
    table = QueryResult(columns=["column", "type", "count", "nulls", "distinct", "min", "max", "avg"], rows=rows,
                        truncated=len(columns) > MAX_STATS_COLUMNS, elapsed_ms=0.0)
    return f"Stats of **{{title}}** ({total} rows):", table.to_markdown()
