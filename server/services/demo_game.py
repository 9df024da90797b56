"""The demo game player: on a demo install, the demo users take turns playing 'Block Runner'.

It plays as a real player and a real game server do, through the service calls the /games
handlers make: the player starts a session, the game server (authenticated by the game's token)
reports one reward every DEMO_GAME_INTERVAL seconds with increasing `seq`, staying inside the
game's policy, keeps the session alive with a heartbeat while the policy makes it wait, and ends
it after a few rewards; then the next player's turn. So the Games tab gets the normal
`reward_earned` and `leaderboard_changed` events, and balances get the normal ledger rows.

One process plays across all server processes: it holds a PostgreSQL advisory lock on its own
pool connection while it leads, as the block producer does; the others stand by.

The game's token is derived from MASTER_KEY (an HMAC), so every process of a deployment knows it
and none stores it. It is installed only on a game without a token: an owner who rotates the
demo game's token takes the game over, and the demo waits.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import hmac
import random
import time
from decimal import ROUND_DOWN, Decimal
from typing import AsyncIterator

import asyncpg
import structlog
from aiohttp import web

from db import demo_game as queries
from db import games as game_queries
from db.pool import POOL, leadership, ping
from server.core.crypto import MASTER_KEY
from server.core.errors import Conflict, ErrorCode, HubError, RateLimited, Unauthorized
from server.core.money import AMOUNT_QUANTUM
from server.core.settings import SETTINGS
from server.realtime.redis import REDIS_HEALTH
from server.services import games
from server.services.demo import DEMO_USERS
from server.services.games import GAMES

log = structlog.get_logger(__name__)

DEMO_LOCK_KEY = 0x4855_4230_6465_6D6F  # "HUB0demo": a fixed key no other lock uses
DEMO_GAME = "Block Runner"  # registered by server/services/demo.py, owned by its first user
REWARD_TYPES = ("coin", "gem", "distance")  # used when the game allows any type
REWARDS_PER_SESSION = (4, 8)
REWARD_CENTS = (25, 500)  # 0.25 .. 5.00 KVP a reward, capped further by the game's policy


class DemoWaiting(Exception):
    """The demo cannot play now (no demo data yet, the game suspended, its token taken over)."""


def demo_token(master_key: bytes, game_id: int) -> str:
    """The demo game's token: an HMAC of its id under the master key, shaped like any game token."""
    mac = hmac.new(master_key, f"sourcenet-demo-game-token:{game_id}".encode(), hashlib.sha256).digest()
    return games.TOKEN_PREFIX + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


@dataclasses.dataclass(slots=True)
class _Play:
    """The running session as its player and game server see it."""

    session_id: int
    player: queries.DemoPlayer
    next_seq: int
    earned: Decimal
    goal: int
    booked: int  # rewards the session holds
    # (monotonic time of the ack, value): later than the row's created_at, so the local view of
    # the per-minute window never holds less than the server's.
    window: collections.deque = dataclasses.field(default_factory=collections.deque)
    pending: games.RewardReport | None = None


class DemoGamePlayer:
    """Plays the demo game while it holds the advisory lock; stands by otherwise."""

    def __init__(self, app: web.Application, interval: float, rng: random.Random | None = None) -> None:
        self.app = app
        self.interval = interval
        self.rng = rng or random.Random()
        self.leading = False
        self.rewards = 0  # rewards this process booked
        self.sessions_ended = 0
        self.refused = 0  # reports the server refused (the demo should stay inside the policy)
        self._demo: tuple[int, list[queries.DemoPlayer], str] | None = None
        self._play: _Play | None = None
        self._turn: int | None = None
        self._problem: str | None = None

    async def run(self) -> None:
        """Lead or stand by until cancelled; errors of the lock's connection go to the restart loop."""
        while True:
            async with leadership(self.app[POOL], DEMO_LOCK_KEY) as conn:
                if conn is None:
                    await asyncio.sleep(self.interval)
                    continue
                self.leading = True
                log.info("demo_game_leading", interval=self.interval)
                try:
                    await self._lead(conn)
                finally:
                    self.leading = False

    async def _lead(self, lock_conn: asyncpg.Connection) -> None:
        self._play, self._turn = None, None
        while True:
            await asyncio.sleep(self.interval)
            # The lock lives on this connection: a dead one must end the lead, not be ignored.
            await ping(lock_conn)
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the demo must never take the server down
                self._report_problem(exc)
            else:
                if self._problem is not None:
                    log.info("demo_game_resumed")
                    self._problem = None

    def _report_problem(self, exc: Exception) -> None:
        # Once per distinct problem, so a suspended game does not log every interval.
        reason = exc.message if isinstance(exc, HubError) else str(exc) or type(exc).__name__
        if reason == self._problem:
            return
        self._problem = reason
        if isinstance(exc, DemoWaiting) or (isinstance(exc, HubError) and exc.code is not ErrorCode.INTERNAL_ERROR):
            log.warning("demo_game_waiting", reason=reason)
        else:
            log.error("demo_game_step_failed", reason=reason, exc_info=exc)

    async def step(self) -> None:
        """One move: start the next player's session when none runs, then report a reward (or wait
        with a heartbeat when the policy says so), and end the session after its last reward."""
        game_id, players, token = self._demo or await self._setup()
        try:
            caller = await self.app[GAMES].tokens.authenticate(self.app[POOL], token)
        except Unauthorized:
            self._demo = None
            raise DemoWaiting("the demo game's token was rotated by its owner; the demo waits") from None
        async with self.app[POOL].acquire() as conn:
            game = await game_queries.get_game(conn, game_id)
        if game is None:
            self._demo = None
            raise DemoWaiting("the demo game is gone")
        if game.status != "active":
            raise DemoWaiting(f"the demo game is {game.status}")
        if self._play is None:
            self._play = await self._start(players, game_id)
        play = self._play
        report = play.pending or self._next_report(game, play)
        if report is None:
            if play.booked >= play.goal or play.earned >= game.max_reward_per_session:
                await self._end(caller)
            else:  # over the per-minute cap: keep the session from timing out until there is room
                await games.heartbeat(self.app, caller, play.session_id)
            return
        play.pending = report
        try:
            ack = await self.app[GAMES].ingest.submit(report)
        except HubError as exc:
            if exc.code in (ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL_ERROR):
                raise  # booked or not is unknown: the same report (same seq) goes again next move
            play.pending = None
            await self._refused(exc, caller, play)
            return
        play.pending = None
        play.next_seq += 1
        play.booked += 1
        play.earned = Decimal(ack["session_total"])
        play.window.append((time.monotonic(), report.value))
        self.rewards += 1
        if play.booked >= play.goal or play.earned >= game.max_reward_per_session:
            await self._end(caller)

    async def _setup(self) -> tuple[int, list[queries.DemoPlayer], str]:
        async with self.app[POOL].acquire() as conn:
            game = await queries.find_game(conn, DEMO_GAME, DEMO_USERS[0][0])
            players = await queries.find_players(conn, [username for username, _, _ in DEMO_USERS])
            if game is None or not players:
                raise DemoWaiting("the demo data is not loaded")
            token = demo_token(self.app[MASTER_KEY], game.game_id)
            # Compare-and-set: a token its owner issued meanwhile wins, and authenticate says so.
            if game.token_hash is None and await queries.claim_token(conn, game.game_id, games.token_digest(token)):
                log.info("demo_game_token_installed", game_id=game.game_id)
        self._demo = (game.game_id, players, token)
        return self._demo

    async def _start(self, players: list[queries.DemoPlayer], game_id: int) -> _Play:
        if self._turn is None:  # this lead's first turn: finish what an earlier leader left running
            self._turn = 0
            async with self.app[POOL].acquire() as conn:
                for index, candidate in enumerate(players):
                    if await game_queries.active_session(conn, game_id, candidate.user_id) is not None:
                        self._turn = index
                        break
        player = players[self._turn % len(players)]
        self._turn += 1
        session = await games.start_session(self.app, player.user_id, game_id)
        # A resumed session already holds seqs 1..reward_count: number (and count) on from there.
        return _Play(session_id=session["session_id"], player=player, next_seq=session["reward_count"] + 1,
                     earned=Decimal(session["rewards_earned"]), booked=session["reward_count"],
                     goal=self.rng.randint(*REWARDS_PER_SESSION))

    def _next_report(self, game: game_queries.Game, play: _Play) -> games.RewardReport | None:
        """The next reward inside the policy; None when the session is done or must wait."""
        if play.booked >= play.goal:
            return None
        now = time.monotonic()
        while play.window and play.window[0][0] <= now - games.MINUTE:
            play.window.popleft()
        in_window = sum((value for _, value in play.window), Decimal(0))
        value = min(Decimal(self.rng.randint(*REWARD_CENTS)) / 100, game.max_reward_per_event,
                    game.max_reward_per_session - play.earned, game.max_reward_per_minute - in_window)
        value = value.quantize(AMOUNT_QUANTUM, rounding=ROUND_DOWN)
        if value <= 0:
            return None
        return games.RewardReport(game_id=game.game_id, session_id=play.session_id, seq=play.next_seq,
                                  reward_type=self.rng.choice(game.reward_types or REWARD_TYPES), value=value)

    async def _refused(self, exc: HubError, caller: games.GameCaller, play: _Play) -> None:
        """Act on a report the server refused (nothing was booked)."""
        self.refused += 1
        policy = exc.extra.get("policy")
        if isinstance(exc, RateLimited):  # the per-minute cap (or a full queue): wait, alive
            await games.heartbeat(self.app, caller, play.session_id)
        elif policy == "max_reward_per_session":
            await self._end(caller)
        elif exc.extra.get("reason") == games.POOL_EXHAUSTED:
            raise DemoWaiting(f"the '{games.GAMING_POOL}' reward pool is empty; the demo waits for an admin "
                              "to add tokens") from exc
        elif isinstance(exc, Conflict) and exc.field == "seq":
            play.next_seq += 1  # someone else used this seq in a resumed session: skip it
        elif isinstance(exc, Conflict) and exc.field == "session_id":
            self._play = None  # it ended or timed out meanwhile: the next player's turn
        else:
            raise exc

    async def _end(self, caller: games.GameCaller) -> None:
        play = self._play
        assert play is not None
        ended = await games.end_session(self.app, caller, play.session_id)
        self._play = None  # only now: a failed end is tried again next move
        self.sessions_ended += 1
        log.info("demo_game_session_played", session_id=play.session_id, player=play.player.username,
                 rewards=ended["reward_count"], earned=ended["rewards_earned"])


DEMO_GAME_PLAYER: web.AppKey[DemoGamePlayer] = web.AppKey("demo_game_player", DemoGamePlayer)


async def demo_game_ctx(app: web.Application) -> AsyncIterator[None]:
    """Play the demo game (demo data on and DEMO_GAME_INTERVAL > 0) for the application's lifetime."""
    settings = app[SETTINGS]
    if not settings.demo_data_on_first_start or settings.demo_game_interval <= 0:
        yield
        return
    player = app[DEMO_GAME_PLAYER] = DemoGamePlayer(app, settings.demo_game_interval)
    task = asyncio.create_task(app[REDIS_HEALTH].run_with_backoff(player.run, "demo_game"))
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
