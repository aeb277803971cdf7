// MiniCPM-o Edge demo page: live camera + microphone over WS /v1/realtime (schema: edge/server/realtime.py).
//
// A live turn: the VAD (audio.js) hears speech -> 1-s units of 16 kHz pcm16, each with the camera frame of its
// second, go out as input.audio -> 0.7 s of silence -> input.commit. The reply streams back as text deltas and
// 24 kHz speech chunks scheduled back to back. Speech while the assistant thinks or speaks is a barge-in:
// response.cancel (if the reply is still being generated) and the scheduled speech stops at once.
// Counters for tests and debugging: window.edgeDemo.stats.

import {
  FRAME_SAMPLES, IN_RATE, Player, TurnDetector, base64ToPcm16, clipToWavDataUrl, floatToPcm16, levelDb,
  pcm16ToBase64, startCapture, VAD,
} from "./audio.js";
import {RealtimeLink} from "./link.js";
import {
  $, Alerts, STATE_LABELS, addAssistantTurn, addDivider, addUserTurn, latencyLine, readAsDataUrl,
} from "./ui.js";

const KEY_STORAGE = "minicpmo-edge-api-key"; // sessionStorage: the key lives as long as the tab
// Camera frames: the live (omni) prompt encodes each frame unsliced at ~448 px, so more pixels only cost bandwidth.
const MAX_FRAME_SIDE = 640;
const JPEG_QUALITY = 0.8;
const VIDEO = {width: {ideal: 640}, height: {ideal: 480}, frameRate: {ideal: 15}};
// Echo cancellation keeps the assistant's own speech out of the microphone (else it would barge in on itself).
const MIC = {channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true};
const MAX_CLONE_SECONDS = 30; // the official demo's reference clips are 5-10 s; longer only costs prompt tokens
// Uploaded images above this are re-encoded (JPEG, longest side MAX_IMAGE_SIDE) before they are sent.
const IMAGE_REENCODE_BYTES = 4 * 2 ** 20;
const MAX_IMAGE_SIDE = 2048;
const CONFIG_RETRY_S = 2;
const STATE_POLL_MS = 250; // safety net: the state badge is also updated on every event

const stats = {
  sessions: 0, reconnects: 0, drops: 0,
  unitsSent: 0, framesSent: 0, commits: 0, audioAcks: 0, lastAck: null,
  textDeltas: 0, audioChunksReceived: 0, audioChunksDropped: 0, audioChunksScheduled: 0,
  audioSecondsScheduled: 0, audioChunksEnded: 0, underruns: 0, schedule: [],
  bargeIns: 0, cancelsSent: 0, sourcesStopped: 0, droppedSpeechSeconds: 0,
  repliesDone: 0, interruptedReplies: 0, failedReplies: 0, replies: {}, replyOrder: [],
  state: "offline", stateLog: [], errors: [],
};
const alertsLog = [];
// For tests and the console: counters, alerts shown, the server's config, and the speech still to be played.
window.edgeDemo = {
  stats, alerts: alertsLog, config: null, vad: VAD,
  speechLeft: () => (S.player && S.player.playing ? Math.max(0, S.player.endTime - S.ctx.currentTime) : 0),
};

const alerts = new Alerts($("alerts"), alertsLog);
const S = {
  cfg: null, link: null, connected: false, downSince: null,
  ctx: null, player: null,
  stream: null, stopCapture: null, live: false, muted: false, camera: false,
  detector: new TurnDetector(), preroll: [], turn: null, levelTick: 0,
  commits: [], commitSeq: 0, cancelledUpTo: 0, reply: null, dropAudio: new Set(),
  attachments: [], voice: "default", voiceName: "",
};
const canvas = document.createElement("canvas");

// --- state badge --------------------------------------------------------------------------------------------------
function replyOpen() {
  return S.commits.length > 0 || (!!S.reply && !S.reply.done);
}

function assistantBusy() {
  return replyOpen() || (!!S.player && S.player.playing);
}

function computeState() {
  if (!S.connected) return "offline";
  if (S.player && S.player.playing) return "speaking";
  if (replyOpen()) return "thinking";
  if (S.live && !S.muted) return S.detector.inTurn ? "hearing" : "listening";
  return "ready";
}

function updateState() {
  const s = computeState();
  if (s === stats.state) return;
  stats.state = s;
  stats.stateLog.push([s, Math.round(performance.now())]);
  const el = $("state");
  el.dataset.state = s;
  el.textContent = STATE_LABELS[s];
}

// --- audio output -------------------------------------------------------------------------------------------------
function ensureAudio() {
  if (!S.ctx) {
    S.ctx = new AudioContext();
    const rate = (S.cfg && S.cfg.audio.output_sample_rate) || 24000;
    S.player = new Player(S.ctx, rate, stats);
    S.player.onIdle = updateState;
  }
  if (S.ctx.state === "suspended") S.ctx.resume().then(() => alerts.clear("sound-blocked"), () => {});
  return S.ctx;
}

// --- connection ---------------------------------------------------------------------------------------------------
function setConn(state, text) {
  const el = $("conn");
  el.dataset.state = state;
  el.textContent = text;
}

const serverGoneText = (extra) => `Cannot reach the MiniCPM-o Edge server at ${location.host}: is \`minicpmo-edge ` +
  `serve\` still running? ${extra}`;

async function loadConfig() {
  for (;;) {
    try {
      const r = await fetch("/web/config", {cache: "no-store"});
      if (!r.ok) throw new Error(`GET /web/config answered HTTP ${r.status}`);
      return await r.json();
    } catch (e) {
      alerts.show("server-gone", "error", serverGoneText(`Retrying every ${CONFIG_RETRY_S} s.`));
      setConn("offline", "server unreachable");
      await new Promise((res) => setTimeout(res, CONFIG_RETRY_S * 1000));
    }
  }
}

function onSocketOpen() {
  setConn("connecting", "connected, waiting for the session…");
}

function onSocketDown(reason, info) {
  const wasReplying = replyOpen();
  S.connected = false;
  if (!S.downSince) S.downSince = performance.now();
  discardTurn(false);
  if (wasReplying && S.reply && !S.reply.done) {
    S.reply.done = true;
    S.reply.rec.status = "dropped";
    S.reply.li.dataset.status = "dropped";
    S.reply.li.querySelector(".meta").textContent = "connection lost: the rest of this reply did not arrive";
  }
  S.commits = [];
  if (reason === "unauthorized") {
    sessionStorage.removeItem(KEY_STORAGE);
    askKey(true);
  } else if (reason === "unreachable") {
    alerts.show("server-gone", "error", serverGoneText("Retrying…"));
    setConn("offline", "server unreachable");
  } else {
    stats.drops++;
    const code = info.code ? ` (WebSocket close code ${info.code})` : "";
    if (wasReplying) {
      alerts.show("socket-dropped", "error", `The connection dropped in the middle of a reply${code}; the rest ` +
        "of that reply is lost. Reconnecting…");
    } else {
      alerts.show("socket-closed", "warn", `Lost the connection to the server${code}. Reconnecting…`);
    }
    setConn("offline", "reconnecting…");
  }
  updateState();
}

function onRetry(delayS, attempt) {
  setConn("offline", `reconnecting in ${delayS} s (attempt ${attempt})`);
  alerts.update("server-gone", serverGoneText(`Retrying in ${delayS} s (attempt ${attempt}).`));
}

function askKey(wrong) {
  setConn("offline", "needs an API key");
  $("key-form").hidden = false;
  $("key").value = "";
  $("key").focus();
  alerts.clear("auth-required", "auth-wrong");
  if (wrong) {
    alerts.show("auth-wrong", "error", "The server refused this API key. Enter the key it was started with " +
      "(--api-key or $MINICPMO_EDGE_API_KEY).");
  } else {
    alerts.show("auth-required", "info", "This server requires an API key: enter it above to connect.");
  }
}

// --- server messages ----------------------------------------------------------------------------------------------
function onMessage(msg) {
  const handler = HANDLERS[msg.type];
  if (handler) handler(msg);
  updateState();
}

const HANDLERS = {
  "session.created": (msg) => {
    stats.sessions++;
    S.connected = true;
    setConn("online", "connected");
    alerts.clear("server-gone", "socket-closed", "not-connected", "auth-required", "auth-wrong");
    if (msg.random_weights) showNotice();
    if (S.downSince) {
      stats.reconnects++;
      alerts.show("reconnected", "info", "Reconnected. The server started a new session: the assistant does not " +
        "remember the earlier turns.");
    }
    S.downSince = null;
    sendSession(S.voice !== "default" ? {voice: S.voice} : {});
  },
  "session.updated": (msg) => {
    const cloned = msg.session && msg.session.voice === "reference clip";
    $("voice-status").textContent = cloned ? `✓ cloned voice from ${S.voiceName} is active` : "";
    $("voice-status").dataset.state = cloned ? "cloned" : "default";
  },
  "session.reset": () => {},
  "input.received": (msg) => {
    if (msg.audio_seconds !== undefined) stats.audioAcks++;
    stats.lastAck = msg;
  },
  "input.cleared": () => {},
  "response.created": (msg) => {
    const c = S.commits.shift() || {n: 0, t0: performance.now()};
    const rec = {text: "", samples: 0, sum: 0, sumSq: 0, status: "streaming", firstTextMs: null,
      firstAudioMs: null, timing: null, audioSeconds: 0, audioSamples: 0};
    stats.replies[msg.response_id] = rec;
    stats.replyOrder.push(msg.response_id);
    S.reply = {id: msg.response_id, t0: c.t0, rec, li: addAssistantTurn($("transcript"), msg.response_id), done: false};
    if (c.n <= S.cancelledUpTo) S.dropAudio.add(msg.response_id);
  },
  "response.text.delta": (msg) => {
    const r = currentReply(msg.response_id);
    if (!r) return;
    stats.textDeltas++;
    if (r.rec.firstTextMs === null) r.rec.firstTextMs = performance.now() - r.t0;
    r.rec.text += msg.delta;
    r.li.querySelector(".text").textContent = r.rec.text;
  },
  "response.audio.delta": (msg) => {
    stats.audioChunksReceived++;
    const r = currentReply(msg.response_id);
    if (!r || S.dropAudio.has(msg.response_id)) {
      stats.audioChunksDropped++;
      return;
    }
    const pcm = base64ToPcm16(msg.audio);
    const rec = r.rec;
    if (rec.firstAudioMs === null) rec.firstAudioMs = performance.now() - r.t0;
    for (let i = 0; i < pcm.length; i++) {
      rec.sum += pcm[i];
      rec.sumSq += pcm[i] * pcm[i];
    }
    rec.samples += pcm.length;
    rec.audioSamples = rec.samples;
    rec.audioSeconds = rec.samples / S.player.rate;
    ensureAudio();
    if (S.ctx.state !== "running" && !alerts.has("sound-blocked")) {
      alerts.show("sound-blocked", "warn", "The browser holds back sound until you interact with the page: " +
        "click anywhere to hear the replies.");
    }
    S.player.enqueue(pcm, msg.response_id);
    r.li.querySelector(".meta").textContent = latencyLine(rec, null);
  },
  "response.done": (msg) => {
    const r = currentReply(msg.response_id);
    if (!r) return;
    r.done = true;
    const rec = r.rec;
    rec.status = msg.status;
    rec.timing = msg.timing;
    rec.serverText = msg.text;
    stats.repliesDone++;
    if (msg.status === "interrupted") stats.interruptedReplies++;
    if (msg.status === "failed") stats.failedReplies++;
    if (r.li.dataset.status !== "interrupted") r.li.dataset.status = msg.status;
    if (!rec.text && msg.text) r.li.querySelector(".text").textContent = rec.text = msg.text;
    const line = latencyLine(rec, msg.timing);
    r.li.querySelector(".meta").textContent = msg.status === "completed" ? line : `${msg.status} · ${line}`;
  },
  "error": (msg) => {
    const err = msg.error || {};
    stats.errors.push(err);
    if (err.code === "invalid_api_key" || err.code === "no_active_response") return; // see onSocketDown / a race
    if (err.code === "empty_turn") S.commits.shift();
    if (err.param === "session.voice") {
      S.voice = "default";
      $("voice").value = "default";
      $("voice-status").textContent = "";
    }
    alerts.show("server-error", "error", `The server said: ${err.message || "an unknown error"}`);
  },
  "pong": () => {},
};

function currentReply(id) {
  return S.reply && S.reply.id === id ? S.reply : null;
}

function showNotice() {
  const n = $("notice");
  n.textContent = (S.cfg && S.cfg.notice) || "This server runs a bundle with RANDOM weights: replies are noise.";
  n.hidden = false;
}

// --- session options ----------------------------------------------------------------------------------------------
function numberOrNull(id, integer) {
  const v = $(id).value.trim();
  if (v === "") return null;
  const x = Number(v);
  if (!Number.isFinite(x)) return null;
  return integer ? Math.round(x) : x;
}

function sendSession(extra) {
  const speak = $("opt-speak").checked && !!S.cfg && S.cfg.speech_output;
  const session = {
    output_audio: speak,
    instructions: $("opt-instructions").value.trim() || null,
    temperature: numberOrNull("opt-temperature", false),
    max_tokens: numberOrNull("opt-max-tokens", true),
    seed: numberOrNull("opt-seed", true),
    ...extra,
  };
  return S.link && S.link.send({type: "session.update", session});
}

// --- live capture -------------------------------------------------------------------------------------------------
function deviceAlert(device, err, otherOk) {
  const name = device === "mic" ? "microphone" : "camera";
  const Name = name[0].toUpperCase() + name.slice(1);
  const what = device === "mic"
    ? "live voice chat is off (you can still type below)"
    : (otherOk ? "live chat continues with voice only, without video frames" : "there is no video");
  let code, text;
  if (err.name === "NotAllowedError" || err.name === "SecurityError") {
    code = "denied";
    text = `${Name} access was denied, so ${what}. Allow the ${name} for this page (the icon in the address ` +
      "bar) and press Start again.";
  } else if (err.name === "NotFoundError" || err.name === "OverconstrainedError") {
    code = "missing";
    text = `No ${name} was found, so ${what}.`;
  } else if (err.name === "NotReadableError" || err.name === "AbortError") {
    code = "busy";
    text = `The ${name} could not be started (another program may be using it), so ${what}.`;
  } else {
    code = "error";
    text = `The ${name} failed (${err.name}: ${err.message}), so ${what}.`;
  }
  alerts.show(`${device}-${code}`, device === "mic" ? "error" : "warn", text);
}

async function openDevices() {
  const gum = (c) => navigator.mediaDevices.getUserMedia(c);
  try {
    return {stream: await gum({audio: MIC, video: VIDEO}), micErr: null, camErr: null};
  } catch (both) {
    // Ask for each device alone, to tell the user which one is the problem and keep the other.
    let stream = null, micErr = null, camErr = null;
    try {
      stream = await gum({audio: MIC});
    } catch (e) {
      micErr = e;
    }
    try {
      const v = await gum({video: VIDEO});
      if (stream) v.getVideoTracks().forEach((t) => stream.addTrack(t));
      else stream = v;
    } catch (e) {
      camErr = e;
    }
    return {stream, micErr, camErr};
  }
}

async function startLive() {
  ensureAudio();
  const codes = ["mic", "camera"].flatMap((d) => ["denied", "missing", "busy", "error"].map((c) => `${d}-${c}`));
  alerts.clear(...codes, "insecure-context", "device-ended");
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    alerts.show("insecure-context", "error", "Camera and microphone only work on a secure page: open " +
      `http://localhost:${location.port}/ on the machine that runs the server, or serve the demo over https. ` +
      "You can still type below.");
    return;
  }
  $("start").disabled = true;
  const {stream, micErr, camErr} = await openDevices();
  $("start").disabled = false;
  if (micErr) deviceAlert("mic", micErr, !camErr);
  if (camErr) deviceAlert("camera", camErr, !micErr);
  if (!stream) return;
  S.stream = stream;
  S.camera = stream.getVideoTracks().length > 0;
  $("video").srcObject = S.camera ? stream : null;
  $("video-off").hidden = S.camera;
  for (const t of stream.getTracks()) {
    t.onended = () => {
      alerts.show("device-ended", "warn", `The ${t.kind === "audio" ? "microphone" : "camera"} stopped ` +
        "(unplugged or taken by another program). Press Start to try again.");
      stopLive();
    };
  }
  if (stream.getAudioTracks().length) {
    S.stopCapture = await startCapture(S.ctx, stream, onMicFrame);
    S.live = true;
  }
  $("start").hidden = true;
  $("stop").hidden = false;
  $("mute").disabled = !S.live;
  $("snapshot").disabled = !S.camera;
  updateState();
}

function stopLive() {
  discardTurn(true);
  if (S.stopCapture) S.stopCapture();
  if (S.stream) S.stream.getTracks().forEach((t) => { t.onended = null; t.stop(); });
  Object.assign(S, {stopCapture: null, stream: null, live: false, camera: false});
  $("video").srcObject = null;
  $("video-off").hidden = false;
  $("start").hidden = false;
  $("stop").hidden = true;
  $("mute").disabled = true;
  $("snapshot").disabled = true;
  updateState();
}

function pushPreroll(frame) {
  S.preroll.push(frame);
  const keep = Math.ceil(VAD.prerollMs / ((FRAME_SAMPLES / IN_RATE) * 1000));
  if (S.preroll.length > keep) S.preroll.splice(0, S.preroll.length - keep);
}

function onMicFrame(frame) {
  const db = levelDb(frame);
  if ((++S.levelTick & 3) === 0) $("level").value = Math.max(-90, db);
  const busy = assistantBusy();
  if (!S.live || S.muted || !S.connected || (busy && !$("barge").checked && !S.turn)) {
    S.detector.reset(); // muted, offline, or half-duplex while the assistant talks: the mic is not listened to
    pushPreroll(frame);
    return;
  }
  const wasInTurn = S.detector.inTurn;
  const ev = S.detector.feed(db, busy);
  if (wasInTurn && S.turn) turnAdd(frame);
  else pushPreroll(frame);
  if (ev === "start") {
    if (busy) interrupt("voice");
    beginTurn();
  } else if (ev === "end") {
    endTurn();
  }
  if (ev) updateState();
}

function grabFrame() {
  const v = $("video");
  if (!S.camera || v.readyState < 2 || !v.videoWidth) return null;
  const scale = Math.min(1, MAX_FRAME_SIDE / Math.max(v.videoWidth, v.videoHeight));
  canvas.width = Math.round(v.videoWidth * scale);
  canvas.height = Math.round(v.videoHeight * scale);
  canvas.getContext("2d").drawImage(v, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", JPEG_QUALITY);
}

function unitSamples() {
  const a = (S.cfg && S.cfg.audio) || {input_sample_rate: IN_RATE, unit_seconds: 1};
  return Math.round(a.input_sample_rate * a.unit_seconds);
}

function beginTurn() {
  S.turn = {chunks: [], pending: 0, samples: 0, units: 0, frames: 0, frame: grabFrame()};
  for (const f of S.preroll) turnAdd(f);
  S.preroll = [];
}

function turnAdd(frame) {
  const t = S.turn;
  t.chunks.push(frame);
  t.pending += frame.length;
  t.samples += frame.length;
  const unit = unitSamples();
  while (t.pending >= unit) sendUnit(t, unit);
}

// Sends the first n pending samples as one input.audio, with the camera frame taken when that second began.
function sendUnit(t, n) {
  const out = new Float32Array(n);
  let filled = 0;
  while (filled < n) {
    const c = t.chunks[0];
    const take = Math.min(c.length, n - filled);
    out.set(c.subarray(0, take), filled);
    filled += take;
    if (take === c.length) t.chunks.shift();
    else t.chunks[0] = c.subarray(take);
  }
  t.pending -= n;
  const msg = {type: "input.audio", audio: pcm16ToBase64(floatToPcm16(out))};
  if (t.frame) {
    msg.image = t.frame;
    t.frames++;
    stats.framesSent++;
  }
  if (S.link.send(msg)) stats.unitsSent++;
  t.units++;
  t.frame = grabFrame();
}

function endTurn() {
  const t = S.turn;
  S.turn = null;
  if (!t) return;
  if (t.pending > 0) sendUnit(t, t.pending);
  if (t.units) commit({speechSeconds: t.samples / IN_RATE, frames: t.frames});
}

function discardTurn(tellServer) {
  if (S.turn && tellServer && S.link) S.link.send({type: "input.clear"});
  S.turn = null;
  S.detector.reset();
}

// --- turns and interruptions --------------------------------------------------------------------------------------
function commit(user) {
  if (!S.link.send({type: "input.commit"})) return;
  stats.commits++;
  S.commits.push({n: ++S.commitSeq, t0: performance.now()});
  addUserTurn($("transcript"), user);
  updateState();
}

// Barge-in ("voice"), a typed message or a reset while the assistant is busy: stop its speech now and, if the
// reply is still being generated, ask the server to stop it (its response.done then says "interrupted").
function interrupt(reason) {
  if (replyOpen()) {
    if (S.link.send({type: "response.cancel"})) stats.cancelsSent++;
    S.cancelledUpTo = S.commitSeq;
  }
  if (S.reply) {
    S.dropAudio.add(S.reply.id);
    if (S.player && S.player.playing || !S.reply.done) S.reply.li.dataset.status = "interrupted";
  }
  const dropped = S.player ? S.player.stop() : 0;
  stats.droppedSpeechSeconds += dropped;
  if (reason === "voice") stats.bargeIns++;
  if (S.reply && dropped > 0) {
    const meta = S.reply.li.querySelector(".meta");
    meta.textContent = `${meta.textContent} · interrupted (${dropped.toFixed(1)} s not played)`;
  }
  updateState();
}

// --- typed messages and images ------------------------------------------------------------------------------------
async function imageDataUrl(file) {
  const bitmap = await createImageBitmap(file);
  const big = Math.max(bitmap.width, bitmap.height);
  if (file.size <= IMAGE_REENCODE_BYTES && big <= MAX_IMAGE_SIDE) {
    bitmap.close();
    return readAsDataUrl(file);
  }
  const scale = Math.min(1, MAX_IMAGE_SIDE / big);
  const c = document.createElement("canvas");
  c.width = Math.round(bitmap.width * scale);
  c.height = Math.round(bitmap.height * scale);
  c.getContext("2d").drawImage(bitmap, 0, 0, c.width, c.height);
  bitmap.close();
  return c.toDataURL("image/jpeg", 0.9);
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  S.attachments.forEach((url, i) => {
    const wrap = document.createElement("span");
    wrap.className = "attachment";
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image to send";
    const x = document.createElement("button");
    x.type = "button";
    x.textContent = "×";
    x.title = "remove";
    x.onclick = () => { S.attachments.splice(i, 1); renderAttachments(); };
    wrap.append(img, x);
    box.append(wrap);
  });
}

async function addImages(files) {
  for (const f of files) {
    try {
      S.attachments.push(await imageDataUrl(f));
    } catch (e) {
      alerts.show("image-error", "error", `${f.name} is not an image this browser can read (${e.message || e}).`);
    }
  }
  renderAttachments();
}

function sendTyped(ev) {
  ev.preventDefault();
  const text = $("text").value.trim();
  if (!text && !S.attachments.length) return;
  if (!S.connected) {
    alerts.show("not-connected", "warn", "Not connected to the server, so the message was not sent. The page " +
      "reconnects by itself: try again in a moment.");
    return;
  }
  ensureAudio();
  if (assistantBusy()) interrupt("typed");
  for (const image of S.attachments) S.link.send({type: "input.image", image});
  if (text) S.link.send({type: "input.text", text});
  commit({text, images: S.attachments.slice()});
  $("text").value = "";
  S.attachments = [];
  renderAttachments();
}

// --- voice picker -------------------------------------------------------------------------------------------------
async function useClip(file) {
  try {
    const {url, seconds} = await clipToWavDataUrl(file, MAX_CLONE_SECONDS);
    S.voice = url;
    S.voiceName = file.name;
    $("voice-status").textContent = `sending ${file.name} (${seconds.toFixed(1)} s)…`;
    $("voice-status").dataset.state = "sending";
    sendSession({voice: url});
  } catch (e) {
    $("voice").value = S.voice === "default" ? "default" : "clone";
    alerts.show("voice-error", "error", `Could not read ${file.name} as audio (${e.message || e}); use a WAV, MP3 ` +
      "or OGG clip with 3-10 s of clear speech.");
  }
}

// --- wiring -------------------------------------------------------------------------------------------------------
function bindUi() {
  $("start").onclick = () => startLive();
  $("stop").onclick = () => stopLive();
  $("mute").onclick = () => {
    S.muted = !S.muted;
    if (S.muted) discardTurn(true);
    $("mute").setAttribute("aria-pressed", String(S.muted));
    $("mute").textContent = S.muted ? "Unmute mic" : "Mute mic";
    updateState();
  };
  $("snapshot").onclick = () => {
    const f = grabFrame();
    if (f) {
      S.attachments.push(f);
      renderAttachments();
    }
  };
  $("reset").onclick = () => {
    if (assistantBusy()) interrupt("reset");
    if (S.link && S.link.send({type: "session.reset"})) addDivider($("transcript"), "new conversation");
  };
  $("composer").onsubmit = sendTyped;
  $("text").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) sendTyped(e);
  };
  $("image").onchange = () => {
    addImages([...$("image").files]);
    $("image").value = "";
  };
  $("voice").onchange = () => {
    if ($("voice").value === "clone") {
      $("voice-file").click();
    } else {
      S.voice = "default";
      S.voiceName = "";
      sendSession({voice: "default"});
    }
  };
  $("voice-file").onchange = () => {
    const f = $("voice-file").files[0];
    $("voice-file").value = "";
    if (f) useClip(f);
  };
  $("voice-file").addEventListener("cancel", () => { $("voice").value = S.voice === "default" ? "default" : "clone"; });
  for (const id of ["opt-speak", "opt-instructions", "opt-temperature", "opt-max-tokens", "opt-seed"]) {
    $(id).addEventListener("change", () => sendSession({}));
  }
  $("key-form").onsubmit = (e) => {
    e.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-form").hidden = true;
    alerts.clear("auth-required", "auth-wrong");
    setConn("connecting", "connecting…");
    S.link.start(key);
  };
  document.addEventListener("pointerdown", () => { if (S.ctx && S.ctx.state === "suspended") ensureAudio(); });
  setInterval(updateState, STATE_POLL_MS);
}

async function boot() {
  bindUi();
  const cfg = await loadConfig();
  S.cfg = cfg;
  window.edgeDemo.config = cfg;
  alerts.clear("server-gone");
  $("model").textContent = `${cfg.model} · ${cfg.bundle_name}`;
  if (cfg.random_weights) showNotice();
  if (!cfg.speech_output) {
    $("opt-speak").checked = false;
    $("opt-speak").disabled = true;
    $("voice").disabled = true;
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  S.link = new RealtimeLink(`${scheme}://${location.host}${cfg.realtime_path}`,
    {onOpen: onSocketOpen, onMessage, onDown: onSocketDown, onRetry});
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (cfg.api_key_required && !key) askKey(false);
  else S.link.start(cfg.api_key_required ? key : null);
}

boot();
