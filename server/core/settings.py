"""Settings read from environment variables (documented in README.md)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import urllib.parse
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Mapping

from aiohttp import web

EVENT_LOOPS = ("uvloop", "asyncio")


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = (env.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _amount(env: Mapping[str, str], name: str) -> str | None:
    raw = _optional(env, name)
    if raw is not None:
        try:
            valid = Decimal(raw).is_finite() and Decimal(raw) >= 0
        except InvalidOperation:
            valid = False
        if not valid:
            raise ValueError(f"{name} must be a non-negative decimal, got {raw!r}")
    return raw


def _fee_rate(env: Mapping[str, str], name: str) -> str | None:
    raw = _amount(env, name)
    if raw is not None and Decimal(raw) >= 1:
        raise ValueError(f"{name} must be below 1 (a fraction of the price), got {raw!r}")
    return raw


def _optional(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the server; `from_env` is the only place that reads the environment."""

    database_url: str | None = None
    redis_url: str | None = None
    redis_prefix: str = "hub:"
    redis_pool_size: int = 100
    # Generous: in a reconnect storm a call that waits its turn beats one that fails and is retried.
    redis_pool_timeout: float = 20.0
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    ai_model: str = "gpt-4o-mini"
    ai_max_input_chars: int = 8000
    ai_messages_per_minute: int = 20
    ai_daily_token_quota: int = 200_000
    ai_context_tokens: int = 8000
    ai_max_output_tokens: int = 1024
    ai_timeout: float = 60.0
    ai_max_retries: int = 2
    ai_retry_max_wait: float = 30.0
    ai_max_tool_rounds: int = 3
    # "auto", "required" or a tool's name: forced on the first round only (servers such as
    # llama-cpp-python's chatml-function-calling stream tool calls only when the choice is forced).
    ai_tool_choice: str = "auto"
    ai_tool_timeout: float = 5.0
    ai_generation_timeout: float = 300.0
    # Answers one process streams at once; more are refused (rate_limited) rather than slowed for all.
    ai_max_streams: int = 500
    ai_save_interval: float = 0.5
    # Seconds a delta's text waits for other answers' text, so one history call carries them all.
    ai_delta_interval: float = 0.002
    ai_stale_after: float = 30.0
    # The models a conversation may choose (besides AI_MODEL, always allowed); empty: AI_MODEL only.
    ai_model_allowlist: tuple[str, ...] = ()
    ai_system_prompt_max_chars: int = 2000  # a conversation's own system prompt
    # "Ask your data" (server/services/dataset_query.py): read-only SQL over a dataset its owner holds.
    dataset_query_timeout: float = 5.0
    dataset_query_max_rows: int = 200
    # The plaintext and DuckDB's copy both sit in memory, several times the file: keep it modest.
    dataset_query_max_bytes: int = 64 * 1024 * 1024
    dataset_query_memory_mb: int = 512
    dataset_query_concurrency: int = 2
    dataset_queries_per_minute: int = 30
    sui_rpc_url: str | None = None
    escrow_address: str | None = None
    escrow_release_seconds: int = 259_200
    # The share of a released escrow paid to the platform's fee wallet (0 <= rate < 1, docs/operations.md).
    platform_fee_rate: str = "0"
    payment_max_age: int = 3600
    payment_verify_timeout: int = 600
    purchase_workers: int = 2
    # A running job renews its lease every heartbeat, so a dead worker's job is free again within one
    # lease (resumed within ~10 s, with the poll interval and the steps); a stall longer than
    # lease - heartbeat only hands the job to another worker, which the lease re-check makes safe.
    purchase_job_lease: float = 8.0
    purchase_job_heartbeat: float = 2.0
    purchase_poll_interval: float = 1.0
    walrus_publisher_url: str | None = None
    walrus_aggregator_url: str | None = None
    walrus_epochs: int = 5
    walrus_max_transfers: int = 100  # blob reads and stores in flight at once, per process
    max_upload_bytes: int = 100 * 1024 * 1024
    kyc_max_bytes: int = 5 * 1024 * 1024
    jwt_secret: str | None = None
    master_key: str | None = None
    previous_master_key: str | None = None  # still accepted for unwrapping while a rotation runs
    host: str = "127.0.0.1"
    port: int = 8080
    # Connections the kernel queues before the server accepts them (capped by net.core.somaxconn).
    # aiohttp's default of 128 dropped the SYNs of a reconnect storm, and each dropped client waited
    # 1, 3, 7 s to try again: 5,000 clients took 10 to 30 s instead of a few.
    listen_backlog: int = 4096
    # uvloop (libuv) runs the same asyncio code with less of the loop's own cost per callback: a
    # reconnect storm of 5,000 recovered a fifth sooner (docs/performance.md); "asyncio" opts out.
    event_loop: str = "uvloop"
    cors_origins: tuple[str, ...] = ()
    # Proxies (addresses or networks) whose X-Forwarded-For names the client: limits per address
    # count the client, not the load balancer.
    trusted_proxies: tuple[str, ...] = ()
    data_dir: Path = Path(".data")
    google_client_id: str | None = None
    google_jwks_url: str = "https://www.googleapis.com/oauth2/v3/certs"
    access_token_ttl: int = 900
    download_link_ttl: int = 3600  # a signed download link works this long (the seed's one hour)
    refresh_token_ttl: int = 30 * 86_400  # a device stays signed in this long after its last refresh
    token_expiry_notice: float = 60.0  # sockets hear `token_expiring` this long before their token ends
    session_cache_ttl: float = 5.0
    signin_attempts_per_address: int = 20  # sign-ins, registrations, Google sign-ins per address...
    signin_address_window: float = 60.0    # ...per this many seconds
    login_failures_per_account: int = 10   # wrong passwords per account...
    login_failure_window: float = 900.0    # ...per this many seconds
    # Accounts (server/services/accounts.py): password reset by mail.
    password_reset_ttl: int = 1800          # a reset token works this long, once
    password_resets_per_address: int = 10   # reset requests per client address per hour (then 429)
    password_resets_per_email: int = 3      # reset mails per address per hour (more are dropped silently)
    smtp_url: str | None = None             # smtp[s]://user:pass@host:port; unset: mail is a log line
    mail_from: str = "SourceNet Hub <no-reply@localhost>"
    public_url: str | None = None           # the page's address in mailed links; unset: http://HOST:PORT
    max_payload_bytes: int = 1_048_576
    db_pool_max: int = 20
    migrate_on_start: bool = True
    demo_data_on_first_start: bool = False
    shutdown_timeout: float = 10.0
    # Prefixes this process's Engine.IO session ids (`hub1.` + id), so a load balancer can send a
    # long-polling client's requests back to the process that holds its session (deploy/haproxy.cfg).
    node_name: str = ""
    history_cap: int = 1000
    history_ttl: int = 86_400
    presence_ttl: int = 30
    max_channels_per_connection: int = 100
    max_connections_per_user: int = 16
    event_rate: float = 20.0
    event_burst: int = 40
    long_poll_timeout: float = 25.0
    outbox_poll_interval: float = 1.0
    log_format: str = "console"
    # KVP chain. The producer is off unless turned on (tests); `from_env` turns it on for serve.
    block_producer: bool = False
    block_interval_seconds: float = 30.0
    pow_difficulty: int = 12
    block_reward: str | None = None       # None: keep chain_settings.initial_block_reward (50)
    halving_interval: int | None = None   # None: keep chain_settings.halving_interval (1000)
    miner_username: str | None = None
    mining_pool: str = "mining"
    # User mining (server/services/mining.py, docs/protocol.md "Mining").
    mining_share_difficulty: int = 12            # leading zero bits a Node share's hash needs
    mining_shares_per_minute: int = 120          # accepted shares per session per minute, at most
    mining_session_timeout_seconds: int = 60     # a gap without a heartbeat (or share) this long counts nothing
    mining_stale_grace_seconds: float = 5.0      # how long the previous tip's challenge is still accepted
    mobile_mining_seconds_per_day: int = 14_400  # Mobile seconds credited per user per UTC day
    mining_mobile_second_weight: str = "0.1"     # weight of one Mobile second; a Node share weighs 1
    max_block_transactions: int = 500
    # Demo faucet (POST /api/v1/me/faucet): None means on exactly when payments use the local KVP
    # chain (no SUI_RPC_URL), where a new user has no other way to get funds to pay with.
    demo_faucet: bool | None = None
    demo_faucet_amount: str = "10"
    # Staking (server/services/staking.py): lock-up and reward rate are counted in sealed blocks.
    staking_pool: str = "staking"                     # the reward pool staking rewards are drawn from
    staking_lockup_blocks: int = 10                   # sealed blocks before a stake may be unstaked
    staking_reward_per_block_rate: str = "0.0000001"  # fraction of the stake paid per sealed block
    # Earn-to-play games (server/services/games.py).
    game_session_idle_seconds: float = 300.0
    game_leaderboard_interval: float = 2.0
    game_leaderboard_period: str = "day"
    game_leaderboard_size: int = 10
    game_reward_workers: int = 4
    game_reward_batch_max: int = 200
    game_reward_queue_max: int = 20_000
    game_server_event_rate: float = 2000.0
    game_server_event_burst: int = 4000
    dao_sweep_interval: float = 5.0
    # The demo game player (server/services/demo_game.py): seconds between its rewards; 0 turns it off.
    demo_game_interval: float = 3.0

    def __post_init__(self) -> None:
        """Refuse values that cannot work, or not together; the message names the variable."""
        if self.ai_system_prompt_max_chars < 0:
            raise ValueError(f"AI_SYSTEM_PROMPT_MAX_CHARS must be 0 or more, got {self.ai_system_prompt_max_chars}")
        if self.ai_max_streams < 1:
            raise ValueError(f"AI_MAX_STREAMS must be at least 1, got {self.ai_max_streams}")
        if not 0 <= self.ai_delta_interval <= 0.1:
            raise ValueError(f"AI_DELTA_INTERVAL_MS must be between 0 and 100, got {self.ai_delta_interval * 1000:g}")
        if self.walrus_max_transfers < 1:
            raise ValueError(f"WALRUS_MAX_TRANSFERS must be at least 1, got {self.walrus_max_transfers}")
        if self.redis_pool_size < 1:
            raise ValueError(f"REDIS_POOL_SIZE must be at least 1, got {self.redis_pool_size}")
        if self.redis_pool_timeout <= 0:
            raise ValueError(f"REDIS_POOL_TIMEOUT must be greater than 0, got {self.redis_pool_timeout}")
        if self.game_reward_workers < 1:
            raise ValueError(f"GAME_REWARD_WORKERS must be at least 1, got {self.game_reward_workers}")
        if self.download_link_ttl < 1:
            raise ValueError(f"DOWNLOAD_LINK_TTL must be at least 1 second, got {self.download_link_ttl}")
        if self.smtp_url is not None and urllib.parse.urlsplit(self.smtp_url).scheme not in ("smtp", "smtps"):
            raise ValueError("SMTP_URL must be smtp://user:password@host:port or smtps://...")
        if self.public_url is not None and urllib.parse.urlsplit(self.public_url).scheme not in ("http", "https"):
            raise ValueError(f"PUBLIC_URL must be an http(s) URL, got {self.public_url!r}")
        if self.node_name and not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", self.node_name):
            # The dot ends the prefix in Engine.IO session ids; HAProxy matches `hub1.` to route.
            raise ValueError(f"HUB_NODE_NAME must be 1-32 letters, digits, '-' or '_', got {self.node_name!r}")
        if self.password_reset_ttl < 60:
            raise ValueError(f"PASSWORD_RESET_TTL must be at least 60 seconds, got {self.password_reset_ttl}")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"TRUSTED_PROXIES must list addresses or networks, got {proxy!r}") from None
        if self.purchase_poll_interval <= 0:
            raise ValueError(f"PURCHASE_POLL_INTERVAL must be greater than 0, got {self.purchase_poll_interval}")
        if not 0 < self.purchase_job_heartbeat < self.purchase_job_lease:
            raise ValueError(f"PURCHASE_JOB_HEARTBEAT must be greater than 0 and less than PURCHASE_JOB_LEASE, "
                             f"got {self.purchase_job_heartbeat} and {self.purchase_job_lease}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from environment variables, falling back to the defaults above."""
        env = os.environ if env is None else env
        defaults = cls()
        origins = tuple(o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip())
        return cls(
            database_url=_optional(env, "DATABASE_URL"),
            redis_url=_optional(env, "REDIS_URL"),
            redis_prefix=env.get("REDIS_PREFIX") or defaults.redis_prefix,
            redis_pool_size=_int(env, "REDIS_POOL_SIZE", defaults.redis_pool_size),
            redis_pool_timeout=_float(env, "REDIS_POOL_TIMEOUT", defaults.redis_pool_timeout),
            openai_base_url=_optional(env, "OPENAI_BASE_URL"),
            openai_api_key=_optional(env, "OPENAI_API_KEY"),
            ai_model=env.get("AI_MODEL") or defaults.ai_model,
            ai_max_input_chars=_int(env, "AI_MAX_INPUT_CHARS", defaults.ai_max_input_chars),
            ai_messages_per_minute=_int(env, "AI_MESSAGES_PER_MINUTE", defaults.ai_messages_per_minute),
            ai_daily_token_quota=_int(env, "AI_DAILY_TOKEN_QUOTA", defaults.ai_daily_token_quota),
            ai_context_tokens=_int(env, "AI_CONTEXT_TOKENS", defaults.ai_context_tokens),
            ai_max_output_tokens=_int(env, "AI_MAX_OUTPUT_TOKENS", defaults.ai_max_output_tokens),
            ai_timeout=_int(env, "AI_TIMEOUT", int(defaults.ai_timeout)),
            ai_max_retries=_int(env, "AI_MAX_RETRIES", defaults.ai_max_retries),
            ai_max_tool_rounds=_int(env, "AI_MAX_TOOL_ROUNDS", defaults.ai_max_tool_rounds),
            ai_max_streams=_int(env, "AI_MAX_STREAMS", defaults.ai_max_streams),
            ai_tool_choice=env.get("AI_TOOL_CHOICE") or defaults.ai_tool_choice,
            ai_model_allowlist=tuple(m.strip() for m in env.get("AI_MODEL_ALLOWLIST", "").split(",") if m.strip()),
            ai_system_prompt_max_chars=_int(env, "AI_SYSTEM_PROMPT_MAX_CHARS", defaults.ai_system_prompt_max_chars),
            ai_delta_interval=_float(env, "AI_DELTA_INTERVAL_MS", defaults.ai_delta_interval * 1000) / 1000,
            dataset_query_timeout=_float(env, "DATASET_QUERY_TIMEOUT", defaults.dataset_query_timeout),
            dataset_query_max_rows=_int(env, "DATASET_QUERY_MAX_ROWS", defaults.dataset_query_max_rows),
            dataset_query_max_bytes=_int(env, "DATASET_QUERY_MAX_BYTES", defaults.dataset_query_max_bytes),
            dataset_query_memory_mb=_int(env, "DATASET_QUERY_MEMORY_MB", defaults.dataset_query_memory_mb),
            dataset_query_concurrency=_int(env, "DATASET_QUERY_CONCURRENCY", defaults.dataset_query_concurrency),
            dataset_queries_per_minute=_int(env, "DATASET_QUERIES_PER_MINUTE", defaults.dataset_queries_per_minute),
            sui_rpc_url=_optional(env, "SUI_RPC_URL"),
            escrow_address=_optional(env, "ESCROW_ADDRESS"),
            escrow_release_seconds=_int(env, "ESCROW_RELEASE_SECONDS", defaults.escrow_release_seconds),
            platform_fee_rate=_fee_rate(env, "PLATFORM_FEE_RATE") or defaults.platform_fee_rate,
            payment_max_age=_int(env, "PAYMENT_MAX_AGE", defaults.payment_max_age),
            payment_verify_timeout=_int(env, "PAYMENT_VERIFY_TIMEOUT", defaults.payment_verify_timeout),
            purchase_workers=_int(env, "PURCHASE_WORKERS", defaults.purchase_workers),
            purchase_poll_interval=_float(env, "PURCHASE_POLL_INTERVAL", defaults.purchase_poll_interval),
            purchase_job_lease=_float(env, "PURCHASE_JOB_LEASE", defaults.purchase_job_lease),
            purchase_job_heartbeat=_float(env, "PURCHASE_JOB_HEARTBEAT", defaults.purchase_job_heartbeat),
            walrus_publisher_url=_optional(env, "WALRUS_PUBLISHER_URL"),
            walrus_aggregator_url=_optional(env, "WALRUS_AGGREGATOR_URL"),
            walrus_epochs=_int(env, "WALRUS_EPOCHS", defaults.walrus_epochs),
            walrus_max_transfers=_int(env, "WALRUS_MAX_TRANSFERS", defaults.walrus_max_transfers),
            max_upload_bytes=_int(env, "MAX_UPLOAD_BYTES", defaults.max_upload_bytes),
            kyc_max_bytes=_int(env, "KYC_MAX_BYTES", defaults.kyc_max_bytes),
            jwt_secret=_optional(env, "JWT_SECRET"),
            master_key=_optional(env, "MASTER_KEY"),
            previous_master_key=_optional(env, "PREVIOUS_MASTER_KEY"),
            host=env.get("HOST") or defaults.host,
            port=_int(env, "PORT", defaults.port),
            listen_backlog=_int(env, "LISTEN_BACKLOG", defaults.listen_backlog),
            event_loop=_choice(env, "EVENT_LOOP", EVENT_LOOPS, defaults.event_loop),
            cors_origins=origins,
            trusted_proxies=tuple(p.strip() for p in env.get("TRUSTED_PROXIES", "").split(",") if p.strip()),
            data_dir=Path(env.get("DATA_DIR") or defaults.data_dir),
            google_client_id=_optional(env, "GOOGLE_CLIENT_ID"),
            google_jwks_url=env.get("GOOGLE_JWKS_URL") or defaults.google_jwks_url,
            access_token_ttl=_int(env, "ACCESS_TOKEN_TTL", defaults.access_token_ttl),
            download_link_ttl=_int(env, "DOWNLOAD_LINK_TTL", defaults.download_link_ttl),
            refresh_token_ttl=_int(env, "REFRESH_TOKEN_TTL", defaults.refresh_token_ttl),
            token_expiry_notice=_float(env, "TOKEN_EXPIRY_NOTICE", defaults.token_expiry_notice),
            signin_attempts_per_address=_int(env, "SIGNIN_ATTEMPTS_PER_ADDRESS", defaults.signin_attempts_per_address),
            signin_address_window=_float(env, "SIGNIN_ADDRESS_WINDOW", defaults.signin_address_window),
            login_failures_per_account=_int(env, "LOGIN_FAILURES_PER_ACCOUNT", defaults.login_failures_per_account),
            login_failure_window=_float(env, "LOGIN_FAILURE_WINDOW", defaults.login_failure_window),
            password_reset_ttl=_int(env, "PASSWORD_RESET_TTL", defaults.password_reset_ttl),
            password_resets_per_address=_int(env, "PASSWORD_RESETS_PER_ADDRESS", defaults.password_resets_per_address),
            password_resets_per_email=_int(env, "PASSWORD_RESETS_PER_EMAIL", defaults.password_resets_per_email),
            smtp_url=_optional(env, "SMTP_URL"),
            mail_from=env.get("MAIL_FROM") or defaults.mail_from,
            public_url=_optional(env, "PUBLIC_URL"),
            max_payload_bytes=_int(env, "MAX_PAYLOAD_BYTES", defaults.max_payload_bytes),
            db_pool_max=_int(env, "DB_POOL_MAX", defaults.db_pool_max),
            log_format=env.get("LOG_FORMAT") or defaults.log_format,
            history_cap=_int(env, "HISTORY_CAP", defaults.history_cap),
            history_ttl=_int(env, "HISTORY_TTL", defaults.history_ttl),
            max_channels_per_connection=_int(env, "MAX_CHANNELS_PER_CONNECTION",
                                             defaults.max_channels_per_connection),
            max_connections_per_user=_int(env, "MAX_CONNECTIONS_PER_USER", defaults.max_connections_per_user),
            event_rate=_int(env, "EVENT_RATE", int(defaults.event_rate)),
            event_burst=_int(env, "EVENT_BURST", defaults.event_burst),
            block_producer=_bool(env, "BLOCK_PRODUCER", True),
            shutdown_timeout=_float(env, "SHUTDOWN_TIMEOUT", defaults.shutdown_timeout),
            node_name=env.get("HUB_NODE_NAME", "").strip(),
            block_interval_seconds=_float(env, "BLOCK_INTERVAL", defaults.block_interval_seconds),
            pow_difficulty=_int(env, "POW_DIFFICULTY", defaults.pow_difficulty),
            block_reward=_amount(env, "BLOCK_REWARD"),
            halving_interval=_int(env, "HALVING_INTERVAL", 0) or None,
            miner_username=_optional(env, "MINER_USERNAME"),
            mining_pool=env.get("MINING_POOL") or defaults.mining_pool,
            mining_share_difficulty=_int(env, "MINING_SHARE_DIFFICULTY", defaults.mining_share_difficulty),
            mining_shares_per_minute=_int(env, "MINING_SHARES_PER_MINUTE", defaults.mining_shares_per_minute),
            mining_session_timeout_seconds=_int(env, "MINING_SESSION_TIMEOUT",
                                                defaults.mining_session_timeout_seconds),
            mining_stale_grace_seconds=_float(env, "MINING_STALE_GRACE_SECONDS", defaults.mining_stale_grace_seconds),
            mobile_mining_seconds_per_day=_int(env, "MOBILE_MINING_SECONDS_PER_DAY",
                                               defaults.mobile_mining_seconds_per_day),
            mining_mobile_second_weight=_amount(env, "MINING_MOBILE_SECOND_WEIGHT")
            or defaults.mining_mobile_second_weight,
            max_block_transactions=_int(env, "MAX_BLOCK_TRANSACTIONS", defaults.max_block_transactions),
            demo_faucet=_bool(env, "DEMO_FAUCET", False) if _optional(env, "DEMO_FAUCET") else None,
            demo_faucet_amount=_amount(env, "DEMO_FAUCET_AMOUNT") or defaults.demo_faucet_amount,
            staking_pool=env.get("STAKING_POOL") or defaults.staking_pool,
            staking_lockup_blocks=_int(env, "STAKING_LOCKUP_BLOCKS", defaults.staking_lockup_blocks),
            staking_reward_per_block_rate=_amount(env, "STAKING_REWARD_PER_BLOCK_RATE")
            or defaults.staking_reward_per_block_rate,
            game_session_idle_seconds=_float(env, "GAME_SESSION_IDLE_SECONDS", defaults.game_session_idle_seconds),
            game_leaderboard_interval=_float(env, "GAME_LEADERBOARD_INTERVAL", defaults.game_leaderboard_interval),
            game_leaderboard_period=env.get("GAME_LEADERBOARD_PERIOD") or defaults.game_leaderboard_period,
            game_leaderboard_size=_int(env, "GAME_LEADERBOARD_SIZE", defaults.game_leaderboard_size),
            game_reward_workers=_int(env, "GAME_REWARD_WORKERS", defaults.game_reward_workers),
            game_reward_batch_max=_int(env, "GAME_REWARD_BATCH_MAX", defaults.game_reward_batch_max),
            game_server_event_rate=_float(env, "GAME_SERVER_EVENT_RATE", defaults.game_server_event_rate),
            game_server_event_burst=_int(env, "GAME_SERVER_EVENT_BURST", defaults.game_server_event_burst),
            dao_sweep_interval=_float(env, "DAO_SWEEP_INTERVAL", defaults.dao_sweep_interval),
            demo_game_interval=_float(env, "DEMO_GAME_INTERVAL", defaults.demo_game_interval),
        )

    @property
    def faucet_enabled(self) -> bool:
        """Whether the demo faucet pays: DEMO_FAUCET when set, else only on the local KVP chain."""
        enabled = self.demo_faucet if self.demo_faucet is not None else self.sui_rpc_url is None
        return enabled and Decimal(self.demo_faucet_amount) > 0

    def replace(self, **changes) -> "Settings":
        """Return a copy with some settings changed (tests and the CLI use it)."""
        return dataclasses.replace(self, **changes)


SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
