"""The `sourcenet-hub` command: serve, migrate, demo-data, check, create-admin, chain verify."""

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


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT, then shut down gracefully."""
    from server.app import SHUTDOWN_STEP_SHARE, create_app

    settings = settings.replace(demo_data_on_first_start=not args.no_demo_data,
                                host=args.host or settings.host, port=args.port or settings.port)
    log.info("starting", host=settings.host, port=settings.port,
             database="configured" if settings.database_url else f"embedded ({settings.data_dir}/postgres)",
             redis="configured" if settings.redis_url else "none (single node)",
             assistant="model" if settings.openai_base_url else "retrieval-only")
    # aiohttp's shutdown_timeout is per step, and it takes two for a request still running.
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None,
                shutdown_timeout=settings.shutdown_timeout * SHUTDOWN_STEP_SHARE, access_log=None)
    log.info("stopped")
    return 0


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
    """`chain verify`: walk the KVP chain; exit 1 at the first broken link or balance mismatch."""
    from server.services.chain import verify_chain

    async def run():
        async with database(settings) as conn:
            return await verify_chain(conn)

    report = asyncio.run(run())
    if report.ok:
        print(f"ok {report.blocks} blocks")
        return 0
    print(f"FAILED after {report.blocks} good blocks: {report.problem}")
    return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="sourcenet-hub", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--no-demo-data", action="store_true", help="do not load demo data on first start")
    migrate = sub.add_parser("migrate", help="upgrade the database to the latest schema")
    migrate.add_argument("--down", metavar="REVISION", help="downgrade to REVISION (e.g. base) instead")
    sub.add_parser("demo-data", help="load a realistic demo data set")
    sub.add_parser("check", help="show which backing services are used and whether they answer")
    admin = sub.add_parser("create-admin", help="create an administrator (password from ADMIN_PASSWORD or a prompt)")
    admin.add_argument("--username", required=True)
    admin.add_argument("--email", required=True)
    chain = sub.add_parser("chain", help="KVP chain tools")
    chain_sub = chain.add_subparsers(dest="chain_command", required=True)
    chain_sub.add_parser("verify", help="check every block's links, hashes, signatures and balance records")
    return parser


COMMANDS = {"serve": cmd_serve, "migrate": cmd_migrate, "demo-data": cmd_demo_data,
            "check": cmd_check, "create-admin": cmd_create_admin, "chain": cmd_chain}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings.log_format)
    return COMMANDS[args.command](settings, args)


if __name__ == "__main__":
    sys.exit(main())
