"""Settings.from_env: every documented variable reaches its field; bad values fail at start."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from server.core.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_unset_and_empty_variables_keep_the_defaults():
    # The one deliberate difference: a served process produces blocks unless told not to.
    defaults = Settings().replace(block_producer=True)
    assert Settings.from_env({}) == defaults
    assert Settings.from_env({"PORT": "", "AI_TOOL_CHOICE": "", "DEMO_FAUCET": " "}) == defaults


def test_variables_reach_their_fields():
    settings = Settings.from_env({
        "PORT": "9090", "AI_MAX_TOOL_ROUNDS": "1", "AI_TOOL_CHOICE": "search_datapods",
        "SHUTDOWN_TIMEOUT": "2.5", "KYC_MAX_BYTES": "1024", "DEMO_GAME_INTERVAL": "0",
        "DEMO_FAUCET": "off", "DEMO_FAUCET_AMOUNT": "2.5", "BLOCK_INTERVAL": "0.5",
        "REDIS_POOL_SIZE": "300", "REDIS_POOL_TIMEOUT": "0.5",
        "PURCHASE_JOB_LEASE": "4", "PURCHASE_JOB_HEARTBEAT": "1.5", "EVENT_LOOP": " Asyncio",
        "PURCHASE_POLL_INTERVAL": "0.25"})
    assert (settings.port, settings.ai_max_tool_rounds, settings.ai_tool_choice) == (9090, 1, "search_datapods")
    assert (settings.shutdown_timeout, settings.kyc_max_bytes, settings.demo_game_interval) == (2.5, 1024, 0.0)
    assert settings.demo_faucet is False and settings.faucet_enabled is False
    assert Decimal(settings.demo_faucet_amount) == Decimal("2.5") and settings.block_interval_seconds == 0.5
    assert (settings.redis_pool_size, settings.redis_pool_timeout) == (300, 0.5)
    assert (settings.purchase_job_lease, settings.purchase_job_heartbeat) == (4.0, 1.5)
    assert settings.purchase_poll_interval == 0.25
    assert settings.event_loop == "asyncio" and Settings.from_env({}).event_loop == "uvloop"


def test_the_faucet_is_on_only_for_the_local_chain_unless_set():
    assert Settings.from_env({}).faucet_enabled is True
    assert Settings.from_env({"SUI_RPC_URL": "https://fullnode.example:443"}).faucet_enabled is False
    assert Settings.from_env({"SUI_RPC_URL": "https://fullnode.example:443", "DEMO_FAUCET": "yes"}).faucet_enabled


@pytest.mark.parametrize("env, name", [
    ({"PORT": "eighty"}, "PORT"), ({"SHUTDOWN_TIMEOUT": "soon"}, "SHUTDOWN_TIMEOUT"),
    ({"DEMO_FAUCET": "maybe"}, "DEMO_FAUCET"), ({"DEMO_FAUCET_AMOUNT": "-1"}, "DEMO_FAUCET_AMOUNT"),
    ({"AI_MAX_TOOL_ROUNDS": "1.5"}, "AI_MAX_TOOL_ROUNDS"),
    ({"REDIS_POOL_SIZE": "0"}, "REDIS_POOL_SIZE"), ({"REDIS_POOL_TIMEOUT": "0"}, "REDIS_POOL_TIMEOUT"),
    ({"PURCHASE_JOB_LEASE": "soon"}, "PURCHASE_JOB_LEASE"),
    ({"PURCHASE_JOB_LEASE": "3", "PURCHASE_JOB_HEARTBEAT": "3"}, "PURCHASE_JOB_HEARTBEAT"),
    ({"PURCHASE_JOB_HEARTBEAT": "0"}, "PURCHASE_JOB_HEARTBEAT"),
    ({"EVENT_LOOP": "trio"}, "EVENT_LOOP"), ({"GAME_REWARD_WORKERS": "0"}, "GAME_REWARD_WORKERS"),
    ({"PURCHASE_POLL_INTERVAL": "0"}, "PURCHASE_POLL_INTERVAL"),
    ({"AI_MAX_STREAMS": "0"}, "AI_MAX_STREAMS"),
    ({"WALRUS_MAX_TRANSFERS": "0"}, "WALRUS_MAX_TRANSFERS"),
    ({"AI_DELTA_INTERVAL_MS": "-1"}, "AI_DELTA_INTERVAL_MS"), ({"AI_DELTA_INTERVAL_MS": "500"}, "AI_DELTA_INTERVAL_MS"),
    ({"PURCHASE_POLL_INTERVAL": "soon"}, "PURCHASE_POLL_INTERVAL"),
])
def test_a_bad_value_names_its_variable(env, name):
    with pytest.raises(ValueError, match=name):
        Settings.from_env(env)


def test_every_variable_read_is_documented_in_the_readme():
    source = (Path(__file__).resolve().parent.parent / "server" / "core" / "settings.py").read_text()
    read = set(re.findall(r'(?:\(env, |env\.get\()"([A-Z][A-Z0-9_]+)"', source))
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", README.read_text()))
    assert len(read) > 50 and read <= documented, sorted(read - documented)
