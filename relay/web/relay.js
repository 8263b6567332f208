// relay.js: the browser (and Node) client of the relay's wire protocol v1.
// One dependency-free ES module; served by the relay at /relay.js, typed by /relay.d.ts.
//
//   import { RelayClient } from "/relay.js";
//   const relay = new RelayClient("wss://chat.example/v1", { token: async () => fetchToken() });
//   relay.addEventListener("message", (event) => show(event.detail));
//   await relay.connect();                  // resolves on the first welcome
//   const accepted = await relay.send("bob", "hello", { ttl: 3600 });
//   relay.close();
//
// What it does for you: first-frame auth (token string or function, called before each
// connect), random refs, resend of unanswered sends with the same ref after a reconnect and
// of `unconfirmed` and `rate_limited` ones after a backoff (`rate_limited` ones one at a
// time), deduplication of redeliveries by id, acks batched after the message listeners
// returned, reconnects with full-jitter backoff, and an idle watchdog. With `identity` and
// `publicKey` (seal.js), every send is sealed for its recipient and every delivery opened;
// one that does not open is an `unopened` event, never a `message`.

const SUBPROTOCOL = "relay.v1";
const OPEN = 1;
/** The first retry of an `unconfirmed` or `rate_limited` send waits up to this (doubling
 * after), so a burst of refused sends comes back spread out rather than as another burst. */
const RETRY_MIN_MS = 500;
/** `rate_limited` sends are retried one at a time, client-wide, waiting up to this at most
 * (whatever maxBackoffMs): each retry the relay refuses is a strike against the connection
 * (README, "Rate limits"), so the retries must slow down to the relay's rate. */
const RATE_RETRY_MAX_MS = 20000;
/** @type {Promise<typeof import("./seal.js")> | null} loaded on the first seal or open */
let sealModule = null;
const loadSeal = () => (sealModule ??= import("./seal.js"));

/**
 * @typedef {object} RelayMessage
 * @property {string} id
 * @property {string} from
 * @property {string} body
 * @property {number} sentAt      milliseconds since the epoch
 * @property {number} expiresAt   milliseconds since the epoch
 * @property {boolean} [sealed]   the body was sealed by `from` and opened (sealing on)
 */

/**
 * @typedef {object} Accepted
 * @property {string} ref
 * @property {Record<string, string>} ids   message id per recipient
 * @property {number} expiresAt
 * @property {boolean} duplicate
 */

/**
 * @typedef {object} RelayOptions
 * @property {string | (() => string | Promise<string>)} token  a JWT, or a function returning one
 * @property {boolean} [autoAck]          ack each message once its listeners returned (default true)
 * @property {number} [minBackoffMs]      first reconnect delay cap (default 500)
 * @property {number} [maxBackoffMs]      largest reconnect delay (default 20000)
 * @property {number} [idleTimeoutMs]     reconnect after this long without a frame, or a handshake
 *                                        that hangs this long (default 60000)
 * @property {number} [ackDelayMs]        acks wait this long to be batched (default 10)
 * @property {number} [dedupeSize]        delivery ids remembered (default 10000)
 * @property {typeof WebSocket} [WebSocket] the WebSocket class (default the global one)
 * @property {import("./seal.js").Identity} [identity]  seal sends and open deliveries as this
 * @property {(mailbox: string) => import("./seal.js").PublicKey | null | undefined | Promise<import("./seal.js").PublicKey | null | undefined>} [publicKey]
 *                                        a mailbox's public key (with identity), or nothing
 */

/** An error answer of the relay (or of this client) to a request. */
export class RelayError extends Error {
  /**
   * @param {string} code  the protocol's error code (`ttl_too_long`, ...) or `closed`, `replaced`, `unauthorized`
   * @param {string} [message]
   */
  constructor(code, message) {
    super(message || code);
    this.name = "RelayError";
    /** @type {string} */
    this.code = code;
  }
}

/**
 * @param {number} attempt
 * @param {number} minMs
 * @param {number} maxMs
 * @returns {number} a full-jitter delay: uniform in [0, min(max, min * 2^attempt))
 */
function jitter(attempt, minMs, maxMs) {
  return Math.random() * Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30));
}

/** @param {string} text */
function utf8Length(text) {
  return new TextEncoder().encode(text).length;
}

/**
 * A relay connection that survives reconnects. Events: `welcome`, `message`, `unopened` (with
 * sealing: a delivery that did not open), `expired`, `epoch`, `state`, `close` (CustomEvents;
 * the payload is in `event.detail`).
 */
export class RelayClient extends EventTarget {
  /**
   * @param {string} url  the relay's WebSocket URL, e.g. `wss://chat.example/v1`
   * @param {RelayOptions} options
   */
  constructor(url, options) {
    super();
    if (!options || (typeof options.token !== "string" && typeof options.token !== "function")) {
      throw new TypeError("RelayClient needs a token: a string or a function returning one");
    }
    this.url = url;
    this._token = options.token;
    this.autoAck = options.autoAck !== false;
    this._minBackoffMs = options.minBackoffMs ?? 500;
    this._maxBackoffMs = options.maxBackoffMs ?? 20000;
    this._idleTimeoutMs = options.idleTimeoutMs ?? 60000;
    this._ackDelayMs = options.ackDelayMs ?? 10;
    this._dedupeSize = options.dedupeSize ?? 10000;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if ((options.identity === undefined) !== (options.publicKey === undefined)) {
      throw new TypeError("sealing needs both identity and publicKey");
    }
    this._identity = options.identity ?? null;
    this._publicKey = options.publicKey ?? null;
    /** @type {Promise<void>} deliveries being opened, in order */
    this._opening = Promise.resolve();
    /** @type {Array<{resolve: (mailbox: string) => void, reject: (e: Error) => void}>} */
    this._welcomeWaiters = [];
    /** @type {"connecting" | "open" | "closed"} */
    this.state = "closed";
    /** @type {Record<string, any> | null} the last welcome frame */
    this.welcome = null;
    /** @type {string | null} */
    this.epoch = null;
    /** @type {WebSocket | null} */
    this._ws = null;
    this._stopped = true;
    this._attempt = 0;
    /** @type {Map<string, {frame: Record<string, any>, resolve: (a: Accepted) => void, reject: (e: Error) => void, retries: number, maybeStored: boolean}>} */
    this._pending = new Map();
    /** @type {Array<any>} `rate_limited` sends waiting for their retry, oldest first */
    this._limited = [];
    /** @type {any} the `rate_limited` send whose retry awaits its answer */
    this._limitedRetry = null;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this._limitedTimer = null;
    /** retries refused in a row, less one per accepted retry */
    this._limitedRefusals = 0;
    /** @type {Map<string, true>} delivery ids seen, oldest first */
    this._seen = new Map();
    /** @type {Set<string>} */
    this._acks = new Set();
    /** @type {any} */
    this._ackTimer = null;
    /** @type {any} */
    this._reconnectTimer = null;
    /** @type {any} */
    this._idleTimer = null;
    this._lastFrameAt = 0;
    this._probed = false;
    /** @type {{promise: Promise<any>, resolve: (w: any) => void, reject: (e: Error) => void} | null} */
    this._connecting = null;
    /** counters, for the curious and for tests */
    this.stats = { connects: 0, welcomes: 0, ackFrames: 0, sends: 0, duplicatesDropped: 0 };
  }

  /**
   * Connect (and keep reconnecting). Resolves with the first welcome frame; rejects when the
   * client stops before one (4409, a failing token function, close()).
   * @returns {Promise<Record<string, any>>}
   */
  connect() {
    if (!this._stopped && this.state === "open" && this.welcome) {
      return Promise.resolve(this.welcome);
    }
    if (this._connecting) return this._connecting.promise;
    /** @type {any} */
    const connecting = {};
    connecting.promise = new Promise((resolve, reject) => {
      connecting.resolve = resolve;
      connecting.reject = reject;
    });
    this._connecting = connecting;
    const promise = connecting.promise;
    if (this._stopped) {
      this._stopped = false;
      this._attempt = 0;
      this._open();
    }
    return promise;
  }

  /**
   * Send `body` to one mailbox or a list of them. Resolves with the relay's `accepted` answer
   * (kept and resent with the same ref across reconnects until then, and after `unconfirmed`
   * or `rate_limited` answers, with backoff); rejects with a RelayError carrying the relay's
   * error code on a definite error. With sealing, it waits for a welcome (it names the sender),
   * seals once, and rejects with `no_key` for a recipient without a public key and
   * `bad_recipient` for more than one.
   * @param {string | string[]} to
   * @param {string} body
   * @param {{ttl?: number, ref?: string}} [options]
   * @returns {Promise<Accepted>}
   */
  send(to, body, options = {}) {
    if (this._identity) return this._sealedSend(to, body, options);
    return this._send(to, body, options);
  }

  /** @param {string | string[]} to @param {string} body @param {{ttl?: number, ref?: string}} options */
  async _sealedSend(to, body, options) {
    const recipients = Array.isArray(to) ? to : [to];
    if (recipients.length !== 1) {
      throw new RelayError("bad_recipient", "a sealed send goes to one mailbox: send to each on its own");
    }
    const [recipient] = recipients;
    const key = await /** @type {NonNullable<typeof this._publicKey>} */ (this._publicKey)(recipient);
    if (!key) throw new RelayError("no_key", `no public key for ${recipient}: cannot seal to it`);
    const sender = await this._ownMailbox();
    const { seal } = await loadSeal();
    let sealed;
    try {
      sealed = await seal(body, key, /** @type {any} */ (this._identity), { sender, recipient });
    } catch (error) {
      throw new RelayError("seal_failed", error instanceof Error ? error.message : String(error));
    }
    return this._send(recipient, sealed, options);
  }

  /** The session's mailbox (the welcome's), once there is one. @returns {Promise<string>} */
  _ownMailbox() {
    if (this.welcome) return Promise.resolve(this.welcome.mailbox);
    return new Promise((resolve, reject) => this._welcomeWaiters.push({ resolve, reject }));
  }

  /** @param {string | string[]} to @param {string} body @param {{ttl?: number, ref?: string}} options */
  _send(to, body, options) {
    const ref = options.ref ?? crypto.randomUUID();
    /** @type {Record<string, any>} */
    const frame = { type: "send", ref, to, body };
    if (options.ttl !== undefined) frame.ttl = options.ttl;
    const limit = this.welcome?.max_body_bytes;
    if (typeof limit === "number" && utf8Length(body) > limit) {
      return Promise.reject(new RelayError("too_large", `body exceeds ${limit} bytes`));
    }
    if (this._pending.has(ref)) {
      return Promise.reject(new RelayError("ref_conflict", "a send with this ref is pending"));
    }
    return new Promise((resolve, reject) => {
      this._pending.set(ref, { frame, resolve, reject, retries: 0, maybeStored: false });
      if (this.state === "open") this._transmit(frame);
    });
  }

  /** Sends not answered yet (resent after a reconnect). */
  get pendingCount() {
    return this._pending.size;
  }

  /**
   * Acknowledge a message (with `autoAck: false`); the relay deletes it. Batched.
   * @param {string} id
   */
  ack(id) {
    this._acks.add(id);
    this._scheduleAcks();
  }

  /**
   * Stop: close the connection (1000) and reconnect no more. Pending sends reject with `closed`.
   */
  close() {
    this._stop("closed", 1000, "client closed");
  }

  // -- internals -------------------------------------------------------------------------

  /** @param {"connecting" | "open" | "closed"} state */
  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state } }));
  }

  async _open() {
    this._setState("connecting");
    let token;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
      if (typeof token !== "string" || !token) throw new Error("the token function returned no token");
    } catch (error) {
      this._stop("unauthorized", 4401, `token: ${error instanceof Error ? error.message : error}`);
      return;
    }
    if (this._stopped) return;
    this.stats.connects += 1;
    let ws;
    try {
      ws = new this._WebSocket(this.url, [SUBPROTOCOL]);
    } catch (error) {
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    this._touch(); // the watchdog also gives up on a handshake that hangs
    ws.onopen = () => {
      if (this._ws !== ws) return;
      ws.send(JSON.stringify({ type: "auth", token }));
      this._touch();
    };
    ws.onmessage = (event) => {
      if (this._ws !== ws) return;
      this._touch();
      if (typeof event.data !== "string") return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this._onFrame(frame);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._onClose(event.code, event.reason);
    };
    ws.onerror = () => {}; // a close event follows
  }

  _touch() {
    this._lastFrameAt = Date.now();
    this._probed = false;
    if (this._idleTimer === null) {
      const tick = Math.max(50, Math.min(1000, this._idleTimeoutMs / 4));
      this._idleTimer = setInterval(() => this._checkIdle(), tick);
    }
  }

  /** Browsers do not show WebSocket pings to scripts: after half the idle timeout of silence,
   * ask for an answer (an ack of an id that cannot exist, with a ref); after the whole timeout,
   * give up on this connection and reconnect. */
  _checkIdle() {
    const ws = this._ws;
    if (!ws) return;
    const silent = Date.now() - this._lastFrameAt;
    if (silent > this._idleTimeoutMs) {
      this._dropConnection(4000, "idle");
    } else if (silent > this._idleTimeoutMs / 2 && !this._probed && this.state === "open") {
      this._probed = true;
      this._raw({ type: "ack", ids: ["keepalive-probe"], ref: `probe-${crypto.randomUUID()}` });
    }
  }

  /** Close the current socket and handle it as a lost connection (without waiting for it). */
  /** @param {number} code @param {string} reason */
  _dropConnection(code, reason) {
    const ws = this._ws;
    if (!ws) return;
    this._ws = null;
    try {
      ws.close(code, reason);
    } catch {}
    this._onClose(1006, reason, true);
  }

  /** @param {Record<string, any>} frame */
  _raw(frame) {
    if (this._ws && this._ws.readyState === OPEN) {
      this._ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  /** @param {Record<string, any>} frame */
  _transmit(frame) {
    if (this._raw(frame)) this.stats.sends += 1;
  }

  /** @param {Record<string, any>} frame */
  _onFrame(frame) {
    switch (frame.type) {
      case "welcome":
        return this._onWelcome(frame);
      case "deliver":
        return this._onDeliver(frame.messages || []);
      case "accepted": {
        const entry = this._pending.get(frame.ref);
        if (!entry) return;
        if (entry === this._limitedRetry) {
          this._limitedRefusals = Math.max(this._limitedRefusals - 1, 0);
          this._nextLimited(null);
        }
        this._pending.delete(frame.ref);
        entry.resolve({
          ref: frame.ref,
          ids: frame.ids,
          expiresAt: frame.expires_at,
          duplicate: frame.duplicate === true,
        });
        return;
      }
      case "error": {
        const entry = frame.ref === undefined ? undefined : this._pending.get(frame.ref);
        if (!entry) return;
        if (frame.code === "rate_limited") {
          this._retryLimited(entry);
          return;
        }
        if (entry === this._limitedRetry) this._nextLimited(null);
        if (frame.code === "unconfirmed") entry.maybeStored = true;
        // After `unconfirmed`, a retry's storage_unavailable says nothing of the first try.
        if (frame.code === "unconfirmed" || (entry.maybeStored && frame.code === "storage_unavailable")) {
          // The same ref converges on one copy: send it again after a jittered delay.
          const delay = jitter(entry.retries, RETRY_MIN_MS, this._maxBackoffMs);
          entry.retries += 1;
          setTimeout(() => {
            if (this._pending.get(frame.ref) === entry && this.state === "open") {
              this._transmit(entry.frame);
            }
          }, delay);
          return;
        }
        this._pending.delete(frame.ref);
        entry.reject(new RelayError(frame.code, frame.message));
        return;
      }
      default:
        return; // acked answers (probes), future frame types
    }
  }

  /** @param {Record<string, any>} frame */
  _onWelcome(frame) {
    this.welcome = frame;
    this._attempt = 0;
    this.stats.welcomes += 1;
    const previous = this.epoch;
    this.epoch = frame.epoch ?? null;
    this._setState("open");
    this.dispatchEvent(new CustomEvent("welcome", { detail: frame }));
    if (frame.expired) {
      this.dispatchEvent(new CustomEvent("expired", { detail: { count: frame.expired } }));
    }
    if (previous !== null && frame.epoch !== previous) {
      this.dispatchEvent(
        new CustomEvent("epoch", { detail: { epoch: frame.epoch, previous } }),
      );
    }
    if (this._connecting) {
      this._connecting.resolve(frame);
      this._connecting = null;
    }
    for (const waiter of this._welcomeWaiters.splice(0)) waiter.resolve(frame.mailbox);
    this._forgetLimited();
    for (const entry of this._pending.values()) this._transmit(entry.frame);
    if (this._acks.size) this._scheduleAcks();
  }

  /** A `rate_limited` answer: queue the send for its retry (again at the head when it was
   * the one being retried: the relay still refuses, so wait longer). @param {any} entry */
  _retryLimited(entry) {
    if (entry === this._limitedRetry) {
      this._limitedRefusals += 1;
      this._limited.unshift(entry);
      this._nextLimited(null);
    } else {
      this._limited.push(entry);
      this._nextLimited(this._limitedRetry);
    }
  }

  /** Schedule the next `rate_limited` retry unless one is due or awaits its answer.
   * @param {any} retrying the send whose retry is still unanswered (null: none) */
  _nextLimited(retrying) {
    this._limitedRetry = retrying;
    if (retrying !== null || this._limitedTimer !== null || this._limited.length === 0) return;
    const delay = jitter(this._limitedRefusals, RETRY_MIN_MS, RATE_RETRY_MAX_MS);
    this._limitedTimer = setTimeout(() => {
      this._limitedTimer = null;
      if (this.state !== "open") return; // the welcome sends every pending send again
      while (this._limited.length) {
        const entry = this._limited.shift();
        if (this._pending.get(entry.frame.ref) !== entry) continue; // answered meanwhile
        this._limitedRetry = entry;
        this._transmit(entry.frame);
        return;
      }
    }, delay);
  }

  /** A new session sends every pending send again: the queue of retries starts over. */
  _forgetLimited() {
    if (this._limitedTimer !== null) clearTimeout(this._limitedTimer);
    this._limitedTimer = null;
    this._limitedRetry = null;
    this._limited = [];
  }

  /** @param {Array<Record<string, any>>} messages */
  _onDeliver(messages) {
    for (const m of messages) {
      if (this._seen.has(m.id)) {
        // Seen in an earlier session: its ack did not land (or is still to come). Do not
        // show it again; ack it again when autoAck (the app acks it itself otherwise).
        this.stats.duplicatesDropped += 1;
        if (this.autoAck) this.ack(m.id);
        continue;
      }
      this._seen.set(m.id, true);
      if (this._seen.size > this._dedupeSize) {
        const oldest = this._seen.keys().next().value;
        if (oldest !== undefined) this._seen.delete(oldest);
      }
      /** @type {RelayMessage} */
      const detail = {
        id: m.id,
        from: m.from,
        body: m.body,
        sentAt: m.sent_at,
        expiresAt: m.expires_at,
      };
      if (this._identity) {
        const mailbox = this.welcome?.mailbox;
        this._opening = this._opening.then(() => this._openAndDispatch(detail, mailbox));
      } else {
        this._dispatch("message", detail);
      }
    }
  }

  /** @param {string} type @param {Record<string, any>} detail */
  _dispatch(type, detail) {
    try {
      this.dispatchEvent(new CustomEvent(type, { detail }));
    } finally {
      if (this.autoAck) this.ack(detail.id);
    }
  }

  /** Open a delivery and dispatch it as `message`, or as `unopened` with why.
   * @param {RelayMessage} detail @param {string} mailbox */
  async _openAndDispatch(detail, mailbox) {
    let body;
    try {
      const key = await /** @type {NonNullable<typeof this._publicKey>} */ (this._publicKey)(detail.from);
      if (!key) throw Object.assign(new Error(`no public key for ${detail.from}`), { reason: "unknown_sender" });
      const { open } = await loadSeal();
      body = await open(detail.body, /** @type {any} */ (this._identity), key, { sender: detail.from, recipient: mailbox });
    } catch (error) {
      const reason = /** @type {any} */ (error)?.reason ?? "error";
      const text = error instanceof Error ? error.message : String(error);
      const { body: _, ...about } = detail; // what arrived is no text: not passed on
      this._dispatch("unopened", { ...about, reason, error: text });
      return;
    }
    this._dispatch("message", { ...detail, body, sealed: true });
  }

  _scheduleAcks() {
    if (this._ackTimer !== null) return;
    this._ackTimer = setTimeout(() => {
      this._ackTimer = null;
      this._flushAcks();
    }, this._ackDelayMs);
  }

  _flushAcks() {
    if (!this._acks.size || this.state !== "open") return; // sent after the next welcome
    const max = Math.max(1, Math.min(this.welcome?.max_inflight ?? 256, 1024));
    const ids = [...this._acks];
    for (let i = 0; i < ids.length; i += max) {
      const chunk = ids.slice(i, i + max);
      if (!this._raw({ type: "ack", ids: chunk })) return;
      this.stats.ackFrames += 1;
      for (const id of chunk) this._acks.delete(id);
    }
  }

  /**
   * @param {number} code
   * @param {string} reason
   * @param {boolean} [local] the client dropped the connection itself
   */
  _onClose(code, reason, local = false) {
    this._ws = null;
    if (this._stopped) return;
    if (code === 4409) {
      this._stop("replaced", code, reason || "replaced by a newer session");
      return;
    }
    if (code === 4401 && typeof this._token !== "function") {
      this._stop("unauthorized", code, reason || "unauthorized");
      return;
    }
    this.dispatchEvent(new CustomEvent("close", { detail: { code, reason, local, final: false } }));
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    this._setState("connecting");
    this._clearIdle();
    const delay = jitter(this._attempt, this._minBackoffMs, this._maxBackoffMs);
    this._attempt += 1;
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (!this._stopped) this._open();
    }, delay);
  }

  _clearIdle() {
    if (this._idleTimer !== null) clearInterval(this._idleTimer);
    this._idleTimer = null;
  }

  /**
   * @param {string} errorCode  the RelayError code pending sends reject with
   * @param {number} closeCode
   * @param {string} reason
   */
  _stop(errorCode, closeCode, reason) {
    if (this._stopped && this.state === "closed") return;
    const wasOpen = this._ws !== null;
    this._stopped = true;
    this._clearIdle();
    if (this._reconnectTimer !== null) clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    if (this._ackTimer !== null) {
      clearTimeout(this._ackTimer);
      this._ackTimer = null;
      this._flushAcks();
    }
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try {
        ws.close(1000, "client closed");
      } catch {}
    }
    const error = new RelayError(errorCode, reason);
    this._forgetLimited();
    for (const entry of this._pending.values()) entry.reject(error);
    this._pending.clear();
    for (const waiter of this._welcomeWaiters.splice(0)) waiter.reject(error);
    if (this._connecting) {
      this._connecting.reject(error);
      this._connecting = null;
    }
    this._setState("closed");
    if (wasOpen || closeCode !== 1000) {
      this.dispatchEvent(
        new CustomEvent("close", { detail: { code: closeCode, reason, local: true, final: true } }),
      );
    }
  }
}
