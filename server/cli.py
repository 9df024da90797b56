"""The `sourcenet-hub` command: serve, cluster, migrate, demo-data, check, create-admin, chain, rotate-master-key."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import sys
from typing import AsyncIterator, Sequence

import asyncpg
import structlog
from aiohttp import web

from server.core.logging import configure_logging
from server.core.memory import tune_garbage_collector
from server.core.settings import Settings

log = structlog.get_logger("sourcenet-hub")


@contextlib.asynccontextmanager
async def database(settings: Settings, *, migrate_first: bool = True) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the configured or embedded database (started and stopped around the block)."""
    from db import migrate
    from db.pool import init_connection
    from server.adapters.embedded import database_dsn

    async with database_dsn(settings.database_url, settings.data_dir) as dsn:
        if migrate_first:
            await migrate.upgrade_async(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await init_connection(conn)
            yield conn
        finally:
            await conn.close()


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """The server's event loop: uvloop's, or the standard library's for EVENT_LOOP=asyncio."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT, then shut down gracefully."""
    from server.app import SHUTDOWN_STEP_SHARE, create_app

    settings = settings.replace(demo_data_on_first_start=not args.no_demo_data,
                                host=args.host or settings.host, port=args.port or settings.port)
    log.info("starting", host=settings.host, port=settings.port,
             database="configured" if settings.database_url else f"embedded ({settings.data_dir}/postgres)",
             redis="configured" if settings.redis_url else "none (single node)",
             assistant="model" if settings.openai_base_url else "retrieval-only", event_loop=settings.event_loop)
    app = create_app(settings)
    tune_garbage_collector()  # after the imports and the app: they stay out of every collection
    # aiohttp's shutdown_timeout is per step, and it takes two for a request still running.
    web.run_app(app, host=settings.host, port=settings.port, print=None,
                backlog=settings.listen_backlog, loop=new_event_loop(settings.event_loop),
                shutdown_timeout=settings.shutdown_timeout * SHUTDOWN_STEP_SHARE, access_log=None)
    log.info("stopped")
    return 0


def cmd_cluster(settings: Settings, args: argparse.Namespace) -> int:
    """Run HAProxy in front of N supervised `serve` processes (and what they share) until SIGINT/SIGTERM."""
    from server import cluster

    try:
        return asyncio.run(cluster.run(settings, args.processes, port=args.port or settings.port,
                                       host=args.host or settings.host, demo_data=not args.no_demo_data))
    except RuntimeError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    """Upgrade the database schema to head (or downgrade with --down)."""
    from db import migrate
    from server.adapters.embedded import database_dsn

    async def run() -> None:
        async with database_dsn(settings.database_url, settings.data_dir) as dsn:
            if args.down:
                await asyncio.to_thread(migrate.downgrade, dsn, args.down)
            else:
                await migrate.upgrade_async(dsn)

    asyncio.run(run())
    print(f"database downgraded to {args.down}" if args.down else "database is at the latest schema")
    return 0


def cmd_demo_data(settings: Settings, args: argparse.Namespace) -> int:
    """Load the demo data set (idempotent: skipped when demo users exist)."""
    from server.core.secrets import load_or_create_secret
    from server.services import demo

    master_key = load_or_create_secret(settings.data_dir, "master_key", settings.master_key)

    async def run() -> bool:
        async with database(settings) as conn:
            return await demo.load_if_empty(conn, settings, master_key)

    print("demo data loaded" if asyncio.run(run()) else "demo data already present; nothing changed")
    return 0


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    """Print which backing services will be used and whether they answer."""
    from server.checks import run_checks

    results = asyncio.run(run_checks(settings))
    width = max(len(r.name) for r in results)
    for result in results:
        print(f"{result.name:<{width}}  {result.mode:<44}  {result.status}")
    return 0 if all(r.ok for r in results) else 1


def cmd_create_admin(settings: Settings, args: argparse.Namespace) -> int:
    """Create an administrator account (or promote an existing user)."""
    from server.services.admin import create_admin

    password = os.environ.get("ADMIN_PASSWORD") or getpass.getpass("password: ")
    if len(password) < 8:
        print("the password must have at least 8 characters", file=sys.stderr)
        return 2

    async def run() -> str:
        async with database(settings) as conn:
            return await create_admin(conn, username=args.username, email=args.email, password=password)

    print(asyncio.run(run()))
    return 0


def cmd_chain(settings: Settings, args: argparse.Namespace) -> int:
    """`chain verify`: walk the KVP chain and check balances against the ledger; exit 1 on any mismatch."""
    from server.services.chain import verify_chain

    async def run():
        async with database(settings) as conn:
            return await verify_chain(conn)

    report = asyncio.run(run())
    if report.ok:
        print(f"ok {report.blocks} blocks")
        return 0
    if report.problem:
        print(f"FAILED after {report.blocks} good blocks: {report.problem}")
    else:
        print(f"FAILED: {report.blocks} blocks are good, the ledger is not")
    for problem in report.ledger_problems:
        print(f"ledger: {problem}")
    return 1


def cmd_rotate_master_key(settings: Settings, args: argparse.Namespace) -> int:
    """Re-wrap every stored key under the new master key; rerun after an interruption to continue."""
    from server.core.crypto import key_id
    from server.services import keys

    configured = keys.load_master_key(settings)
    try:
        new_text = _new_key_text(args)
    except OSError as exc:
        print(f"cannot read the new key: {exc.strerror} ({args.new_key_file})", file=sys.stderr)
        return 2
    if new_text is not None:
        new_key = keys.decode_key(new_text, settings.data_dir)
        old_keys = configured.all
    elif configured.previous:  # MASTER_KEY is already the new key on the servers
        new_key, old_keys = bytes(configured), configured.previous
    else:
        print("nothing to rotate to: give --new-key-file FILE (or NEW_MASTER_KEY), or set MASTER_KEY to the new "
              "key and PREVIOUS_MASTER_KEY to the old one", file=sys.stderr)
        return 2
    old_ids = ", ".join(key_id(key).hex() for key in old_keys if key != new_key) or "none"
    print(f"re-wrapping every stored key under master key {key_id(new_key).hex()} (opening with {old_ids})")

    async def run() -> keys.RotationReport:
        async with database(settings) as conn:
            return await keys.rotate(conn, new_key, old_keys)

    report = asyncio.run(run())
    print("\n".join(report.lines()))
    if not report.complete:
        print("some keys could not be re-wrapped (see the log for their rows); they are unchanged. Fix or remove "
              "them and run the command again; it continues where it stopped", file=sys.stderr)
        return 1
    print(_next_steps(settings, args, configured, new_text, new_key))
    return 0


def _new_key_text(args: argparse.Namespace) -> str | None:
    """The new key as text, from --new-key-file or NEW_MASTER_KEY (never echoed)."""
    if args.new_key_file:
        with open(args.new_key_file) as handle:
            return handle.read().strip() or None
    return os.environ.get("NEW_MASTER_KEY", "").strip() or None


def _next_steps(settings: Settings, args: argparse.Namespace, configured: bytes, new_text: str | None,
                new_key: bytes) -> str:
    """What the operator does after a complete run, for where MASTER_KEY lives."""
    from server.services import keys

    key_file = keys.secret_path(settings.data_dir, keys.MASTER_KEY_FILE)
    previous_file = keys.secret_path(settings.data_dir, keys.PREVIOUS_KEY_FILE)
    if new_text is None or new_key == configured:
        return ("every stored key is wrapped under MASTER_KEY. Next: remove PREVIOUS_MASTER_KEY (and delete "
                f"{previous_file} if it exists) on every node, restart them, then destroy the old key")
    rerun = ("run `sourcenet-hub rotate-master-key` again, without a new key: it re-wraps what servers still on "
             "the old key wrote meanwhile")
    if settings.master_key is None and args.write_key_file:
        # The old key first: a crash between the two writes leaves both files holding the old key.
        keys.write_secret_file(previous_file, key_file.read_text().strip())
        keys.write_secret_file(key_file, new_text)
        return (f"every stored key is wrapped under the new key, now in {key_file} (the old one is in "
                f"{previous_file}). Next:\n  1. restart every server\n  2. {rerun}\n"
                f"  3. when it reports 0 re-wrapped, delete {previous_file} and destroy any other copy of the old key")
    install = (f"rerun with --write-key-file to install it in {key_file}, or set MASTER_KEY to it"
               if settings.master_key is None else "set MASTER_KEY to it")
    return ("every stored key is wrapped under the new key. Next:\n"
            f"  1. {install}, and PREVIOUS_MASTER_KEY to the old key, on every node; restart them\n"
            f"  2. {rerun}\n  3. remove PREVIOUS_MASTER_KEY, restart, and destroy the old key")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="sourcenet-hub", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--no-demo-data", action="store_true", help="do not load demo data on first start")
    cluster = sub.add_parser("cluster", help="run N hub processes behind HAProxy on this machine (deploy/haproxy.cfg)")
    cluster.add_argument("--processes", type=int, default=2, help="how many hub processes (default 2)")
    cluster.add_argument("--host", help="HAProxy's address (default HOST)")
    cluster.add_argument("--port", type=int, help="HAProxy's port (default PORT); the hubs take free loopback ports")
    cluster.add_argument("--no-demo-data", action="store_true", help="do not load demo data")
    migrate = sub.add_parser("migrate", help="upgrade the database to the latest schema")
    migrate.add_argument("--down", metavar="REVISION", help="downgrade to REVISION (e.g. base) instead")
    sub.add_parser("demo-data", help="load a realistic demo data set")
    sub.add_parser("check", help="show which backing services are used and whether they answer")
    admin = sub.add_parser("create-admin", help="create an administrator (password from ADMIN_PASSWORD or a prompt)")
    admin.add_argument("--username", required=True)
    admin.add_argument("--email", required=True)
    chain = sub.add_parser("chain", help="KVP chain tools")
    chain_sub = chain.add_subparsers(dest="chain_command", required=True)
    chain_sub.add_parser("verify", help="check every block's links, hashes, signatures and balance records, "
                                   "and every balance against its ledger")
    rotate = sub.add_parser("rotate-master-key", help="re-wrap every dataset, KYC and purchase key under a new key")
    rotate.add_argument("--new-key-file", metavar="FILE",
                        help="the new key (else NEW_MASTER_KEY; else MASTER_KEY, with PREVIOUS_MASTER_KEY the old)")
    rotate.add_argument("--write-key-file", action="store_true",
                        help="when MASTER_KEY lives in DATA_DIR: install the new key there once all is re-wrapped")
    return parser


COMMANDS = {"serve": cmd_serve, "cluster": cmd_cluster, "migrate": cmd_migrate, "demo-data": cmd_demo_data,
            "check": cmd_check, "create-admin": cmd_create_admin, "chain": cmd_chain,
            "rotate-master-key": cmd_rotate_master_key}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings.log_format)
    return COMMANDS[args.command](settings, args)


if __name__ == "__main__":
    sys.exit(main())
