"""A client's side of the key log (protocol section 12): checking a peer's
whole log, remembering it, and the notices when it changed.

Pure logic and one small file; no Twisted, no network: the client library
(wsserver/client.py) fetches, this module judges.

- ``check_log`` turns the JSON of ``GET /auth/users/{id}/keylog`` into a
  ``CheckedLog`` after checking every entry (every signature, every ``prev``,
  through ``keylog.apply``), or raises ``KeyLogError``.
- ``SeenLogs`` remembers, per server and user, how far this device has seen
  each log (its length, the digest of its last entry, its active keys), in
  a JSON file of mode 0600 (or in memory only).
- ``compare`` says what changed since then: ``rewritten`` (what was seen is
  no longer the start of the log), or ``devices_changed`` (keys added or
  revoked since).  ``invalid`` (a log that does not check) and
  ``unknown_key`` (a message signed by a key the log does not hold) are made
  by the client, with the same ``KeyLogNotice`` shape.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from dataclasses import dataclass, field, replace

from nacl.signing import SigningKey

from . import keylog
from .keylog import Entry, KeyLogError, LogState, Pairing
from .messages import b64decode, b64encode

MAX_ENTRIES = 10_000  # a log longer than this is refused as invalid (each is a verify)
MAX_SEEN_BYTES = 8 << 20  # the remembered-logs file is small; refuse a huge one
SEEN_VERSION = 1

# Notice kinds.
REWRITTEN = "rewritten"  # what was seen before is not the start of the log now
INVALID = "invalid"  # the log does not check
UNKNOWN_KEY = "unknown_key"  # a message signed by a key the log does not hold
DEVICES_CHANGED = "devices_changed"  # keys added or revoked since last seen (milder)
SERIOUS = frozenset({REWRITTEN, INVALID, UNKNOWN_KEY})


@dataclass(frozen=True, slots=True)
class CheckedLog:
    """A user's key log that checked, entry by entry.

    ``heads[i]`` is the digest a next entry would hold as ``prev`` after the
    first ``i + 1`` entries (so ``heads[-1] == state.head``); ``at`` maps a
    ``seq`` to the time the server says it appended it."""

    user_id: str
    entries: tuple[Entry, ...]
    state: LogState
    heads: tuple[str, ...]
    at: dict[int, str | None]

    @property
    def next_seq(self) -> int:
        return self.state.next_seq

    def key(self, key_id: str) -> bytes | None:
        """The public key of ``key_id`` if the log ever added it (revoked keys
        included: old messages stay checkable), else None."""
        return self.state.every.get(key_id)

    def added_at(self, key_id: str) -> str | None:
        """When the entry that added ``key_id`` was appended."""
        for entry in self.entries:
            if entry.action != keylog.REVOKE and entry.key_id == key_id:
                return self.at.get(entry.seq)
        return None


def check_log(user_id: str, data: object) -> CheckedLog:
    """Check a whole key log as the server sent it (``{"user_id", "entries"}``);
    ``KeyLogError`` (``code`` and a human ``message``) if it does not hold:
    an ill-formed entry, a bad signature, a broken ``prev`` chain, a ``seq``
    out of order, a shown ``key_id`` that is not the key's (null included;
    an entry may leave it out), or the log of another user.  A device
    ``name`` is not signed and never makes a log fail: a string is kept as
    is (cut to 64 characters; print it through a safe() of your own), any
    other value counts as no name."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise KeyLogError("invalid_request", "the answer is not a key log")
    if data.get("user_id") != user_id:
        raise KeyLogError("invalid_request", "the answer is the key log of another user")
    raw_entries = data["entries"]
    if len(raw_entries) > MAX_ENTRIES:
        raise KeyLogError("invalid_request", f"more than {MAX_ENTRIES} entries")
    state = LogState()
    entries: list[Entry] = []
    heads: list[str] = []
    at: dict[int, str | None] = {}
    for raw in raw_entries:
        if not isinstance(raw, dict):
            raise KeyLogError("invalid_request", "an entry must be a JSON object")
        # The name is not signed: any string is kept as a label (shown made
        # safe by whoever prints it), anything else is no name; neither makes
        # the log fail, as in the web page (the server refuses such names).
        entry = keylog.entry_from_json({**raw, "name": None})
        entry = replace(entry, name=_label(raw.get("name")))
        if "key_id" in raw and raw["key_id"] != entry.key_id:
            raise KeyLogError(
                "invalid_request", f"entry {entry.seq} shows a key_id that is not its key's"
            )
        if entry.seq == 0 and (entry.by or entry.signature or entry.key_signature):
            raise KeyLogError("invalid_request", "entry 0 carries signatures it cannot have")
        keylog.apply(state, user_id, entry)
        entries.append(entry)
        heads.append(state.head)
        stamp = raw.get("at")
        at[entry.seq] = stamp if isinstance(stamp, str) else None
    if not entries:
        raise KeyLogError("invalid_request", "a key log starts with its registration")
    return CheckedLog(user_id, tuple(entries), state, tuple(heads), at)


def _label(name: object) -> str | None:
    """A device name as a log shows it: a string (cut to ``keylog.MAX_NAME``
    characters), else None."""
    if not isinstance(name, str) or not name:
        return None
    return name if len(name) <= keylog.MAX_NAME else name[: keylog.MAX_NAME - 1] + "\u2026"


@dataclass(frozen=True, slots=True)
class Seen:
    """How far this device has seen a user's key log."""

    count: int  # entries seen
    head: str  # heads[count - 1] then
    active: tuple[str, ...]  # active key_ids then
    names: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def of(cls, log: CheckedLog) -> Seen:
        return cls(
            len(log.entries),
            log.heads[-1],
            tuple(log.state.active),
            {k: log.state.names.get(k) for k in log.state.active},
        )

    def to_json(self) -> dict:
        return {
            "count": self.count,
            "head": self.head,
            "active": list(self.active),
            "names": self.names,
        }

    @classmethod
    def from_json(cls, obj: object) -> Seen:
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        count, head, active = obj.get("count"), obj.get("head"), obj.get("active")
        names = obj.get("names") or {}
        if (
            not isinstance(count, int)
            or count < 1
            or not isinstance(head, str)
            or not isinstance(active, list)
            or not all(isinstance(k, str) for k in active)
            or not isinstance(names, dict)
        ):
            raise ValueError("ill-formed")
        return cls(count, head, tuple(active), dict(names))


@dataclass(frozen=True, slots=True)
class KeyLogNotice:
    """Something a person should know about a user's key log.

    ``kind`` is REWRITTEN, INVALID, UNKNOWN_KEY (serious: like a changed
    safety number, check with the person) or DEVICES_CHANGED (milder: they
    added or removed a device).  ``text`` is one human line (with the ids of
    others in it as they are: make it safe before printing)."""

    kind: str
    user_id: str
    text: str
    added: tuple[str, ...] = ()
    revoked: tuple[str, ...] = ()

    @property
    def serious(self) -> bool:
        return self.kind in SERIOUS


def compare(seen: Seen | None, log: CheckedLog) -> KeyLogNotice | None:
    """What changed in ``log`` since ``seen`` (None: never seen, nothing to say)."""
    if seen is None:
        return None
    user = log.user_id
    if len(log.entries) < seen.count or log.heads[seen.count - 1] != seen.head:
        return KeyLogNotice(
            REWRITTEN,
            user,
            f"{user}'s key log was rewritten since you last saw it (entries changed or "
            f"removed): the server may be passing off a key {user} never approved; "
            f"check with {user} another way before trusting their messages",
        )
    added = tuple(k for k in log.state.active if k not in seen.active)
    revoked = tuple(k for k in seen.active if k not in log.state.active)
    if not added and not revoked:
        return None
    parts = []
    if added:
        parts.append(
            "added " + ", ".join(f"{k} ({log.state.names.get(k) or 'no name'})" for k in added)
        )
    if revoked:
        parts.append(
            "revoked " + ", ".join(f"{k} ({seen.names.get(k) or 'no name'})" for k in revoked)
        )
    return KeyLogNotice(
        DEVICES_CHANGED,
        user,
        f"{user}'s devices changed since you last saw them: {'; '.join(parts)}",
        added,
        revoked,
    )


def invalid_notice(user_id: str, err: KeyLogError) -> KeyLogNotice:
    return KeyLogNotice(
        INVALID,
        user_id,
        f"{user_id}'s key log does not check ({err.code}: {err.message}): "
        f"messages from {user_id} cannot be verified",
    )


def unknown_key_notice(user_id: str, key_id: str, msg_id: object) -> KeyLogNotice:
    return KeyLogNotice(
        UNKNOWN_KEY,
        user_id,
        f"message #{msg_id} from {user_id} is signed with key {key_id}, which "
        f"{user_id}'s key log does not hold: not verified",
    )


def directory_notices(log: CheckedLog, record: object) -> list[KeyLogNotice]:
    """What the key directory (``GET /auth/users/{id}``: ``public_key`` and
    ``keys``) shows that the checked log does not back: a key listed as
    active that the log does not hold as active (one UNKNOWN_KEY notice
    each)."""
    if not isinstance(record, dict):
        return []
    shown: list[str] = []
    if isinstance(record.get("public_key"), str):
        shown.append(record["public_key"])
    for item in record.get("keys") or ():
        if isinstance(item, dict) and isinstance(item.get("public_key"), str):
            shown.append(item["public_key"])
    active = {b64encode(raw) for raw in log.state.active.values()}
    notices = []
    for b64 in dict.fromkeys(shown):
        if b64 in active:
            continue
        try:
            kid = keylog.key_id(b64decode(b64))
        except ValueError:
            kid = "(not a key)"
        user = log.user_id
        notices.append(
            KeyLogNotice(
                UNKNOWN_KEY,
                user,
                f"the key directory lists key {kid} for {user}, which {user}'s key log "
                f"does not hold as active: it is not trusted",
            )
        )
    return notices


class SeenLogs:
    """What this device has seen of each user's key log, per server.

    With a ``path``, kept in that JSON file (mode 0600, replaced whole on
    each change so a reader never sees half of it); without one, in memory
    for the life of the object.  ``ValueError`` when the file is not one of
    ours.

    Several runs of the client may share the file (a long ``listen`` and a
    ``send`` meanwhile): each change takes an exclusive ``flock`` of a lock
    file beside it (``PATH.lock``), reads the file again, changes only its
    one (server, user) entry, and replaces the file (written and fsynced
    first), so no run undoes what another remembered."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.save_error: OSError | None = None  # the file could not be written
        self._data: dict[str, dict[str, Seen]] = {}
        if path is not None:
            self._load(path)

    def _load(self, path: str) -> None:
        self._data = self._read(path)

    @staticmethod
    def _read(path: str) -> dict[str, dict[str, Seen]]:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_SEEN_BYTES + 1)
        except FileNotFoundError:
            return {}
        bad = ValueError(
            f"{path} is not a file of key logs seen by wsserver-client (delete it to start over)"
        )
        if len(raw) > MAX_SEEN_BYTES:
            raise bad
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict) or obj.get("version") != SEEN_VERSION:
                raise ValueError
            servers = obj["servers"]
            return {
                server: {user: Seen.from_json(s) for user, s in users.items()}
                for server, users in servers.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError):
            raise bad from None

    def get(self, server: str, user_id: str) -> Seen | None:
        return self._data.get(server, {}).get(user_id)

    def put(self, server: str, user_id: str, seen: Seen) -> None:
        if self.get(server, user_id) == seen:
            return
        self._data.setdefault(server, {})[user_id] = seen
        if self.path is not None and self.save_error is None:
            try:
                self._merge(self.path, server, user_id, seen)
            except OSError as exc:
                # Kept in memory for this run; the caller may say so once.
                self.save_error = exc

    def _merge(self, path: str, server: str, user_id: str, seen: Seen) -> None:
        """Under the lock, write the file as it is now with this one entry
        changed; what other runs remembered meanwhile is kept (and now known
        here too)."""
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                data = self._read(path)
            except ValueError as exc:  # not ours any more: leave it alone
                raise OSError(str(exc)) from None
            data.setdefault(server, {})[user_id] = seen
            self._data = data
            self._save(path)
        finally:
            os.close(fd)  # releases the lock

    def _save(self, path: str) -> None:
        obj = {
            "version": SEEN_VERSION,
            "servers": {
                server: {user: s.to_json() for user, s in users.items()}
                for server, users in self._data.items()
            },
        }
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".keylogs-", dir=folder)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def seen_path(key_path: str) -> str:
    """Where the CLI keeps the key logs a device has seen: beside its key file."""
    return key_path + ".keylogs.json"


# -- building entries ------------------------------------------------------------


def sign(key: SigningKey, string: str) -> bytes:
    return key.sign(string.encode("utf-8")).signature


def own_key_id(key: SigningKey) -> str:
    return keylog.key_id(bytes(key.verify_key))


def pairing_for(log: CheckedLog, new_key: SigningKey) -> Pairing:
    """The new device's half (common decision 6): its key and its signature of
    the ``add`` entry at the log's next ``seq``, bound to the log's head."""
    public = bytes(new_key.verify_key)
    string = keylog.entry_string(log.user_id, log.next_seq, keylog.ADD, public, log.state.head)
    return Pairing(log.user_id, log.next_seq, public, sign(new_key, string))


class PairingProblem(Exception):
    """A pairing text that cannot be approved here, with the reason for people."""


def approve_body(log: CheckedLog, pairing: Pairing, key: SigningKey, name: str | None) -> dict:
    """The approving device's half: check ``pairing`` against the log as it
    stands (same user, ``seq`` still next, the new key's signature good, the
    key new, this device's key active) and return the POST body of the
    ``add`` entry signed by ``key``."""
    if pairing.user_id != log.user_id:
        raise PairingProblem(f"this pairing text is for {pairing.user_id}, not for {log.user_id}")
    if pairing.seq != log.next_seq:
        raise PairingProblem(
            "the key log changed since this pairing text was made: make a new one on the new device"
        )
    me = own_key_id(key)
    if me not in log.state.active:
        raise PairingProblem(f"this device's key {me} is not an active key of {log.user_id}")
    new_id = keylog.key_id(pairing.public_key)
    if new_id in log.state.every:
        raise PairingProblem(f"the key {new_id} is already in {log.user_id}'s key log")
    string = keylog.entry_string(
        log.user_id, pairing.seq, keylog.ADD, pairing.public_key, log.state.head
    )
    if not keylog.signature_ok(pairing.public_key, string, pairing.key_signature):
        raise PairingProblem(
            "the pairing text's signature does not match (mistyped, or not made for this log)"
        )
    return {
        "seq": pairing.seq,
        "action": keylog.ADD,
        "public_key": b64encode(pairing.public_key),
        "name": keylog.normalize_name(name),
        "by": me,
        "signature": b64encode(sign(key, string)),
        "key_signature": b64encode(pairing.key_signature),
    }


def revoke_body(log: CheckedLog, key_id: str, key: SigningKey) -> dict:
    """The POST body of a ``revoke`` entry for ``key_id``, signed by ``key``."""
    target = log.state.active.get(key_id)
    if target is None:
        if key_id in log.state.every:
            raise PairingProblem(f"{key_id} is already revoked")
        raise PairingProblem(f"{key_id} is not one of {log.user_id}'s keys")
    me = own_key_id(key)
    if me not in log.state.active:
        raise PairingProblem(f"this device's key {me} is not an active key of {log.user_id}")
    if len(log.state.active) == 1:
        raise PairingProblem("the last active key cannot be revoked: delete the account instead")
    string = keylog.entry_string(log.user_id, log.next_seq, keylog.REVOKE, target, log.state.head)
    return {
        "seq": log.next_seq,
        "action": keylog.REVOKE,
        "public_key": b64encode(target),
        "name": None,
        "by": me,
        "signature": b64encode(sign(key, string)),
        "key_signature": None,
    }


def delete_body(log: CheckedLog, key: SigningKey) -> dict:
    """The body of ``DELETE /auth/users/{id}``: this key's signature over the
    deletion statement at the log's next ``seq``."""
    string = keylog.delete_string(log.user_id, log.next_seq)
    return {"key_id": own_key_id(key), "signature": b64encode(sign(key, string))}


__all__ = [
    "DEVICES_CHANGED",
    "INVALID",
    "REWRITTEN",
    "UNKNOWN_KEY",
    "CheckedLog",
    "KeyLogNotice",
    "PairingProblem",
    "Seen",
    "SeenLogs",
    "approve_body",
    "check_log",
    "compare",
    "delete_body",
    "directory_notices",
    "invalid_notice",
    "own_key_id",
    "pairing_for",
    "revoke_body",
    "seen_path",
    "unknown_key_notice",
]
