// The hub client: REST calls with the envelope, Socket.IO namespaces over one connection, and
// channel subscriptions that recover what was missed after a reconnect (docs/protocol.md).
import { Manager } from "./vendor/socket.io.esm.min.js";

// Shared by every tab of this origin: one sign-in for all of them, so a sign-out or a token
// rotation in one tab reaches the others (through the `storage` event).
const TOKEN_KEY = "hub.token";
const REFRESH_KEY = "hub.refresh_token";
const EXPIRES_KEY = "hub.expires_at";
const STORED_KEY = "hub.stored_at"; // this machine's clock when the token came: its lifetime, skew-free
// Refresh tokens rotate, and a second use of one revokes the sign-in, so one tab, the leader (it
// holds LEADER_LOCK while it lives), refreshes for all; the others ask it over SESSION_CHANNEL.
// Storage alone cannot arbitrate: another tab's localStorage writes reach this one a little later.
const LEADER_LOCK = "hub.session-leader";
const REFRESH_LOCK = "hub.refresh"; // when the leader does not answer, tabs refresh one at a time
const SESSION_CHANNEL = "hub.session";
const LEADER_ANSWER_MS = 5_000;
// Refresh when this share of the token's life is left, but no earlier than a minute before expiry.
const REFRESH_LEAD_SHARE = 0.25;
const REFRESH_LEAD_MAX_MS = 60_000;
const REFRESH_MIN_DELAY_MS = 1_000;
const REFRESH_RETRY_MS = 5_000; // after a failed refresh (network, server busy): the token is not yet expired
const COMMAND_TIMEOUT_MS = 10_000;
const FIRST_ID = "0-0"; // older than any event id

export class HubError extends Error {
  constructor(error) {
    super(error.message);
    this.code = error.code;
    this.field = error.field;
    this.retryAfter = error.retry_after;
  }
}

export const session = {
  get token() { return localStorage.getItem(TOKEN_KEY); },
  get refreshToken() { return localStorage.getItem(REFRESH_KEY); },
  get expiresAt() { return Number(localStorage.getItem(EXPIRES_KEY)) || null; },

  /** Keep a sign-in or refresh answer ({token, expires_at, refresh_token, ...}). */
  store(data) {
    ended = false;
    localStorage.setItem(REFRESH_KEY, data.refresh_token ?? "");
    localStorage.setItem(EXPIRES_KEY, String(Date.parse(data.expires_at) || ""));
    localStorage.setItem(STORED_KEY, String(Date.now()));
    localStorage.setItem(TOKEN_KEY, data.token); // last: other tabs react to this key
    scheduleRefresh();
  },

  clear() {
    for (const key of [REFRESH_KEY, EXPIRES_KEY, STORED_KEY, TOKEN_KEY]) localStorage.removeItem(key);
    scheduleRefresh();
  },
};

/**
 * Session changes this page must act on: "token" (a new access token, from this tab or another)
 * and "signedout" (detail.reason: "logged_out", "revoked", "expired" or "elsewhere").
 */
export const sessionEvents = new EventTarget();

let ended = false;

/** Forget the tokens and tell the page, once: several sockets report the same ending. */
export function endSession(reason) {
  session.clear();
  if (ended) return;
  ended = true;
  sessionEvents.dispatchEvent(new CustomEvent("signedout", { detail: { reason } }));
}

function announceToken() {
  sessionEvents.dispatchEvent(new CustomEvent("token", { detail: { token: session.token } }));
}

let refreshTimer = null;

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  if (!leader) return;
  const expiresAt = session.expiresAt;
  const storedAt = Number(localStorage.getItem(STORED_KEY));
  if (!expiresAt || !session.refreshToken) return;
  const lifetime = expiresAt - storedAt;
  // A token already past its expiry by this clock: the clock is wrong, so a timer would refresh in a
  // loop; the server's token_expiring and 401 answers still drive the refresh.
  if (lifetime <= 0) return;
  const lead = Math.min(REFRESH_LEAD_MAX_MS, lifetime * REFRESH_LEAD_SHARE);
  const delay = Math.max(REFRESH_MIN_DELAY_MS, expiresAt - lead - Date.now());
  const stale = session.token;
  refreshTimer = setTimeout(() => {
    refreshSession(stale).catch((error) => {
      if (!(error instanceof HubError && error.code === "unauthorized")) refreshTimer = setTimeout(scheduleRefresh, REFRESH_RETRY_MS);
    });
  }, delay);
}

// Web Locks and BroadcastChannel need a secure context (https, or http on localhost); without
// them each tab is its own leader.
const channel = navigator.locks && window.BroadcastChannel ? new BroadcastChannel(SESSION_CHANNEL) : null;
let leader = !channel;
if (channel) {
  navigator.locks.request(LEADER_LOCK, () => {
    leader = true;
    scheduleRefresh();
    return new Promise(() => {}); // held until this tab closes; then the next tab in line leads
  });
  channel.addEventListener("message", ({ data }) => {
    if (!leader || data?.type !== "refresh") return;
    refreshSession(data.stale).then(
      (token) => channel.postMessage({ type: "refreshed", id: data.id, token }),
      (error) => channel.postMessage({ type: "failed", id: data.id, error: { code: error.code ?? "unavailable", message: error.message } }));
  });
}

async function withRefreshLock(task) {
  return navigator.locks ? navigator.locks.request(REFRESH_LOCK, task) : task();
}

/** Ask the leading tab to refresh; resolves with its new token. */
function askLeader(stale) {
  return new Promise((resolve, reject) => {
    const id = crypto.randomUUID();
    const done = () => {
      clearTimeout(timer);
      channel.removeEventListener("message", listen);
    };
    const listen = ({ data }) => {
      if (data?.id !== id) return;
      done();
      if (data.type === "refreshed") resolve(data.token);
      else reject(new HubError(data.error));
    };
    const timer = setTimeout(() => {
      done();
      reject(new HubError({ code: "timeout", message: "the leading tab did not answer" }));
    }, LEADER_ANSWER_MS);
    channel.addEventListener("message", listen);
    channel.postMessage({ type: "refresh", id, stale });
  });
}

/** Trade the refresh token for new tokens, unless that was done already. */
async function rotate(stale) {
  if (session.token && session.token !== stale) return session.token;
  const refreshToken = session.refreshToken;
  if (!refreshToken) {
    endSession("expired");
    throw new HubError({ code: "unauthorized", message: "signed out" });
  }
  const response = await fetch("/api/v1/auth/refresh", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ refresh_token: refreshToken }) });
  const envelope = await response.json();
  if (!envelope.ok) {
    const error = new HubError(envelope.error);
    if (error.code === "unauthorized") endSession("expired");
    throw error;
  }
  session.store(envelope.data);
  announceToken();
  return envelope.data.token;
}

let refreshing = null;

/**
 * A current access token in place of `stale`: refreshed once for every caller in this tab and,
 * through the leading tab, for every tab. Rejects with a HubError when the sign-in is over.
 */
export function refreshSession(stale = session.token) {
  const locally = () => withRefreshLock(() => rotate(stale));
  refreshing ??= (leader ? locally() : askLeader(stale).catch((error) => {
    // A leader that does not answer (frozen, closing): refresh here, still one tab at a time.
    if (error.code === "timeout") return locally();
    throw error;
  })).finally(() => { refreshing = null; });
  return refreshing;
}

window.addEventListener("storage", (event) => {
  if (event.key !== TOKEN_KEY && event.key !== null) return; // null: the whole storage was cleared
  scheduleRefresh();
  if (session.token) announceToken();
  else if (event.oldValue || event.key === null) endSession("elsewhere");
});
scheduleRefresh();

/**
 * fetch with the access token; a 401 gets one silent refresh and one retry. Resolves with the
 * Response (the last one), like fetch.
 */
export async function authorizedFetch(path, init = {}) {
  const send = (token) => {
    const headers = new Headers(init.headers);
    if (token) headers.set("Authorization", `Bearer ${token}`);
    return fetch(path, { ...init, headers });
  };
  const token = session.token;
  const response = await send(token);
  if (response.status !== 401 || !token || !session.refreshToken) return response;
  let fresh;
  try {
    fresh = await refreshSession(token);
  } catch {
    return response;
  }
  return send(fresh);
}

/** Call the REST API; resolves with the envelope's data, rejects with a HubError. */
export async function api(method, path, body) {
  const headers = {};
  const init = { method, headers };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await authorizedFetch(path, init);
  const envelope = await response.json();
  if (!envelope.ok) throw new HubError(envelope.error);
  return envelope.data;
}

/** The envelope of an XMLHttpRequest's answer; a made-up error one when the body is not JSON (a proxy's 413). */
function envelopeOf(xhr) {
  try {
    return JSON.parse(xhr.responseText);
  } catch {
    return { ok: false, error: {
      code: xhr.status === 413 ? "payload_too_large" : "unavailable",
      message: `the server answered ${xhr.status} ${xhr.statusText}`.trim(),
    } };
  }
}

/**
 * POST a multipart form with XMLHttpRequest (fetch reports no upload progress), authorised as
 * api() is: the session's bearer token, and on a 401 one silent refresh and one retry. Resolves with
 * the envelope's data, rejects with a HubError. onProgress(fraction or null, sent) follows the bytes.
 */
export function upload(path, form, { onProgress, signal }) {
  return new Promise((resolve, reject) => {
    const attempt = (token, retried) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      if (token) xhr.setRequestHeader("Authorization", `Bearer ${token}`);
      xhr.upload.addEventListener("progress", (event) => {
        onProgress(event.lengthComputable && event.total ? event.loaded / event.total : null, false);
      });
      xhr.upload.addEventListener("load", () => onProgress(1, true));
      xhr.addEventListener("load", () => {
        if (xhr.status === 401 && token && !retried && session.refreshToken) {
          refreshSession(token).then((fresh) => attempt(fresh, true), () => reject(new HubError(envelopeOf(xhr).error)));
          return;
        }
        const envelope = envelopeOf(xhr);
        if (envelope.ok) resolve(envelope.data);
        else reject(new HubError(envelope.error));
      });
      xhr.addEventListener("error", () => reject(new HubError({ code: "network", message:
        "the connection broke off before the server answered (a file over the upload limit is cut off this way)" })));
      xhr.addEventListener("abort", () => reject(new HubError({ code: "aborted", message: "cancelled" })));
      signal?.addEventListener("abort", () => xhr.abort(), { once: true });
      xhr.send(form);
    };
    attempt(session.token, false);
  });
}

/** Event ids are "<ms>-<seq>": compare numerically, part by part. */
export function compareIds(a, b) {
  const [am, as] = a.split("-").map(BigInt);
  const [bm, bs] = b.split("-").map(BigInt);
  if (am !== bm) return am < bm ? -1 : 1;
  return as === bs ? 0 : as < bs ? -1 : 1;
}

/**
 * One Engine.IO connection shared by every namespace. Reports "connected", "reconnecting" and
 * "recovered" (reconnected and every channel replayed) through onState. Keeps each socket's
 * authentication current: a new access token is handed to open sockets in place (refresh_token),
 * and a socket whose session ended stays closed.
 */
export class Hub {
  constructor({ onState = () => {} } = {}) {
    this.manager = new Manager(location.origin, { transports: ["websocket"], autoConnect: true });
    this.sockets = new Map();
    this.subscriptions = new Map(); // "<namespace> <channel>" -> {namespace, channel, lastId, handlers}
    this.onState = onState;
    this.connectedBefore = new Set(); // namespaces that had a connection before this one
    this.tokens = new Map(); // namespace -> the access token the server holds for its socket
    this.retried = new Set(); // namespaces refused once since their last connect: refreshed and retried
    this.manager.on("reconnect_attempt", () => this.onState("reconnecting"));
    this.manager.on("error", () => this.onState("reconnecting"));
    sessionEvents.addEventListener("token", () => this.#handOver());
  }

  /** The socket of a namespace, created (and authenticated) on first use. */
  socket(namespace) {
    let socket = this.sockets.get(namespace);
    if (socket) return socket;
    socket = this.manager.socket(namespace, { auth: (cb) => {
      const token = session.token;
      this.tokens.set(namespace, token);
      cb(token ? { token } : {});
    } });
    socket.on("connect", () => {
      this.retried.delete(namespace);
      this.#connected(namespace);
    });
    socket.on("disconnect", () => this.onState("reconnecting"));
    socket.on("server_shutdown", () => this.onState("reconnecting"));
    socket.on("connect_error", (error) => {
      if (error?.data?.code === "unauthorized") this.#reconnectSignedIn(socket);
    });
    socket.on("token_expiring", () => this.#renew(socket));
    socket.on("signed_out", (notice) => {
      if (notice?.reason === "expired") this.#reconnectSignedIn(socket);
      else endSession(notice?.reason);
    });
    socket.onAny((type, event) => this.#dispatch(namespace, event));
    this.sockets.set(namespace, socket);
    return socket;
  }

  /** Send a command; resolves with the ack's data, rejects with a HubError. */
  async call(namespace, event, payload = {}) {
    const socket = this.socket(namespace);
    let envelope = await socket.timeout(COMMAND_TIMEOUT_MS).emitWithAck(event, payload);
    if (!envelope.ok && envelope.error.code === "unauthorized" && session.refreshToken && this.tokens.get(socket.nsp)) {
      // The socket's token ran out before the page renewed it: renew in place, then retry once.
      if (await this.#renew(socket)) envelope = await socket.timeout(COMMAND_TIMEOUT_MS).emitWithAck(event, payload);
    }
    if (!envelope.ok) throw new HubError(envelope.error);
    return envelope.data;
  }

  /** Hand the session's token to the socket, refreshing first when the socket already has it. */
  async #renew(socket) {
    let token = session.token;
    try {
      if (!token || token === this.tokens.get(socket.nsp)) token = await refreshSession(token);
      return await this.#sendToken(socket, token);
    } catch {
      return false; // signed out (endSession told the page) or unreachable: the server ends it at expiry
    }
  }

  /** Re-authenticate an open socket without reconnecting; whether the server took the token. */
  async #sendToken(socket, token) {
    if (!socket.connected) return false;
    const ack = await socket.timeout(COMMAND_TIMEOUT_MS).emitWithAck("refresh_token", { token });
    if (ack.ok) this.tokens.set(socket.nsp, token);
    return ack.ok;
  }

  /** A new token (this tab refreshed, or another did): give it to every open socket still on an older one. */
  #handOver() {
    const token = session.token;
    for (const socket of this.sockets.values()) {
      if (socket.connected && this.tokens.get(socket.nsp) && this.tokens.get(socket.nsp) !== token) {
        this.#sendToken(socket, token).catch(() => {});
      }
    }
  }

  /**
   * The server refused or ended the socket for an expired token: refresh and connect again, once;
   * a second refusal in a row means the sign-in is over, so no reconnect loop.
   */
  async #reconnectSignedIn(socket) {
    const token = this.tokens.get(socket.nsp);
    if (!token || this.retried.has(socket.nsp)) {
      if (token) endSession("expired");
      return;
    }
    this.retried.add(socket.nsp);
    try {
      await refreshSession(token);
    } catch {
      return; // endSession has told the page when the refresh token is spent too
    }
    socket.connect();
  }

  /** Disconnect every namespace for good (signed out): nothing reconnects. */
  close() {
    this.subscriptions.clear();
    for (const socket of this.sockets.values()) socket.disconnect();
  }

  /**
   * Watch a channel. onEvent(event) gets each event once, in order; onGap() is called when the
   * history could not cover what was missed (reload over REST). Returns the first ack.
   */
  async subscribe(namespace, channel, { onEvent, onGap = () => {}, onPresence = () => {} }) {
    const key = `${namespace} ${channel}`;
    const sub = this.subscriptions.get(key) ||
      { namespace, channel, lastId: null, offset: null, epoch: null, handlers: [], recovering: null, held: [] };
    sub.handlers.push({ onEvent, onGap, onPresence });
    this.subscriptions.set(key, sub);
    return this.#join(sub);
  }

  async unsubscribe(namespace, channel) {
    this.subscriptions.delete(`${namespace} ${channel}`);
    await this.call(namespace, "unsubscribe", { channel });
  }

  /** Subscribe from the last position: the ack carries what was missed, or history_gap. */
  async #join(sub) {
    const position = () => {
      const payload = { channel: sub.channel };
      if (sub.lastId) payload.since = sub.lastId;
      if (sub.lastId && sub.epoch) payload.epoch = sub.epoch;
      return payload;
    };
    let ack = await this.call(sub.namespace, "subscribe", position());
    if (ack.history_gap) sub.handlers.forEach((h) => h.onGap());
    this.#deliver(sub, ack.events, false);
    while (ack.has_more) {
      ack = await this.call(sub.namespace, "subscribe", position());
      this.#deliver(sub, ack.events, false);
    }
    if (ack.history_gap || !sub.lastId) {
      if (ack.latest_id) this.#moveTo(sub, ack.latest_id, ack.latest_offset, ack.epoch);
      else this.#moveTo(sub, FIRST_ID, 0, null); // an empty channel: its first event has offset 1
    }
    if (ack.presence !== null && ack.presence !== undefined) sub.handlers.forEach((h) => h.onPresence(ack.presence));
    sub.joined = true; // the server has the connection in the room: nothing published from now on is missed
    return ack;
  }

  /**
   * #join, retried while the server is briefly unable (its event bus down, a reconnect storm):
   * giving up would leave the channel silently unwatched.
   */
  async #rejoin(sub) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.#join(sub);
      } catch (error) {
        const retryable = error instanceof HubError && (error.code === "unavailable" || error.code === "rate_limited");
        const current = this.subscriptions.get(`${sub.namespace} ${sub.channel}`) === sub;
        if (!retryable || !current || !this.socket(sub.namespace).connected) return null;
        const seconds = error.retryAfter || Math.min(2 ** attempt, 10) * (0.5 + Math.random() / 2);
        await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
      }
    }
  }

  #moveTo(sub, id, offset, epoch) {
    sub.lastId = id;
    sub.offset = offset;
    sub.epoch = epoch;
  }

  /**
   * Resubscribe from the last position, holding live events meanwhile: an event published between
   * the server's history read and its ack reaches us live only, so it must not be dropped.
   */
  #recover(sub) {
    if (!sub.recovering) {
      sub.recovering = this.#rejoin(sub).finally(() => {
        sub.recovering = null;
        const held = sub.held.splice(0);
        this.#deliver(sub, held, true);
      });
    }
    return sub.recovering;
  }

  #deliver(sub, events, live) {
    for (const event of events) {
      if (event.id === null) {
        // Unstored (the server's event bus was down): it has no position to keep.
        sub.handlers.forEach((h) => h.onEvent(event));
        continue;
      }
      // Join-then-replay means an event can come both live and in a replay: keep the first.
      if (sub.lastId && compareIds(event.id, sub.lastId) <= 0) continue;
      // A position that does not follow ours (offset jump, new epoch) means events were missed.
      const follows = event.offset === null || sub.offset === null ||
        (sub.epoch === null ? event.offset === 1 : event.epoch === sub.epoch && event.offset === sub.offset + 1);
      if (live && sub.lastId && !follows) {
        sub.held.push(event);
        this.#recover(sub);
        continue;
      }
      this.#moveTo(sub, event.id, event.offset, event.epoch);
      sub.handlers.forEach((h) => h.onEvent(event));
    }
  }

  #dispatch(namespace, event) {
    if (!event || typeof event !== "object" || !event.channel) return;
    const sub = this.subscriptions.get(`${namespace} ${event.channel}`);
    if (!sub) return;
    if (event.type === "presence_changed") {
      sub.handlers.forEach((h) => h.onPresence(event.data.count));
      return;
    }
    if (event.type === "history_gap") {
      this.#recover(sub); // the server says events may have passed us by
      return;
    }
    if (sub.recovering) {
      sub.held.push(event);
      return;
    }
    this.#deliver(sub, [event], true);
  }

  async #connected(namespace) {
    const rejoin = [...this.subscriptions.values()].filter((s) => s.namespace === namespace);
    await Promise.all(rejoin.map((sub) => this.#rejoin(sub)));
    this.onState(this.connectedBefore.has(namespace) ? "recovered" : "connected");
    this.connectedBefore.add(namespace);
  }

  /** Reconnect every namespace with the current token (after sign-in or sign-out). */
  reauthenticate() {
    for (const socket of this.sockets.values()) {
      socket.disconnect();
      socket.connect();
    }
  }
}
