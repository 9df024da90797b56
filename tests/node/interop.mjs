// Drives the official socket.io-client against the hub: a client nobody here wrote.
// Reads commands from stdin, one JSON object per line; prints one JSON object per line.
//   {"cmd": "connect", "url", "namespace", "token"}  -> {"connected": id} or {"connect_error": err}
//   {"cmd": "subscribe", "channel", "since"}          -> {"ack": envelope}
//   {"cmd": "disconnect"}                              -> {"disconnected": true}
// Every server event is printed as {"event": name, "data": payload}.
import { createInterface } from "node:readline";
import { io } from "socket.io-client";

let socket = null;
const print = (value) => process.stdout.write(JSON.stringify(value) + "\n");

const commands = {
  connect({ url, namespace, token }) {
    socket = io(url + namespace, {
      transports: ["websocket"], auth: token ? { token } : {}, reconnection: false, forceNew: true,
    });
    socket.on("connect", () => print({ connected: socket.id }));
    socket.on("connect_error", (err) => print({ connect_error: { message: err.message, data: err.data } }));
    socket.onAny((event, data) => print({ event, data }));
  },
  async subscribe({ channel, since }) {
    const payload = since ? { channel, since } : { channel };
    print({ ack: await socket.timeout(5000).emitWithAck("subscribe", payload) });
  },
  disconnect() {
    socket.disconnect();
    print({ disconnected: true });
  },
};

for await (const line of createInterface({ input: process.stdin })) {
  const command = JSON.parse(line);
  try {
    await commands[command.cmd](command);
  } catch (err) {
    print({ error: String(err) });
  }
}
socket?.disconnect();
