// The realtime socket (WS /v1/realtime, schema in edge/server/realtime.py) with automatic reconnection.
// It reports why a connection ended, because the page says different things for each:
//   "unreachable"  the connection never opened: the server is gone (or not started yet)
//   "dropped"      an open connection ended without the server closing it cleanly
//   "closed"       the server closed the connection (restart, shutdown)
//   "unauthorized" the server refused the API key (no retry until a new key is given)

const KEY_SUBPROTOCOL = "openai-insecure-api-key."; // browsers cannot set headers: the key rides in a subprotocol
const POLICY_VIOLATION = 1008; // close code the server uses for a refused key
const NORMAL_CLOSURE = 1000;
const GOING_AWAY = 1001;
const SERVICE_RESTART = 1012;
export const RETRY_DELAYS_S = [0.5, 1, 2, 3, 5]; // backoff between reconnection attempts (last one repeats)

export class RealtimeLink {
  constructor(url, handlers) {
    this.url = url;
    this.h = handlers; // {onOpen(), onMessage(msg), onDown(reason, info), onRetry(delayS, attempt)}
    this.key = null;
    this.ws = null;
    this.attempt = 0;
    this.wanted = false;
    this.timer = null;
    this.authFailed = false;
  }

  get open() {
    return !!this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  start(key) {
    this.key = key || null;
    this.wanted = true;
    this.authFailed = false;
    this.attempt = 0;
    clearTimeout(this.timer);
    this._connect();
  }

  stop() {
    this.wanted = false;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(NORMAL_CLOSURE);
  }

  send(msg) {
    if (!this.open) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  _connect() {
    const protocols = ["realtime"];
    if (this.key) protocols.push(KEY_SUBPROTOCOL + this.key);
    let ws;
    try {
      ws = new WebSocket(this.url, protocols);
    } catch (e) {
      this.h.onDown("unreachable", {error: String(e)});
      return this._retry();
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.attempt = 0;
      this.h.onOpen();
    };
    ws.onmessage = (e) => {
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch (err) {
        return;
      }
      if (msg.type === "error" && msg.error && msg.error.code === "invalid_api_key") this.authFailed = true;
      this.h.onMessage(msg);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      let reason;
      if (this.authFailed || e.code === POLICY_VIOLATION) reason = "unauthorized";
      else if (!opened) reason = "unreachable";
      else if (e.code === NORMAL_CLOSURE || e.code === GOING_AWAY || e.code === SERVICE_RESTART) reason = "closed";
      else reason = "dropped";
      if (!this.wanted) return;
      this.h.onDown(reason, {code: e.code, wasOpen: opened});
      if (reason !== "unauthorized") this._retry();
      else this.wanted = false;
    };
  }

  _retry() {
    if (!this.wanted) return;
    const delay = RETRY_DELAYS_S[Math.min(this.attempt, RETRY_DELAYS_S.length - 1)];
    this.attempt++;
    this.h.onRetry(delay, this.attempt);
    this.timer = setTimeout(() => this.wanted && this._connect(), delay * 1000);
  }
}
