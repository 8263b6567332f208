// Types of seal.js: sealed bodies (X25519, HKDF-SHA-256, AES-256-GCM, Ed25519 on WebCrypto).

export const VERSION: 1;
export const ALG: "x25519-hkdf-sha256-aes256gcm-ed25519";

/** A mailbox's public keys: what others seal to, and check its seals with. */
export interface PublicKey {
  /** 32 bytes */
  x25519: Uint8Array;
  /** 32 bytes */
  ed25519: Uint8Array;
  mailbox: string | null;
}

/** A mailbox's private keys; never leave the page. */
export interface Identity {
  x25519Private: CryptoKey;
  ed25519Private: CryptoKey;
  mailbox: string | null;
  public: PublicKey;
}

/** Who sends to whom: bound into every sealed body. */
export interface Context {
  sender: string;
  recipient: string;
}

export type SealErrorReason = "malformed" | "unsupported" | "signature" | "decrypt" | "mailbox";

/** A sealed body did not open. */
export class SealError extends Error {
  constructor(reason: SealErrorReason, message: string);
  readonly reason: SealErrorReason;
}

export function generateIdentity(mailbox?: string | null): Promise<Identity>;
export function identityFromPrivateBytes(
  x25519: Uint8Array,
  ed25519: Uint8Array,
  mailbox?: string | null,
): Promise<Identity>;
/** The private identity file's text (the format `relay keygen` writes). */
export function exportIdentity(identity: Identity): Promise<string>;
/** Rejects with a TypeError naming what is wrong. */
export function importIdentity(text: string): Promise<Identity>;
/** The public-key file's text (what `relay keygen` writes to FILE.pub). */
export function exportPublicKey(key: PublicKey | Identity): string;
/** Throws a TypeError naming what is wrong. */
export function importPublicKey(text: string): PublicKey;

/** `body` sealed for `recipient`, signed by `sender`: a JSON string for a message body. */
export function seal(body: string, recipient: PublicKey, sender: Identity, context: Context): Promise<string>;
/** For known-answer tests only: a reused ephemeral key or iv gives away what it sealed. */
export function sealWith(
  body: string,
  recipient: PublicKey,
  sender: Identity,
  context: Context,
  fixed: { ephemeral: Uint8Array; iv: Uint8Array },
): Promise<string>;
/** The body, or a rejection with a SealError; never anything else. */
export function open(sealed: string, recipient: Identity, sender: PublicKey, context: Context): Promise<string>;

/** The sealed body's length for a body of `bodyBytes` UTF-8 bytes. */
export function sealedLength(bodyBytes: number): number;
/** The largest body (UTF-8 bytes) whose sealed form fits `maxBodyBytes`. */
export function maxPlaintextBytes(maxBodyBytes: number): number;

export function b64url(bytes: Uint8Array): string;
export function unb64url(text: unknown, size?: number): Uint8Array;
export function associatedData(context: Context): Uint8Array;
export function signedBytes(
  context: Context,
  recipientX25519: Uint8Array,
  epk: Uint8Array,
  iv: Uint8Array,
  ct: Uint8Array,
): Uint8Array;
