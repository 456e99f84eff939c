// The wsserver web client: plain JavaScript, no build step, no outside URLs.
//
// It follows docs/protocol.md: an Ed25519 key made by WebCrypto (the private
// half non-extractable, kept in IndexedDB), a challenge login, one WebSocket
// with the token in the query (browsers cannot set headers on it), signed
// messages with fresh nonces, and every received signature checked here
// against the sender's key from GET /auth/users/{id}.  After a drop it
// reconnects with since=<last id seen> and resends what was not yet
// acknowledged with its original nonce, so nothing is lost or stored twice.

const USER_ID = /^[A-Za-z0-9_.-]{1,64}$/;
const RETRY_SECONDS = [0.2, 0.5, 1, 2, 5];
const $ = (id) => document.getElementById(id);
const utf8 = new TextEncoder();

// -- base64 and signing input ------------------------------------------------

function toBase64(buffer) {
  let text = "";
  for (const byte of new Uint8Array(buffer)) text += String.fromCharCode(byte);
  return btoa(text);
}

function fromBase64(text) {
  const raw = atob(text); // throws on anything that is not base64
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

function signingInput(from, to, nonce, content) {
  return utf8.encode(`wsserver-msg-v1\n${from}\n${to}\n${nonce || ""}\n${content}`);
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
  // add, not put: a key already kept for this id is never replaced.
  await request((await keyStore("readwrite")).add(record));
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

async function api(method, path, body) {
  const init = { method, headers: {} };
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

const senderKeys = new Map(); // user id -> Promise of a CryptoKey, or null if unknown

function senderKey(userId) {
  if (!senderKeys.has(userId)) {
    const lookup = api("GET", `/auth/users/${encodeURIComponent(userId)}`)
      .then((user) => crypto.subtle.importKey("raw", fromBase64(user.public_key), { name: "Ed25519" }, false, ["verify"]))
      .catch(() => {
        senderKeys.delete(userId); // try again for the next message
        return null;
      });
    senderKeys.set(userId, lookup);
  }
  return senderKeys.get(userId);
}

// true, false, or null when the message is unsigned; "unknown" when the
// sender's key could not be fetched.
async function checkSignature(frame) {
  if (!frame.signature) return null;
  const key = await senderKey(frame.from);
  if (key === null) return "unknown";
  try {
    const data = signingInput(frame.from, frame.to, frame.nonce, frame.content);
    return await crypto.subtle.verify({ name: "Ed25519" }, key, fromBase64(frame.signature), data);
  } catch (err) {
    return false; // not base64, or not 64 bytes
  }
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
};

async function login(user) {
  const { challenge } = await api("POST", "/auth/login", { user_id: user.user_id });
  const signature = await crypto.subtle.sign({ name: "Ed25519" }, user.privateKey, utf8.encode(challenge));
  const { token } = await api("POST", "/auth/login?verify=true", {
    user_id: user.user_id,
    challenge,
    signature: toBase64(signature),
  });
  session.token = token;
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
      if (err.code === "unknown_user" || err.code === "invalid_signature") {
        showConnection("offline", `offline: ${err.message}`);
        return; // this key is no longer registered here: nothing to retry
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
  }
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
      if (item) setStatus(item, frame.status, recipientCount(frame));
      break;
    }
    case "system":
      onSystem(frame);
      break;
  }
}

function onMessage(frame) {
  if (typeof frame.id !== "number" || session.seen.has(frame.id)) return;
  session.seen.add(frame.id);
  session.lastId = Math.max(session.lastId, frame.id);
  rememberPeer(frame.from);
  const item = addMessage(frame, "in");
  const mark = item.querySelector(".mark");
  mark.textContent = "checking…";
  checkSignature(frame).then((verdict) => {
    const [text, state] = {
      true: ["✓ verified", "verified"],
      false: ["✗ INVALID", "invalid"],
      null: ["UNSIGNED", "unsigned"],
      unknown: ["? sender unknown", "unknown"],
    }[String(verdict)];
    mark.textContent = text;
    mark.dataset.state = state;
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
  setStatus(item, frame.status, recipientCount(frame));
}

function recipientCount(frame) {
  return frame.recipients === undefined ? undefined : `${frame.recipients} connections`;
}

function onSystem(frame) {
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
  const item = element("li", `msg ${direction}`);
  if (frame.id) item.dataset.id = frame.id;
  const meta = element("div", "meta");
  const route = frame.to === "broadcast" ? `${frame.from} → everyone` : `${frame.from} → ${frame.to}`;
  meta.append(element("span", "route", route), element("time", "", formatTime(frame.timestamp)));
  meta.append(element("span", direction === "in" ? "mark" : "status"));
  item.append(meta, element("p", "content", frame.content));
  appendToLog(item);
  return item;
}

function addNotice(frame) {
  const last = $("log").lastElementChild;
  if (frame.code === "rate_limited" && last && last.dataset.code === "rate_limited") {
    last.textContent = frame.content; // one notice for a burst, kept up to date
    return;
  }
  const item = element("li", "notice", frame.content);
  item.dataset.code = frame.code;
  appendToLog(item);
}

function appendToLog(item) {
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(item);
  if (atBottom) item.scrollIntoView({ block: "end" });
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

async function start(user) {
  await login(user);
  session.user = user;
  localStorage.setItem("wsserver.user", user.user_id);
  $("signin").hidden = true;
  $("chat").hidden = false;
  $("who").textContent = `signed in as ${user.user_id}`;
  connect();
  $("text").focus();
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
  await start(user);
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
$("send-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const to = $("to").value.trim();
  const text = $("text").value;
  if (!text) return;
  if (!USER_ID.test(to)) {
    addNotice({ code: "invalid_recipient", content: "a recipient is a user id, or broadcast" });
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
document.body.dataset.ready = "true";
