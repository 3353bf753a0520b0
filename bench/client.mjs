// The broadcast benchmark's client: one Node process holding its share of the subscriber sockets.
//
// It opens one WebSocket per token it is given (each token is a distinct user), joins the topic,
// heartbeats, and during each phase the driver announces it checks every "tick" push per socket
// (sequence numbers in order, none missing) and histograms publish→receive latency.
//
// Usage: node bench/client.mjs CONFIG.json
//   CONFIG = {"name", "url" (ws://…/socket/websocket?vsn=2.0.0), "topic", "event", "tokens": [...],
//             "connect_concurrency", "heartbeat_ms"}
// Talks to the driver in JSON lines. stdin: {"cmd": "clock" | "phase" | "end" | "quit", ...};
// stdout: {"type": "ready" | "clock" | "phase_started" | "phase" | "bye", ...}.
//
// Clock: the driver stamps `sent_at` with CLOCK_MONOTONIC in ms (Python time.monotonic_ns() / 1e6).
// Here `now()` is performance.now() plus an offset taken from process.hrtime.bigint(); both are
// libuv's uv_hrtime(), i.e. CLOCK_MONOTONIC too, so the two processes read one clock with no
// wall-clock steps or NTP slew between them. The driver checks this with the "clock" command.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { performance } from 'node:perf_hooks';
import readline from 'node:readline';

const require = createRequire(new URL('../tests/js/package.json', import.meta.url));
const WebSocket = require('ws');

const cfg = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const { name, url, topic, event } = cfg;
const tokens = cfg.tokens;
const N = tokens.length;
const CONNECT_CONCURRENCY = cfg.connect_concurrency ?? 100;
const HEARTBEAT_MS = cfg.heartbeat_ms ?? 30000;
// Concurrent publishers: each numbers its own ticks (payload.p is its index), and order is checked per
// publisher and socket, as a server only promises order from one publisher to one subscriber.
const P = cfg.publishers ?? 1;

function calibrateOffset() {
  // The smallest gap between the two readings gives the tightest offset.
  let best = Infinity;
  let offset = 0;
  for (let k = 0; k < 50; k++) {
    const a = performance.now();
    const mono = Number(process.hrtime.bigint()) / 1e6;
    const b = performance.now();
    if (b - a < best) {
      best = b - a;
      offset = mono - (a + b) / 2;
    }
  }
  return offset;
}
const OFFSET = calibrateOffset();
const now = () => performance.now() + OFFSET;

// Latency histogram: 10 µs bins below 100 ms, 1 ms bins up to 100 s, one overflow bin.
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

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

// Per-socket state, indexed by the socket's position in `tokens`.
const sockets = new Array(N);
const state = new Uint8Array(N); // 0 connecting, 1 joined, 2 failed, 3 closed after joining
const expected = new Float64Array(N * P); // next seq socket i should get from publisher p: [i * P + p]
const streamsDone = new Uint16Array(N); // publishers whose last tick socket i has seen
const count = new Uint32Array(N);
const gaps = new Uint32Array(N); // seqs skipped (frames missing)
const disorder = new Uint32Array(N); // seqs at or below one already seen (duplicate or reordered)
let openCount = 0;
let joined = 0;
let failed = 0;
const errors = [];
const closeCodes = {};
let unexpected = 0;

// Phase state.
let phase = null;
let hist = new Uint32Array(HIST_SIZE);
let frames = 0;
let firstRecv = 0;
let lastRecv = 0;
let latMax = -Infinity;
let latMin = Infinity;
let latSum = 0;
let negatives = 0;
let outsidePhase = 0;

function onTick(i, payload) {
  const t = now();
  if (phase === null) {
    outsidePhase++;
    return;
  }
  const seq = payload.seq;
  const p = payload.p ?? 0;
  const k = i * P + p;
  const exp = expected[k];
  if (seq === exp) {
    expected[k] = seq + 1;
  } else if (seq > exp) {
    gaps[i] += seq - exp;
    expected[k] = seq + 1;
  } else {
    disorder[i]++;
  }
  count[i]++;
  frames++;
  const lat = t - payload.sent_at;
  hist[binOf(lat)]++;
  if (lat < 0) negatives++;
  if (lat > latMax) latMax = lat;
  if (lat < latMin) latMin = lat;
  latSum += lat;
  if (firstRecv === 0) firstRecv = t;
  lastRecv = t;
  if (phase.lastSeq !== null && seq === phase.lastSeq[p]) {
    streamsDone[i]++;
    if (streamsDone[i] === P) {
      phase.reached++;
      maybeFinishPhase();
    }
  }
}

function connect(i) {
  const ws = new WebSocket(`${url}&token=${encodeURIComponent(tokens[i])}`, { perMessageDeflate: false });
  sockets[i] = ws;
  ws.on('open', () => ws.send(JSON.stringify(['1', '1', topic, 'phx_join', {}])));
  ws.on('message', (data) => {
    const m = JSON.parse(data);
    if (m[3] === event && m[2] === topic) {
      onTick(i, m[4]);
    } else if (m[3] === 'phx_reply') {
      if (state[i] === 0 && m[1] === '1') settleJoin(i, m[4].status === 'ok', m[4]);
    } else {
      unexpected++;
    }
  });
  ws.on('error', (err) => {
    if (errors.length < 10) errors.push(`socket ${i}: ${err.message}`);
  });
  ws.on('close', (code) => {
    closeCodes[code] = (closeCodes[code] ?? 0) + 1;
    if (state[i] === 0) {
      settleJoin(i, false, { closed: code });
    } else if (state[i] === 1) {
      state[i] = 3;
      openCount--;
      maybeFinishPhase();
    }
  });
}

let nextToConnect = 0;
let inflight = 0;
function pump() {
  while (inflight < CONNECT_CONCURRENCY && nextToConnect < N) {
    inflight++;
    connect(nextToConnect++);
  }
}

function settleJoin(i, ok, detail) {
  inflight--;
  if (ok) {
    state[i] = 1;
    joined++;
    openCount++;
  } else {
    state[i] = 2;
    failed++;
    if (errors.length < 10) errors.push(`socket ${i}: join failed ${JSON.stringify(detail)}`);
  }
  if (joined + failed === N) {
    emit({ type: 'ready', name, joined, failed, errors, clock_ms: now() });
  } else {
    pump();
  }
}

// Heartbeats: each socket every HEARTBEAT_MS, spread evenly (one slice of the sockets per second).
let heartbeatRef = 0;
let heartbeatTick = 0;
const slices = Math.max(1, Math.round(HEARTBEAT_MS / 1000));
setInterval(() => {
  for (let i = heartbeatTick++ % slices; i < N; i += slices) {
    if (state[i] === 1) sockets[i].send(`[null,"hb${heartbeatRef++}","phoenix","heartbeat",{}]`);
  }
}, 1000);

function startPhase(cmd) {
  phase = { name: cmd.name, firstSeq: cmd.first_seq, lastSeq: null, reached: 0, timer: null, lastProgress: 0 };
  expected.fill(cmd.first_seq);
  count.fill(0);
  gaps.fill(0);
  disorder.fill(0);
  hist = new Uint32Array(HIST_SIZE);
  frames = 0;
  firstRecv = 0;
  lastRecv = 0;
  latMax = -Infinity;
  latMin = Infinity;
  latSum = 0;
  negatives = 0;
  emit({ type: 'phase_started', name, phase: cmd.name });
}

function endPhase(cmd) {
  // last_seq: one number (every publisher) or one per publisher.
  phase.lastSeq = Array.isArray(cmd.last_seq) ? cmd.last_seq : new Array(P).fill(cmd.last_seq);
  phase.reached = 0;
  for (let i = 0; i < N; i++) {
    streamsDone[i] = 0;
    for (let p = 0; p < P; p++) if (expected[i * P + p] > phase.lastSeq[p]) streamsDone[i]++;
    if (state[i] === 1 && streamsDone[i] === P) phase.reached++;
  }
  // Give up when nothing arrives for timeout_ms: what is missing then is reported as dropped.
  const timeout = cmd.timeout_ms ?? 10000;
  phase.lastProgress = now();
  let seen = frames;
  phase.timer = setInterval(() => {
    if (frames !== seen) {
      seen = frames;
      phase.lastProgress = now();
    } else if (now() - phase.lastProgress > timeout) {
      finishPhase(true);
    }
  }, 50);
  maybeFinishPhase();
}

function maybeFinishPhase() {
  if (phase !== null && phase.lastSeq !== null && phase.reached >= openCount) finishPhase(false);
}

function finishPhase(timedOut) {
  clearInterval(phase.timer);
  let perSocket = 0;
  for (let p = 0; p < P; p++) perSocket += phase.lastSeq[p] - phase.firstSeq + 1;
  let complete = 0;
  let missing = 0;
  let gapSum = 0;
  let disorderSum = 0;
  const incomplete = [];
  for (let i = 0; i < N; i++) {
    if (state[i] === 0 || state[i] === 2) continue;
    gapSum += gaps[i];
    disorderSum += disorder[i];
    let ends = true;
    for (let p = 0; p < P; p++) if (expected[i * P + p] !== phase.lastSeq[p] + 1) ends = false;
    const ok = count[i] === perSocket && gaps[i] === 0 && disorder[i] === 0 && ends;
    if (ok) {
      complete++;
    } else {
      missing += Math.max(0, perSocket - count[i]);
      if (incomplete.length < 10) {
        incomplete.push({ socket: i, open: state[i] === 1, count: count[i], gaps: gaps[i], disorder: disorder[i] });
      }
    }
  }
  const bins = [];
  for (let k = 0; k < HIST_SIZE; k++) if (hist[k] !== 0) bins.push([...binEdges(k), hist[k]]);
  emit({
    type: 'phase',
    name,
    phase: phase.name,
    timed_out: timedOut,
    sockets: joined,
    open: openCount,
    per_socket: perSocket,
    frames,
    complete,
    missing,
    gaps: gapSum,
    disorder: disorderSum,
    incomplete,
    first_recv_ms: firstRecv,
    last_recv_ms: lastRecv,
    lat_min_ms: latMin,
    lat_max_ms: latMax,
    lat_sum_ms: latSum,
    negative_latencies: negatives,
    hist: bins,
    close_codes: closeCodes,
    unexpected,
    outside_phase: outsidePhase,
  });
  phase = null;
}

function quit() {
  for (let i = 0; i < N; i++) if (state[i] === 1) sockets[i].close(1000);
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
  if (cmd.cmd === 'clock') emit({ type: 'clock', name, clock_ms: now() });
  else if (cmd.cmd === 'phase') startPhase(cmd);
  else if (cmd.cmd === 'end') endPhase(cmd);
  else if (cmd.cmd === 'quit') quit();
});
// The driver went away: do not linger holding thousands of sockets.
rl.on('close', () => process.exit(0));

pump();
