// DOM helpers of the demo page: alerts, the transcript, the state badge. Holds no conversation state.

export const $ = (id) => document.getElementById(id);

export const STATE_LABELS = {
  offline: "Offline",
  ready: "Ready",
  listening: "Listening",
  hearing: "Listening — hearing you",
  thinking: "Thinking…",
  speaking: "Speaking",
};

// Alerts carry a stable `data-code` (the tests and the console read it); one alert per code at a time.
export class Alerts {
  constructor(root, log) {
    this.root = root;
    this.log = log; // every alert ever shown: [{code, kind, text, t}]
  }

  show(code, kind, text) {
    this.clear(code);
    const div = document.createElement("div");
    div.className = `alert ${kind}`;
    div.dataset.code = code;
    div.setAttribute("role", kind === "error" ? "alert" : "status");
    const span = document.createElement("span");
    span.textContent = text;
    const x = document.createElement("button");
    x.type = "button";
    x.className = "dismiss";
    x.title = "dismiss";
    x.textContent = "×";
    x.onclick = () => div.remove();
    div.append(span, x);
    this.root.append(div);
    this.log.push({code, kind, text, t: performance.now()});
    return div;
  }

  update(code, text) {
    const el = this.root.querySelector(`[data-code="${code}"] span`);
    if (el) el.textContent = text;
  }

  has(code) {
    return !!this.root.querySelector(`[data-code="${code}"]`);
  }

  clear(...codes) {
    for (const c of codes) this.root.querySelectorAll(`[data-code="${c}"]`).forEach((e) => e.remove());
  }
}

// --- transcript -------------------------------------------------------------------------------------------------
export function addUserTurn(list, {text, images, speechSeconds, frames}) {
  const li = document.createElement("li");
  li.className = "turn user";
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = "You";
  li.append(who);
  if (speechSeconds) {
    const p = document.createElement("p");
    p.className = "speech";
    const cam = frames ? ` · ${frames} camera frame${frames > 1 ? "s" : ""}` : "";
    p.textContent = `spoke ${speechSeconds.toFixed(1)} s${cam}`;
    li.append(p);
  }
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "attached image";
    img.className = "thumb";
    li.append(img);
  }
  if (text) {
    const p = document.createElement("p");
    p.textContent = text;
    li.append(p);
  }
  list.append(li);
  li.scrollIntoView({block: "end"});
  return li;
}

export function addAssistantTurn(list, replyId) {
  const li = document.createElement("li");
  li.className = "turn assistant";
  li.dataset.reply = replyId;
  li.dataset.status = "streaming";
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = "Assistant";
  const text = document.createElement("p");
  text.className = "text";
  const meta = document.createElement("div");
  meta.className = "meta";
  li.append(who, text, meta);
  list.append(li);
  li.scrollIntoView({block: "end"});
  return li;
}

export function addDivider(list, label) {
  const li = document.createElement("li");
  li.className = "divider";
  li.textContent = label;
  list.append(li);
}

export function fmtMs(ms) {
  if (ms == null) return "–";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

// "first token 312 ms · first audio 480 ms · 2.1 s of speech (server: 300 ms / 470 ms)"
export function latencyLine(r, timing) {
  const parts = [`first token ${fmtMs(r.firstTextMs)}`];
  if (r.audioSamples) parts.push(`first audio ${fmtMs(r.firstAudioMs)}`);
  if (r.audioSamples) parts.push(`${(r.audioSeconds).toFixed(1)} s of speech`);
  let s = parts.join(" · ");
  if (timing && timing.first_token_ms != null) {
    const audio = timing.first_audio_ms != null ? ` / ${fmtMs(timing.first_audio_ms)}` : "";
    s += ` (server: ${fmtMs(timing.first_token_ms)}${audio})`;
  }
  return s;
}

export function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}
