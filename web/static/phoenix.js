// A small Phoenix Channels V2 (JSON) client of our own, for the dashboards.
//
// Frames are arrays [join_ref, ref, topic, event, payload]. The socket sends a `heartbeat` on topic
// `phoenix` every 30 s (a heartbeat still unanswered when the next is due closes the connection),
// matches every `phx_reply` to its push by `ref`, and reconnects with a growing backoff, rejoining
// every channel that was joined. A channel ignores frames of an older join (their join_ref differs).

const HEARTBEAT_MS = 30000;
const BACKOFF_MS = [250, 500, 1000, 2000, 5000, 10000];
const PUSH_TIMEOUT_MS = 10000;

export class Socket {
  /**
   * @param {string} url   e.g. "/socket/websocket" (made absolute against the page's origin)
   * @param {object} opts  {params: {...}, onStatus(status), onFailure(attempts), heartbeatMs, backoffMs}
   *                      (without a `token` param the upgrade carries the page's session cookie)
   */
  constructor(url, opts = {}) {
    const base = new URL(url, window.location.href);
    base.protocol = base.protocol === "https:" ? "wss:" : "ws:";
    base.searchParams.set("vsn", "2.0.0");
    for (const [k, v] of Object.entries(opts.params || {})) base.searchParams.set(k, v);
    this.url = base.toString();
    this.heartbeatMs = opts.heartbeatMs || HEARTBEAT_MS;
    this.backoffMs = opts.backoffMs || BACKOFF_MS;
    this.onStatus = opts.onStatus || (() => {});
    this.onFailure = opts.onFailure || (() => {});
    this.ws = null;
    this.ref = 0;
    this.pending = new Map(); // ref -> {resolve, timer}
    this.channels = new Set();
    this.attempts = 0;
    this.closedOnPurpose = false;
    this.heartbeatTimer = null;
    this.heartbeatRef = null;
    this.reconnectTimer = null;
    this.status = "idle";
  }

  nextRef() {
    this.ref += 1;
    return String(this.ref);
  }

  setStatus(status) {
    this.status = status;
    this.onStatus(status, this.attempts);
  }

  connect() {
    this.closedOnPurpose = false;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) return;
    this.setStatus(this.attempts ? "reconnecting" : "connecting");
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      if (ws !== this.ws) return;
      this.attempts = 0;
      this.setStatus("open");
      this.startHeartbeat();
      for (const channel of this.channels) {
        if (channel.wanted) channel.rejoin();
      }
    };
    ws.onmessage = (message) => {
      if (ws !== this.ws) return;
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch (err) {
        return; // not ours to handle: the server only sends V2 JSON
      }
      if (!Array.isArray(frame) || frame.length !== 5) return;
      this.dispatch(frame);
    };
    ws.onclose = () => {
      if (ws !== this.ws) return;
      this.onDisconnect();
    };
    ws.onerror = () => {
      // onclose follows; nothing to do here
    };
  }

  disconnect() {
    this.closedOnPurpose = true;
    clearTimeout(this.reconnectTimer);
    this.stopHeartbeat();
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000, "bye");
    }
    this.failPending("disconnected");
    this.setStatus("closed");
  }

  onDisconnect() {
    this.stopHeartbeat();
    this.ws = null;
    this.failPending("disconnected");
    for (const channel of this.channels) channel.joined = false;
    if (this.closedOnPurpose) {
      this.setStatus("closed");
      return;
    }
    const delay = this.backoffMs[Math.min(this.attempts, this.backoffMs.length - 1)];
    this.attempts += 1;
    this.setStatus("reconnecting");
    this.onFailure(this.attempts);
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  failPending(reason) {
    for (const [, entry] of this.pending) {
      clearTimeout(entry.timer);
      entry.resolve({ status: "error", response: { reason } });
    }
    this.pending.clear();
  }

  startHeartbeat() {
    this.stopHeartbeat();
    this.heartbeatTimer = setInterval(() => {
      if (this.heartbeatRef !== null) {
        // The last heartbeat went unanswered for a whole interval: the connection is dead.
        this.heartbeatRef = null;
        if (this.ws) this.ws.close(4000, "heartbeat timeout");
        return;
      }
      this.heartbeatRef = this.nextRef();
      this.send([null, this.heartbeatRef, "phoenix", "heartbeat", {}]);
    }, this.heartbeatMs);
  }

  stopHeartbeat() {
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
    this.heartbeatRef = null;
  }

  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Send a frame that expects a `phx_reply`; resolves with {status, response} (never rejects). */
  request(joinRef, topic, event, payload, ref = this.nextRef()) {
    return new Promise((resolve) => {
      if (!this.send([joinRef, ref, topic, event, payload])) {
        resolve({ status: "error", response: { reason: "not connected" } });
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        resolve({ status: "timeout", response: {} });
      }, PUSH_TIMEOUT_MS);
      this.pending.set(ref, { resolve, timer });
    });
  }

  dispatch([joinRef, ref, topic, event, payload]) {
    if (event === "phx_reply" && ref !== null) {
      if (topic === "phoenix" && ref === this.heartbeatRef) {
        this.heartbeatRef = null;
        return;
      }
      const entry = this.pending.get(ref);
      if (entry) {
        this.pending.delete(ref);
        clearTimeout(entry.timer);
        entry.resolve(payload || { status: "error", response: {} });
      }
      return;
    }
    for (const channel of this.channels) {
      if (channel.topic === topic) channel.receive(joinRef, event, payload);
    }
  }

  channel(topic, params = {}) {
    const channel = new Channel(this, topic, params);
    this.channels.add(channel);
    return channel;
  }
}

export class Channel {
  constructor(socket, topic, params) {
    this.socket = socket;
    this.topic = topic;
    this.params = params;
    this.joinRef = null;
    this.joined = false;
    this.wanted = false;
    this.handlers = new Map(); // event -> [callback]
    this.onJoinReply = () => {};
  }

  on(event, callback) {
    if (!this.handlers.has(event)) this.handlers.set(event, []);
    this.handlers.get(event).push(callback);
    return this;
  }

  /** Join (or join again with new params: the server replaces the old join). Resolves with the reply. */
  async join(params = this.params) {
    this.params = params;
    this.wanted = true;
    return this.rejoin();
  }

  async rejoin() {
    const ref = this.socket.nextRef();
    this.joinRef = ref;
    this.joined = false;
    const reply = await this.socket.request(ref, this.topic, "phx_join", this.params, ref);
    if (ref !== this.joinRef) return reply; // a newer join superseded this one
    if (reply.status === "ok") {
      this.joined = true;
    } else if (reply.status === "error" && reply.response && reply.response.reason !== "not connected"
               && reply.response.reason !== "disconnected") {
      this.wanted = false; // refused (e.g. unauthorized): do not retry on reconnect
    }
    this.onJoinReply(reply);
    return reply;
  }

  push(event, payload = {}) {
    return this.socket.request(this.joinRef, this.topic, event, payload);
  }

  leave() {
    this.wanted = false;
    this.joined = false;
    const joinRef = this.joinRef;
    this.joinRef = null;
    this.socket.channels.delete(this);
    return this.socket.request(joinRef, this.topic, "phx_leave", {});
  }

  receive(joinRef, event, payload) {
    if (joinRef !== null && joinRef !== this.joinRef) return; // from an older join
    if (event === "phx_error" || event === "phx_close") this.joined = false;
    if (event === "phx_error" && this.wanted) {
      setTimeout(() => {
        if (this.wanted && !this.joined && this.socket.status === "open") this.rejoin();
      }, 1000);
    }
    for (const callback of this.handlers.get(event) || []) callback(payload);
  }
}
