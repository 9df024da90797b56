// Many official socket.io-client connections through the cluster's load balancer, for
// tests/test_cluster.py and bench/cluster.py. Each watches one channel the way docs/protocol.md asks
// (and static/hub.js does): it keeps the id, offset and epoch of the last event it applied; an event
// that does not follow (offset jump, other epoch) or a `history_gap` notice makes it resubscribe
// with `since`/`epoch`, holding live events meanwhile; after every (re)connect it resubscribes from
// its position. It records which offsets it applied, so the driver can check that every client
// holds every offset 1..N exactly once.
//
//   node cluster-clients.mjs '{"url": "http://127.0.0.1:8080", "namespace": "/marketplace",
//        "channel": "market:category:x", "event": "stream_tick", "clients": 300,
//        "transports": "mixed" | "websocket" | "polling", "concurrency": 50, "maxEvents": 20000}'
//   -> {"ready": n, "seconds": s}         once every client has subscribed
//   stdin {"cmd": "status"}               -> {"connected": n, "connects": n, ...}
//   stdin {"cmd": "finish", "total": N, "timeoutMs": 30000}
//   -> the summary (see summary()), then exit
import { io } from "socket.io-client";
import readline from "node:readline";

const config = JSON.parse(process.argv[2]);
const ACK_TIMEOUT_MS = 120000;
const FIRST_ID = "0-0"; // older than any event id: a first subscribe replays the channel from its start
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const jitter = (attempt) => Math.min(2000, 100 * 2 ** attempt) * (0.5 + Math.random() / 2);
const count = (table, key) => { table[key] = (table[key] || 0) + 1; };

function compareIds(a, b) {
  const [am, as] = a.split("-").map(Number);
  const [bm, bs] = b.split("-").map(Number);
  return am !== bm ? am - bm : as - bs;
}

const stats = {
  connects: 0, disconnects: {}, connectErrors: {}, subscribeErrors: {}, ackTimeouts: 0, shutdownNotices: 0,
  gapNotices: 0, detectedHoles: 0, historyGapAcks: 0, replayHoles: 0, replayed: 0, live: 0,
};

class Client {
  constructor(index, transports) {
    this.index = index;
    this.transports = transports;
    this.lastId = FIRST_ID;
    this.offset = 0;
    this.epoch = null;
    this.applied = new Uint8Array(config.maxEvents + 2);
    this.beyond = 0;        // offsets past maxEvents
    this.generation = 0;    // bumped on every connect: a join of an older connection is void
    this.recovering = null;
    this.held = [];
    this.subscribed = false;
  }

  start() {
    const socket = io(config.url + config.namespace, {
      transports: this.transports, forceNew: true, timeout: 20000,
      reconnectionDelay: 250, reconnectionDelayMax: 2000, randomizationFactor: 0.5,
    });
    this.socket = socket;
    this.ready = new Promise((resolve) => { this.resolveReady = resolve; });
    socket.on("connect", () => {
      stats.connects += 1;
      this.generation += 1;
      this.recovering = null;
      this.recover();
    });
    socket.on("connect_error", (err) => count(stats.connectErrors, (err.data && err.data.code) || err.message));
    socket.on("disconnect", (reason) => count(stats.disconnects, reason));
    socket.on("server_shutdown", () => { stats.shutdownNotices += 1; });
    socket.on("history_gap", () => { stats.gapNotices += 1; this.recover(); });
    socket.on(config.event, (event) => {
      if (!event || event.channel !== config.channel) return;
      if (this.recovering) this.held.push(event);
      else this.deliver([event], true);
    });
  }

  // Resubscribe from our position; live events wait in `held` until the ack is applied.
  recover() {
    if (this.recovering) return;
    const generation = this.generation;
    this.recovering = this.join(generation).then((joined) => {
      if (generation !== this.generation) return; // a reconnect started a newer join
      this.recovering = null;
      if (!joined) return; // disconnected: the next connect recovers, `held` waits for it
      this.deliver(this.held.splice(0), true);
      if (!this.subscribed) {
        this.subscribed = true;
        this.resolveReady();
      }
    });
  }

  async join(generation) {
    for (let attempt = 0; ; attempt++) {
      if (generation !== this.generation || !this.socket.connected) return false;
      const payload = { channel: config.channel, since: this.lastId };
      if (this.epoch) payload.epoch = this.epoch;
      const ack = await this.call("subscribe", payload);
      if (ack === "timeout") {
        stats.ackTimeouts += 1;
        continue;
      }
      if (ack === null || generation !== this.generation) return false;
      if (!ack.ok) {
        count(stats.subscribeErrors, ack.error.code);
        await sleep(jitter(attempt));
        continue;
      }
      const data = ack.data;
      // A hole we are told of but cannot fill; a channel with no history yet (latest_id null) has none.
      if (data.history_gap && data.latest_id !== null) stats.historyGapAcks += 1;
      this.deliver(data.events, false);
      if (data.has_more) continue;
      if (data.history_gap && data.latest_id) this.moveTo(data.latest_id, data.latest_offset, data.epoch);
      return true;
    }
  }

  // The ack, or null if the connection drops first. No short timeout: the server acks every
  // command in order, so a slow ack is a busy server, and giving up on it to ask again would
  // only make it replay the same events twice (a storm feeding itself).
  call(command, payload) {
    return new Promise((resolve) => {
      const socket = this.socket;
      const done = (answer) => {
        clearTimeout(timer);
        socket.off("disconnect", dropped);
        resolve(answer);
      };
      const dropped = () => done(null);
      const timer = setTimeout(() => done("timeout"), ACK_TIMEOUT_MS);
      socket.once("disconnect", dropped);
      socket.emit(command, payload, done);
    });
  }

  moveTo(id, offset, epoch) {
    this.lastId = id;
    this.offset = offset;
    this.epoch = epoch;
  }

  deliver(events, live) {
    for (const event of events) {
      if (event.id === null) continue; // a notice, no position
      if (compareIds(event.id, this.lastId) <= 0) continue; // join-then-replay duplicate
      const follows = this.epoch === null ? event.offset === this.offset + 1
        : event.epoch === this.epoch && event.offset === this.offset + 1;
      if (!follows) {
        if (live) {
          stats.detectedHoles += 1;
          this.held.push(event);
          this.recover();
          continue;
        }
        stats.replayHoles += 1; // the history itself skipped offsets: a hole nobody can see
      }
      if (live) stats.live += 1;
      else stats.replayed += 1;
      if (event.offset <= config.maxEvents) this.applied[event.offset] += 1;
      else this.beyond += 1;
      this.moveTo(event.id, event.offset, event.epoch);
    }
  }

  node() {
    const engine = this.socket.io.engine;
    const sid = engine && engine.id;
    return sid && sid.includes(".") ? sid.split(".")[0] : "none";
  }
}

function transportsFor(index) {
  if (config.transports === "mixed") return index % 2 === 0 ? ["websocket"] : ["polling"];
  return [config.transports];
}

function reply(message) {
  process.stdout.write(JSON.stringify(message) + "\n");
}

const clients = [];

async function connectAll() {
  const started = Date.now();
  let next = 0;
  const worker = async () => {
    while (next < config.clients) {
      const client = new Client(next, transportsFor(next));
      next += 1;
      clients.push(client);
      client.start();
      await client.ready;
    }
  };
  await Promise.all(Array.from({ length: Math.min(config.concurrency || 50, config.clients) }, worker));
  reply({ ready: clients.filter((c) => c.subscribed).length, seconds: (Date.now() - started) / 1000 });
}

function status() {
  const nodes = {};
  for (const client of clients) if (client.socket.connected) count(nodes, client.node());
  return { connected: clients.filter((c) => c.socket.connected).length, nodes, ...stats };
}

function summary(total) {
  let complete = 0, missing = 0, duplicates = 0, beyond = 0;
  const incomplete = [];
  for (const client of clients) {
    let clientMissing = 0, clientDuplicates = 0;
    for (let offset = 1; offset <= total; offset++) {
      const times = client.applied[offset];
      if (times === 0) clientMissing += 1;
      else if (times > 1) clientDuplicates += 1;
    }
    for (let offset = total + 1; offset <= config.maxEvents; offset++) beyond += client.applied[offset];
    beyond += client.beyond;
    missing += clientMissing;
    duplicates += clientDuplicates;
    if (clientMissing === 0 && clientDuplicates === 0) complete += 1;
    else if (incomplete.length < 5) {
      incomplete.push({ index: client.index, offset: client.offset, missing: clientMissing,
                        duplicates: clientDuplicates, connected: client.socket.connected });
    }
  }
  return { clients: clients.length, complete, missing, duplicates, beyond, total, incomplete, ...status() };
}

async function finish(command) {
  const deadline = Date.now() + (command.timeoutMs || 30000);
  const caughtUp = () => clients.every((c) => c.offset >= command.total && !c.recovering && c.held.length === 0);
  while (!caughtUp() && Date.now() < deadline) await sleep(100);
  reply(summary(command.total));
  for (const client of clients) client.socket.disconnect();
  process.exit(0);
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  if (command.cmd === "status") reply(status());
  else if (command.cmd === "finish") finish(command);
});

connectAll().catch((err) => reply({ error: String((err && err.message) || err) }));
