// Joins a presence topic with the official `phoenix` client and its `Presence` helper, and prints
// the helper's list (one JSON line) every time it syncs: what a real app would render.
import { Presence, Socket } from "phoenix";
import WebSocket from "ws";

const [url, token, topic] = process.argv.slice(2);
const socket = new Socket(url, { transport: WebSocket, params: { token } });
socket.connect();
const channel = socket.channel(topic, {});
const presence = new Presence(channel);
presence.onSync(() => {
  const list = presence.list((key, { metas }) => ({
    key,
    metas: metas.map((m) => ({ status: m.status, name: m.name ?? null })).sort((a, b) => (a.status < b.status ? -1 : 1)),
  }));
  list.sort((a, b) => (a.key < b.key ? -1 : 1));
  process.stdout.write(JSON.stringify({ event: "sync", list }) + "\n");
});
channel.join().receive("ok", () => process.stdout.write(JSON.stringify({ event: "joined" }) + "\n"));
