// seal.js: sealed bodies for relay messages (end-to-end encryption and signing) on WebCrypto
// alone (X25519, HKDF-SHA-256, AES-256-GCM, Ed25519); the same construction as relay/seal.py,
// byte for byte (README.md, "Sealed messages"). Served by the relay at /seal.js.
//
//   import { generateIdentity, importPublicKey, seal, open } from "/seal.js";
//   const me = await generateIdentity("alice");
//   const bob = importPublicKey(pastedText);          // what `relay keygen` wrote, or a page's
//   const body = await seal("hi", bob, me, { sender: "alice", recipient: "bob" });
//   const text = await open(body, me, bob, { sender: "bob", recipient: "alice" }); // SealError if not

export const VERSION = 1;
export const ALG = "x25519-hkdf-sha256-aes256gcm-ed25519";
const FIELDS = ["v", "alg", "epk", "iv", "ct", "sig"];
const KEY_BYTES = 32;
const IV_BYTES = 12;
const TAG_BYTES = 16;
const SIG_BYTES = 64;
const IDENTITY_TYPE = "relay-identity";
const PUBLIC_KEY_TYPE = "relay-public-key";
const MAILBOX_ID = /^[A-Za-z0-9._:@/-]{1,128}$/;
const utf8 = new TextEncoder();
const LABEL = "relay-seal/1";
const HKDF_INFO = utf8.encode(`${LABEL} ${ALG}`);
const AAD_LABEL = utf8.encode(`${LABEL} aad`);
const SIG_LABEL = utf8.encode(`${LABEL} sig`);
// PKCS #8 wrappers of a raw 32-byte private key (RFC 8410): WebCrypto imports no raw private keys.
const PKCS8_PREFIX = { X25519: 0x6e, Ed25519: 0x70 };

/** A sealed body did not open; `reason` is malformed, unsupported, signature, decrypt or mailbox. */
export class SealError extends Error {
  /** @param {string} reason @param {string} message */
  constructor(reason, message) {
    super(`${reason}: ${message}`);
    this.name = "SealError";
    /** @type {string} */
    this.reason = reason;
  }
}

/** @param {Uint8Array} bytes @returns {string} base64url without padding */
export function b64url(bytes) {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * Strict base64url without padding: only the canonical spelling of some bytes (of `size`).
 * @param {unknown} text @param {number} [size] @returns {Uint8Array}
 */
export function unb64url(text, size) {
  if (typeof text !== "string" || !/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) {
    throw new TypeError("not base64url");
  }
  const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4));
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  if (b64url(bytes) !== text) throw new TypeError("not canonical base64url");
  if (size !== undefined && bytes.length !== size) throw new TypeError(`${bytes.length} bytes, expected ${size}`);
  return bytes;
}

/** @param {...Uint8Array} parts */
function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** One transcript field: its length as 4 bytes big-endian, then the bytes. @param {Uint8Array} data */
function frame(data) {
  const head = new Uint8Array(4);
  new DataView(head.buffer).setUint32(0, data.length);
  return concat(head, data);
}

/** @param {unknown} mailbox @returns {string | null} */
function checkMailbox(mailbox) {
  if (mailbox === undefined || mailbox === null) return null;
  if (typeof mailbox !== "string" || !MAILBOX_ID.test(mailbox)) {
    throw new TypeError("mailbox is not a mailbox id (1 to 128 bytes of [A-Za-z0-9._:@/-])");
  }
  return mailbox;
}

/**
 * @typedef {object} PublicKey
 * @property {Uint8Array} x25519   32 bytes: seals to this mailbox
 * @property {Uint8Array} ed25519  32 bytes: checks what this mailbox sealed
 * @property {string | null} mailbox
 */

/**
 * @typedef {object} Identity  a mailbox's private keys (never leave the page)
 * @property {CryptoKey} x25519Private
 * @property {CryptoKey} ed25519Private
 * @property {string | null} mailbox
 * @property {PublicKey} public
 */

/** @typedef {{sender: string, recipient: string}} Context  who sends to whom */

/** @param {"X25519" | "Ed25519"} name @param {Uint8Array} raw @param {KeyUsage[]} usages */
function importPrivate(name, raw, usages) {
  const der = concat(
    new Uint8Array([0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, PKCS8_PREFIX[name]]),
    new Uint8Array([0x04, 0x22, 0x04, 0x20]),
    raw,
  );
  return crypto.subtle.importKey("pkcs8", der, { name }, true, usages);
}

/** The raw public key of a private one. @param {CryptoKey} key */
async function publicOf(key) {
  const jwk = await crypto.subtle.exportKey("jwk", key);
  return unb64url(jwk.x, KEY_BYTES);
}

/** @param {CryptoKey} key */
async function rawPrivate(key) {
  return new Uint8Array(await crypto.subtle.exportKey("pkcs8", key)).slice(-KEY_BYTES);
}

/**
 * A new identity (X25519 and Ed25519 key pairs) for `mailbox` (named in its public key).
 * @param {string | null} [mailbox] @returns {Promise<Identity>}
 */
export async function generateIdentity(mailbox = null) {
  const name = checkMailbox(mailbox);
  const x = /** @type {CryptoKeyPair} */ (await crypto.subtle.generateKey({ name: "X25519" }, true, ["deriveBits"]));
  const ed = /** @type {CryptoKeyPair} */ (await crypto.subtle.generateKey({ name: "Ed25519" }, true, ["sign", "verify"]));
  const raw = async (/** @type {CryptoKey} */ k) => new Uint8Array(await crypto.subtle.exportKey("raw", k));
  const publicKey = { x25519: await raw(x.publicKey), ed25519: await raw(ed.publicKey), mailbox: name };
  return { x25519Private: x.privateKey, ed25519Private: ed.privateKey, mailbox: name, public: publicKey };
}

/**
 * An identity from its two raw private keys (the X25519 scalar, the Ed25519 seed).
 * @param {Uint8Array} x25519 @param {Uint8Array} ed25519 @param {string | null} [mailbox]
 * @returns {Promise<Identity>}
 */
export async function identityFromPrivateBytes(x25519, ed25519, mailbox = null) {
  const name = checkMailbox(mailbox);
  const x25519Private = await importPrivate("X25519", x25519, ["deriveBits"]);
  const ed25519Private = await importPrivate("Ed25519", ed25519, ["sign"]);
  const publicKey = { x25519: await publicOf(x25519Private), ed25519: await publicOf(ed25519Private), mailbox: name };
  return { x25519Private, ed25519Private, mailbox: name, public: publicKey };
}

/** @param {string} text @param {string} type */
function load(text, type) {
  let obj;
  try {
    obj = JSON.parse(text);
  } catch {
    throw new TypeError(`not a ${type} file: not JSON`);
  }
  if (!obj || typeof obj !== "object" || obj.type !== type || obj.v !== VERSION) {
    throw new TypeError(`not a ${type} file (version ${VERSION})`);
  }
  return obj;
}

/** @param {PublicKey} key @returns {Record<string, any>} */
function publicFields(key) {
  /** @type {Record<string, any>} */
  const obj = { v: VERSION, type: PUBLIC_KEY_TYPE };
  if (key.mailbox !== null && key.mailbox !== undefined) obj.mailbox = key.mailbox;
  obj.x25519 = b64url(key.x25519);
  obj.ed25519 = b64url(key.ed25519);
  return obj;
}

/** The public-key file's text (what `relay keygen` writes to FILE.pub). @param {PublicKey | Identity} key */
export function exportPublicKey(key) {
  return JSON.stringify(publicFields("public" in key ? key.public : key));
}

/** Read a public-key file's text (TypeError says what is wrong). @param {string} text @returns {PublicKey} */
export function importPublicKey(text) {
  const obj = load(text, PUBLIC_KEY_TYPE);
  return {
    x25519: unb64url(obj.x25519, KEY_BYTES),
    ed25519: unb64url(obj.ed25519, KEY_BYTES),
    mailbox: checkMailbox(obj.mailbox),
  };
}

/** The private identity file's text (as `relay keygen` writes it). @param {Identity} identity */
export async function exportIdentity(identity) {
  return JSON.stringify({
    ...publicFields(identity.public),
    type: IDENTITY_TYPE,
    x25519_private: b64url(await rawPrivate(identity.x25519Private)),
    ed25519_private: b64url(await rawPrivate(identity.ed25519Private)),
  });
}

/** Read a private identity file's text; rejects when its public keys are not its private keys'.
 * @param {string} text @returns {Promise<Identity>} */
export async function importIdentity(text) {
  const obj = load(text, IDENTITY_TYPE);
  const identity = await identityFromPrivateBytes(
    unb64url(obj.x25519_private, KEY_BYTES),
    unb64url(obj.ed25519_private, KEY_BYTES),
    obj.mailbox,
  );
  if (
    b64url(identity.public.x25519) !== obj.x25519 ||
    b64url(identity.public.ed25519) !== obj.ed25519
  ) {
    throw new TypeError("the identity file's public keys are not those of its private keys");
  }
  return identity;
}

// -- the construction ------------------------------------------------------------------------

/** The AES-GCM associated data: the two mailboxes. @param {Context} context */
export function associatedData(context) {
  return concat(frame(AAD_LABEL), frame(utf8.encode(context.sender)), frame(utf8.encode(context.recipient)));
}

/** What the sender's Ed25519 key signs: every field of the body and of the context.
 * @param {Context} context @param {Uint8Array} recipientX25519
 * @param {Uint8Array} epk @param {Uint8Array} iv @param {Uint8Array} ct */
export function signedBytes(context, recipientX25519, epk, iv, ct) {
  const parts = [SIG_LABEL, utf8.encode(ALG), utf8.encode(context.sender), utf8.encode(context.recipient), recipientX25519, epk, iv, ct];
  return concat(...parts.map(frame));
}

/** @param {CryptoKey} privateKey @param {Uint8Array} peer @param {Uint8Array} epk
 * @param {Uint8Array} recipientX25519 @param {KeyUsage} usage */
async function aesKey(privateKey, peer, epk, recipientX25519, usage) {
  const peerKey = await crypto.subtle.importKey("raw", peer, { name: "X25519" }, false, []);
  const shared = await crypto.subtle.deriveBits({ name: "X25519", public: peerKey }, privateKey, 256);
  const ikm = await crypto.subtle.importKey("raw", shared, "HKDF", false, ["deriveKey"]);
  const salt = concat(epk, recipientX25519);
  return crypto.subtle.deriveKey(
    { name: "HKDF", hash: "SHA-256", salt, info: HKDF_INFO },
    ikm,
    { name: "AES-GCM", length: 256 },
    false,
    [usage],
  );
}

/** @param {PublicKey} recipient @param {Identity} sender @param {Context} context */
function checkParties(recipient, sender, context) {
  for (const [key, party] of [[recipient.mailbox, context.recipient], [sender.mailbox, context.sender]]) {
    if (key !== null && key !== undefined && key !== party) {
      throw new TypeError(`the key of mailbox ${JSON.stringify(key)} used for ${JSON.stringify(party)}`);
    }
  }
}

/**
 * @param {string} body @param {PublicKey} recipient @param {Identity} sender @param {Context} context
 * @param {CryptoKey} esk @param {Uint8Array} epk @param {Uint8Array} iv
 */
async function sealParts(body, recipient, sender, context, esk, epk, iv) {
  const key = await aesKey(esk, recipient.x25519, epk, recipient.x25519, "encrypt");
  const ct = new Uint8Array(
    await crypto.subtle.encrypt({ name: "AES-GCM", iv, additionalData: associatedData(context) }, key, utf8.encode(body)),
  );
  const signed = signedBytes(context, recipient.x25519, epk, iv, ct);
  const sig = new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, sender.ed25519Private, signed));
  return JSON.stringify({ v: VERSION, alg: ALG, epk: b64url(epk), iv: b64url(iv), ct: b64url(ct), sig: b64url(sig) });
}

/**
 * `body` sealed for `recipient` and signed by `sender`, bound to the context's mailboxes: a JSON
 * string to send as a message body.
 * @param {string} body @param {PublicKey} recipient @param {Identity} sender @param {Context} context
 * @returns {Promise<string>}
 */
export async function seal(body, recipient, sender, context) {
  checkParties(recipient, sender, context);
  const ephemeral = /** @type {CryptoKeyPair} */ (await crypto.subtle.generateKey({ name: "X25519" }, false, ["deriveBits"]));
  const epk = new Uint8Array(await crypto.subtle.exportKey("raw", ephemeral.publicKey));
  const iv = crypto.getRandomValues(new Uint8Array(IV_BYTES));
  return sealParts(body, recipient, sender, context, ephemeral.privateKey, epk, iv);
}

/**
 * `seal` with a given ephemeral X25519 private key and iv: for known-answer tests only (a reused
 * ephemeral key or iv gives away what it sealed).
 * @param {string} body @param {PublicKey} recipient @param {Identity} sender @param {Context} context
 * @param {{ephemeral: Uint8Array, iv: Uint8Array}} fixed
 */
export async function sealWith(body, recipient, sender, context, { ephemeral, iv }) {
  checkParties(recipient, sender, context);
  if (iv.length !== IV_BYTES) throw new TypeError(`the iv must be ${IV_BYTES} bytes`);
  const esk = await importPrivate("X25519", ephemeral, ["deriveBits"]);
  return sealParts(body, recipient, sender, context, esk, await publicOf(esk), iv);
}

/** @param {string} sealed */
function fields(sealed) {
  let obj;
  try {
    obj = JSON.parse(sealed);
  } catch {
    throw new SealError("malformed", "not a sealed body (not JSON)");
  }
  const keys = obj && typeof obj === "object" && !Array.isArray(obj) ? Object.keys(obj) : [];
  if (keys.length !== FIELDS.length || !FIELDS.every((f) => keys.includes(f))) {
    throw new SealError("malformed", `not a sealed body (expected the fields ${FIELDS.join(", ")})`);
  }
  if (obj.v !== VERSION || obj.alg !== ALG) {
    throw new SealError("unsupported", `version ${JSON.stringify(obj.v)}, alg ${JSON.stringify(String(obj.alg).slice(0, 40))}`);
  }
  try {
    const parsed = {
      epk: unb64url(obj.epk, KEY_BYTES),
      iv: unb64url(obj.iv, IV_BYTES),
      ct: unb64url(obj.ct),
      sig: unb64url(obj.sig, SIG_BYTES),
    };
    if (parsed.ct.length < TAG_BYTES) throw new TypeError("ciphertext shorter than its tag");
    return parsed;
  } catch (error) {
    throw new SealError("malformed", `bad field: ${error instanceof Error ? error.message : error}`);
  }
}

/**
 * The body `sender` sealed for `recipient` in `context`; rejects with a SealError when it is not
 * exactly that (never a body that was altered, replayed to another mailbox or claimed by another
 * sender).
 * @param {string} sealed @param {Identity} recipient @param {PublicKey} sender @param {Context} context
 * @returns {Promise<string>}
 */
export async function open(sealed, recipient, sender, context) {
  for (const [key, party] of [[recipient.mailbox, context.recipient], [sender.mailbox, context.sender]]) {
    if (key !== null && key !== undefined && key !== party) {
      throw new SealError("mailbox", `the key of mailbox ${JSON.stringify(key)} used for ${JSON.stringify(party)}`);
    }
  }
  const { epk, iv, ct, sig } = fields(sealed);
  const own = recipient.public.x25519;
  let verified = false;
  try {
    const verifier = await crypto.subtle.importKey("raw", sender.ed25519, { name: "Ed25519" }, false, ["verify"]);
    verified = await crypto.subtle.verify({ name: "Ed25519" }, verifier, sig, signedBytes(context, own, epk, iv, ct));
  } catch {} // a sender key that is no curve point verifies nothing
  if (!verified) throw new SealError("signature", "not sealed by this sender for this recipient, or altered");
  let plain;
  try {
    const key = await aesKey(recipient.x25519Private, epk, epk, own, "decrypt");
    plain = await crypto.subtle.decrypt({ name: "AES-GCM", iv, additionalData: associatedData(context) }, key, ct);
  } catch {
    throw new SealError("decrypt", "the ciphertext does not decrypt"); // altered, or a low-order epk
  }
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(plain);
  } catch {
    throw new SealError("malformed", "the sealed body is not UTF-8 text");
  }
}

const b64Length = (/** @type {number} */ n) => Math.floor((4 * n + 2) / 3);
const FIXED = JSON.stringify({ v: VERSION, alg: ALG, epk: "", iv: "", ct: "", sig: "" }).length
  + b64Length(KEY_BYTES) + b64Length(IV_BYTES) + b64Length(SIG_BYTES);

/** The sealed body's length for a body of `bodyBytes` UTF-8 bytes. @param {number} bodyBytes */
export function sealedLength(bodyBytes) {
  return FIXED + b64Length(bodyBytes + TAG_BYTES);
}

/** The largest body (UTF-8 bytes) whose sealed form fits `maxBodyBytes` (negative: none does).
 * @param {number} maxBodyBytes */
export function maxPlaintextBytes(maxBodyBytes) {
  return Math.floor((3 * (maxBodyBytes - FIXED)) / 4) - TAG_BYTES;
}
