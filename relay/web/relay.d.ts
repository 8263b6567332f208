// Types of relay.js, the relay's browser client (wire protocol v1).

import type { Identity, PublicKey } from "./seal.js";

export interface RelayMessage {
  id: string;
  from: string;
  body: string;
  /** milliseconds since the epoch */
  sentAt: number;
  /** milliseconds since the epoch */
  expiresAt: number;
  /** with sealing: the body was sealed by `from` for this mailbox and opened */
  sealed?: true;
}

/** With sealing: a delivery that did not open (acked like a message under autoAck). */
export interface Unopened {
  id: string;
  from: string;
  sentAt: number;
  expiresAt: number;
  /** a SealError's reason, `unknown_sender` (no public key for `from`), or `error` (the
   * publicKey function failed) */
  reason: "malformed" | "unsupported" | "signature" | "decrypt" | "mailbox" | "unknown_sender" | "error";
  error: string;
}

export interface Accepted {
  ref: string;
  /** message id per recipient */
  ids: Record<string, string>;
  expiresAt: number;
  /** the relay had stored this ref already (a retry converged) */
  duplicate: boolean;
}

export interface Welcome {
  type: "welcome";
  mailbox: string;
  session: string;
  retention_s: number;
  max_body_bytes: number;
  max_frame_bytes: number;
  max_inflight: number;
  server_time: number;
  expired: number;
  epoch: string;
}

export type RelayState = "connecting" | "open" | "closed";

export interface RelayOptions {
  /** a JWT, or a (possibly async) function returning one: called before each connect */
  token: string | (() => string | Promise<string>);
  /** ack each message once its listeners returned (default true); else call ack(id) */
  autoAck?: boolean;
  /** default 500 */
  minBackoffMs?: number;
  /** default 20000 */
  maxBackoffMs?: number;
  /** reconnect after this long without a frame, or a handshake that hangs this long
   * (default 60000, the relay's idle timeout) */
  idleTimeoutMs?: number;
  /** acks wait this long to be batched into one frame (default 10) */
  ackDelayMs?: number;
  /** delivery ids remembered for deduplication (default 10000) */
  dedupeSize?: number;
  /** the WebSocket class (default the global one) */
  WebSocket?: typeof WebSocket;
  /** with publicKey: seal every send and open every delivery as this identity (seal.js) */
  identity?: Identity;
  /** a mailbox's public key, or null for one the app does not know (with identity) */
  publicKey?: (mailbox: string) => PublicKey | null | undefined | Promise<PublicKey | null | undefined>;
}

export interface CloseDetail {
  code: number;
  reason: string;
  /** the client closed the connection itself (idle watchdog, close(), stop) */
  local: boolean;
  /** the client stopped and does not reconnect */
  final: boolean;
}

export interface RelayEventMap {
  welcome: CustomEvent<Welcome>;
  message: CustomEvent<RelayMessage>;
  unopened: CustomEvent<Unopened>;
  expired: CustomEvent<{ count: number }>;
  epoch: CustomEvent<{ epoch: string; previous: string }>;
  state: CustomEvent<{ state: RelayState }>;
  close: CustomEvent<CloseDetail>;
}

export class RelayError extends Error {
  constructor(code: string, message?: string);
  /** the relay's error code (ttl_too_long, ref_conflict, ...) or closed / replaced /
   * unauthorized; with sealing also no_key, seal_failed and bad_recipient (more than one) */
  readonly code: string;
}

export class RelayClient extends EventTarget {
  constructor(url: string, options: RelayOptions);
  readonly url: string;
  autoAck: boolean;
  readonly state: RelayState;
  readonly welcome: Welcome | null;
  readonly epoch: string | null;
  readonly pendingCount: number;
  readonly stats: {
    connects: number;
    welcomes: number;
    ackFrames: number;
    sends: number;
    duplicatesDropped: number;
  };
  /** resolves with the first welcome; rejects when the client stops before one */
  connect(): Promise<Welcome>;
  /**
   * Resolves with the relay's `accepted` answer. Until then the send is kept and sent again
   * with the same ref after a reconnect, and after an `unconfirmed` or `rate_limited` answer
   * (jittered backoff from 500 ms, doubling; `rate_limited` sends one at a time, up to 20 s
   * apart whatever maxBackoffMs; a `storage_unavailable` answering the retry of
   * an `unconfirmed` send keeps it pending too). Rejects with a RelayError carrying the
   * relay's code on any other error, and with closed / replaced / unauthorized on a stop.
   * With sealing it waits for a welcome (it names the sender), seals once for the one
   * recipient, and rejects with no_key when publicKey has none for it.
   */
  send(to: string | string[], body: string, options?: { ttl?: number; ref?: string }): Promise<Accepted>;
  ack(id: string): void;
  close(): void;
  addEventListener<K extends keyof RelayEventMap>(
    type: K,
    listener: (event: RelayEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof RelayEventMap>(
    type: K,
    listener: (event: RelayEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}
