// The Games view (#/games, #/games/<game_id>): every game with its live leaderboard, a readable
// live reward feed, the gaming reward pool's balance, and the signed-in player's sessions and earnings.
// Players are shown by name (the events and the leaderboard carry the username), never by wallet or id.
import { html, render, useEffect, useRef } from "../vendor/preact-htm.module.js";
import { createStore, FEED_LENGTH, formatAmount } from "../ui.js";

const GAMES_PAGE = 20;
const GAMING_POOL = "gaming"; // every game's rewards are drawn from this pool (docs/protocol.md)
const PERIODS = { hour: "the last hour", day: "the last 24 hours", week: "the last 7 days", all: "all time" };
const STATUS_TEXT = { Active: "playing", Ended: "ended", TimedOut: "timed out" };

let context = null;
let started = null; // start's first reads: route may run before they have finished
let opened = false; // the game channels are watched once the view first opens (each counts its watchers)
const watched = new Set();

const state = {
  games: [], nextAfter: null, gamesLoaded: false, gamesError: "",
  boards: new Map(), // game_id -> {period, entries}
  watching: new Map(), // game_id -> how many watch the game's channel
  activity: new Map(), // game_id -> the latest session news, as a sentence
  feed: [], // the newest rewards of every game, newest first
  pool: null, poolError: "",
  mine: null, mineError: "", mineBusy: false,
  selected: null, // the game of #/games/<id>, or null for the list
  missing: null, // a #/games/<id> that names no game
  focus: false,
};

const { changed, use: useStore } = createStore(state);


// --- money: KVP amounts as exact base units (1e-8), never floats --------------------------------

const UNIT = 100000000n;

function units(amount) {
  const text = String(amount ?? "0");
  const negative = text.startsWith("-");
  const [whole, fraction = ""] = text.replace("-", "").split(".");
  const value = BigInt(whole || "0") * UNIT + BigInt(fraction.padEnd(8, "0").slice(0, 8) || "0");
  return negative ? -value : value;
}

function fromUnits(value) {
  const sign = value < 0n ? "-" : "";
  const size = value < 0n ? -value : value;
  return `${sign}${size / UNIT}.${String(size % UNIT).padStart(8, "0")}`;
}

const kvp = (amount) => `${formatAmount(amount)} KVP`;
const timeText = (iso) => (iso ? new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" }) : "");
const dateText = (iso) => (iso ? new Date(iso).toLocaleString([], { dateStyle: "medium", timeStyle: "short" }) : "");
const playerName = (data) => data.username ?? "A former player";
const gameName = (id) => state.games.find((game) => game.game_id === id)?.name ?? `Game ${id}`;

// --- loading ------------------------------------------------------------------------------------

async function loadGames({ more = false } = {}) {
  const params = new URLSearchParams({ limit: String(GAMES_PAGE) });
  if (more && state.nextAfter) params.set("after", String(state.nextAfter));
  try {
    const page = await context.api("GET", `/api/v1/games?${params}`);
    // A union by id: a game a deep link loaded beyond the first page stays.
    const byId = new Map(state.games.map((game) => [game.game_id, game]));
    for (const game of page.games) byId.set(game.game_id, game);
    state.games = [...byId.values()].sort((a, b) => a.game_id - b.game_id);
    if (more || !state.gamesLoaded) state.nextAfter = page.next_after ?? null;
    state.gamesError = "";
    state.gamesLoaded = true;
    changed();
    if (opened) await Promise.all(state.games.map(watch));
  } catch (error) {
    state.gamesError = `Could not load the games: ${error.message}`;
    changed();
  }
}

/** A game a deep link names that the loaded pages do not hold (or that does not exist). */
async function loadOneGame(gameId) {
  try {
    const game = await context.api("GET", `/api/v1/games/${gameId}`);
    if (!state.games.some((known) => known.game_id === game.game_id)) {
      state.games = [...state.games, game].sort((a, b) => a.game_id - b.game_id);
    }
    if (state.missing === gameId) state.missing = null;
    changed();
    await watch(game);
  } catch (error) {
    if (error.code === "not_found" && state.selected === gameId) state.missing = gameId;
    else state.gamesError = `Could not load game ${gameId}: ${error.message}`;
    changed();
  }
}

const boardVersions = new Map(); // a REST answer older than a live leaderboard must not replace it

async function loadBoard(gameId) {
  const version = (boardVersions.get(gameId) ?? 0) + 1;
  boardVersions.set(gameId, version);
  try {
    const board = await context.api("GET", `/api/v1/games/${gameId}/leaderboard`);
    if (boardVersions.get(gameId) !== version) return;
    state.boards.set(gameId, board);
    changed();
  } catch {
    if (!state.boards.has(gameId)) state.boards.set(gameId, { period: null, entries: [], failed: true });
    changed();
  }
}

async function loadPool() {
  try {
    const { pools } = await context.api("GET", "/api/v1/reward-pools");
    state.pool = pools.find((pool) => pool.name === GAMING_POOL) ?? { missing: true };
    state.poolError = "";
  } catch (error) {
    state.poolError = `Could not read the reward pool: ${error.message}`;
  }
  changed();
}

let mineRequest = 0;

async function loadMine({ more = false } = {}) {
  const request = ++mineRequest;
  const params = new URLSearchParams({ limit: "10" });
  if (more && state.mine?.next_before) params.set("before", String(state.mine.next_before));
  state.mineBusy = more;
  try {
    const page = await context.api("GET", `/api/v1/me/game-sessions?${params}`);
    if (request !== mineRequest) return;
    if (more) {
      const known = new Set(state.mine.sessions.map((s) => s.session_id));
      page.sessions = [...state.mine.sessions, ...page.sessions.filter((s) => !known.has(s.session_id))];
    }
    state.mine = page;
    state.mineError = "";
  } catch (error) {
    if (request === mineRequest) state.mineError = `Could not load your sessions: ${error.message}`;
  } finally {
    state.mineBusy = false;
    changed();
  }
}

// My sessions change on events of mine: re-read them once a burst of rewards has passed.
let mineTimer = null;
function reloadMineSoon() {
  clearTimeout(mineTimer);
  mineTimer = setTimeout(() => loadMine(), 300);
}

// --- live ---------------------------------------------------------------------------------------

/** The pool pays the reward and the owner's share (value × revenue share, truncated to 8 decimals). */
function drawFromPool(game, value) {
  if (!state.pool || state.pool.missing || state.pool.remaining_tokens === undefined) return;
  const reward = units(value);
  const share = game?.owner_id && game.revenue_share ? (reward * units(game.revenue_share)) / UNIT : 0n;
  const remaining = units(state.pool.remaining_tokens) - reward - share;
  state.pool = { ...state.pool, remaining_tokens: fromUnits(remaining < 0n ? 0n : remaining) };
}

function applyEvent(gameId, event) {
  const data = event.data ?? {};
  const game = state.games.find((known) => known.game_id === gameId);
  if (event.type === "leaderboard_changed") {
    boardVersions.set(gameId, (boardVersions.get(gameId) ?? 0) + 1);
    state.boards.set(gameId, data);
  } else if (event.type === "reward_earned") {
    const key = String(data.reward_id ?? event.id);
    if (!state.feed.some((item) => item.key === key)) {
      state.feed = [{ key, gameId, ...data }, ...state.feed].slice(0, FEED_LENGTH);
      drawFromPool(game, data.value);
    }
  }
  const news = sessionNews(event.type, data);
  if (news) state.activity.set(gameId, news);
  if (context.me && data.user_id === context.me.id) reloadMineSoon();
  changed();
}

/** The latest about a game's sessions, by name: "alice is playing (session 7), 12.5 KVP earned so far". */
function sessionNews(type, data) {
  const who = context.me && data.user_id === context.me.id ? "You" : playerName(data);
  const session = `session ${data.session_id}`;
  if (type === "session_started") return `${who} started playing (${session}).`;
  if (type === "reward_earned") return `${who} ${who === "You" ? "are" : "is"} playing (${session}): ${kvp(data.session_total)} earned so far.`;
  if (type === "session_ended") {
    const how = data.status === "TimedOut" ? "timed out" : "ended";
    return `${who === "You" ? "Your" : `${who}'s`} ${session} ${how} with ${kvp(data.rewards_earned)} earned.`;
  }
  return null;
}

async function watch(game) {
  const gameId = game.game_id;
  if (watched.has(gameId)) return;
  watched.add(gameId);
  // Subscribed before the leaderboard is read, so nothing that changes it meanwhile is missed.
  const subscription = context.hub.subscribe("/games", `game:${gameId}`, {
    onPresence(count) { state.watching.set(gameId, count); changed(); },
    onGap() { loadBoard(gameId); loadPool(); loadMine(); },
    onEvent(event) { applyEvent(gameId, event); },
  });
  await Promise.all([subscription.catch(() => { watched.delete(gameId); }), loadBoard(gameId)]);
}

async function endSession(session) {
  try {
    await context.api("POST", `/api/v1/game-sessions/${session.session_id}/end`);
    state.mineError = "";
    await loadMine();
  } catch (error) {
    state.mineError = `Could not end the session: ${error.message}`;
    changed();
  }
}

// --- views --------------------------------------------------------------------------------------

function Leaderboard({ gameId, limit }) {
  const board = state.boards.get(gameId);
  if (!board) return html`<p class="hint">Loading the leaderboard…</p>`;
  if (board.failed) return html`<p class="hint">The leaderboard could not be read; it updates when the next reward comes.</p>`;
  const entries = (board.entries ?? []).slice(0, limit);
  const period = PERIODS[board.period] ?? "this period";
  if (!entries.length) return html`<p class="empty">Nobody has earned a reward in ${period} yet.</p>`;
  const me = context.me?.id;
  return html`
    <ol class="leaderboard" aria-label=${`Leaderboard of ${gameName(gameId)}, ${period}`}>
      ${entries.map((entry) => html`
        <li key=${entry.user_id} class=${entry.user_id === me ? "you" : ""} data-user=${entry.user_id === me ? "you" : "other"}
          aria-current=${entry.user_id === me ? "true" : undefined}>
          <span class="rank">${entry.rank ? `${entry.rank}.` : ""}</span>${" "}
          <span class="name">${entry.username ?? "A former player"}${entry.user_id === me ? html` <strong class="you-tag">(you)</strong>` : null}</span>${" "}
          <span class="total">${kvp(entry.total)}</span>
        </li>`)}
    </ol>`;
}

function Feed({ gameId, id }) {
  const items = gameId === undefined ? state.feed : state.feed.filter((item) => item.gameId === gameId);
  const me = context.me?.id;
  return html`
    <ul id=${id} class="feed" aria-live="polite" aria-relevant="additions">
      ${items.map((item) => html`
        <li key=${item.key} class=${item.user_id === me ? "you" : ""}>
          <span class="who">${playerName(item)}${item.user_id === me ? html` <strong class="you-tag">(you)</strong>` : null}</span>
          ${" earned "}<strong class="amount">${kvp(item.value)}</strong>${" "}
          <span class="type">(${item.reward_type})</span>
          ${gameId === undefined ? html`<span class="in"> in <a href=${`#/games/${item.gameId}`}>${gameName(item.gameId)}</a></span>` : null}
          <span class="sep" aria-hidden="true">${" · "}</span><time datetime=${item.created_at}>${timeText(item.created_at)}</time>
        </li>`)}
    </ul>
    ${items.length ? null : html`<p class="empty">No rewards since you opened this page. They appear here as players earn them.</p>`}`;
}

function Pool() {
  const pool = state.pool;
  let text = "Reading the reward pool…";
  if (pool?.missing) text = `There is no "${GAMING_POOL}" reward pool yet: rewards are refused until an administrator creates it.`;
  else if (pool) text = html`<strong>${kvp(pool.remaining_tokens)}</strong> left to pay rewards, of ${kvp(pool.total_tokens)} (every game draws on it).`;
  return html`
    <section class="pool" aria-labelledby="games-pool-title">
      <h3 id="games-pool-title">Reward pool</h3>
      <p id="games-pool" aria-live="polite">${text}</p>
      <p class="error" role="alert">${state.poolError}</p>
    </section>`;
}

function MySessions({ gameId }) {
  const mine = state.mine;
  const title = gameId === undefined ? "My sessions and earnings" : "My sessions of this game";
  let body;
  if (!mine) body = html`<p class="hint">Loading your sessions…</p>`;
  else {
    const sessions = gameId === undefined ? mine.sessions : mine.sessions.filter((s) => s.game_id === gameId);
    const earnings = gameId === undefined ? null : mine.earnings.find((e) => e.game_id === gameId);
    const summary = gameId === undefined
      ? html`<p class="earned">You earned <strong>${kvp(mine.total.rewards_earned)}</strong> in ${mine.total.sessions} session${mine.total.sessions === 1 ? "" : "s"} (${mine.total.reward_count} reward${mine.total.reward_count === 1 ? "" : "s"}).</p>`
      : html`<p class="earned">You earned <strong>${kvp(earnings?.rewards_earned ?? "0")}</strong> in this game over ${earnings?.sessions ?? 0} session${earnings?.sessions === 1 ? "" : "s"}.</p>`;
    body = html`
      ${summary}
      ${gameId === undefined && mine.earnings.length ? html`
        <ul class="earnings" aria-label="Earnings per game">
          ${mine.earnings.map((e) => html`<li key=${e.game_id}><a href=${`#/games/${e.game_id}`}>${e.name ?? gameName(e.game_id)}</a>: ${kvp(e.rewards_earned)} in ${e.sessions} session${e.sessions === 1 ? "" : "s"}</li>`)}
        </ul>` : null}
      ${sessions.length ? html`
        <ul class="sessions" aria-label="My sessions, newest first">
          ${sessions.map((s) => html`
            <li key=${s.session_id} data-session=${s.session_id} data-status=${s.status}>
              <span class="what">${s.game_name ?? gameName(s.game_id)} · session ${s.session_id}</span>${" · "}
              <span class="status">${STATUS_TEXT[s.status] ?? s.status}</span>${" · "}
              <span>started <time datetime=${s.started_at}>${dateText(s.started_at)}</time></span>${" · "}
              <span class="earned">${kvp(s.rewards_earned)} earned · ${s.reward_count} reward${s.reward_count === 1 ? "" : "s"}</span>
              ${s.status === "Active" ? html`<button type="button" onClick=${() => endSession(s)}
                aria-label=${`End session ${s.session_id} of ${s.game_name ?? gameName(s.game_id)}`}>End session</button>` : null}
            </li>`)}
        </ul>` : html`<p class="empty">${gameId === undefined
          ? "You have not played yet. Start a game from its own app; your sessions and what they earn show here, live."
          : "You have not played this game yet."}</p>`}
      ${gameId === undefined && mine.next_before ? html`
        <button type="button" disabled=${state.mineBusy} onClick=${() => loadMine({ more: true })}>More sessions</button>` : null}`;
  }
  return html`
    <section class="mine" aria-labelledby=${gameId === undefined ? "games-mine-title" : "game-mine-title"}>
      <h3 id=${gameId === undefined ? "games-mine-title" : "game-mine-title"}>${title}</h3>
      ${body}
      <p class="error" role="alert">${state.mineError}</p>
    </section>`;
}

function watchingText(gameId) {
  const count = state.watching.get(gameId);
  return count === undefined ? "" : `${count} watching`;
}

function GameCard({ game }) {
  const earned = state.mine?.earnings.find((e) => e.game_id === game.game_id);
  return html`
    <li key=${game.game_id} data-key=${String(game.game_id)} class="game">
      <h3><a href=${`#/games/${game.game_id}`}>${game.name ?? `Game ${game.game_id}`}</a></h3>
      <p class="meta">
        ${game.status !== "active" ? html`<span class="badge">${game.status}</span> ` : null}
        <span class="watchers" aria-live="polite">${watchingText(game.game_id)}</span>
        ${earned ? html`<span class="mine-earned"> · you earned ${kvp(earned.rewards_earned)}</span>` : null}
      </p>
      <p class="session">${state.activity.get(game.game_id) ?? ""}</p>
      <${Leaderboard} gameId=${game.game_id} limit=${5} />
    </li>`;
}

function GameList() {
  return html`
    <div class="games-layout">
      <div class="games-main">
        <h2 id="games-title">Games</h2>
        <p class="error" role="alert">${state.gamesError}</p>
        ${state.gamesLoaded && !state.games.length ? html`<p class="empty">No games are registered yet.</p>` : null}
        ${!state.gamesLoaded && !state.gamesError ? html`<p class="hint">Loading the games…</p>` : null}
        <ul id="games" class="game-cards" aria-labelledby="games-title">
          ${state.games.map((game) => html`<${GameCard} key=${game.game_id} game=${game} />`)}
        </ul>
        ${state.nextAfter ? html`<button type="button" onClick=${() => loadGames({ more: true })}>More games</button>` : null}
        <section aria-labelledby="games-feed-title">
          <h3 id="games-feed-title">Latest rewards</h3>
          <${Feed} id="game-rewards" />
        </section>
      </div>
      <aside class="games-side">
        <${Pool} />
        <${MySessions} />
      </aside>
    </div>`;
}

function Fact({ name, children }) {
  return html`<dt>${name}</dt><dd>${children}</dd>`;
}

function GamePage({ gameId }) {
  const heading = useRef(null);
  useEffect(() => {
    if (state.focus && heading.current) {
      state.focus = false;
      heading.current.focus();
    }
  });
  const game = state.games.find((known) => known.game_id === gameId);
  const back = html`<a class="back button" href="#/games">← All games</a>`;
  if (state.missing === gameId) {
    return html`${back}<h2 ref=${heading} tabindex="-1">No such game</h2>
      <p class="empty">There is no game number ${gameId}. It may have been removed; see all the games instead.</p>`;
  }
  if (!game) {
    return html`${back}<h2 ref=${heading} tabindex="-1">Game ${gameId}</h2>
      <p class="error" role="alert">${state.gamesError}</p><p class="hint">Loading the game…</p>`;
  }
  const policy = game.policy ?? {};
  const board = state.boards.get(gameId);
  return html`
    ${back}
    <article class="game-page" data-game=${String(gameId)} aria-labelledby="game-title">
      <h2 id="game-title" ref=${heading} tabindex="-1">${game.name ?? `Game ${gameId}`}</h2>
      <p class="error" role="alert">${state.gamesError}</p>
      <p class="watchers" aria-live="polite">${watchingText(gameId)}</p>
      <p class="session">${state.activity.get(gameId) ?? ""}</p>
      <div class="games-layout">
        <div class="games-main">
          <section aria-labelledby="game-board-title">
            <h3 id="game-board-title">Leaderboard${board?.period ? html` <span class="hint">(${PERIODS[board.period] ?? board.period})</span>` : null}</h3>
            <${Leaderboard} gameId=${gameId} limit=${10} />
          </section>
          <section aria-labelledby="game-feed-title">
            <h3 id="game-feed-title">Rewards in this game</h3>
            <${Feed} gameId=${gameId} id="game-rewards" />
          </section>
        </div>
        <aside class="games-side">
          <${MySessions} gameId=${gameId} />
          <${Pool} />
          <section aria-labelledby="game-rules-title">
            <h3 id="game-rules-title">Rules</h3>
            <dl class="facts">
              <${Fact} name="Status">${game.status}<//>
              <${Fact} name="Largest reward">${kvp(policy.max_reward_per_event)}<//>
              <${Fact} name="Per minute, at most">${kvp(policy.max_reward_per_minute)}<//>
              <${Fact} name="Per session, at most">${kvp(policy.max_reward_per_session)}<//>
              <${Fact} name="Reward types">${policy.reward_types?.length ? policy.reward_types.join(", ") : "any"}<//>
              <${Fact} name="Developer's share">${game.revenue_share ? `${(Number(game.revenue_share) * 100).toFixed(2).replace(/\.?0+$/, "")} % on top of each reward` : "none"}<//>
            </dl>
          </section>
        </aside>
      </div>
    </article>`;
}

function GamesView() {
  useStore();
  return state.selected === null ? html`<${GameList} />` : html`<${GamePage} gameId=${state.selected} />`;
}

// --- the view contract --------------------------------------------------------------------------

let mounted;
const ready = new Promise((resolve) => { mounted = resolve; });

/** Mount the view and read the games and my sessions; their channels are watched when the view first opens. */
export async function start(ctx) {
  context = ctx;
  render(html`<${GamesView} />`, document.querySelector("#tab-games"));
  started = Promise.all([loadGames(), loadMine()]);
  mounted();
  await started;
}

/** #/games (every game) or #/games/<game_id> (one game). */
export async function route(path) {
  await ready;
  const id = /^[1-9][0-9]{0,9}$/.test(path) ? Number(path) : null;
  if (id !== null && id !== state.selected) state.focus = true;
  state.selected = id;
  changed();
  await started;
  const work = [loadPool()];
  if (!opened) {
    opened = true;
    work.push(...state.games.map(watch));
  } else {
    work.push(loadMine());
  }
  if (id !== null && !state.games.some((game) => game.game_id === id)) work.push(loadOneGame(id));
  await Promise.all(work);
}
