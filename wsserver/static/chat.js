// The conversations of the web client: the sidebar (direct conversations,
// groups and broadcast, newest first, with display names, unread counts and
// online dots), the open conversation's header, its history paged from
// GET /messages, group creation and additions, read receipts and presence.
//
// app.js owns the connection and the message items; it hands this module what
// it needs in init() (an authenticated fetch, a way to send a frame, and one
// to show history frames), so imports point one way: app.js -> chat.js.

import { shownName } from "./keylog.js";

const USER_ID = /^[A-Za-z0-9_.-]{1,64}$/;
const GROUP_ID = /^#[A-Za-z0-9_.-]{1,64}$/;
const PAGE = 30; // messages per history page
const MAX_WATCH = 256; // the server's limit on a watch list
// Receipts go out one at a time, this far apart: each costs a token of the
// user's rate limit (5 a second by default, shared with their messages).
const READ_GAP_MS = 300;
const MAX_QUEUED_READS = 500; // receipts waiting to go out, at most
const REFUSAL_WINDOW_MS = 5000; // a refusal refers to a frame sent this recently
const $ = (id) => document.getElementById(id);

let env = null; // {api, transmit, me, showHistory}

const state = {
  open: null, // the conversation shown, or null: "All messages"
  convs: new Map(), // id -> {id, order, unread: [ids], loaded, more, oldest, loading}
  names: new Map(), // user id -> display name (a string) once known
  asked: new Set(), // user ids whose name was asked for
  groups: new Map(), // group id -> {group_id, name, owner, members}
  left: new Set(), // groups this user was removed from (or left) while here
  online: new Map(), // user id -> true/false, from presence frames
  watching: "", // the list last sent in a watch frame
  reads: [], // ids waiting to be reported read, in order
  readTimer: null, // the next read's turn
  readGap: READ_GAP_MS, // longer once the server refused one
  lastSent: null, // the last read or watch sent, {kind, id, at}, in case it is refused
  counter: 0, // orders conversations that have no message yet
};

export function init(hooks) {
  env = hooks;
  $("open-form").addEventListener("submit", onOpenForm);
  $("new-group").addEventListener("click", () => toggleGroupForm(true));
  $("group-cancel").addEventListener("click", () => toggleGroupForm(false));
  $("group-form").addEventListener("submit", onCreateGroup);
  $("add-form").addEventListener("submit", onAddMember);
  $("earlier").addEventListener("click", () => loadEarlier(state.open));
  $("back").addEventListener("click", () => ($("chat").dataset.view = "list"));
  $("log").addEventListener("scroll", () => {
    if ($("log").scrollTop === 0 && state.open && !$("earlier").hidden) loadEarlier(state.open);
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") markShownRead();
  });
}

// -- conversations -----------------------------------------------------------------

// The conversation a message belongs to, for the user signed in.
export function convOf(frame) {
  if (frame.to === "broadcast") return "broadcast";
  if (typeof frame.to === "string" && frame.to.startsWith("#")) return frame.to;
  return frame.from === env.me() ? frame.to : frame.from;
}

function conv(id) {
  let entry = state.convs.get(id);
  if (!entry) {
    entry = { id, order: 0, unread: [], loaded: false, more: false, oldest: null, loading: null };
    state.convs.set(id, entry);
    if (id.startsWith("#")) {
      if (!state.groups.has(id)) fetchGroup(id);
    } else if (id !== "broadcast") {
      askName(id);
    }
  }
  return entry;
}

// Back to nobody signed in.
export function reset() {
  Object.assign(state, {
    open: null,
    convs: new Map(),
    groups: new Map(),
    left: new Set(),
    online: new Map(),
    watching: "",
    reads: [],
    readGap: READ_GAP_MS,
    lastSent: null,
    counter: 0,
  });
  clearTimeout(state.readTimer);
  state.readTimer = null;
  $("convs").replaceChildren();
  $("side-error").textContent = "";
  toggleGroupForm(false);
  showHeader();
}

// After signing in: the conversation list and the groups from the server,
// then the conversation kept from before a reload (or "All messages").
export async function load(openId) {
  try {
    const [{ conversations }, { groups }] = await Promise.all([
      env.api("GET", "/conversations"),
      env.api("GET", "/groups"),
    ]);
    for (const group of groups) state.groups.set(group.group_id, group);
    for (const item of conversations) conv(item.with).order = Math.max(conv(item.with).order, item.last_id);
    for (const group of groups) conv(group.group_id); // a group with no message yet is listed too
  } catch (err) {
    sideError(`could not load the conversations: ${err.message}`);
  }
  render();
  watch();
  if (openId && (state.convs.has(openId) || validId(openId))) open(openId);
  else open(null);
}

function validId(id) {
  return id === "broadcast" || USER_ID.test(id) || GROUP_ID.test(id);
}

// Is a message of conversation id on screen now?
export function shown(id) {
  return state.open === null || state.open === id;
}

export function openId() {
  return state.open;
}

// Show one conversation (null: all of them), loading its history once.
export function open(id) {
  state.open = id;
  const chat = $("chat");
  chat.dataset.view = "pane";
  if (id === null) delete chat.dataset.open;
  else chat.dataset.open = id;
  for (const item of $("log").children) item.hidden = !(item.dataset.conv === undefined || shown(item.dataset.conv));
  if (id !== null) {
    conv(id);
    $("to").value = id;
  }
  env.opened(id);
  showHeader();
  render();
  watch(); // a conversation opened before its first message: its peer too
  const log = $("log");
  log.scrollTop = log.scrollHeight;
  if (id !== null && !state.convs.get(id).loaded) loadEarlier(id);
  markShownRead();
}

// A page of older messages of conversation id, from GET /messages.
async function loadEarlier(id) {
  const entry = state.convs.get(id);
  if (!entry || entry.loading) return;
  if (entry.loaded && !entry.more) return;
  const query = new URLSearchParams({ with: id, limit: String(PAGE) });
  if (entry.oldest !== null) query.set("before", String(entry.oldest));
  entry.loading = (async () => {
    try {
      const { messages, more } = await env.api("GET", `/messages?${query}`);
      entry.loaded = true;
      entry.more = Boolean(more);
      for (const frame of messages) entry.oldest = entry.oldest === null ? frame.id : Math.min(entry.oldest, frame.id);
      if (messages.length) entry.order = Math.max(entry.order, messages[0].id);
      env.showHistory(messages);
    } catch (err) {
      sideError(`could not load the history of ${id}: ${err.message}`);
    } finally {
      entry.loading = null;
      if (state.open === id) showHeader();
      render(); // its place in the list may have changed
    }
  })();
  return entry.loading;
}

// A message arrived (live or replayed) or was sent: its conversation moves
// to the top; one received while not on screen counts as unread, one shown
// is reported read.
export function noteMessage(frame, incoming) {
  const id = convOf(frame);
  const entry = conv(id);
  // The server decides whom we may see online when it reads a watch frame:
  // a conversation's first message lets us see its peer from the next one.
  if (entry.order === 0) state.watching = "";
  // Under contacts a peer may be watched once they wrote to us: their first
  // message here (this page's) makes the page watch again.
  if (incoming && frame.from !== env.me() && !entry.heard) {
    entry.heard = true;
    state.watching = "";
  }
  if (typeof frame.id === "number") entry.order = Math.max(entry.order, frame.id);
  else entry.order = Math.max(entry.order, ++state.counter + topOrder());
  if (incoming && frame.from !== env.me() && typeof frame.id === "number") {
    if (shown(id) && document.visibilityState === "visible") sendRead(frame.id);
    else if (!entry.unread.includes(frame.id)) entry.unread.push(frame.id);
  }
  render();
  watch();
}

// A history page: the others' messages it says we never reported read
// ("read": false) are reported now if on screen, else counted unread: a
// direct message to us that was delivered (to this or another of our
// connections) or a group message.  Not broadcasts: scrolling back through
// them would report every one ever sent, from before we registered too.
// (A group message may still
// be above our delivery point while a reconnect's replay is under way: the
// server refuses that read, and the page drops the refusal without a notice,
// see onSystem in app.js.)
export function noteHistory(frames) {
  for (const frame of frames) {
    if (frame.read !== false || frame.from === env.me() || typeof frame.id !== "number") continue;
    const direct = frame.to === env.me() && frame.status === "delivered";
    if (!direct && !frame.to.startsWith("#")) continue;
    const entry = conv(convOf(frame));
    if (shown(entry.id) && document.visibilityState === "visible") sendRead(frame.id);
    else if (!entry.unread.includes(frame.id)) entry.unread.push(frame.id);
  }
  render();
}

function topOrder() {
  let top = 0;
  for (const entry of state.convs.values()) top = Math.max(top, entry.order);
  return top;
}

// What is on screen now is read: receipts for the unread messages shown.
function markShownRead() {
  if (document.visibilityState !== "visible") return;
  let changed = false;
  for (const entry of state.convs.values()) {
    if (!entry.unread.length || !shown(entry.id)) continue;
    for (const id of entry.unread) sendRead(id);
    entry.unread = [];
    changed = true;
  }
  if (changed) render();
}

function sendRead(id) {
  if (!state.reads.includes(id)) state.reads.push(id);
  // Bounded: past MAX_QUEUED_READS waiting, the oldest are not reported.
  if (state.reads.length > MAX_QUEUED_READS) state.reads.splice(0, state.reads.length - MAX_QUEUED_READS);
  drainReads(0);
}

// The next waiting read goes out when its turn comes (none while offline:
// they wait for the connection).
function drainReads(delay) {
  if (state.readTimer !== null || !state.reads.length) return;
  state.readTimer = setTimeout(() => {
    state.readTimer = null;
    const id = state.reads[0];
    if (id === undefined || !env.transmit({ type: "read", id })) return;
    state.reads.shift();
    state.lastSent = { kind: "read", id, at: Date.now() };
    drainReads(state.readGap);
  }, delay);
}

// The server refused a frame with no nonce for the rate limit: the page's
// messages all have one, so it is our last read or watch (the server
// answers in order, and reads go out far enough apart for the refusal of
// one to come before the next is sent).  It goes out again after the pause
// the server asks for, and later reads go out that far apart.  True when it
// was ours to handle, so the page shows no "message not sent" notice.
export function refused(retryMs) {
  const last = state.lastSent;
  if (!last || Date.now() - last.at > REFUSAL_WINDOW_MS) return false;
  state.lastSent = null;
  const pause = Math.max(Number(retryMs) || 200, READ_GAP_MS);
  state.readGap = Math.max(state.readGap, pause);
  clearTimeout(state.readTimer);
  state.readTimer = null;
  if (last.kind === "read" && !state.reads.includes(last.id)) state.reads.unshift(last.id);
  if (last.kind === "watch") {
    state.watching = "";
    setTimeout(watch, pause);
  }
  drainReads(pause);
  return true;
}

// The connection is (again) open: the watch list and the reads held back go out.
export function connected() {
  state.watching = "";
  watch();
  drainReads(0);
}

// -- presence ----------------------------------------------------------------------

// The users of the sidebar (direct peers and group members) are watched.
// Sent again when that list changes, when a conversation gets its first
// message, and when a group is made, joined or grows (state.watching = "").
function watch() {
  const users = new Set();
  for (const id of state.convs.keys()) if (USER_ID.test(id) && id !== "broadcast") users.add(id);
  for (const group of state.groups.values()) for (const member of group.members) users.add(member);
  users.delete(env.me());
  const list = [...users].sort().slice(0, MAX_WATCH);
  const key = list.join(" ");
  if (key === state.watching) return;
  if (env.transmit({ type: "watch", users: list })) {
    state.watching = key;
    state.lastSent = { kind: "watch", at: Date.now() };
  }
}

export function onPresence(frame) {
  if (typeof frame.user !== "string") return;
  state.online.set(frame.user, frame.online === true);
  for (const dot of document.querySelectorAll(`.dot[data-user="${CSS.escape(frame.user)}"]`)) {
    dot.dataset.online = String(frame.online === true);
    dot.title = frame.online === true ? "online" : "offline";
  }
}

// The connection is lost: nobody is known to be online until the next
// watch answers (the dots go grey rather than claim what is not known).
export function disconnected() {
  state.online.clear();
  for (const node of document.querySelectorAll(".dot[data-user]")) {
    node.dataset.online = "false";
    node.title = "unknown while offline";
  }
}

function dot(userId) {
  const node = document.createElement("span");
  node.className = "dot";
  node.dataset.user = userId;
  const online = state.online.get(userId) === true;
  node.dataset.online = String(online);
  node.title = online ? "online" : "offline";
  return node;
}

// -- display names -------------------------------------------------------------------

// A user's display name from the directory (GET /auth/users/{id}), shown
// through shownName (control and format characters made visible); the id
// until it is known.
export function nameOf(userId) {
  if (userId === "broadcast") return "everyone";
  if (userId.startsWith("#")) {
    const group = state.groups.get(userId);
    return group ? shownName(group.name) : userId;
  }
  askName(userId);
  return state.names.get(userId) || userId;
}

// A span showing a user's (or group's) name, kept up to date.
export function nameSpan(id, className) {
  const node = document.createElement("span");
  if (className) node.className = className;
  node.dataset.nameOf = id;
  node.textContent = nameOf(id);
  node.title = id;
  return node;
}

function askName(userId) {
  if (!USER_ID.test(userId) || state.asked.has(userId)) return;
  state.asked.add(userId);
  env
    .api("GET", `/auth/users/${encodeURIComponent(userId)}`)
    .then((info) => {
      const name = shownName(info.username);
      if (!name) return;
      state.names.set(userId, name);
      renamed(userId);
    })
    .catch(() => state.asked.delete(userId)); // asked again next time
}

function renamed(id) {
  for (const node of document.querySelectorAll(`[data-name-of="${CSS.escape(id)}"]`)) node.textContent = nameOf(id);
  if (state.open === id) showHeader();
}

// -- groups ----------------------------------------------------------------------------

async function fetchGroup(id) {
  try {
    const group = await env.api("GET", `/groups/${encodeURIComponent(id)}`);
    state.groups.set(id, group);
    state.watching = "";
  } catch (err) {
    state.groups.delete(id);
  }
  renamed(id);
  render();
  watch();
}

// A group frame: someone was added or removed; the group is read again.
export function onGroup(frame) {
  if (!GROUP_ID.test(frame.group_id || "")) return;
  const id = frame.group_id;
  if (frame.event === "removed" && frame.user_id === env.me()) {
    state.groups.delete(id);
    state.left.add(id); // its header says so (sending there is refused)
    render();
    if (state.open === id) showHeader();
    return;
  }
  if (!state.convs.has(id)) {
    conv(id).order = ++state.counter + topOrder();
    render();
    return; // conv() fetches it
  }
  fetchGroup(id);
}

function toggleGroupForm(show) {
  $("group-form").hidden = !show;
  $("new-group").hidden = show;
  if (show) $("group-id").focus();
}

async function onCreateGroup(event) {
  event.preventDefault();
  sideError("");
  let id = $("group-id").value.trim();
  if (!id.startsWith("#")) id = `#${id}`;
  const name = $("group-name").value.trim() || id.slice(1);
  const members = $("group-members")
    .value.split(/[\s,]+/)
    .filter((member) => member && member !== env.me());
  if (!GROUP_ID.test(id)) return sideError("a group id is # and 1 to 64 of A-Z a-z 0-9 _ . -");
  const bad = members.find((member) => !USER_ID.test(member));
  if (bad !== undefined) return sideError(`not a user id: ${bad}`);
  $("group-create").disabled = true;
  try {
    const group = await env.api("POST", "/groups", { group_id: id, name, members: [...new Set(members)] });
    state.groups.set(group.group_id, group);
    state.watching = "";
    conv(group.group_id).order = ++state.counter + topOrder();
    for (const field of ["group-id", "group-name", "group-members"]) $(field).value = "";
    toggleGroupForm(false);
    open(group.group_id);
    watch();
  } catch (err) {
    sideError(`could not create the group: ${err.message}`);
  } finally {
    $("group-create").disabled = false;
  }
}

async function onAddMember(event) {
  event.preventDefault();
  const id = state.open;
  const member = $("add-id").value.trim();
  // Shown beside the field: the list (and its error line) is hidden at 420 px.
  const addError = (text) => ($("add-error").textContent = text);
  addError("");
  if (!id || !id.startsWith("#")) return;
  if (!USER_ID.test(member)) return addError("a user id is 1 to 64 of A-Z a-z 0-9 _ . -");
  try {
    const group = await env.api("POST", `/groups/${encodeURIComponent(id)}/members`, { user_id: member });
    state.groups.set(id, group);
    state.watching = "";
    $("add-id").value = "";
    showHeader();
    watch();
  } catch (err) {
    addError(`could not add ${member}: ${err.message}`);
  }
}

// -- the open-a-conversation field --------------------------------------------------------

async function onOpenForm(event) {
  event.preventDefault();
  sideError("");
  const id = $("open-id").value.trim();
  if (!validId(id)) return sideError("open a user id, a #group or broadcast");
  $("open-id").value = "";
  open(id);
}

function sideError(text) {
  $("side-error").textContent = text;
}

// -- rendering -------------------------------------------------------------------------------

function render() {
  const list = $("convs");
  const items = [allItem()];
  const entries = [...state.convs.values()].sort((a, b) => b.order - a.order || (a.id < b.id ? -1 : 1));
  for (const entry of entries) items.push(convItem(entry));
  list.replaceChildren(...items);
}

function allItem() {
  const item = document.createElement("li");
  item.className = "conv all";
  item.dataset.conv = "";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "plain";
  button.append(nameLabel("All messages"));
  button.addEventListener("click", () => open(null));
  if (state.open === null) item.setAttribute("aria-current", "true");
  item.append(button);
  return item;
}

function nameLabel(text) {
  const node = document.createElement("span");
  node.className = "name";
  node.textContent = text;
  return node;
}

function convItem(entry) {
  const item = document.createElement("li");
  item.className = "conv";
  item.dataset.conv = entry.id;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "plain";
  if (USER_ID.test(entry.id) && entry.id !== "broadcast" && entry.id !== env.me()) button.append(dot(entry.id));
  else button.append(badge(entry.id));
  button.append(nameSpan(entry.id, "name"));
  if (entry.unread.length) {
    const count = document.createElement("span");
    count.className = "unread";
    count.textContent = String(entry.unread.length);
    count.title = `${entry.unread.length} unread`;
    button.append(count);
  }
  button.addEventListener("click", () => open(entry.id));
  if (state.open === entry.id) item.setAttribute("aria-current", "true");
  item.append(button);
  return item;
}

function badge(id) {
  const node = document.createElement("span");
  node.className = "kind";
  node.textContent = id === "broadcast" ? "*" : id.startsWith("#") ? "#" : "@";
  return node;
}

function showHeader() {
  const id = state.open;
  const title = $("conv-title");
  const sub = $("conv-sub");
  const members = $("members");
  const group = id && state.groups.get(id);
  title.replaceChildren(id === null ? "All messages" : nameSpan(id));
  if (id !== null && USER_ID.test(id) && id !== "broadcast" && id !== env.me()) title.prepend(dot(id), " ");
  if (id === null) sub.textContent = "every conversation, as it comes";
  else if (id === "broadcast") sub.textContent = "broadcast: to everyone connected";
  else if (state.left.has(id) && !group) sub.textContent = `${id}: you are no longer a member`;
  else sub.textContent = id;
  members.replaceChildren();
  members.hidden = !group;
  // Only the owner may add (the server answers not_owner to anyone else).
  $("add-form").hidden = !group || group.owner !== env.me();
  $("add-error").textContent = "";
  if (group) {
    for (const member of group.members) {
      const item = document.createElement("li");
      if (member !== env.me()) item.append(dot(member));
      item.append(nameSpan(member));
      members.append(item);
    }
  }
  const entry = id && state.convs.get(id);
  $("earlier").hidden = !(entry && entry.loaded && entry.more);
}
