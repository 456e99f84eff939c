// The wsserver web client: plain JavaScript, no build step, no outside URLs.
//
// It follows docs/protocol.md: an Ed25519 key made by WebCrypto (the private
// half non-extractable, kept in IndexedDB), a challenge login, one WebSocket
// with the token in the query (browsers cannot set headers on it), signed
// messages with fresh nonces, and every received signature checked here
// against the key its key_id names in the sender's key log, which the page
// fetches, checks entry by entry (keylog.js) and remembers per peer, warning
// when it changes.  After a drop it reconnects with since=<last id seen> and
// resends what was not yet acknowledged with its original nonce, so nothing
// is lost or stored twice.  Devices (section 12): list and revoke this
// user's keys, approve a new device's pairing text, link this browser to an
// account whose key lives elsewhere, sign out, delete the account.
// Conversations (section 13, chat.js): a sidebar, history, groups, read
// receipts and presence.  The token is kept in sessionStorage so a reload
// stays signed in (see "kept" below).

import * as chat from "./chat.js";
import * as keylog from "./keylog.js";

const USER_ID = /^[A-Za-z0-9_.-]{1,64}$/;
const GROUP_ID = /^#[A-Za-z0-9_.-]{1,64}$/;
const RETRY_SECONDS = [0.2, 0.5, 1, 2, 5];
const LINK_POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
const utf8 = new TextEncoder();
const { toBase64, fromBase64 } = keylog;

// -- signing input ---------------------------------------------------------------

function signingText(from, to, nonce, content) {
  return `wsserver-msg-v1\n${from}\n${to}\n${nonce || ""}\n${content}`;
}

function signingInput(from, to, nonce, content) {
  return utf8.encode(signingText(from, to, nonce, content));
}

function freshNonce() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return "w-" + toBase64(bytes).replaceAll("+", "-").replaceAll("/", "_");
}

// -- keys in IndexedDB ---------------------------------------------------------

function keyStore(mode) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open("wsserver", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("keys", { keyPath: "user_id" });
    open.onerror = () => reject(open.error);
    open.onsuccess = () => resolve(open.result.transaction("keys", mode).objectStore("keys"));
  });
}

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function loadKey(userId) {
  return request((await keyStore("readonly")).get(userId));
}

async function saveKey(record) {
  // add, not put: a key already kept for this id is never replaced (one
  // that was revoked or whose account was deleted is deleted first).
  await request((await keyStore("readwrite")).add(record));
}

async function forgetKey(userId) {
  await request((await keyStore("readwrite")).delete(userId));
}

// The key_id of a kept key (records kept before key ids existed lack it).
async function keyIdOf(user) {
  if (!user.key_id) user.key_id = await keylog.keyId(fromBase64(user.public_key));
  return user.key_id;
}

async function newKeyPair() {
  try {
    return await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
  } catch (err) {
    throw new Error("this browser has no WebCrypto Ed25519 (Chrome 137, Firefox 129, Safari 17 or newer)");
  }
}

// -- HTTP ------------------------------------------------------------------------

class ServerError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

async function api(method, path, body, token) {
  const init = { method, headers: {} };
  if (token) init.headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ServerError("network", "the server cannot be reached");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    throw new ServerError(error.code || `http_${response.status}`, error.message || response.statusText);
  }
  return data;
}

// An HTTP request with this session's token.  A token refused (expired, or
// the server's secret changed) is replaced by logging in again with the kept
// key, without asking; a request the server's rate limit refused is tried
// again after a pause, twice at most.
async function authed(method, path, body) {
  const user = session.user;
  for (let attempt = 0; ; attempt++) {
    try {
      return await api(method, path, body, session.token);
    } catch (err) {
      if (session.user !== user || attempt >= 2) throw err;
      if (err.code === "unauthorized") await login(user);
      else if (err.code === "rate_limited") await new Promise((resolve) => setTimeout(resolve, 1000 * (attempt + 1)));
      else throw err;
    }
  }
}

// -- the session kept across a reload ---------------------------------------------
//
// The token (and the open conversation, and the last message id for since)
// is kept in sessionStorage: it survives a reload of this tab, and goes when
// the tab is closed; other tabs do not share it.  The token is a bearer
// credential for at most TOKEN_TTL (an hour by default); the key that makes
// new ones stays non-extractable in IndexedDB.  localStorage would keep it
// after the tab is closed, for every tab: a longer life for no gain, since
// signing in again with the kept key is silent.
const kept = {
  key: "wsserver.session",
  save() {
    if (!session.user || !session.token) return;
    const value = { user_id: session.user.user_id, token: session.token, open: chat.openId(), last_id: session.lastId };
    sessionStorage.setItem(this.key, JSON.stringify(value));
  },
  load() {
    try {
      const value = JSON.parse(sessionStorage.getItem(this.key));
      if (value && USER_ID.test(value.user_id) && typeof value.token === "string") return value;
    } catch (err) {
      // nothing usable kept
    }
    return null;
  },
  forget() {
    sessionStorage.removeItem(this.key);
  },
};

// -- key logs: ours and our peers' ------------------------------------------------

const logPath = (userId) => `/auth/users/${encodeURIComponent(userId)}/keylog`;

// A user's key log, fetched and checked entry by entry: the state it leads
// to (keylog.checkLog), or a KeyLogError when it does not check.
async function fetchLog(userId) {
  const data = await api("GET", logPath(userId));
  if (data.user_id !== userId) throw new keylog.KeyLogError("the answer is the key log of another user");
  return keylog.checkLog(userId, data.entries);
}

// What this browser remembers of each peer's log: the digest of every entry
// it has seen ({heads: [...]}), in localStorage, so a log that is rewritten
// (an entry seen before changed or vanished) shows even after a reload.
const remembered = {
  key: (userId) => `wsserver.keylog.${userId}`,
  get(userId) {
    try {
      const value = JSON.parse(localStorage.getItem(this.key(userId)));
      return value && Array.isArray(value.heads) ? value : null;
    } catch (err) {
      return null;
    }
  },
  set(userId, heads) {
    localStorage.setItem(this.key(userId), JSON.stringify({ heads }));
  },
  forget(userId) {
    localStorage.removeItem(this.key(userId));
  },
};

// userId -> Promise of {state, trust, why}: trust is "ok" (the log checks
// and extends what was seen before), "rewritten", "broken" (it does not
// check) or "unknown" (it could not be fetched: no such user, or offline).
const peerLogs = new Map();
const refetched = new Set(); // "user key_id" pairs a log was fetched again for

function peerLog(userId) {
  if (!peerLogs.has(userId)) {
    const lookup = loadPeerLog(userId);
    peerLogs.set(userId, lookup);
    lookup.then((log) => {
      if (log.trust === "unknown") peerLogs.delete(userId); // try again next time
    });
  }
  return peerLogs.get(userId);
}

async function loadPeerLog(userId) {
  let state;
  try {
    state = await fetchLog(userId);
  } catch (err) {
    if (!(err instanceof keylog.KeyLogError)) return { state: null, trust: "unknown", why: err.message };
    warnAbout(userId, "broken", err.message);
    return { state: null, trust: "broken", why: err.message };
  }
  const before = remembered.get(userId);
  const relation = before ? keylog.compareHeads(before.heads, state.heads) : "new";
  if (relation === "rewritten") {
    warnAbout(userId, "rewritten", "an entry seen before changed or vanished", state);
    return { state, trust: "rewritten", why: "their key log was rewritten" };
  }
  if (relation === "extended") noteChanges(userId, before.heads.length, state);
  else if (relation === "new" && state.nextSeq > 1) noteChanges(userId, 1, state, "has");
  remembered.set(userId, state.heads);
  return { state, trust: "ok" };
}

// A notice for each entry added to a peer's log since this browser last saw it.
// (A log seen for the first time with more than its registration gets one
// notice naming its devices: no change to warn about, but worth knowing.)
function noteChanges(userId, seen, state, first) {
  const who = userId === session.user?.user_id ? "your account" : userId;
  if (first) {
    const devices = [...state.active.values()].map((key) => key.name || key.key_id).join(", ");
    addNotice({ code: "keylog_seen", content: `${who} has ${state.active.size} devices: ${devices}` });
    return;
  }
  for (const entry of state.entries.slice(seen)) {
    const label = entry.name ? `${entry.name}, ${entry.key_id}` : entry.key_id;
    const verb = entry.action === "add" ? "added a device" : "revoked a device";
    addNotice({ code: "keylog_changed", content: `key change: ${who} ${verb} (${label}) since this browser last looked` });
  }
}

// The strong warning: a peer's log that was rewritten or does not check.
// Their messages are marked unverified until the person accepts it here,
// having compared key ids with them some other way.
function warnAbout(userId, trust, why, state) {
  const what = trust === "rewritten" ? "was REWRITTEN since this browser last saw it" : "does NOT CHECK";
  const item = addNotice({
    code: `keylog_${trust}`,
    content: `WARNING: ${userId}'s key log ${what} (${why}). Their messages are marked unverified: the server may be giving you a key they never approved. Compare key ids with them in person before trusting it.`,
  });
  item.classList.add("strong");
  item.dataset.peer = userId;
  if (state) {
    const accept = element("button", "", "I checked: accept it");
    accept.type = "button";
    accept.addEventListener("click", () => {
      remembered.set(userId, state.heads);
      peerLogs.delete(userId);
      item.classList.remove("strong");
      accept.remove();
      item.append(" (accepted)");
    });
    item.append(accept);
  }
}

// The check of a received message: {state, text, device}; state is
// verified, invalid, unsigned, unverified (the sender's log is not to be
// trusted) or unknown (the sender or the key could not be found).
async function checkSignature(frame) {
  if (!frame.signature) return { state: "unsigned" };
  let log = await peerLog(frame.from);
  if (log.trust === "unknown") return { state: "unknown", text: "? sender unknown" };
  if (log.trust !== "ok") return { state: "unverified", text: "⚠ unverified: key log changed" };
  let publicKey = pickKey(log.state, frame.key_id);
  const ask = `${frame.from} ${frame.key_id}`;
  if (!publicKey && !refetched.has(ask)) {
    // A device added since the log was fetched: fetch it again (once per key).
    refetched.add(ask);
    peerLogs.delete(frame.from);
    log = await peerLog(frame.from);
    if (log.trust !== "ok") return checkSignature(frame);
    publicKey = pickKey(log.state, frame.key_id);
  }
  if (!publicKey) {
    // The server says a key signed it that the sender's log never added.
    if (!refetched.has(`warned ${ask}`)) {
      refetched.add(`warned ${ask}`);
      const item = addNotice({
        code: "keylog_unknown_key",
        content: `WARNING: a message from ${frame.from} is signed by a key (${frame.key_id}) that their key log does not hold: it is marked unverified.`,
      });
      item.classList.add("strong");
    }
    return { state: "unverified", text: "⚠ unverified: key not in their key log" };
  }
  const ok = await keylog.signatureOk(publicKey, signingText(frame.from, frame.to, frame.nonce, frame.content), frame.signature);
  // Name the device when the sender has had more than one key.
  const device = log.state.every.size > 1 && frame.key_id ? log.state.names.get(frame.key_id) || frame.key_id : null;
  return { state: ok ? "verified" : "invalid", device };
}

// The key a frame's key_id names (revoked keys included: old messages stay
// checkable); a server from before key ids sends none: the first active key.
// A message stored before keys per device carries "key_id": null: a signed
// one was signed by the registration key (docs/protocol.md section 15), so
// entry 0's key, and no other, checks it.
function pickKey(state, kid) {
  if (kid === undefined) return state.active.values().next().value?.public_key;
  if (kid === null) return state.every.get(state.entries[0].key_id);
  return typeof kid === "string" ? state.every.get(kid) : undefined;
}

// -- the session -----------------------------------------------------------------

const session = {
  user: null, // {user_id, privateKey}
  token: null,
  socket: null,
  lastId: 0, // the largest message id seen, for since=
  seen: new Set(), // message ids shown, so a replay never shows one twice
  outbox: new Map(), // nonce -> {frame, item, held}: in send order, not yet acknowledged
  sentById: new Map(), // id -> item, for status frames
  signing: Promise.resolve(), // sends are signed one after another, in order
  holding: false, // the server's rate limit refused a message: new ones wait too
  releaseTimer: null,
  retries: 0,
  timer: null,
  leaving: null, // "signout" or "delete" while that request is under way
  leaveTimer: null,
};

// Back to a session with nobody signed in (after a sign-out, a revoked key,
// a deleted account): nothing of the last user's session is kept.
function resetSession() {
  const socket = session.socket;
  session.socket = null;
  if (socket) socket.close(1000);
  clearTimeout(session.timer);
  clearTimeout(session.releaseTimer);
  clearTimeout(session.leaveTimer);
  Object.assign(session, {
    user: null,
    token: null,
    lastId: 0,
    seen: new Set(),
    outbox: new Map(),
    sentById: new Map(),
    signing: Promise.resolve(),
    holding: false,
    retries: 0,
    leaving: null,
  });
  peerLogs.clear();
  refetched.clear();
}

// A login challenge is exactly wsserver-login-v1:<user_id>:<43 base64url
// characters> (docs/protocol.md section 2).  Anything else is never signed:
// a server could pass off a key-log entry or a deletion as a "challenge" and
// so get this browser's key to approve a device or delete the account.
function challengeOk(challenge, userId) {
  const prefix = `wsserver-login-v1:${userId}:`;
  return typeof challenge === "string" && challenge.startsWith(prefix) && /^[A-Za-z0-9_-]{43}$/.test(challenge.slice(prefix.length));
}

async function login(user) {
  const { challenge } = await api("POST", "/auth/login", { user_id: user.user_id });
  if (!challengeOk(challenge, user.user_id)) {
    throw new ServerError(
      "invalid_challenge",
      "the server sent a login challenge that is not one (not wsserver-login-v1:<user>:<nonce>): nothing was signed",
    );
  }
  const signature = await crypto.subtle.sign({ name: "Ed25519" }, user.privateKey, utf8.encode(challenge));
  const { token } = await api("POST", "/auth/login?verify=true", {
    user_id: user.user_id,
    challenge,
    signature: toBase64(signature),
    key_id: await keyIdOf(user),
  });
  session.token = token;
  kept.save();
}

function connect() {
  clearTimeout(session.timer);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = new URLSearchParams({ token: session.token });
  if (session.lastId > 0) query.set("since", String(session.lastId));
  const socket = new WebSocket(`${scheme}://${location.host}/ws?${query}`);
  let opened = false;
  session.socket = socket;
  showConnection("connecting", "connecting…");
  socket.onopen = () => {
    opened = true;
    session.retries = 0;
    showConnection("online", "online");
    for (const entry of session.outbox.values()) {
      if (!entry.held) transmit(entry.frame);
    }
    chat.connected();
  };
  socket.onmessage = (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch (err) {
      return;
    }
    onFrame(frame);
  };
  socket.onclose = (event) => {
    if (session.socket !== socket) return;
    session.socket = null;
    chat.disconnected();
    if (event.code === 4003 || event.code === 4004) {
      // Never retried: this key was revoked, the account deleted, or this
      // session signed out (section 9).
      ended(event.code, event.reason);
      return;
    }
    // A refused upgrade (an expired or unknown token, say) reaches a browser
    // only as a close without an open: log in again before the next try.
    reconnectLater(event.code === 4001 || !opened, describeClose(event));
  };
}

function describeClose(event) {
  const reasons = {
    1001: "the server is restarting",
    1008: "too many connections for this user",
    1013: "this page fell behind",
    4001: "the session expired",
  };
  return reasons[event.code] || "connection lost";
}

function reconnectLater(relogin, why) {
  const delay = RETRY_SECONDS[Math.min(session.retries, RETRY_SECONDS.length - 1)];
  session.retries += 1;
  showConnection("offline", `offline: ${why}; retrying in ${delay} s`);
  session.timer = setTimeout(async () => {
    try {
      if (relogin) await login(session.user);
    } catch (err) {
      if (err.code === "unknown_user" || err.code === "invalid_signature" || err.code === "invalid_challenge") {
        // This key can no longer sign in (revoked, or the account deleted,
        // while this page was offline), or the server asks it to sign what
        // is not a challenge: nothing to retry.
        showConnection("offline", `offline: ${err.message}`);
        return;
      }
      reconnectLater(true, err.message);
      return;
    }
    connect();
  }, delay * 1000);
}

function transmit(frame) {
  if (session.socket && session.socket.readyState === WebSocket.OPEN) {
    session.socket.send(JSON.stringify(frame));
    return true;
  }
  return false;
}

function send(to, content) {
  const from = session.user.user_id;
  const nonce = freshNonce();
  const item = addMessage({ from, to, content, timestamp: null }, "out");
  setStatus(item, "sending");
  session.signing = session.signing.then(async () => {
    try {
      const data = signingInput(from, to, nonce, content);
      const signature = await crypto.subtle.sign({ name: "Ed25519" }, session.user.privateKey, data);
      const entry = { frame: { to, content, nonce, signature: toBase64(signature) }, item, held: session.holding };
      session.outbox.set(nonce, entry);
      if (entry.held) setStatus(item, "waiting", "rate limit");
      else transmit(entry.frame);
    } catch (err) {
      setStatus(item, "refused", "could not sign");
    }
  });
}

function onFrame(frame) {
  switch (frame.type) {
    case "message":
      onMessage(frame);
      break;
    case "ack":
      onAck(frame);
      break;
    case "status": {
      const item = session.sentById.get(frame.id);
      if (item && frame.status === "read") addReader(item, frame.by);
      else if (item) setStatus(item, frame.status, recipientCount(frame, item));
      break;
    }
    case "system":
      onSystem(frame);
      break;
    case "presence":
      chat.onPresence(frame);
      break;
    case "group":
      chat.onGroup(frame);
      break;
  }
}

function onMessage(frame) {
  // One of ours (from another device, or replayed with since) is shown as
  // ours, once; a note to self comes back as received.
  const ours = frame.from === session.user.user_id && frame.to !== frame.from;
  if (typeof frame.id !== "number" || session.seen.has(frame.id) || (ours && session.sentById.has(frame.id))) return;
  session.seen.add(frame.id);
  session.lastId = Math.max(session.lastId, frame.id);
  kept.save();
  rememberPeer(frame.from);
  const item = addMessage(frame, ours ? "out" : "in");
  if (ours) {
    session.sentById.set(frame.id, item); // its status and read frames come here too
    setStatus(item, frame.status || "delivered");
  }
  showMark(item, frame);
  chat.noteMessage(frame, !ours);
}

// History from GET /messages (newest first): each message not shown yet,
// in id order among those shown.
function showHistory(frames) {
  const log = $("log");
  const before = log.scrollHeight - log.scrollTop;
  for (const frame of frames) {
    const ours = frame.from === session.user.user_id && frame.to !== frame.from;
    if (typeof frame.id !== "number" || session.seen.has(frame.id) || (ours && session.sentById.has(frame.id))) continue;
    session.seen.add(frame.id);
    const item = messageItem(frame, ours ? "out" : "in");
    item.classList.add("history");
    if (ours) {
      session.sentById.set(frame.id, item);
      setStatus(item, frame.status || "delivered");
      // Receipts kept by the server: those sent while this page was away too.
      if (Array.isArray(frame.read_by)) for (const by of frame.read_by) addReader(item, by);
    }
    insertById(item, frame.id);
    showMark(item, frame);
  }
  log.scrollTop = log.scrollHeight - before; // what was on screen stays there
  chat.noteHistory(frames);
}

function insertById(item, id) {
  const log = $("log");
  for (const other of log.children) {
    if (other.classList.contains("msg") && Number(other.dataset.id) > id) {
      log.insertBefore(item, other);
      return;
    }
  }
  log.append(item);
}

// The verification mark of a message, ours included: its signature checked
// here against the sender's key log.
function showMark(item, frame) {
  const mark = item.querySelector(".mark");
  mark.textContent = "checking…";
  checkSignature(frame)
    .catch(() => ({ state: "unknown", text: "? could not check" }))
    .then((verdict) => {
      const texts = { verified: "✓ verified", invalid: "✗ INVALID", unsigned: "UNSIGNED" };
      let text = verdict.text || texts[verdict.state];
      if (verdict.device) text += ` (${verdict.device})`;
      mark.textContent = text;
      mark.dataset.state = verdict.state;
      if (frame.key_id) mark.dataset.keyId = frame.key_id;
      if (verdict.state === "invalid") {
        item.classList.add("tampered");
        const warning = element("p", "warning", "This message does not match its signature: it was changed after it was signed, or not signed by the key named. Do not trust it.");
        item.append(warning);
      }
    });
}

function onAck(frame) {
  const pending = frame.nonce ? session.outbox.get(frame.nonce) : undefined;
  if (!pending) return; // an ack for a resend already answered
  session.outbox.delete(frame.nonce);
  const { item } = pending;
  item.dataset.id = frame.id;
  item.querySelector(".meta time").textContent = formatTime(frame.timestamp);
  session.sentById.set(frame.id, item);
  session.lastId = Math.max(session.lastId, frame.id);
  kept.save();
  if (Number.isSafeInteger(frame.members)) item.dataset.members = frame.members;
  setStatus(item, frame.status, recipientCount(frame, item));
  showMark(item, { ...frame, from: session.user.user_id });
  chat.noteMessage({ ...frame, from: session.user.user_id }, false);
}

// A read receipt: "read by" and the readers' names (a group's, one by one).
function addReader(item, by) {
  if (typeof by !== "string") return;
  const readers = item.querySelector(".read");
  if ([...readers.children].some((node) => node.dataset.nameOf === by)) return;
  readers.dataset.state = "read";
  if (!readers.childElementCount) readers.append("read by ");
  else readers.append(", ");
  readers.append(chat.nameSpan(by));
}

// How many it reached: members of a group (the ack says how many), or
// connections for a broadcast.
function recipientCount(frame, item) {
  if (frame.recipients === undefined) return undefined;
  if (item.dataset.members !== undefined) return `${frame.recipients} of ${item.dataset.members} members`;
  return `${frame.recipients} connections`;
}

function onSystem(frame) {
  // A read receipt or a watch list refused for the rate limit goes out
  // again by itself: no notice (it is no message of the user's).
  if (frame.code === "rate_limited" && !frame.nonce && chat.refused(frame.retry_after_ms)) return;
  // A refusal without a nonce that is not the rate limit's is a read the
  // server did not take (the page's messages all have a nonce, and its
  // watch lists are well formed): not the user's doing, so no notice.
  if (frame.code === "invalid_message" && !frame.nonce) return;
  const pending = frame.nonce ? session.outbox.get(frame.nonce) : undefined;
  if (pending && frame.code === "rate_limited") {
    // Refused before it was stored: it goes out again, with the same nonce,
    // when the bucket has a token; what is written meanwhile waits behind it,
    // so the messages keep their order.
    pending.held = true;
    setStatus(pending.item, "waiting", "rate limit");
    holdFor(frame.retry_after_ms || 200);
    const seconds = ((frame.retry_after_ms || 200) / 1000).toFixed(1);
    addNotice({ ...frame, content: `${frame.content.split(";")[0]}; sending again in ${seconds} s` });
    return;
  }
  if (pending && frame.code !== "internal_error") {
    session.outbox.delete(frame.nonce); // refused for good
    setStatus(pending.item, "refused", frame.code);
  }
  addNotice(frame);
}

function holdFor(ms) {
  session.holding = true;
  clearTimeout(session.releaseTimer);
  session.releaseTimer = setTimeout(() => {
    session.holding = false;
    for (const entry of session.outbox.values()) {
      if (entry.held) {
        entry.held = false;
        setStatus(entry.item, "sending");
        transmit(entry.frame);
      }
    }
  }, Math.max(ms, 50));
}

// -- the page ----------------------------------------------------------------------

function formatTime(timestamp) {
  return timestamp ? new Date(timestamp).toLocaleTimeString() : "";
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // never innerHTML: content is untrusted
  return node;
}

function addMessage(frame, direction) {
  const item = messageItem(frame, direction);
  appendToLog(item);
  return item;
}

// A message's item: who to whom (display names), when, the verification
// mark, and for ours the delivery status and the read receipts.
function messageItem(frame, direction) {
  const item = element("li", `msg ${direction}`);
  if (frame.id) item.dataset.id = frame.id;
  const conv = chat.convOf(frame);
  item.dataset.conv = conv;
  item.hidden = !chat.shown(conv);
  const meta = element("div", "meta");
  const route = element("span", "route");
  route.append(chat.nameSpan(frame.from, "from"), " → ", chat.nameSpan(frame.to, "to"));
  meta.append(route, element("time", "", formatTime(frame.timestamp)), element("span", "mark"));
  if (direction === "out") meta.append(element("span", "status"), element("span", "read"));
  item.append(meta, element("p", "content", frame.content));
  return item;
}

function addNotice(frame) {
  const last = $("log").lastElementChild;
  if (frame.code === "rate_limited" && last && last.dataset.code === "rate_limited") {
    last.textContent = frame.content; // one notice for a burst, kept up to date
    return last;
  }
  const item = element("li", "notice", frame.content);
  item.dataset.code = frame.code;
  if (frame.nonce) {
    // A refusal of a message: shown with that message's conversation.
    const pending = session.outbox.get(frame.nonce);
    if (pending) {
      item.dataset.conv = pending.item.dataset.conv;
      item.hidden = pending.item.hidden;
    }
  }
  appendToLog(item);
  return item;
}

function appendToLog(item) {
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(item);
  if (atBottom && !item.hidden) log.scrollTop = log.scrollHeight;
}

// state: sending, waiting (held back by the rate limit), pending, delivered or refused.
function setStatus(item, state, detail) {
  const node = item.querySelector(".status");
  node.dataset.state = state;
  node.textContent = detail === undefined ? state : `${state} (${detail})`;
}

function rememberPeer(userId) {
  const list = $("peers");
  if (userId === session.user.user_id) return;
  if ([...list.options].some((option) => option.value === userId)) return;
  const option = document.createElement("option");
  option.value = userId;
  list.append(option);
}

function showConnection(state, text) {
  const node = $("conn");
  node.hidden = false; // hidden until someone signs in: no "offline" before that
  node.dataset.state = state;
  node.textContent = text;
}

function showError(error) {
  $("signin-error").textContent = error ? error.message || String(error) : "";
}

// Signed in (logged in now, or with a token kept from before a reload).
async function start(user, resumed) {
  if (resumed) {
    session.token = resumed.token;
    session.lastId = Number.isSafeInteger(resumed.last_id) && resumed.last_id > 0 ? resumed.last_id : 0;
  } else {
    await login(user);
  }
  session.user = user;
  kept.save();
  localStorage.setItem("wsserver.user", user.user_id);
  cancelLink();
  $("signin").hidden = true;
  $("signin-note").textContent = "";
  $("nav").hidden = false;
  $("log").replaceChildren();
  resetDevicesView();
  $("who").textContent = `signed in as ${user.user_id}`;
  showView("chat");
  chat.reset();
  connect();
  $("text").focus();
  await chat.load(resumed ? resumed.open : null);
}

// A reload: the session kept in this tab goes on, with the key kept in
// IndexedDB (a refused token is replaced by logging in again, silently).
async function resume() {
  const saved = kept.load();
  if (!saved) return;
  const user = await loadKey(saved.user_id).catch(() => null);
  if (!user) {
    kept.forget();
    return;
  }
  await start(user, saved);
}

function showView(name) {
  $("chat").hidden = name !== "chat";
  $("devices").hidden = name !== "devices";
  $("delete-confirm").value = "";
  $("delete-account").disabled = true;
  $("show-chat").setAttribute("aria-pressed", String(name === "chat"));
  $("show-devices").setAttribute("aria-pressed", String(name === "devices"));
  if (name === "devices") showDevices();
}

// The session is over (close 4003 or 4004): back to the sign-in view, saying
// why.  A deleted account's or a revoked key's key is forgotten here.
// byPage: the page ended it (the server's close did not come in time).
async function ended(code, reason, byPage = false) {
  const user = session.user;
  if (!user) return; // ended already
  const leaving = session.leaving;
  kept.forget();
  chat.reset();
  resetSession();
  resetDevicesView();
  $("nav").hidden = true;
  $("chat").hidden = true;
  $("devices").hidden = true;
  $("signin").hidden = false;
  $("who").textContent = "";
  showConnection("signed-out", code === 4004 ? "signed out" : leaving === "delete" ? "account deleted" : "closed");
  showError(null);
  const note = $("signin-note");
  delete note.dataset.code; // set with the final text below
  note.textContent = `connection closed (${code}): checking this browser's key in the key log…`;
  let text;
  let badge = null; // what the header says once the key log was read (4003)
  if (code === 4004) {
    text =
      leaving === "signout"
        ? `signed out: ${user.user_id}'s key stays in this browser; log in to come back`
        : `signed out (this session was signed out elsewhere): log in again to come back`;
  } else if (leaving === "delete") {
    text = `account ${user.user_id} deleted: its key is forgotten in this browser`;
    await forgetUser(user.user_id);
  } else {
    // The close reason is only the server's word: the key (which cannot be
    // made again) is forgotten only when the key log shows it revoked, or
    // the user is gone.
    const fate = await keyFate(user);
    if (fate === "deleted") {
      text = `account ${user.user_id} deleted: its key is forgotten in this browser`;
      badge = "account deleted";
      await forgetUser(user.user_id);
    } else if (fate === "revoked") {
      badge = "key revoked";
      text = `this browser's key for ${user.user_id} was revoked (from another device): it can no longer sign in as ${user.user_id}; link this browser again to use it here`;
      await forgetKey(user.user_id);
    } else {
      text =
        `the server closed the connection (${code} ${reason || "no reason"}), but ${fate}: ` +
        `this browser keeps its key for ${user.user_id}; log in to try again`;
    }
  }
  if (session.user) return; // signed in again meanwhile: the note is stale
  if (badge) showConnection("signed-out", badge);
  note.textContent = text;
  note.dataset.code = String(code);
  note.dataset.by = byPage ? "page" : "server";
}

// What the key log says of this browser's key after a 4003 close:
// "revoked" (the log checks and holds a revoke of it), "deleted" (the user
// is unknown), or else why neither is shown (the key is kept).
async function keyFate(user) {
  const mine = await keyIdOf(user);
  try {
    const state = await fetchLog(user.user_id);
    if (state.entries.some((entry) => entry.action === "revoke" && entry.key_id === mine)) return "revoked";
    return "the key log does not show this browser's key revoked";
  } catch (err) {
    if (err.code === "unknown_user") return "deleted";
    if (err instanceof keylog.KeyLogError) return `the key log does not check (${err.message})`;
    return `the key log could not be fetched (${err.message})`;
  }
}

async function forgetUser(userId) {
  await forgetKey(userId);
  remembered.forget(userId);
  if (localStorage.getItem("wsserver.user") === userId) localStorage.removeItem("wsserver.user");
  $("user-id").value = "";
  $("username").value = "";
}

// -- sign out and delete -----------------------------------------------------------

// The server closes our connection (4004, or 4003 for a deletion) once it
// has done it; should that close not come, the page ends the session itself.
function awaitClose(code, reason) {
  clearTimeout(session.leaveTimer);
  session.leaveTimer = setTimeout(() => {
    if (session.user) ended(code, reason, true);
  }, 10000);
}

async function onSignOut() {
  if (!session.user || session.leaving) return;
  session.leaving = "signout";
  $("signout").disabled = true;
  try {
    const user = session.user;
    await api("POST", "/auth/logout", undefined, session.token);
    if (session.user !== user) return; // the 4004 came first: ended already
    awaitClose(4004, "signed out");
    if (!session.socket) ended(4004, "signed out", true);
  } catch (err) {
    session.leaving = null;
    addNotice({ code: "signout_failed", content: `could not sign out: ${err.message}` });
    if (err.code === "unauthorized") ended(4004, "signed out", true);
  } finally {
    $("signout").disabled = false;
  }
}

async function onDelete() {
  const user = session.user;
  if (!user || session.leaving || $("delete-confirm").value !== user.user_id) return;
  clearDevicesNotes();
  session.leaving = "delete";
  $("delete-account").disabled = true;
  try {
    // As for an approval or a revocation: nothing is signed on top of a log
    // that was rewritten since this browser last saw it.
    const state = await ownLog();
    const signature = await keylog.sign(user.privateKey, keylog.deleteString(user.user_id, state.nextSeq));
    await api("DELETE", `/auth/users/${encodeURIComponent(user.user_id)}`, { key_id: await keyIdOf(user), signature });
    if (session.user !== user) return; // the 4003 came first: ended already
    awaitClose(4003, "account deleted");
    if (!session.socket) ended(4003, "account deleted", true);
  } catch (err) {
    if (session.user !== user) return;
    session.leaving = null;
    showDevicesError(err);
    $("delete-account").disabled = false;
  }
}

// -- devices -----------------------------------------------------------------------

function showDevicesError(error) {
  $("devices-error").textContent = error ? error.message || String(error) : "";
  if (error) $("devices-note").textContent = "";
}

function clearDevicesNotes() {
  $("devices-error").textContent = "";
  $("devices-note").textContent = "";
}

// The Devices view as a new session finds it: no note, no pairing under review.
function resetDevicesView() {
  clearDevicesNotes();
  pairing = null;
  $("pair-review").hidden = true;
  $("pair-input").value = "";
  $("pair-name").value = "";
  $("device-list").replaceChildren();
}

function showDevicesNote(text) {
  $("devices-note").textContent = text;
  $("devices-error").textContent = "";
}

// Our own key log, checked; what it adds since this browser last saw it is
// noticed as for any peer.
async function ownLog() {
  const userId = session.user.user_id;
  peerLogs.delete(userId);
  const log = await peerLog(userId);
  if (log.trust === "unknown") throw new Error(`the key log cannot be fetched: ${log.why}`);
  if (log.trust !== "ok") throw new Error(`your key log ${log.trust === "rewritten" ? "was rewritten" : "does not check"}: ${log.why}`);
  return log.state;
}

let devicesShown = 0; // the latest rendering of the list wins

async function showDevices() {
  const list = $("device-list");
  const user = session.user;
  const turn = ++devicesShown;
  list.replaceChildren(); // never a stale list while the log is fetched
  let state;
  try {
    state = await ownLog();
  } catch (err) {
    showDevicesError(err);
    return;
  }
  if (session.user !== user || turn !== devicesShown) return;
  const mine = await keyIdOf(user);
  const items = [];
  const keys = [...state.active.values()].sort((a, b) => (a.key_id === mine ? -1 : b.key_id === mine ? 1 : 0));
  for (const key of keys) {
    const item = element("li", "device");
    item.dataset.keyId = key.key_id;
    // This browser's row: its name when the approving device gave one, and
    // the tag "this browser" (once) beside it; any other: a name or "unnamed device".
    if (key.key_id === mine) {
      item.dataset.this = "true";
      if (key.name) item.append(element("span", "name", key.name));
      item.append(element("span", "this", "this browser"));
    } else {
      item.append(element("span", "name", key.name || "unnamed device"));
    }
    item.append(element("code", "key-id", key.key_id));
    item.append(element("span", "added", key.at ? `added ${new Date(key.at).toLocaleString()}` : ""));
    if (key.key_id !== mine) item.append(revokeButton(key));
    items.push(item);
  }
  list.replaceChildren(...items);
}

// Revoke asks first: the button turns into "Revoke NAME? Yes / No".
function revokeButton(key) {
  const box = element("span", "revoke");
  const ask = element("button", "plain", "Revoke");
  ask.type = "button";
  ask.addEventListener("click", () => {
    clearDevicesNotes(); // a new action: the last one's note is no longer news
    // The name is the approving device's label, signed by no one: the
    // key_id beside it is what identifies the key.
    const yes = element("button", "danger", key.name ? `Yes, revoke ${key.name} (${key.key_id})` : `Yes, revoke ${key.key_id}`);
    const no = element("button", "plain", "No");
    yes.type = no.type = "button";
    yes.classList.add("confirm-revoke");
    no.addEventListener("click", () => box.replaceChildren(ask));
    yes.addEventListener("click", async () => {
      clearDevicesNotes();
      yes.disabled = no.disabled = true;
      try {
        await revoke(key);
        showDevicesNote(`revoked ${key.name || key.key_id}: that device is cut off`);
      } catch (err) {
        showDevicesError(err);
      }
      showDevices();
    });
    box.replaceChildren(yes, no);
  });
  box.append(ask);
  return box;
}

async function revoke(key) {
  const user = session.user;
  const state = await ownLog();
  if (!state.active.has(key.key_id)) throw new Error(`${key.key_id} is no longer an active key`);
  const string = keylog.entryString(user.user_id, state.nextSeq, "revoke", key.public_key, state.head);
  await appendEntry({
    seq: state.nextSeq,
    action: "revoke",
    public_key: key.public_key,
    name: null,
    by: await keyIdOf(user),
    signature: await keylog.sign(user.privateKey, string),
    key_signature: null,
  });
}

async function appendEntry(body) {
  const userId = session.user.user_id;
  const entry = await api("POST", logPath(userId), body);
  // Remember the log with our own entry, so it brings no notice; anything
  // else appended meanwhile is left for the next look to notice.
  const before = remembered.get(userId);
  if (before && before.heads.length === body.seq) {
    const state = await fetchLog(userId).catch(() => null);
    if (state && state.nextSeq === body.seq + 1 && keylog.compareHeads(before.heads, state.heads) === "extended") {
      remembered.set(userId, state.heads);
    }
  }
  peerLogs.delete(userId);
  return entry;
}

let pairing = null; // the pairing text under review: {userId, seq, publicKey, keySignature, keyId}

async function onPairCheck() {
  pairing = null;
  $("pair-review").hidden = true;
  clearDevicesNotes();
  const user = session.user;
  try {
    const pair = keylog.parsePairingText($("pair-input").value);
    if (pair.userId !== user.user_id) {
      throw new Error(`this pairing text is for ${pair.userId}, not ${user.user_id}: approve it from a device of ${pair.userId}`);
    }
    const state = await ownLog();
    if (pair.seq !== state.nextSeq) {
      throw new Error("the key log changed since this pairing text was made: make a new one on the new device");
    }
    if (!keylog.validPoint(fromBase64(pair.publicKey))) {
      throw new Error("the pairing text's key is not a valid Ed25519 public key: make a new one on the new device");
    }
    const string = keylog.entryString(user.user_id, pair.seq, "add", pair.publicKey, state.head);
    if (!(await keylog.signatureOk(pair.publicKey, string, pair.keySignature))) {
      throw new Error("the pairing text's signature does not match (a character changed?): copy it again");
    }
    pair.keyId = await keylog.keyId(fromBase64(pair.publicKey));
    if (state.every.has(pair.keyId)) throw new Error(`the key ${pair.keyId} is already in your key log`);
    pairing = pair;
    $("pair-key-id").textContent = pair.keyId;
    $("pair-name").value = "";
    $("pair-review").hidden = false;
    $("pair-name").focus();
  } catch (err) {
    showDevicesError(err);
  }
}

async function onPairApprove() {
  const pair = pairing;
  if (!pair) return;
  const user = session.user;
  clearDevicesNotes();
  $("pair-approve").disabled = true;
  try {
    const state = await ownLog();
    if (pair.seq !== state.nextSeq) {
      throw new Error("the key log changed since this pairing text was made: make a new one on the new device");
    }
    const string = keylog.entryString(user.user_id, pair.seq, "add", pair.publicKey, state.head);
    const name = $("pair-name").value.trim() || null;
    await appendEntry({
      seq: pair.seq,
      action: "add",
      public_key: pair.publicKey,
      name,
      by: await keyIdOf(user),
      signature: await keylog.sign(user.privateKey, string),
      key_signature: pair.keySignature,
    });
    pairing = null;
    $("pair-review").hidden = true;
    $("pair-input").value = "";
    showDevicesNote(`approved ${name || "the new device"} (${pair.keyId}): it can sign in now`);
    showDevices();
  } catch (err) {
    showDevicesError(err);
  } finally {
    $("pair-approve").disabled = false;
  }
}

function onPairCancel() {
  pairing = null;
  $("pair-review").hidden = true;
}

// -- linking this browser to an account whose key lives elsewhere -----------------------

const linking = { userId: null, timer: null, pair: null, user: null };

async function onLink() {
  const userId = $("user-id").value.trim();
  if (!USER_ID.test(userId)) throw new Error("a user id is 1 to 64 of A-Z a-z 0-9 _ . -");
  let state;
  try {
    state = await fetchLog(userId);
  } catch (err) {
    if (err.code === "unknown_user" || err.code === "http_404") throw new Error(`${userId} is not registered: register it`);
    if (err instanceof keylog.KeyLogError) throw new Error(`${userId}'s key log does not check (${err.message}): do not link to it`);
    throw err;
  }
  // What this browser remembers of the log (it was used here before, or
  // showed as a peer): a log that no longer starts with it was rewritten,
  // and a pairing text made on top of it would approve that.
  const before = remembered.get(userId);
  if (before && keylog.compareHeads(before.heads, state.heads) === "rewritten") {
    throw new Error(
      `${userId}'s key log was REWRITTEN since this browser last saw it (an entry seen before changed or vanished): ` +
        "not linking; compare key ids on a device of yours before trusting it",
    );
  }
  const kept = await loadKey(userId);
  if (kept) {
    if (state.active.has(await keyIdOf(kept))) throw new Error(`this browser already has a key for ${userId}: log in`);
    await forgetKey(userId); // a key revoked since: useless, make a new one
  }
  const pair = await newKeyPair();
  const publicKey = toBase64(await crypto.subtle.exportKey("raw", pair.publicKey));
  const string = keylog.entryString(userId, state.nextSeq, "add", publicKey, state.head);
  const keySignature = await keylog.sign(pair.privateKey, string);
  const user = { user_id: userId, privateKey: pair.privateKey, public_key: publicKey };
  await keyIdOf(user);
  cancelLink();
  Object.assign(linking, { userId, user });
  // First sight: remembered now.  A log that grew since this browser last
  // saw it stays as remembered, so those changes are still noticed.
  if (!before) remembered.set(userId, state.heads);
  $("pair-text").value = keylog.pairingText(userId, state.nextSeq, publicKey, keySignature);
  $("link-user").textContent = userId;
  $("link-user-2").textContent = userId;
  $("link-key-id").textContent = user.key_id;
  linkState("waiting", "waiting for approval on another device (checking every 2 s)…");
  $("signin-note").textContent = "";
  $("linking").hidden = false;
  $("linking").scrollIntoView({ block: "nearest" });
  linking.timer = setTimeout(pollLink, LINK_POLL_MS);
}

function linkState(state, text) {
  $("link-state").dataset.state = state;
  $("link-state").textContent = text;
}

async function pollLink() {
  const { user } = linking;
  if (!user) return;
  let active = false;
  try {
    const info = await api("GET", `/auth/users/${encodeURIComponent(user.user_id)}`);
    active = Array.isArray(info.keys) && info.keys.some((key) => key.key_id === user.key_id);
    if (active) {
      // Approved: check the whole log holds it before trusting it.
      const state = await fetchLog(user.user_id);
      if (!state.active.has(user.key_id)) throw new Error("the key log does not hold this browser's key");
      // Our own addition brings no notice: remember the log only when it is
      // what this browser remembers plus this browser's entry.  Any other
      // change (an entry that changed or vanished, another device added
      // meanwhile) is left for the next look to notice (or warn about).
      const before = remembered.get(user.user_id);
      const last = state.entries[state.entries.length - 1];
      if (
        before &&
        state.heads.length === before.heads.length + 1 &&
        keylog.compareHeads(before.heads, state.heads) === "extended" &&
        last.action === "add" &&
        last.key_id === user.key_id
      ) {
        remembered.set(user.user_id, state.heads);
      }
    }
  } catch (err) {
    if (linking.user !== user) return;
    linkState("waiting", `waiting for approval (last check: ${err.message}; checking again)…`);
    active = false;
  }
  if (linking.user !== user) return; // cancelled meanwhile
  if (!active) {
    linking.timer = setTimeout(pollLink, LINK_POLL_MS);
    return;
  }
  linkState("approved", "approved: signing in…");
  linking.user = null;
  try {
    await saveKey(user);
    await start(user);
  } catch (err) {
    linkState("failed", `approved, but signing in failed: ${err.message}`);
  }
}

function cancelLink() {
  clearTimeout(linking.timer);
  Object.assign(linking, { userId: null, timer: null, user: null });
  $("linking").hidden = true;
  $("pair-text").value = "";
  $("link-key-id").textContent = "";
  delete $("link-state").dataset.state;
  $("link-state").textContent = "";
}

async function onCopyPair() {
  const text = $("pair-text").value;
  try {
    await navigator.clipboard.writeText(text);
    $("copy-pair").textContent = "Copied";
  } catch (err) {
    $("pair-text").select(); // no clipboard permission: selected, ready for Ctrl-C
    $("copy-pair").textContent = "Selected: press Ctrl-C";
  }
  setTimeout(() => ($("copy-pair").textContent = "Copy"), 2000);
}

async function onRegister() {
  const userId = $("user-id").value.trim();
  const username = $("username").value.trim() || userId;
  if (!USER_ID.test(userId)) throw new Error("a user id is 1 to 64 of A-Z a-z 0-9 _ . -");
  if (await loadKey(userId)) throw new Error(`this browser already has a key for ${userId}: log in`);
  const pair = await newKeyPair();
  const publicKey = toBase64(await crypto.subtle.exportKey("raw", pair.publicKey));
  try {
    await api("POST", "/auth/register", { user_id: userId, username, public_key: publicKey });
  } catch (err) {
    if (err.code === "user_exists") {
      throw new Error(
        `${userId} is already registered elsewhere (another browser, or the command line), ` +
          "and this browser has no key for it: choose another user id here",
      );
    }
    throw err;
  }
  const user = { user_id: userId, privateKey: pair.privateKey, public_key: publicKey };
  await saveKey(user);
  await start(user);
}

async function onLogin() {
  const userId = $("user-id").value.trim();
  if (!USER_ID.test(userId)) throw new Error("a user id is 1 to 64 of A-Z a-z 0-9 _ . -");
  const user = await loadKey(userId);
  if (!user) throw await noKeyHere(userId);
  try {
    await start(user);
  } catch (err) {
    if (err.code !== "invalid_signature") throw err;
    throw new Error(
      `this browser's key for ${userId} is not one of ${userId}'s active keys (revoked from another device?): ` +
        "link this browser again to use it here",
    );
  }
}

// Why this browser cannot log in as userId, which it has no key for: the id
// is registered elsewhere (its key is in another browser or a key file), or
// not registered at all.
async function noKeyHere(userId) {
  try {
    await api("GET", `/auth/users/${encodeURIComponent(userId)}`);
  } catch (err) {
    if (err.code === "unknown_user" || err.code === "http_404") {
      return new Error(`${userId} is not registered: register it`);
    }
    return err;
  }
  return new Error(
    `${userId} is registered elsewhere (another browser, or the command line): ` +
      "its key is not in this browser, so it cannot log in here; register another user id",
  );
}

let signingIn = false; // one registration or login at a time

function guarded(action) {
  return async (event) => {
    event.preventDefault();
    if (signingIn) return;
    signingIn = true;
    showError(null);
    for (const button of document.querySelectorAll("#signin button")) button.disabled = true;
    try {
      await action();
    } catch (err) {
      showError(err);
    } finally {
      signingIn = false;
      for (const button of document.querySelectorAll("#signin button")) button.disabled = false;
    }
  };
}

// Enter in the form: log in when this browser keeps a key for the id, else register.
async function onEnter() {
  const userId = $("user-id").value.trim();
  if (USER_ID.test(userId) && (await loadKey(userId))) await onLogin();
  else await onRegister();
}

$("signin-form").addEventListener("keydown", (event) => {
  // In a field only: Enter on a focused button already clicks it.
  if (event.key === "Enter" && event.target.tagName === "INPUT") guarded(onEnter)(event);
});
$("register").addEventListener("click", guarded(onRegister));
$("login").addEventListener("click", guarded(onLogin));
$("link").addEventListener("click", guarded(onLink));
$("link-cancel").addEventListener("click", cancelLink);
$("copy-pair").addEventListener("click", onCopyPair);
$("show-chat").addEventListener("click", () => showView("chat"));
$("show-devices").addEventListener("click", () => showView("devices"));
$("signout").addEventListener("click", onSignOut);
$("pair-check").addEventListener("click", onPairCheck);
$("pair-approve").addEventListener("click", onPairApprove);
$("pair-cancel").addEventListener("click", onPairCancel);
$("delete-confirm").addEventListener("input", () => {
  $("delete-account").disabled = !session.user || $("delete-confirm").value !== session.user.user_id;
});
$("delete-account").addEventListener("click", onDelete);
$("send-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const to = chat.openId() || $("to").value.trim();
  const text = $("text").value;
  if (!text) return;
  if (!USER_ID.test(to) && !GROUP_ID.test(to)) {
    addNotice({ code: "invalid_recipient", content: "a recipient is a user id, a #group, or broadcast" });
    return;
  }
  $("text").value = "";
  send(to, text);
});
$("user-id").value = localStorage.getItem("wsserver.user") || "";
if (!window.isSecureContext || !crypto.subtle) {
  // Browsers offer WebCrypto only to pages served over TLS, and to localhost.
  showError(new Error("open this page over HTTPS (or on localhost): browsers keep WebCrypto from plain HTTP pages"));
}
chat.init({
  api: authed,
  transmit,
  me: () => session.user?.user_id,
  showHistory,
  opened: () => kept.save(),
});
resume()
  .catch((err) => showError(err))
  .finally(() => (document.body.dataset.ready = "true"));
