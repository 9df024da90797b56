// Reference server for bench/fanout.py: socket.io 4.8 with its defaults (no permessage-deflate).
// Every client of "/" joins room "bench"; a client of "/control" starts a broadcast run with
// `start {rate, duration, size}` (broadcasts/s, seconds, payload bytes) and gets an ack when done.
"use strict";
const http = require("http");
const { Server } = require("socket.io");
const { performance } = require("perf_hooks");

const port = Number(process.argv[2] || 9100);
const httpServer = http.createServer();
const io = new Server(httpServer, { serveClient: false });
const now = () => performance.timeOrigin + performance.now();

io.on("connection", (socket) => socket.join("bench"));

function payload(seq, ts, size) {
  // Same shape and size as bench/fanout.py's Python servers.
  const base = JSON.stringify({ seq, ts, pad: "" }).length;
  return { seq, ts, pad: "x".repeat(Math.max(0, size - base)) };
}

io.of("/control").on("connection", (socket) => {
  socket.on("start", ({ rate, duration, size }, ack) => {
    const total = Math.round(rate * duration);
    const interval = 1000 / rate;
    const t0 = now();
    let seq = 0;
    const tick = () => {
      // Emit everything that is due (catching up when late), stamped with its scheduled time.
      const elapsed = now() - t0;
      while (seq < total && seq * interval <= elapsed) {
        io.to("bench").emit("tick", payload(seq, t0 + seq * interval, size));
        seq += 1;
      }
      if (seq >= total) return ack({ sent: seq });
      setTimeout(tick, Math.max(0, seq * interval - (now() - t0)));
    };
    tick();
  });
});

httpServer.listen(port, "127.0.0.1", () => console.log(JSON.stringify({ ready: port })));
