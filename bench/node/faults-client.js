// Clients for bench/faults.py: N official socket.io-client connections (one Engine.IO connection
// each, several namespaces on it) that subscribe to channels and keep their position per channel
// (id, epoch) the way docs/protocol.md asks. When a connection closes they either stay closed
// (the shutdown scenario records when) or move at once to the failover URL and resubscribe from
// their positions (the reconnect storm). Every subscribe answer is counted by its error code.
//
//   node faults-client.js < commands
//   {"cmd": "connect", "url": "http://127.0.0.1:8081", "clients": 500, "concurrency": 100,
//    "transports": ["websocket"], "failover": "http://127.0.0.1:8082" or null,
//    "profiles": [[{"namespace": "/chain", "token": null, "channels": ["chain:transactions"]}, ...], ...]}
//        -> {"ready": n}       (client i uses profiles[i % profiles.length]; ready = all its channels acked)
//   {"cmd": "report"}  -> the counters below, times in epoch milliseconds
//   {"cmd": "exit"}
"use strict";
const { Manager } = require("socket.io-client");
const readline = require("readline");

const ACK_TIMEOUT_MS = 20000;
const RETRY_MIN_MS = 200;
const RETRY_MAX_MS = 2000;

const stats = {
  clients: 0,
  ready: 0,
  answers: { initial: {}, failover: {} },          // subscribe acks: "ok" or the error code
  connectErrors: { initial: {}, failover: {} },    // connect_error by err.data.code or message
  closeReasons: {},                                // Engine.IO connection closes by reason
  disconnectReasons: {},                           // namespace disconnects by reason
  closeTimes: [],                                  // first close of each client's connection
  failoverCloses: 0,                               // connections to the failover node that closed
  shutdownNotices: 0,
  events: 0,
};

const count = (table, key) => { table[key] = (table[key] || 0) + 1; };
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const jitter = (attempt) => Math.min(RETRY_MAX_MS, RETRY_MIN_MS * 2 ** attempt) * (0.5 + Math.random() / 2);

class Client {
  constructor(profile, options) {
    this.profile = profile;
    this.options = options;
    this.positions = new Map();  // channel -> {id, epoch}
    this.phase = "initial";
    this.closedAt = null;
    this.resubscribedAt = null;
  }

  // Resolves when every channel of the profile is subscribed on `url`.
  open(url) {
    const manager = new Manager(url, { transports: this.options.transports, reconnection: false,
                                       timeout: 60000 });
    this.manager = manager;
    this.sockets = [];
    manager.on("close", (reason) => this.onClose(manager, reason));
    return Promise.all(this.profile.map((spec) => this.join(manager, spec)));
  }

  join(manager, spec) {
    const phase = this.phase;
    return new Promise((resolve) => {
      const socket = manager.socket(spec.namespace, { auth: spec.token ? { token: spec.token } : {} });
      this.sockets.push(socket);
      let attempt = 0;
      socket.on("connect", async () => {
        for (const channel of spec.channels) {
          if (!(await this.subscribe(socket, channel, phase))) return;  // dropped: a new life retries
        }
        resolve();
      });
      socket.on("connect_error", async (err) => {
        count(stats.connectErrors[phase], (err.data && err.data.code) || err.message || "error");
        await sleep(jitter(attempt++));
        if (this.manager === manager) socket.connect();  // reopens the connection too when it failed
      });
      socket.on("disconnect", (reason) => count(stats.disconnectReasons, reason));
      socket.on("server_shutdown", () => { stats.shutdownNotices += 1; });
      socket.onAny((event, data) => {
        stats.events += 1;
        if (data && data.id && data.channel) this.positions.set(data.channel, { id: data.id, epoch: data.epoch });
      });
    });
  }

  async subscribe(socket, channel, phase) {
    for (let attempt = 0; ; attempt++) {
      const payload = { channel };
      const position = this.positions.get(channel);
      if (position && position.id) {
        payload.since = position.id;
        if (position.epoch != null) payload.epoch = position.epoch;
      }
      let ack;
      try {
        ack = await socket.timeout(ACK_TIMEOUT_MS).emitWithAck("subscribe", payload);
      } catch (err) {
        ack = { ok: false, error: { code: socket.connected ? "ack_timeout" : "disconnected" } };
      }
      count(stats.answers[phase], ack.ok ? "ok" : ack.error.code);
      if (ack.ok) {
        const data = ack.data;
        const last = data.events.length ? data.events[data.events.length - 1] : null;
        const id = last ? last.id : data.latest_id;
        // The ack's epoch speaks for the channel now (the Python watchers do the same).
        if (id) this.positions.set(channel, { id, epoch: data.epoch != null ? data.epoch : last && last.epoch });
        return true;
      }
      if (!socket.connected) return false;
      await sleep(jitter(attempt));
    }
  }

  async onClose(manager, reason) {
    if (manager !== this.manager) return;
    count(stats.closeReasons, reason);
    if (this.closedAt === null) {
      this.closedAt = Date.now();
      stats.closeTimes.push(this.closedAt);
    }
    if (!this.options.failover || reason === "forced close") return;
    if (this.phase === "failover") {
      // Dropped by the failover node too (e.g. a ping timeout under load): try it again shortly.
      stats.failoverCloses += 1;
      this.resubscribedAt = null;
      await sleep(jitter(2));
    }
    // The storm: every client moves to the failover node the moment its connection drops.
    this.phase = "failover";
    const subscribed = this.open(this.options.failover);
    const opened = this.manager;
    await subscribed;
    if (this.manager === opened) this.resubscribedAt = Date.now();
  }

  close() {
    for (const socket of this.sockets || []) socket.disconnect();
  }
}

const clients = [];

async function connect(command) {
  const options = { transports: command.transports || ["websocket"], failover: command.failover || null };
  let next = 0;
  const worker = async () => {
    while (next < command.clients) {
      const client = new Client(command.profiles[next % command.profiles.length], options);
      next += 1;
      clients.push(client);
      stats.clients += 1;
      await client.open(command.url);
      stats.ready += 1;
    }
  };
  await Promise.all(Array.from({ length: Math.min(command.concurrency || 100, command.clients) }, worker));
  return { ready: stats.ready };
}

function reply(message) {
  process.stdout.write(JSON.stringify(message) + "\n");
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  if (command.cmd === "connect") {
    connect(command).then(reply, (err) => reply({ error: String((err && err.message) || err) }));
  } else if (command.cmd === "report") {
    reply({ ...stats, resubscribedTimes: clients.filter((c) => c.resubscribedAt).map((c) => c.resubscribedAt) });
  } else if (command.cmd === "exit") {
    for (const client of clients) client.close();
    process.exit(0);
  }
});
