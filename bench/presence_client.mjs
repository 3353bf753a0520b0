// The presence benchmark's client: one Node process holding its share of the sockets, in one of two modes.
//
// "hold": every socket joins its presence topic once and stays; after the join reply nothing is parsed,
//   received bytes and messages are only counted (these are the 10,000 present users of the
//   presence_state measurement: they receive the growing state and every diff, so parsing it all
//   would make the client, not the server, the cost). Closes after joining are reported with their
//   code and reason (a closed holder is a user who is no longer present).
// "churn": every socket connects, then on the driver's "phase" command repeatedly joins and leaves its
//   room: phx_join → ok reply → phx_leave → ok reply → … An op is one completed join or leave reply.
//   Closed loop (phase rate null): each socket sends its next op as soon as the previous one answered.
//   Open loop (phase rate R ops/s for this process): ops are due at t0 + k/R whatever happens; each
//   due op goes to the idle socket that has waited longest (a FIFO), and its latency is measured
//   from the time it was due (so a client or server that falls behind shows up in the latency,
//   and as `late_ops` when no socket was idle).
//
// Usage: node bench/presence_client.mjs CONFIG.json
//   CONFIG = {"name", "mode": "hold" | "churn", "urls": [ws://…/socket/websocket?vsn=2.0.0, …],
//             "sockets": [[token, url_index, topic], …], "connect_concurrency", "heartbeat_ms",
//             "local_addresses": [] (optional: source addresses, socket i binds local_addresses[i % n])}
// JSON lines. stdin: {"cmd": "grow" (hold) | "prime" | "stats" | "phase" | "end" | "stop" | "quit", ...};
// stdout: {"type": "ready" | "primed" | "stats" | "phase_started" | "phase" | "settled" | "bye", ...}.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { performance } from 'node:perf_hooks';
import readline from 'node:readline';

const require = createRequire(new URL('../tests/js/package.json', import.meta.url));
const WebSocket = require('ws');

const cfg = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const { name, mode, urls } = cfg;
const specs = cfg.sockets;
const N = specs.length;
const CONNECT_CONCURRENCY = cfg.connect_concurrency ?? 100;
const HEARTBEAT_MS = cfg.heartbeat_ms ?? 30000;
const LOCAL_ADDRESSES = cfg.local_addresses ?? [];
const OP_TIMEOUT_MS = cfg.op_timeout_ms ?? 10000;
const HOLD = mode === 'hold';

const now = () => performance.now();
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

// Latency histogram: 10 µs bins below 100 ms, 1 ms bins up to 100 s, one overflow bin (as client.mjs).
const HIST_SIZE = 10000 + 99900 + 1;
function binOf(ms) {
  if (ms < 100) return ms <= 0 ? 0 : Math.floor(ms * 100);
  if (ms < 100000) return 10000 + Math.floor(ms - 100);
  return HIST_SIZE - 1;
}
function binEdges(idx) {
  if (idx < 10000) return [idx / 100, (idx + 1) / 100];
  if (idx < HIST_SIZE - 1) return [100 + (idx - 10000), 101 + (idx - 10000)];
  return [100000, Infinity];
}

// Per-socket state.
const sockets = new Array(N);
// 0 connecting, 1 ready (hold: joined; churn: open), 2 failed to connect/join, 3 closed after ready
const conn = new Uint8Array(N);
// churn: 0 out of the room, 1 join sent, 2 in the room, 3 leave sent
const churn = new Uint8Array(N);
const opStart = new Float64Array(N); // when the pending op was due (open loop) or sent (closed loop)
const opSeq = new Uint32Array(N);
const joinRef = new Uint32Array(N); // ref of the join the socket's current (or last) membership came from
let ready = 0;
let failed = 0;
const errors = [];
const closeCodes = {};
const closeReasons = {};
let closedAfterReady = 0;
const note = (msg) => {
  if (errors.length < 20) errors.push(msg);
};

// Counters (hold): bytes and messages after the join reply.
let bytesIn = 0;
let messagesIn = 0;

// Phase counters (churn).
let running = false;
let stopping = false;
let rate = null; // ops/s of this process in open loop, null for closed loop
let phase = null;
let hist = new Uint32Array(HIST_SIZE);
let joins = 0;
let leaves = 0;
let replyErrors = 0;
let latSum = 0;
let latMax = 0;
let lateOps = 0;
let pushes = { presence_state: 0, presence_diff: 0, phx_close: 0, other: 0 };
const replyErrorReasons = {};

// Open loop: FIFO of idle socket indices, and the schedule.
const fifo = new Int32Array(N + 1);
let fifoHead = 0;
let fifoLen = 0;
function fifoPush(i) {
  fifo[(fifoHead + fifoLen) % fifo.length] = i;
  fifoLen++;
}
function fifoPop() {
  const i = fifo[fifoHead];
  fifoHead = (fifoHead + 1) % fifo.length;
  fifoLen--;
  return i;
}
let schedT0 = 0;
let issued = 0;
let pacer = null;

function sendOp(i, dueAt) {
  const ws = sockets[i];
  const topic = specs[i][2];
  const seq = String(++opSeq[i]);
  opStart[i] = dueAt;
  if (churn[i] === 0) {
    churn[i] = 1;
    joinRef[i] = opSeq[i];
    ws.send(`["${seq}","${seq}","${topic}","phx_join",{}]`);
  } else if (churn[i] === 2) {
    churn[i] = 3;
    // A leave carries the join_ref of the join it ends.
    ws.send(`["${joinRef[i]}","${seq}","${topic}","phx_leave",{}]`);
  }
}

function opDone(i, ok, reason) {
  const t = now();
  const lat = t - opStart[i];
  const wasJoin = churn[i] === 1;
  if (ok && priming !== null && wasJoin) {
    churn[i] = 2;
    priming.lat[priming.done++] = lat;
    if (lat > 1000 && priming.slow.length < 20) {
      priming.slow.push({ socket: i, topic: specs[i][2], node: specs[i][1], ms: Math.round(lat) });
    }
    if (priming.done === priming.expected) finishPriming();
    return;
  }
  if (ok) {
    churn[i] = wasJoin ? 2 : 0;
    if (lat > 1000 && phase !== null) slowCount++;
    if (lat > 1000 && slowOps.length < 20) {
      slowOps.push({ socket: i, topic: specs[i][2], node: specs[i][1], op: wasJoin ? 'join' : 'leave', ms: Math.round(lat) });
    }
    if (phase !== null) {
      if (wasJoin) joins++;
      else leaves++;
      hist[binOf(lat)]++;
      latSum += lat;
      if (lat > latMax) latMax = lat;
    }
  } else {
    // A refused op leaves the socket where it was.
    churn[i] = wasJoin ? 0 : 2;
    replyErrors++;
    const key = JSON.stringify(reason).slice(0, 200);
    replyErrorReasons[key] = (replyErrorReasons[key] ?? 0) + 1;
  }
  next(i);
}

// Priming: every socket joins its room once, concurrently, and stays; churn then starts in the room (its
// first op is a leave). This is the thundering herd of a node's start (or of its clients reconnecting
// after a restart): the first join of each room on each node subscribes the topic at the broker.
let priming = null;
const slowOps = [];
let slowCount = 0; // ops of the current phase that took over a second
function prime() {
  priming = { started: now(), expected: 0, done: 0, lat: null, slow: [] };
  const todo = [];
  for (let i = 0; i < N; i++) if (conn[i] === 1 && churn[i] === 0) todo.push(i);
  priming.expected = todo.length;
  priming.lat = new Float64Array(todo.length);
  for (const i of todo) sendOp(i, now());
  if (todo.length === 0) finishPriming();
}

function finishPriming() {
  const lat = Array.from(priming.lat.subarray(0, priming.done)).sort((a, b) => a - b);
  const q = (f) => (lat.length ? lat[Math.min(lat.length - 1, Math.floor(f * lat.length))] : null);
  emit({
    type: 'primed',
    name,
    joins: priming.done,
    duration_ms: now() - priming.started,
    p50_ms: q(0.5),
    p99_ms: q(0.99),
    max_ms: lat.length ? lat[lat.length - 1] : null,
    over_1s: lat.filter((v) => v > 1000).length,
    slow: priming.slow,
    errors: replyErrors,
  });
  priming = null;
}

function next(i) {
  if (conn[i] !== 1) return;
  if (priming !== null) {
    if (churn[i] === 0) sendOp(i, now()); // a refused first join is retried
    return;
  }
  if (stopping) {
    // End with every socket in its room, so the driver can check the final state on every node.
    if (churn[i] === 0) sendOp(i, now());
    else maybeSettled();
    return;
  }
  if (!running) return;
  if (rate === null) sendOp(i, now());
  else fifoPush(i);
}

function pace() {
  const t = now();
  const due = Math.floor(((t - schedT0) / 1000) * rate);
  while (issued < due) {
    if (fifoLen === 0) {
      // No idle socket: these ops stay due and are sent (late) as sockets free up.
      break;
    }
    const dueAt = schedT0 + (issued / rate) * 1000;
    issued++;
    sendOp(fifoPop(), dueAt);
  }
}

function onMessage(i, data) {
  if (HOLD) {
    if (conn[i] === 1) {
      bytesIn += data.length;
      messagesIn++;
      return;
    }
    // The first message after phx_join is its reply.
    const m = JSON.parse(data);
    if (m[3] === 'phx_reply' && m[1] === '1') settle(i, m[4].status === 'ok', m[4]);
    return;
  }
  // Churn: parse replies only; pushes are counted by event from the raw text.
  const text = data.toString();
  if (text.includes('"phx_reply"')) {
    const m = JSON.parse(text);
    if (m[2] === 'phoenix') return; // heartbeat reply
    if (m[1] === String(opSeq[i]) && (churn[i] === 1 || churn[i] === 3)) {
      opDone(i, m[4].status === 'ok', m[4].response);
    }
  } else if (text.includes('"presence_diff"')) {
    pushes.presence_diff++;
  } else if (text.includes('"presence_state"')) {
    pushes.presence_state++;
  } else if (text.includes('"phx_close"')) {
    pushes.phx_close++;
  } else {
    pushes.other++;
  }
}

function connect(i) {
  const [token, urlIndex, topic] = specs[i];
  const options = { perMessageDeflate: false, skipUTF8Validation: HOLD };
  if (LOCAL_ADDRESSES.length) options.localAddress = LOCAL_ADDRESSES[i % LOCAL_ADDRESSES.length];
  const ws = new WebSocket(`${urls[urlIndex]}&token=${encodeURIComponent(token)}`, options);
  sockets[i] = ws;
  ws.on('open', () => {
    if (HOLD) ws.send(`["1","1","${topic}","phx_join",{}]`);
    else settle(i, true, null);
  });
  ws.on('message', (data) => onMessage(i, data));
  ws.on('error', (err) => note(`socket ${i}: ${err.message}`));
  ws.on('close', (code, reason) => {
    closeCodes[code] = (closeCodes[code] ?? 0) + 1;
    if (conn[i] === 0) {
      settle(i, false, { closed: code, reason: reason.toString() });
    } else if (conn[i] === 1) {
      conn[i] = 3;
      closedAfterReady++;
      const key = `${code} ${reason.toString()}`.slice(0, 200);
      closeReasons[key] = (closeReasons[key] ?? 0) + 1;
      if (stopping) maybeSettled();
      if (priming !== null && churn[i] === 1 && --priming.expected === priming.done) finishPriming();
    }
  });
}

// Sockets [0, target) are opened, CONNECT_CONCURRENCY handshakes (hold: joins) in flight at a time.
// Churn opens all of them at start; hold grows on the driver's "grow" command, so the driver can
// measure at several room sizes with one set of processes.
let target = HOLD ? 0 : N;
let nextToConnect = 0;
let inflight = 0;
function pump() {
  while (inflight < CONNECT_CONCURRENCY && nextToConnect < target) {
    inflight++;
    connect(nextToConnect++);
  }
}

function settle(i, ok, detail) {
  inflight--;
  if (ok) {
    conn[i] = 1;
    ready++;
  } else {
    conn[i] = 2;
    failed++;
    note(`socket ${i}: ${HOLD ? 'join' : 'connect'} failed ${JSON.stringify(detail)}`);
  }
  if (ready + failed === target) emit({ type: 'ready', name, ready, failed, errors });
  else pump();
}

// Heartbeats: each socket every HEARTBEAT_MS, spread evenly (one slice of the sockets per second).
let heartbeatRef = 0;
let heartbeatTick = 0;
const slices = Math.max(1, Math.round(HEARTBEAT_MS / 1000));
setInterval(() => {
  for (let i = heartbeatTick++ % slices; i < N; i += slices) {
    if (conn[i] === 1) sockets[i].send(`[null,"hb${heartbeatRef++}","phoenix","heartbeat",{}]`);
  }
}, 1000);

// Ops that never got a reply.
function stuckOps() {
  const t = now();
  let stuck = 0;
  for (let i = 0; i < N; i++) {
    if (conn[i] === 1 && (churn[i] === 1 || churn[i] === 3) && t - opStart[i] > OP_TIMEOUT_MS) stuck++;
  }
  return stuck;
}

function startPhase(cmd) {
  const wasRunning = running;
  const newRate = cmd.rate ?? null;
  phase = { name: cmd.name, started: now() };
  hist = new Uint32Array(HIST_SIZE);
  joins = 0;
  leaves = 0;
  replyErrors = 0;
  latSum = 0;
  latMax = 0;
  lateOps = 0;
  slowCount = 0;
  pushes = { presence_state: 0, presence_diff: 0, phx_close: 0, other: 0 };
  for (const key of Object.keys(replyErrorReasons)) delete replyErrorReasons[key];
  if (pacer !== null) {
    clearInterval(pacer);
    pacer = null;
  }
  const switching = newRate !== rate;
  rate = newRate;
  running = true;
  if (rate !== null) {
    schedT0 = now();
    issued = 0;
    if (switching || !wasRunning) {
      // Every socket not waiting for a reply becomes idle; the busy ones join the FIFO when answered.
      fifoHead = 0;
      fifoLen = 0;
      for (let i = 0; i < N; i++) if (conn[i] === 1 && (churn[i] === 0 || churn[i] === 2)) fifoPush(i);
    }
    pacer = setInterval(pace, 1);
  } else if (!wasRunning || switching) {
    for (let i = 0; i < N; i++) if (conn[i] === 1 && (churn[i] === 0 || churn[i] === 2)) sendOp(i, now());
  }
  emit({ type: 'phase_started', name, phase: cmd.name });
}

function endPhase() {
  const t = now();
  if (rate !== null) lateOps = Math.max(0, Math.floor(((t - schedT0) / 1000) * rate) - issued);
  const bins = [];
  for (let k = 0; k < HIST_SIZE; k++) if (hist[k] !== 0) bins.push([...binEdges(k), hist[k]]);
  emit({
    type: 'phase',
    name,
    phase: phase.name,
    duration_ms: t - phase.started,
    rate,
    joins,
    leaves,
    ops: joins + leaves,
    reply_errors: replyErrors,
    reply_error_reasons: { ...replyErrorReasons },
    late_ops: lateOps,
    stuck_ops: stuckOps(),
    lat_sum_ms: latSum,
    lat_max_ms: latMax,
    hist: bins,
    pushes,
    open: countOpen(),
    closed_after_ready: closedAfterReady,
    close_reasons: { ...closeReasons },
    slow_ops: slowOps.splice(0),
    over_1s: slowCount,
    errors,
  });
  phase = null;
}

function countOpen() {
  let open = 0;
  for (let i = 0; i < N; i++) if (conn[i] === 1) open++;
  return open;
}

// Stop: no new cycles; every socket finishes what it is doing and ends in its room.
let settledSent = false;
let settleTimer = null;
function stop() {
  running = false;
  stopping = true;
  if (pacer !== null) {
    clearInterval(pacer);
    pacer = null;
  }
  for (let i = 0; i < N; i++) if (conn[i] === 1 && churn[i] === 0) sendOp(i, now());
  settleTimer = setTimeout(() => sendSettled(true), OP_TIMEOUT_MS);
  maybeSettled();
}

function maybeSettled() {
  if (settledSent) return;
  for (let i = 0; i < N; i++) if (conn[i] === 1 && churn[i] !== 2) return;
  sendSettled(false);
}

function sendSettled(timedOut) {
  if (settledSent) return;
  settledSent = true;
  clearTimeout(settleTimer);
  let inRoom = 0;
  for (let i = 0; i < N; i++) if (conn[i] === 1 && churn[i] === 2) inRoom++;
  emit({ type: 'settled', name, timed_out: timedOut, in_room: inRoom, open: countOpen(), errors });
}

function quit() {
  for (let i = 0; i < N; i++) if (sockets[i] && conn[i] === 1) sockets[i].close(1000);
  const deadline = Date.now() + 3000;
  const poll = setInterval(() => {
    let left = 0;
    for (let i = 0; i < N; i++) if (sockets[i] && sockets[i].readyState !== WebSocket.CLOSED) left++;
    if (left === 0 || Date.now() > deadline) {
      clearInterval(poll);
      emit({ type: 'bye', name, left });
      process.exit(0);
    }
  }, 20);
}

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const cmd = JSON.parse(line);
  if (cmd.cmd === 'stats') {
    emit({
      type: 'stats',
      name,
      ready,
      failed,
      open: countOpen(),
      bytes_in: bytesIn,
      messages_in: messagesIn,
      closed_after_ready: closedAfterReady,
      close_codes: closeCodes,
      close_reasons: closeReasons,
      errors,
    });
  } else if (cmd.cmd === 'grow') {
    target = Math.min(N, cmd.to);
    if (ready + failed >= target) emit({ type: 'ready', name, ready, failed, errors });
    else pump();
  } else if (cmd.cmd === 'prime') prime();
  else if (cmd.cmd === 'phase') startPhase(cmd);
  else if (cmd.cmd === 'end') endPhase();
  else if (cmd.cmd === 'stop') stop();
  else if (cmd.cmd === 'quit') quit();
});
// The driver went away: do not linger holding thousands of sockets.
rl.on('close', () => process.exit(0));

pump();
