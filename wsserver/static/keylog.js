// The key log (docs/protocol.md section 12) in the browser: key ids, the
// signed strings, checking a whole log, the pairing text.  WebCrypto only
// (Ed25519 and SHA-256); no page, no network: app.js fetches, this checks.
// It mirrors wsserver/keylog.py; tests/test_browser.py checks both against
// the same vectors.

const utf8 = new TextEncoder();

export const KEYLOG_PREFIX = "wsserver-keylog-v1\n";
export const DELETE_PREFIX = "wsserver-delete-v1\n";
export const PAIRING_PREFIX = "wsserver-pair-v1";
const USER_ID = /^[A-Za-z0-9_.-]{1,64}$/;
const MAX_ENTRIES = 10000; // far beyond MAX_KEYS_PER_USER's churn; a limit on what we check

export class KeyLogError extends Error {}

// -- base64 ---------------------------------------------------------------------

export function toBase64(buffer) {
  let text = "";
  for (const byte of new Uint8Array(buffer)) text += String.fromCharCode(byte);
  return btoa(text);
}

// Standard base64, padding optional (as the server accepts); throws otherwise.
export function fromBase64(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(text)) throw new KeyLogError("not base64");
  const padded = text.replace(/=+$/, "");
  const raw = atob(padded + "=".repeat((4 - (padded.length % 4)) % 4));
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

export function toBase64url(buffer) {
  return toBase64(buffer).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

export function fromBase64url(text) {
  if (!/^[A-Za-z0-9_-]*$/.test(text)) throw new KeyLogError("not base64url");
  return fromBase64(text.replaceAll("-", "+").replaceAll("_", "/"));
}

// -- ids and strings -------------------------------------------------------------

async function sha256url(bytes) {
  return toBase64url(await crypto.subtle.digest("SHA-256", bytes));
}

// The key_id of a raw 32-byte public key.
export async function keyId(rawPublicKey) {
  return (await sha256url(rawPublicKey)).slice(0, 16);
}

// publicKey: standard base64 with padding (as the server shows it).
export function entryString(userId, seq, action, publicKey, prev) {
  return `${KEYLOG_PREFIX}${userId}\n${seq}\n${action}\n${publicKey}\n${prev}`;
}

// Unpadded base64url SHA-256 of a string's UTF-8 bytes (the next entry's prev).
export async function digest(string) {
  return sha256url(utf8.encode(string));
}

export function deleteString(userId, seq) {
  return `${DELETE_PREFIX}${userId}\n${seq}`;
}

// -- names ------------------------------------------------------------------------

// A device name as the page shows it.  The name is unsigned (the approving
// device's label), so one with control or format characters (bidi
// overrides, zero-width characters) does not make the log invalid; each
// such character is shown as an escape (\u202e), as the command line's
// safe() does, so none can hide or reorder what is shown.  Anything that is
// not a string is no name (null).  (The server refuses such names; a
// server that shows one anyway gets it escaped, not obeyed.)
const UNSAFE = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Cs}]/gu;
const MAX_NAME = 64; // code points, as the server allows; a longer one is cut, with "…"
export function shownName(name) {
  if (typeof name !== "string") return null;
  const points = [...name];
  const cut = points.length > MAX_NAME ? points.slice(0, MAX_NAME).join("") + "…" : name;
  return cut.replace(UNSAFE, (ch) => {
    if (ch === "\u200d") return ch; // the zero-width joiner joins emoji, hides nothing alone
    const named = { "\n": "\\n", "\r": "\\r", "\t": "\\t" }[ch];
    if (named) return named;
    const code = ch.codePointAt(0);
    const hex = code.toString(16);
    if (code < 0x100) return `\\x${hex.padStart(2, "0")}`;
    return code < 0x10000 ? `\\u${hex.padStart(4, "0")}` : `\\U${hex.padStart(8, "0")}`;
  });
}

// -- is a public key a point of the group? -----------------------------------------

// The check Python makes with libsodium's crypto_core_ed25519_is_valid_point
// (WebCrypto's importKey makes none: Chromium's takes any 32 bytes): the
// encoding is canonical (y < p), it decodes to a point of the curve, and
// that point is in the prime-order subgroup ([L]P is the neutral point) and
// is not the neutral point itself, so not of small order.  BigInt
// arithmetic, once per key: not constant-time, and it need not be (public
// keys only).
const P = 2n ** 255n - 19n;
const L = 2n ** 252n + 27742317777372353535851937790883648493n;
const mod = (a) => ((a % P) + P) % P;
function power(base, exp) {
  let result = 1n;
  base = mod(base);
  while (exp > 0n) {
    if (exp & 1n) result = (result * base) % P;
    base = (base * base) % P;
    exp >>= 1n;
  }
  return result;
}
const D = mod(-121665n * power(121666n, P - 2n));
const D2 = mod(2n * D);
const SQRT_M1 = power(2n, (P - 1n) / 4n);

// Twisted Edwards (a = -1) points in extended coordinates [X, Y, Z, T];
// this addition is complete (it doubles too).
function add([x1, y1, z1, t1], [x2, y2, z2, t2]) {
  const a = mod((y1 - x1) * (y2 - x2));
  const b = mod((y1 + x1) * (y2 + x2));
  const c = mod(t1 * D2 * t2);
  const d = mod(2n * z1 * z2);
  const e = b - a;
  const f = d - c;
  const g = d + c;
  const h = b + a;
  return [mod(e * f), mod(g * h), mod(f * g), mod(e * h)];
}

function times(point, n) {
  let result = [0n, 1n, 1n, 0n];
  for (let bit = BigInt(n.toString(2).length - 1); bit >= 0n; bit -= 1n) {
    result = add(result, result);
    if ((n >> bit) & 1n) result = add(result, point);
  }
  return result;
}

const isNeutral = ([x, y, z]) => x === 0n && y === z;

// raw: 32 bytes.  True when it is a valid Ed25519 public key as above.
export function validPoint(raw) {
  if (!(raw instanceof Uint8Array) || raw.length !== 32) return false;
  let y = 0n;
  for (let i = 31; i >= 0; i -= 1) y = (y << 8n) | BigInt(raw[i]);
  const sign = y >> 255n;
  y &= (1n << 255n) - 1n;
  if (y >= P) return false; // not canonical
  const u = mod(y * y - 1n);
  const v = mod(D * y * y + 1n);
  let x = mod(u * power(v, 3n) * power(u * power(v, 7n), (P - 5n) / 8n));
  const vxx = mod(v * x * x);
  if (vxx === mod(-u)) x = mod(x * SQRT_M1);
  else if (vxx !== u) return false; // not on the curve
  if (x === 0n && sign === 1n) return false;
  if ((x & 1n) !== sign) x = P - x;
  const point = [x, y, 1n, mod(x * y)];
  return !isNeutral(point) && isNeutral(times(point, L));
}

const checkedPoints = new Map(); // base64 public key -> validPoint (each key once)
function validKey(publicKey, raw) {
  if (checkedPoints.size >= MAX_ENTRIES) checkedPoints.clear();
  if (!checkedPoints.has(publicKey)) checkedPoints.set(publicKey, validPoint(raw));
  return checkedPoints.get(publicKey);
}

// -- signatures -------------------------------------------------------------------

const imported = new Map(); // base64 public key -> Promise of a CryptoKey

export function verifyKey(publicKey) {
  if (!imported.has(publicKey)) {
    const raw = fromBase64(publicKey);
    if (raw.length !== 32) throw new KeyLogError("a public key is 32 bytes");
    imported.set(publicKey, crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]));
  }
  return imported.get(publicKey);
}

// True when signature (base64) is a valid Ed25519 signature of string by publicKey.
export async function signatureOk(publicKey, string, signature) {
  if (typeof signature !== "string" || signature === "") return false;
  try {
    const raw = fromBase64(signature);
    if (raw.length !== 64) return false;
    return await crypto.subtle.verify({ name: "Ed25519" }, await verifyKey(publicKey), raw, utf8.encode(string));
  } catch (err) {
    return false;
  }
}

export async function sign(privateKey, string) {
  return toBase64(await crypto.subtle.sign({ name: "Ed25519" }, privateKey, utf8.encode(string)));
}

// -- checking a whole log ----------------------------------------------------------------

// Checks every entry of a user's log (as GET /auth/users/{id}/keylog gives
// it): seq in order, entry 0 the registration, every signature by a key
// active before it, every add also signed by the new key, every prev, every
// key_id.  Returns the state it leads to:
//   {nextSeq, head, heads: [digest of entry 0, 1, ...],
//    entries: [{seq, action, key_id, name, at}],
//    active: Map key_id -> {public_key, name, at}, every: Map key_id -> public_key,
//    names: Map key_id -> name}
// or throws KeyLogError saying which entry does not hold.
export async function checkLog(userId, entries) {
  if (!Array.isArray(entries) || entries.length === 0) throw new KeyLogError("the key log is empty");
  if (entries.length > MAX_ENTRIES) throw new KeyLogError("the key log is too long");
  const state = { nextSeq: 0, head: "", heads: [], entries: [], active: new Map(), every: new Map(), names: new Map() };
  for (const entry of entries) {
    const where = `entry ${state.nextSeq}`;
    if (!entry || entry.seq !== state.nextSeq) throw new KeyLogError(`${where}: seq out of order`);
    let raw;
    try {
      raw = fromBase64(entry.public_key);
    } catch (err) {
      throw new KeyLogError(`${where}: public_key is not base64`);
    }
    if (raw.length !== 32) throw new KeyLogError(`${where}: public_key is not 32 bytes`);
    const publicKey = toBase64(raw); // the canonical form the string holds
    // As Python: a key that is not a valid Ed25519 point (small order, not
    // on the curve, not canonical) is refused.  (WebCrypto's importKey does
    // not tell: Chromium's takes any 32 bytes.)
    if (!validKey(publicKey, raw)) throw new KeyLogError(`${where}: public_key is not a valid Ed25519 point`);
    const kid = await keyId(raw);
    if (entry.key_id !== undefined && entry.key_id !== kid) throw new KeyLogError(`${where}: key_id does not match its key`);
    const string = entryString(userId, entry.seq, entry.action, publicKey, state.head);
    if (entry.seq === 0) {
      if (entry.action !== "register") throw new KeyLogError(`${where}: not the registration`);
      if (entry.by || entry.signature || entry.key_signature) throw new KeyLogError(`${where}: carries signatures it cannot have`);
    } else if (entry.action === "add" || entry.action === "revoke") {
      const signer = typeof entry.by === "string" ? state.active.get(entry.by) : undefined;
      if (!signer) throw new KeyLogError(`${where}: signed by a key that is not active`);
      if (!(await signatureOk(signer.public_key, string, entry.signature))) {
        throw new KeyLogError(`${where}: the signature does not match`);
      }
      if (entry.action === "add") {
        if (!(await signatureOk(publicKey, string, entry.key_signature))) {
          throw new KeyLogError(`${where}: the new key's signature does not match`);
        }
        if (state.every.has(kid)) throw new KeyLogError(`${where}: adds a key already in the log`);
      } else {
        if (!state.active.has(kid)) throw new KeyLogError(`${where}: revokes a key that is not active`);
        if (state.active.size === 1) throw new KeyLogError(`${where}: revokes the last key`);
      }
    } else {
      throw new KeyLogError(`${where}: unknown action`);
    }
    if (entry.action === "revoke") {
      state.active.delete(kid);
    } else {
      const name = shownName(entry.name);
      state.active.set(kid, { key_id: kid, public_key: publicKey, name, at: entry.at || null });
      state.every.set(kid, publicKey);
      state.names.set(kid, name);
    }
    state.entries.push({ seq: entry.seq, action: entry.action, key_id: kid, name: state.names.get(kid) ?? null, at: entry.at || null });
    state.head = await digest(string);
    state.heads.push(state.head);
    state.nextSeq += 1;
  }
  return state;
}

// How a log checked now relates to the heads remembered from before:
// "same", "extended" (the old log is its beginning: devices added or
// revoked since), or "rewritten" (an entry seen before changed or vanished).
export function compareHeads(before, now) {
  if (before.length > now.length) return "rewritten";
  for (let i = 0; i < before.length; i += 1) if (before[i] !== now[i]) return "rewritten";
  return before.length === now.length ? "same" : "extended";
}

// -- the pairing text ---------------------------------------------------------------------

// wsserver-pair-v1:<user_id>:<seq>:<public key>:<key_signature>, the key and
// signature unpadded base64url (publicKey and keySignature: standard base64).
export function pairingText(userId, seq, publicKey, keySignature) {
  return [PAIRING_PREFIX, userId, String(seq), toBase64url(fromBase64(publicKey)), toBase64url(fromBase64(keySignature))].join(":");
}

// {userId, seq, publicKey, keySignature} (standard base64), or KeyLogError.
// Whitespace anywhere is ignored (a terminal may wrap the text).
export function parsePairingText(text) {
  const parts = String(text).replace(/\s+/g, "").split(":");
  const bad = new KeyLogError("this is not a wsserver pairing text (wsserver-pair-v1:...)");
  if (parts.length !== 5 || parts[0] !== PAIRING_PREFIX || !USER_ID.test(parts[1])) throw bad;
  if (!/^[0-9]{1,9}$/.test(parts[2])) throw bad;
  let key, sig;
  try {
    key = fromBase64url(parts[3]);
    sig = fromBase64url(parts[4]);
  } catch (err) {
    throw bad;
  }
  if (key.length !== 32 || sig.length !== 64) throw bad;
  if (toBase64url(key) !== parts[3] || toBase64url(sig) !== parts[4]) throw bad;
  return { userId: parts[1], seq: Number(parts[2]), publicKey: toBase64(key), keySignature: toBase64(sig) };
}
