// Load generator for bench/fanout.py: N official socket.io-client connections (websocket
// transport) to one server; counts "tick" events and their latency (receive time minus the
// scheduled time the server stamped in `ts`). Driven by JSON lines on stdin:
//   {"cmd": "reset"}                  -> start a new measurement window
//   {"cmd": "report"}                 -> {"count", "hist", "disconnects", "cpu"} for the window
//   {"cmd": "exit"}
"use strict";
const { io } = require("socket.io-client");
const { performance } = require("perf_hooks");
const readline = require("readline");

const [url, clientsArg, concurrencyArg] = process.argv.slice(2);
const clients = Number(clientsArg || 1000);
const concurrency = Number(concurrencyArg || 100);
const now = () => performance.timeOrigin + performance.now();

let count = 0;
let latencies = new Float64Array(1 << 20);
let cpuStart = process.cpuUsage();
let wallStart = performance.now();
let disconnects = 0;
const sockets = [];

function record(data) {
  if (count === latencies.length) {
    const bigger = new Float64Array(latencies.length * 2);
    bigger.set(latencies);
    latencies = bigger;
  }
  // The hub's events wrap the payload in the protocol envelope {id, channel, type, data, ts}.
  latencies[count++] = now() - (data.data ? data.data.ts : data.ts);
}

function connectOne() {
  return new Promise((resolve, reject) => {
    const socket = io(url, { transports: ["websocket"], forceNew: true, reconnection: false,
                             timeout: 60000 });
    socket.on("tick", record);
    socket.on("disconnect", () => { disconnects += 1; });
    socket.once("connect", () => resolve(socket));
    socket.once("connect_error", reject);
    sockets.push(socket);
  });
}

async function main() {
  let next = 0;
  const worker = async () => {
    while (next < clients) {
      next += 1;
      await connectOne();
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, clients) }, worker));
  console.log(JSON.stringify({ ready: sockets.length }));
}

// Latencies in 0.1 ms buckets, {bucket: count}: the driver merges the histograms of several load
// generator processes before it takes percentiles.
function histogram() {
  const hist = {};
  for (let i = 0; i < count; i++) {
    const bucket = Math.max(0, Math.floor(latencies[i] * 10));
    hist[bucket] = (hist[bucket] || 0) + 1;
  }
  return hist;
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const { cmd } = JSON.parse(line);
  if (cmd === "reset") {
    count = 0;
    cpuStart = process.cpuUsage();
    wallStart = performance.now();
    console.log(JSON.stringify({ reset: true }));
  } else if (cmd === "report") {
    const cpu = process.cpuUsage(cpuStart);
    const wall = performance.now() - wallStart;
    console.log(JSON.stringify({
      count, hist: histogram(), disconnects, cpu: (cpu.user + cpu.system) / 1000 / wall,
    }));
  } else if (cmd === "exit") {
    for (const s of sockets) s.disconnect();
    process.exit(0);
  }
});

main().catch((err) => {
  console.log(JSON.stringify({ error: String(err && err.message || err) }));
  process.exit(1);
});
