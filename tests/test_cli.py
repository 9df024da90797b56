"""The console script as a user runs it: check, migrate, create-admin, serve with graceful shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp

from tests.helpers import SocketClient, free_port


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def cli_env(db_dsn: str, tmp_path) -> dict[str, str]:
    return {"DATABASE_URL": db_dsn, "DATA_DIR": str(tmp_path), "REDIS_URL": "",
            "JWT_SECRET": "j" * 43, "MASTER_KEY": "m" * 43}


def test_check_reports_each_backing_service(db_dsn, tmp_path):
    result = run_cli("check", env=cli_env(db_dsn, tmp_path))
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "DATABASE_URL" in lines["database"] and "ok" in lines["database"]
    assert "single node" in lines["redis"]
    assert "retrieval-only" in lines["ai"]


def test_check_fails_when_the_database_does_not_answer(tmp_path, unused_tcp_port):
    env = cli_env(f"postgresql://postgres@127.0.0.1:{unused_tcp_port}/postgres", tmp_path)
    result = run_cli("check", env=env)
    assert result.returncode == 1 and "FAILED" in result.stdout


def test_migrate_and_create_admin(db_dsn, tmp_path):
    env = cli_env(db_dsn, tmp_path)
    assert "latest schema" in run_cli("migrate", env=env).stdout
    result = run_cli("create-admin", "--username", "ops", "--email", "ops@example.org",
                     env={**env, "ADMIN_PASSWORD": "operator password"})
    assert result.returncode == 0, result.stderr
    assert "created administrator ops" in result.stdout
    assert "operator password" not in result.stdout + result.stderr



async def test_serve_then_sigterm_tells_clients_and_exits(db_dsn, tmp_path):
    port = free_port()
    env = {**os.environ, **cli_env(db_dsn, tmp_path), "PORT": str(port), "LISTEN_BACKLOG": "777"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "serve", "--no-demo-data", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    client = SocketClient()
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(base + "/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("server did not become ready")
        # The listen queue is LISTEN_BACKLOG long (ss shows it as Send-Q), not aiohttp's 128.
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True)
        assert listening.stdout.split()[2] == "777", listening.stdout
        await client.connect(base, "/chain")
        proc.send_signal(signal.SIGTERM)
        assert (await client.wait_for("server_shutdown"))["reconnect"] is True
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        output = (await proc.stdout.read()).decode()
        assert "stopped" in output
    finally:
        await client.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
