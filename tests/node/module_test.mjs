// relay.js in Node (a global WebSocket: 22+, or 20 with --experimental-websocket).
// Usage: node module_test.mjs <ws url> <token alice> <token bob> <token bob again> <token of a
// third mailbox> <token of a fourth> <ws url of a relay with a rate limit below one frame a
// second (0.5/s, burst 10): over the burst, refused>
// Prints one line per check; exits non-zero on the first failure.
import { RelayClient, RelayError } from "../../relay/web/relay.js";

const [url, alice, bob, bobAgain, third, fourth, limitedUrl] = process.argv.slice(2);
const deadline = setTimeout(() => { console.error("FAIL: deadline"); process.exit(2); }, 40000);

function check(ok, what) {
  if (!ok) { console.error(`FAIL: ${what}`); process.exit(1); }
  console.log(`ok: ${what}`);
}
async function until(condition) {
  while (!condition()) await new Promise((r) => setTimeout(r, 10));
}
function client(token, options = {}, at = url) {
  const c = new RelayClient(at, { token, minBackoffMs: 50, maxBackoffMs: 300, ...options });
  c.got = [];
  c.addEventListener("message", (e) => c.got.push(e.detail));
  return c;
}

const a = client(async () => alice);
const b = client(bob, { autoAck: false });
await Promise.all([a.connect(), b.connect()]);
check(a.state === "open" && b.welcome.mailbox, "connect resolves on welcome");

const sends = [];
for (let i = 0; i < 50; i++) sends.push(a.send(b.welcome.mailbox, `n${i}`));
const accepted = await Promise.all(sends);
check(new Set(accepted.map((x) => x.ref)).size === 50, "every send has its own random ref");
check(a.stats.sends === 50, "each sent once");
await until(() => b.got.length >= 50);
check(b.got.map((m) => m.body).join() === [...Array(50).keys()].map((i) => `n${i}`).join(), "50 in order, each once");

b._ws.close(4000, "test: reconnect");
await until(() => b.stats.welcomes === 2 && b.stats.duplicatesDropped === 50);
check(b.got.length === 50, "redeliveries after a reconnect are dropped");
for (const m of b.got) b.ack(m.id);
await until(() => b._acks.size === 0);
check(b.stats.ackFrames === 1, "50 acks in one frame");

try {
  await a.send(b.welcome.mailbox, "x", { ttl: 10 ** 9 });
  check(false, "ttl_too_long rejects");
} catch (error) {
  check(error instanceof RelayError && error.code === "ttl_too_long", "a definite error rejects with its code");
}

const quiet = client(async () => third, { idleTimeoutMs: 1000 });
const first = quiet.connect();
check(quiet.connect() === first, "connect() while connecting returns the same promise");
await first;
await new Promise((r) => setTimeout(r, 2500)); // the point is time passing in silence
check(quiet.stats.welcomes === 1 && quiet.state === "open", "idle probes keep a quiet connection open");
quiet.close();

const limited = client(fourth, {}, limitedUrl);
await limited.connect();
const burst = await Promise.allSettled([...Array(13).keys()].map((i) => limited.send("carol-n", `l${i}`)));
check(burst.every((r) => r.status === "fulfilled"), "rate_limited sends are sent again until accepted");
check(limited.stats.sends > 13, "some of the 13 (3 over the burst) went twice");
check(limited.stats.welcomes === 1, "retried one at a time: one session throughout, never closed 1008");
limited.close();

const newer = client(bobAgain);
await newer.connect();
await until(() => b.state === "closed");
check(b._reconnectTimer === null, "4409 stops the older client");
check(a.state === "open" && a.stats.welcomes === 1, "the other clients' sessions did not touch alice's");
a.close(); newer.close();
clearTimeout(deadline);
console.log("all ok");
