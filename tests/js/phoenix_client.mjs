// Drives the official `phoenix` npm client (with `ws` as its transport under Node) for the
// protocol-compatibility test. Prints one JSON object per line for every thing that happens and
// takes commands ("leave", "exit") on stdin, so pytest can script a whole session.
import { createInterface } from "node:readline";
import { Socket } from "phoenix";
import WebSocket from "ws";

const [url, token, topic, mode] = process.argv.slice(2);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const opts = {
  transport: WebSocket,
  reconnectAfterMs: () => 100,
  rejoinAfterMs: () => 100,
  heartbeatIntervalMs: 1000,
};
if (mode === "authToken") opts.authToken = token; // sent in the Sec-WebSocket-Protocol header
else opts.params = { token };

const socket = new Socket(url, opts);
socket.onOpen(() => emit({ event: "open" }));
socket.onClose((e) => emit({ event: "close", code: e && e.code }));
socket.connect();

const channel = socket.channel(topic, {});
let joins = 0;
channel.on("nudge", (payload) => emit({ event: "nudge", payload }));
channel
  .join()
  .receive("ok", (resp) => emit({ event: "joined", count: ++joins, resp }))
  .receive("error", (resp) => emit({ event: "join_error", resp }));

createInterface({ input: process.stdin }).on("line", (line) => {
  if (line === "leave") {
    channel.leave().receive("ok", () => emit({ event: "left", state: channel.state }));
  } else if (line === "exit") {
    socket.disconnect(() => process.exit(0));
  }
});
