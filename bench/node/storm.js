// Connect storm for bench/connect_storm.py: N official socket.io-client connections opened at once
// (websocket transport). With a token list and a channel, each connection authenticates with its
// token and subscribes to the channel with `since` (the oldest retained id), and counts as
// recovered when the ack returns its replay; without them (the Node reference) a connection
// counts when it is connected. Prints one JSON line: {ok, failed, seconds, replayed, errors}.
//   node storm.js URL NAMESPACE CLIENTS [TOKENS_FILE CHANNEL SINCE]
"use strict";
const fs = require("fs");
const { io } = require("socket.io-client");
const { performance } = require("perf_hooks");

const [url, namespace, clientsArg, tokensFile, channel, since] = process.argv.slice(2);
const clients = Number(clientsArg);
const tokens = tokensFile ? fs.readFileSync(tokensFile, "utf8").split("\n").filter(Boolean) : null;
const started = performance.now();
let ok = 0, failed = 0, replayed = 0, done = 0;
const errors = {};
const sockets = [];

function finish(success, error) {
  if (success) ok += 1; else { failed += 1; errors[error] = (errors[error] || 0) + 1; }
  done += 1;
  if (done === clients) {
    const seconds = (performance.now() - started) / 1000;
    console.log(JSON.stringify({ ok, failed, seconds, replayed, errors }));
    for (const socket of sockets) socket.close();
    process.exit(0);
  }
}

for (let i = 0; i < clients; i += 1) {
  const options = { transports: ["websocket"], forceNew: true, reconnection: false, timeout: 120000 };
  if (tokens) options.auth = { token: tokens[i % tokens.length] };
  const socket = io(url + namespace, options);
  sockets.push(socket);
  let settled = false;
  const settle = (success, error) => { if (!settled) { settled = true; finish(success, error); } };
  socket.once("connect_error", (err) => settle(false, String(err && err.message)));
  socket.once("connect", () => {
    if (!channel) return settle(true);
    socket.timeout(120000).emit("subscribe", { channel, since }, (err, reply) => {
      if (err) return settle(false, "subscribe timed out");
      if (!reply || reply.ok === false || reply.error) return settle(false, JSON.stringify(reply).slice(0, 80));
      const data = reply.data || reply;
      replayed += (data.events || []).length;
      settle(true);
    });
  });
}
