// The hub client: REST calls with the envelope, Socket.IO namespaces over one connection, and
// channel subscriptions that recover what was missed after a reconnect (docs/protocol.md).
import { Manager } from "./vendor/socket.io.esm.min.js";

const TOKEN_KEY = "hub.token";
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
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
};

/** Call the REST API; resolves with the envelope's data, rejects with a HubError. */
export async function api(method, path, body) {
  const headers = {};
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  const init = { method, headers };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const envelope = await response.json();
  if (!envelope.ok) throw new HubError(envelope.error);
  return envelope.data;
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
 * "recovered" (reconnected and every channel replayed) through onState.
 */
export class Hub {
  constructor({ onState = () => {} } = {}) {
    this.manager = new Manager(location.origin, { transports: ["websocket"], autoConnect: true });
    this.sockets = new Map();
    this.subscriptions = new Map(); // "<namespace> <channel>" -> {namespace, channel, lastId, handlers}
    this.onState = onState;
    this.connectedBefore = new Set(); // namespaces that had a connection before this one
    this.manager.on("reconnect_attempt", () => this.onState("reconnecting"));
    this.manager.on("error", () => this.onState("reconnecting"));
  }

  /** The socket of a namespace, created (and authenticated) on first use. */
  socket(namespace) {
    let socket = this.sockets.get(namespace);
    if (socket) return socket;
    socket = this.manager.socket(namespace, { auth: (cb) => cb(session.token ? { token: session.token } : {}) });
    socket.on("connect", () => this.#connected(namespace));
    socket.on("disconnect", () => this.onState("reconnecting"));
    socket.on("server_shutdown", () => this.onState("reconnecting"));
    socket.onAny((type, event) => this.#dispatch(namespace, event));
    this.sockets.set(namespace, socket);
    return socket;
  }

  /** Send a command; resolves with the ack's data, rejects with a HubError. */
  async call(namespace, event, payload = {}) {
    const envelope = await this.socket(namespace).timeout(10000).emitWithAck(event, payload);
    if (!envelope.ok) throw new HubError(envelope.error);
    return envelope.data;
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
