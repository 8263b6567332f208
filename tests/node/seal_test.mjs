// seal.js in Node (its WebCrypto has X25519 and Ed25519 from Node 20 on).
// Usage: node seal_test.mjs <seal_vectors.json> <exchange.json>
// exchange.json: {"alice": identity file, "bob": identity file, "fromPython": a body alice sealed
// for bob}. Prints one line per check, then the JSON line {"forPython": a body alice sealed for
// bob}; exits non-zero on the first failure.
import { readFileSync } from "node:fs";
import * as S from "../../relay/web/seal.js";

const [vectorPath, exchangePath] = process.argv.slice(2);
const vectors = JSON.parse(readFileSync(vectorPath, "utf8"));
const exchange = JSON.parse(readFileSync(exchangePath, "utf8"));

function check(ok, what) {
  if (!ok) { console.error(`FAIL: ${what}`); process.exit(1); }
  console.log(`ok: ${what}`);
}
async function reason(promise) {
  try { await promise; return "opened"; } catch (e) { return e instanceof S.SealError ? e.reason : `${e}`; }
}
function flip(sealed, field) {
  const obj = JSON.parse(sealed);
  const bytes = S.unb64url(obj[field]);
  bytes[0] ^= 1;
  obj[field] = S.b64url(bytes);
  return JSON.stringify(obj);
}
const hex = (h) => Uint8Array.from(h.match(/../g) || [], (x) => parseInt(x, 16));
const fromVector = (v) => S.identityFromPrivateBytes(hex(v.x25519_private), hex(v.ed25519_private), v.mailbox);

const ctx = { sender: "alice", recipient: "bob" };
const [va, vb] = [await fromVector(vectors.sender), await fromVector(vectors.recipient)];
check(S.b64url(va.public.ed25519) === S.b64url(hex(vectors.sender.ed25519)), "RFC 8032 public key");
for (const c of vectors.cases) {
  const fixed = { ephemeral: hex(vectors.ephemeral), iv: hex(vectors.iv) };
  check((await S.sealWith(c.body, vb.public, va, ctx, fixed)) === c.sealed, `known answer for ${JSON.stringify(c.body)}`);
}

const alice = await S.importIdentity(exchange.alice);
const bob = await S.importIdentity(exchange.bob);
check((await S.open(exchange.fromPython, bob, alice.public, ctx)) === "from python ✓", "opens what Python sealed");
for (const field of ["ct", "sig", "epk", "iv"]) {
  check((await reason(S.open(flip(exchange.fromPython, field), bob, alice.public, ctx))) === "signature", `tampered ${field} fails`);
}
const carol = await S.generateIdentity("carol");
check((await reason(S.open(exchange.fromPython, carol, alice.public, { sender: "alice", recipient: "carol" }))) === "signature", "another recipient fails");
const mallory = await S.generateIdentity("mallory");
check((await reason(S.open(exchange.fromPython, bob, mallory.public, { sender: "mallory", recipient: "bob" }))) === "signature", "another sender fails");
console.log(JSON.stringify({ forPython: await S.seal("from node ✓", bob.public, alice, ctx) }));
console.log("all ok");
