"""The key log (protocol section 12): key ids, the signed strings, and checks.

Pure functions over plain values, shared by the server (which checks every
entry before it appends it) and the client library (which checks a peer's
whole log and remembers it).  No I/O, no Twisted: PyNaCl and hashlib only.

A log is a list of ``Entry`` oldest first.  ``replay`` walks it and returns
the ``LogState`` it leads to (active keys, every key ever added, the next
``seq``, the digest the next entry's ``prev`` must hold), or raises
``KeyLogError`` with the stable code the HTTP API answers for that fault.
"""

from __future__ import annotations

import base64
import hashlib
import unicodedata
from dataclasses import dataclass, field

from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from .messages import b64decode, b64encode, is_user_id

KEYLOG_PREFIX = "wsserver-keylog-v1\n"
DELETE_PREFIX = "wsserver-delete-v1\n"
REGISTER = "register"
ADD = "add"
REVOKE = "revoke"
ACTIONS = frozenset({REGISTER, ADD, REVOKE})
KEY_ID_LENGTH = 16
MAX_NAME = 64
# The most entries a user's key log holds (the store refuses an append past
# it, ``too_many_keys``): an append replays the whole log under the write
# lock, so the log's length is bounded.  The store keeps room in it to revoke
# every active key but one, so a revocation is never refused for a full log.
MAX_LOG_ENTRIES = 1000
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_ZWJ = "\u200d"


class KeyLogError(Exception):
    """An entry or log that does not hold: ``code`` is the HTTP error code
    (``invalid_request``, ``invalid_signature``, ``keylog_conflict``,
    ``key_exists``, ``last_key``, ``too_many_keys``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def key_id(public_key: bytes) -> str:
    """The ``key_id`` of a raw 32-byte Ed25519 public key: the first 16
    characters of the unpadded base64url SHA-256 of its bytes."""
    return _b64url(hashlib.sha256(public_key).digest())[:KEY_ID_LENGTH]


def entry_string(user_id: str, seq: int, action: str, public_key: bytes, prev: str) -> str:
    """The string an entry's signatures cover (and whose digest the next
    entry's ``prev`` holds)."""
    return f"{KEYLOG_PREFIX}{user_id}\n{seq}\n{action}\n{b64encode(public_key)}\n{prev}"


def digest(string: str) -> str:
    """Unpadded base64url SHA-256 of a string's UTF-8 bytes (``prev``)."""
    return _b64url(hashlib.sha256(string.encode("utf-8")).digest())


def delete_string(user_id: str, seq: int) -> str:
    """What an account deletion's signature covers; ``seq`` is the key log's
    next sequence number."""
    return f"{DELETE_PREFIX}{user_id}\n{seq}"


def normalize_name(value: object) -> str | None:
    """A device name: None, or 1 to 64 code points after NFC with no control
    or format characters (as usernames); ``KeyLogError`` otherwise."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise KeyLogError("invalid_request", "name must be a string")
    name = unicodedata.normalize("NFC", value)
    if not 1 <= len(name) <= MAX_NAME:
        raise KeyLogError("invalid_request", f"name must be 1 to {MAX_NAME} characters")
    for ch in name:
        if ch != _ZWJ and unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            raise KeyLogError("invalid_request", "name contains a control or format character")
    return name


def signature_ok(public_key: bytes, message: str, signature: bytes | None) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message``."""
    if signature is None or len(signature) != 64:
        return False
    try:
        VerifyKey(public_key).verify(message.encode("utf-8"), signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a key log.  ``public_key`` and the signatures are raw
    bytes; ``at_ms`` is when the server appended it (not signed)."""

    seq: int
    action: str
    public_key: bytes
    name: str | None = None
    by: str | None = None
    signature: bytes | None = None
    key_signature: bytes | None = None
    at_ms: int = 0

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def string(self, user_id: str, prev: str) -> str:
        return entry_string(user_id, self.seq, self.action, self.public_key, prev)


@dataclass(slots=True)
class LogState:
    """Where a log stands after its last entry."""

    next_seq: int = 0
    head: str = ""  # the digest the next entry's prev must hold ("" before entry 0)
    active: dict[str, bytes] = field(default_factory=dict)  # key_id -> key, in order added
    every: dict[str, bytes] = field(default_factory=dict)  # every key ever added
    names: dict[str, str | None] = field(default_factory=dict)


def apply(
    state: LogState,
    user_id: str,
    entry: Entry,
    verify: bool = True,
    max_keys: int | None = None,
) -> LogState:
    """Check ``entry`` as the next one of a log at ``state`` and apply it in
    place; return ``state``.  ``verify=False`` skips the signature checks
    (for entries read back from a store that checked them when appending)."""
    if entry.seq != state.next_seq:
        raise KeyLogError(
            "keylog_conflict",
            f"seq must be {state.next_seq}, the next one: fetch the log and sign again",
        )
    kid = entry.key_id
    string = entry.string(user_id, state.head)
    if entry.seq == 0:
        if entry.action != REGISTER:
            raise KeyLogError("invalid_request", "entry 0 must be the registration")
    elif entry.action == REGISTER:
        raise KeyLogError("invalid_request", "only entry 0 is a registration")
    elif entry.action not in (ADD, REVOKE):
        raise KeyLogError("invalid_request", "action must be add or revoke")
    else:
        signer = state.active.get(entry.by) if isinstance(entry.by, str) else None
        if signer is None:
            raise KeyLogError("invalid_signature", "by is not an active key of the user")
        if verify and not signature_ok(signer, string, entry.signature):
            raise KeyLogError("invalid_signature", "the signature does not match the entry")
        if entry.action == ADD:
            if verify and not signature_ok(entry.public_key, string, entry.key_signature):
                raise KeyLogError(
                    "invalid_signature", "the key_signature (by the new key) does not match"
                )
            if kid in state.every:
                raise KeyLogError("key_exists", "this key is already in the user's key log")
            if max_keys is not None and len(state.active) >= max_keys:
                raise KeyLogError("too_many_keys", f"a user may hold at most {max_keys} keys")
        else:
            if kid not in state.active:
                raise KeyLogError("invalid_request", "the key to revoke is not an active key")
            if len(state.active) == 1:
                raise KeyLogError(
                    "last_key", "the last active key cannot be revoked: delete the account instead"
                )
    if entry.action == REVOKE:
        del state.active[kid]
    else:
        state.active[kid] = entry.public_key
        state.every[kid] = entry.public_key
        state.names[kid] = entry.name
    state.next_seq = entry.seq + 1
    state.head = digest(string)
    return state


def replay(user_id: str, entries: list[Entry], verify: bool = True) -> LogState:
    """The state a whole log leads to, checking every entry (every signature
    when ``verify``, every ``prev`` by construction); ``KeyLogError`` if any
    entry does not hold."""
    state = LogState()
    for entry in entries:
        apply(state, user_id, entry, verify)
    if state.next_seq == 0:
        raise KeyLogError("invalid_request", "a key log starts with its registration")
    return state


def entry_from_json(obj: object) -> Entry:
    """An ``Entry`` from its JSON shape (GET .../keylog's entries, or a POST
    body, whose ``seq``, ``action``, ``public_key``, ``name``, ``by``,
    ``signature`` and ``key_signature`` are read); ``KeyLogError``
    ``invalid_request`` naming the field that is ill-formed."""
    if not isinstance(obj, dict):
        raise KeyLogError("invalid_request", "an entry must be a JSON object")
    seq = obj.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**31:
        raise KeyLogError("invalid_request", "seq must be a non-negative integer")
    action = obj.get("action")
    if action not in ACTIONS:
        raise KeyLogError("invalid_request", "action must be add or revoke")
    public_key = _raw_key(obj.get("public_key"))
    by = obj.get("by")
    if by is not None and not isinstance(by, str):
        raise KeyLogError("invalid_request", "by must be a key_id")
    return Entry(
        seq,
        action,
        public_key,
        normalize_name(obj.get("name")),
        by,
        _raw_signature(obj.get("signature"), "signature"),
        _raw_signature(obj.get("key_signature"), "key_signature"),
    )


def _raw_key(value: object) -> bytes:
    if not isinstance(value, str):
        raise KeyLogError("invalid_request", "public_key must be a base64 string")
    try:
        raw = b64decode(value)
    except ValueError:
        raise KeyLogError("invalid_request", "public_key is not base64") from None
    if len(raw) != 32 or not crypto_core_ed25519_is_valid_point(raw):
        raise KeyLogError("invalid_request", "public_key must be a valid 32-byte Ed25519 key")
    return raw


def _raw_signature(value: object, name: str) -> bytes | None:
    """A signature field: None when absent, null or empty; else its bytes.  A
    malformed one is an invalid signature (401), as for logins."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise KeyLogError("invalid_request", f"{name} must be a base64 string")
    try:
        raw = b64decode(value)
    except ValueError:
        raise KeyLogError("invalid_signature", f"{name} is not base64") from None
    if len(raw) != 64:
        raise KeyLogError("invalid_signature", f"{name} must be 64 bytes")
    return raw


PAIRING_PREFIX = "wsserver-pair-v1"


@dataclass(frozen=True, slots=True)
class Pairing:
    """What a new device hands to one that already holds a key: its public key
    and its ``key_signature`` over the ``add`` entry at ``seq`` (signed with
    the log as it stood then; a log that moved on since needs a new text)."""

    user_id: str
    seq: int
    public_key: bytes
    key_signature: bytes


def pairing_text(pairing: Pairing) -> str:
    """``wsserver-pair-v1:<user_id>:<seq>:<public key>:<key_signature>``, the
    key and signature in unpadded base64url: one word, safe to paste."""
    return ":".join(
        (
            PAIRING_PREFIX,
            pairing.user_id,
            str(pairing.seq),
            _b64url(pairing.public_key),
            _b64url(pairing.key_signature),
        )
    )


def parse_pairing_text(text: str) -> Pairing:
    """A ``Pairing`` from its text (whitespace anywhere in it is ignored, as a
    terminal may wrap it); ``KeyLogError('invalid_request')`` if it is not one."""
    parts = "".join(text.split()).split(":")
    bad = KeyLogError("invalid_request", "this is not a wsserver pairing text")
    if len(parts) != 5 or parts[0] != PAIRING_PREFIX or not is_user_id(parts[1]):
        raise bad
    if not parts[2].isascii() or not parts[2].isdigit() or len(parts[2]) > 9:
        raise bad
    try:
        key = base64.urlsafe_b64decode(parts[3] + "=" * (-len(parts[3]) % 4))
        sig = base64.urlsafe_b64decode(parts[4] + "=" * (-len(parts[4]) % 4))
    except ValueError:
        raise bad from None
    if len(key) != 32 or len(sig) != 64 or _b64url(key) != parts[3] or _b64url(sig) != parts[4]:
        raise bad
    return Pairing(parts[1], int(parts[2]), key, sig)


def entry_json(user_id: str, entry: Entry, at: str | None = None) -> dict:
    """An entry as GET .../keylog shows it (``at``: the RFC 3339 time)."""
    return {
        "seq": entry.seq,
        "action": entry.action,
        "public_key": b64encode(entry.public_key),
        "key_id": entry.key_id,
        "name": entry.name,
        "at": at,
        "by": entry.by,
        "signature": b64encode(entry.signature) if entry.signature is not None else None,
        "key_signature": (
            b64encode(entry.key_signature) if entry.key_signature is not None else None
        ),
    }


__all__ = [
    "ADD",
    "DELETE_PREFIX",
    "KEYLOG_PREFIX",
    "MAX_LOG_ENTRIES",
    "PAIRING_PREFIX",
    "REGISTER",
    "REVOKE",
    "Entry",
    "KeyLogError",
    "LogState",
    "Pairing",
    "apply",
    "delete_string",
    "digest",
    "entry_from_json",
    "entry_json",
    "entry_string",
    "key_id",
    "normalize_name",
    "pairing_text",
    "parse_pairing_text",
    "replay",
    "signature_ok",
]
