// The hub client: REST calls with the envelope, Socket.IO namespaces over one connection, and
// channel subscriptions that recover what was missed after a reconnect (docs/protocol.md).
import { Manager } from "./vendor/socket.io.esm.min.js";

const TOKEN_KEY = "hub.token";

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
   * history could not cover a disconnection (reload over REST). Returns the first ack.
   */
  async subscribe(namespace, channel, { onEvent, onGap = () => {}, onPresence = () => {} }) {
    const key = `${namespace} ${channel}`;
    const sub = this.subscriptions.get(key) || { namespace, channel, lastId: null, handlers: [] };
    sub.handlers.push({ onEvent, onGap, onPresence });
    this.subscriptions.set(key, sub);
    return this.#join(sub);
  }

  async unsubscribe(namespace, channel) {
    this.subscriptions.delete(`${namespace} ${channel}`);
    await this.call(namespace, "unsubscribe", { channel });
  }

  async #join(sub) {
    const payload = { channel: sub.channel };
    if (sub.lastId) payload.since = sub.lastId;
    let ack = await this.call(sub.namespace, "subscribe", payload);
    if (ack.history_gap) sub.handlers.forEach((h) => h.onGap());
    this.#deliver(sub, ack.events);
    while (ack.has_more) {
      ack = await this.call(sub.namespace, "subscribe", { channel: sub.channel, since: sub.lastId });
      this.#deliver(sub, ack.events);
    }
    if (!sub.lastId && ack.latest_id) sub.lastId = ack.latest_id;
    if (ack.presence !== null && ack.presence !== undefined) sub.handlers.forEach((h) => h.onPresence(ack.presence));
    sub.joined = true; // the server has the connection in the room: nothing published from now on is missed
    return ack;
  }

  #deliver(sub, events) {
    for (const event of events) {
      // Join-then-replay means an event can come both live and in a replay: keep the first.
      if (sub.lastId && compareIds(event.id, sub.lastId) <= 0) continue;
      sub.lastId = event.id;
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
    this.#deliver(sub, [event]);
  }

  async #connected(namespace) {
    const rejoin = [...this.subscriptions.values()].filter((s) => s.namespace === namespace);
    await Promise.all(rejoin.map((sub) => this.#join(sub).catch(() => {})));
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
