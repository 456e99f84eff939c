"""The wire format of protocol v1: identifiers, client frames, server frames.

Everything here is pure and synchronous (stdlib only), so every other module
can lean on it and the tests can check it without a reactor.  See
docs/protocol.md for the contract these functions implement.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any

BROADCAST = "broadcast"
SYSTEM = "system"
RESERVED_IDS = frozenset({BROADCAST, SYSTEM})

# Delivery status (section 5) and verification result (section 4).
PENDING = "pending"
DELIVERED = "delivered"
VERIFIED = "verified"
INVALID_SIGNATURE = "invalid_signature"
UNVERIFIED = "unverified"
UNSIGNED = "unsigned"

_USER_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_GROUP_ID = re.compile(r"#[A-Za-z0-9_.\-]{1,64}")
_NONCE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
# Used only to echo the nonce of a frame refused before it was parsed.
_NONCE_IN_RAW = re.compile(rb'"nonce"\s*:\s*"([A-Za-z0-9_.:\-]{1,64})"')
_USERNAME_MAX = 128
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_ZWJ = "\u200d"

MSG_PREFIX = b"wsserver-msg-v1\n"
LOGIN_PREFIX = "wsserver-login-v1:"


class Refusal(Exception):
    """A client frame the server will not accept; it becomes a ``system`` frame.

    ``code`` is one of the stable codes of protocol section 3.2.
    """

    def __init__(self, code: str, message: str, nonce: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.nonce = nonce


class InvalidJSON(ValueError):
    """A body or frame that is not one well-formed JSON object."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise InvalidJSON("duplicate key in JSON object")
    return obj


def _not_json(name: str) -> Any:
    # Python's decoder takes NaN, Infinity and -Infinity, which RFC 8259
    # does not: a body or frame holding one is not JSON.
    raise InvalidJSON(f"not valid JSON: {name}")


_decoder = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_not_json)
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# The C encoder ``_encoder.encode`` builds anew on every call (with the same
# arguments), built once: the same bytes for half the time of a message's
# frame (measured: 5.0 against 2.6 µs; docs/performance.md, "The signed path").
# No circular-reference markers: every object encoded here is built from
# literals by this package and holds no cycle.
_make_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_encode = (
    _make_c_encoder(
        None,
        _encoder.default,
        json.encoder.encode_basestring,
        None,
        _encoder.key_separator,
        _encoder.item_separator,
        False,
        False,
        True,
    )
    if _make_c_encoder is not None
    else None
)


# A JSON escape of a UTF-16 surrogate (\uD800-\uDFFF): the only way a
# surrogate gets into a parsed string, since the UTF-8 decoder refuses them.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_FIELD_NAME = re.compile(r"[A-Za-z0-9_]{1,32}")


def _lone_surrogate_field(obj: dict[str, Any]) -> str | None:
    """The top-level member of ``obj`` that holds a lone surrogate, if any.

    Paired escapes were already joined into one code point by the decoder, so
    any surrogate left in a string is a lone one, which no UTF-8 text (hence
    no stored, signed or forwarded string) can hold.  Iterative, so nesting
    as deep as the decoder accepts costs no recursion.
    """
    for key, value in obj.items():
        if _SURROGATE.search(key):
            return "a member name"
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                if _SURROGATE.search(item):
                    return f"'{key}'" if _FIELD_NAME.fullmatch(key) else "a member"
            elif isinstance(item, dict):
                if any(_SURROGATE.search(k) for k in item):
                    return f"'{key}'" if _FIELD_NAME.fullmatch(key) else "a member"
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    return None


def loads_object(data: bytes | str) -> dict[str, Any]:
    """Parse one JSON object, refusing duplicate keys, deep nesting and invalid
    Unicode (a lone surrogate spelt as a ``\\uD800``-style escape)."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = _decoder.decode(text)
    except InvalidJSON:
        raise
    except (ValueError, RecursionError) as exc:
        # RecursionError: a client can nest arrays deeply enough to hit it.
        raise InvalidJSON("not valid JSON") from exc
    if not isinstance(value, dict):
        raise InvalidJSON("not a JSON object")
    # Decoded UTF-8 holds no surrogate, so for bytes only an escape can spell one;
    # nor does ASCII text (``isascii`` costs nothing; the scan 1.5 µs a frame).
    if _SURROGATE_ESCAPE.search(text) or (
        not isinstance(data, bytes) and not text.isascii() and _SURROGATE.search(text)
    ):
        field = _lone_surrogate_field(value)
        if field is not None:
            raise InvalidJSON(f"not valid Unicode: {field} holds a lone surrogate")
    return value


def dumps(obj: dict[str, Any]) -> bytes:
    """Serialize a frame or body compactly as UTF-8."""
    if _c_encode is None:
        return _encoder.encode(obj).encode("utf-8")
    return "".join(_c_encode(obj, 0)).encode("utf-8")


def is_user_id(value: object) -> bool:
    """True for a syntactically valid user_id (reserved names included)."""
    return isinstance(value, str) and _USER_ID.fullmatch(value) is not None


def is_group_id(value: object) -> bool:
    """True for a syntactically valid group id: ``#`` and 1 to 64 characters
    of the user id alphabet (protocol section 13)."""
    return isinstance(value, str) and _GROUP_ID.fullmatch(value) is not None


def conversation_of(a: str, b: str) -> str:
    """The ``conv`` of a direct message between users ``a`` and ``b`` (either
    direction): the two ids in Python's str order (bytewise for this
    alphabet, as SQLite's BINARY and PostgreSQL's "C" collation), joined by
    one space; a note to self is ``"a a"`` (schema 005)."""
    return f"{a} {b}" if a <= b else f"{b} {a}"


def normalize_username(value: object) -> str:
    """Return the NFC form of a valid username, or raise ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError("username must be a string")
    name = unicodedata.normalize("NFC", value)
    if not 1 <= len(name) <= _USERNAME_MAX:
        raise ValueError("username must be 1 to 128 characters")
    for ch in name:
        if ch != _ZWJ and unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            raise ValueError("username contains a control or format character")
    return name


def b64decode(value: str) -> bytes:
    """Decode standard base64 with optional padding; ``ValueError`` otherwise."""
    if not value.isascii():
        raise ValueError("not base64")
    padded = value + "=" * (-len(value) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64") from exc


def b64encode(raw: bytes) -> str:
    """Standard base64 with padding, as every server output uses."""
    return base64.b64encode(raw).decode("ascii")


def signing_input(sender: str, recipient: str, nonce: str | None, content: str) -> bytes:
    """The exact bytes a message signature covers (protocol section 4)."""
    return b"".join(
        (
            MSG_PREFIX,
            sender.encode("utf-8"),
            b"\n",
            recipient.encode("utf-8"),
            b"\n",
            (nonce or "").encode("utf-8"),
            b"\n",
            content.encode("utf-8"),
        )
    )


_last_second: list = [None, ""]  # (second, its formatted prefix): most stamps share one


def format_timestamp(ms: int) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-25T12:34:56.789Z``."""
    seconds, millis = divmod(ms, 1000)
    if _last_second[0] != seconds:
        _last_second[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
    return f"{_last_second[1]}.{millis:03d}Z"


def nonce_from_raw(payload: bytes) -> str | None:
    """Best-effort nonce of a frame that is refused before it is parsed."""
    found = _NONCE_IN_RAW.search(payload)
    return found.group(1).decode("ascii") if found else None


@dataclass(frozen=True, slots=True)
class Draft:
    """A parsed, well-formed client message, not yet verified or stored."""

    recipient: str
    content: str
    signature: bytes | None  # None: unsigned
    nonce: str | None


def parse_client_frame(payload: bytes | str, sender: str, max_content_bytes: int) -> Draft:
    """Parse a text frame from ``sender`` into a ``Draft`` or raise ``Refusal``.

    Checks everything that needs no database: shape, types, sizes, the
    ``from`` claim, nonce syntax, signature encoding.  Whether the recipient
    exists and whether the signature is valid are decided later.
    """
    try:
        obj = loads_object(payload)
    except InvalidJSON as exc:
        raw = payload if isinstance(payload, bytes) else payload.encode("utf-8")
        raise Refusal("invalid_message", str(exc), nonce_from_raw(raw)) from None

    raw_nonce = obj.get("nonce")
    if raw_nonce is None or raw_nonce == "":
        nonce = None
    elif isinstance(raw_nonce, str) and _NONCE.fullmatch(raw_nonce):
        nonce = raw_nonce
    else:
        raise Refusal("invalid_message", "nonce must be 1 to 64 characters of A-Z a-z 0-9 _ . : -")

    def refuse(code: str, message: str) -> Refusal:
        return Refusal(code, message, nonce)

    kind = obj.get("type", "message")
    if kind != "message":
        raise refuse("invalid_message", "type must be 'message', 'read' or 'watch'")
    recipient = obj.get("to")
    if not isinstance(recipient, str):
        raise refuse("invalid_message", "'to' must be a string")
    if not (is_user_id(recipient) or is_group_id(recipient)) or recipient == SYSTEM:
        raise refuse("unknown_recipient", "no such recipient")
    content = obj.get("content")
    if not isinstance(content, str):
        raise refuse("invalid_message", "'content' must be a string")
    # Cheap bound first: a str of n code points has at least n UTF-8 bytes.
    if len(content) > max_content_bytes or len(content.encode("utf-8")) > max_content_bytes:
        raise refuse("message_too_large", f"content is larger than {max_content_bytes} bytes")
    # U+0000 (only a JSON escape can spell it): PostgreSQL's text cannot hold
    # it, so it is refused on every engine alike (protocol.md section 15).
    if "\x00" in content:
        raise refuse("invalid_message", "content must not hold U+0000")
    if "from" in obj and obj["from"] != sender:
        raise refuse("from_mismatch", "'from' must be the authenticated user")

    raw_sig = obj.get("signature")
    if raw_sig is None or raw_sig == "":
        signature = None
    elif isinstance(raw_sig, str):
        try:
            signature = b64decode(raw_sig)
        except ValueError:
            raise refuse("invalid_signature", "signature is not valid base64") from None
        if len(signature) != 64:
            raise refuse("invalid_signature", "signature must be 64 bytes")
    else:
        raise refuse("invalid_message", "'signature' must be a base64 string")
    return Draft(recipient, content, signature, nonce)


@dataclass(slots=True)
class Message:
    """A stored message, as the store returns it and the frames show it."""

    id: int
    sender: str
    recipient: str
    content: str
    signature: bytes | None
    nonce: str | None
    verification: str
    status: str
    created_ms: int
    recipients: int | None = None  # broadcasts only: connections reached
    key_id: str | None = None  # the key that signed it (None when unsigned)
    # Group messages only: the group's members when it was stored (the sender
    # included), set by the store and carried between nodes; None otherwise.
    group_members: tuple[str, ...] | None = None
    _encoded: bytes | None = field(default=None, repr=False, compare=False)

    def encoded(self) -> bytes:
        """The fields every frame of this message shares, as one JSON object.

        Encoded once per message: the recipients' ``message`` frame and the
        sender's ``ack`` are this object with ``type`` and ``status`` in front.
        """
        if self._encoded is None:
            self._encoded = dumps(
                {
                    "id": self.id,
                    "from": self.sender,
                    "to": self.recipient,
                    "content": self.content,
                    "timestamp": format_timestamp(self.created_ms),
                    "verification": self.verification,
                    "signature": b64encode(self.signature) if self.signature is not None else None,
                    "key_id": self.key_id,
                    "nonce": self.nonce,
                }
            )
        return self._encoded


def message_frame(msg: Message) -> bytes:
    """The ``message`` frame a recipient receives (always ``delivered``)."""
    return b'{"type":"message","status":"delivered",' + msg.encoded()[1:]


def ack_frame(msg: Message, members: int | None = None) -> bytes:
    """The ``ack`` frame: the message as stored, status as it stands now
    (``members``: a group message's member count but the sender, when not
    counted from ``msg.group_members``)."""
    head = b'{"type":"ack","status":"' + msg.status.encode("ascii") + b'",'
    body = msg.encoded()
    if members is None and msg.group_members is not None:
        members = len(msg.group_members) - (msg.sender in msg.group_members)
    if members is not None:
        body = body[:-1] + b',"members":' + str(members).encode("ascii") + b"}"
    if msg.recipients is not None:
        body = body[:-1] + b',"recipients":' + str(msg.recipients).encode("ascii") + b"}"
    return head + body[1:]


def status_frame(
    msg_id: int, status: str, ms: int, recipients: int | None = None, members: int | None = None
) -> bytes:
    """A ``status`` frame: a later change of a message the user sent
    (``members``: a group message's member count but the sender)."""
    frame: dict[str, Any] = {
        "type": "status",
        "id": msg_id,
        "status": status,
        "timestamp": format_timestamp(ms),
    }
    if members is not None:
        frame["members"] = members
    if recipients is not None:
        frame["recipients"] = recipients
    return dumps(frame)


def group_frame(group_id: str, event: str, user_id: str, ms: int) -> bytes:
    """A ``group`` frame: ``user_id`` was ``added`` to or ``removed`` from a
    group (protocol section 13)."""
    return dumps(
        {
            "type": "group",
            "group_id": group_id,
            "event": event,
            "user_id": user_id,
            "timestamp": format_timestamp(ms),
        }
    )


def read_frame(msg_id: int, reader: str, ms: int) -> bytes:
    """The ``status`` frame ``read``: ``reader`` read message ``msg_id``."""
    return dumps(
        {
            "type": "status",
            "id": msg_id,
            "status": "read",
            "by": reader,
            "timestamp": format_timestamp(ms),
        }
    )


def system_frame(
    to: str,
    code: str,
    content: str,
    ms: int,
    nonce: str | None = None,
    retry_after_ms: int | None = None,
) -> bytes:
    """A ``system`` frame: a notice or a refusal, shaped like a message."""
    frame: dict[str, Any] = {
        "type": "system",
        "from": SYSTEM,
        "to": to,
        "code": code,
        "content": content,
        "timestamp": format_timestamp(ms),
        "nonce": nonce,
    }
    if retry_after_ms is not None:
        frame["retry_after_ms"] = retry_after_ms
    return dumps(frame)


# -- read receipts and presence (protocol section 13) ---------------------------

MAX_MESSAGE_ID = 2**63 - 1  # the largest id either store can hold
MAX_WATCH = 256  # users one watch frame may list


@dataclass(frozen=True, slots=True)
class ReadFrame:
    """``{"type": "read", "id": N}``: the client read message N."""

    msg_id: int


@dataclass(frozen=True, slots=True)
class WatchFrame:
    """``{"type": "watch", "users": [...]}``: the connection's new watch list."""

    users: tuple[str, ...]


def parse_control_frame(text: str) -> ReadFrame | WatchFrame | None:
    """A ``read`` or ``watch`` frame, or None for anything else (a message,
    or what ``parse_client_frame`` refuses); raises ``Refusal``
    (``invalid_message``) for a ``read`` or ``watch`` spelt wrong.

    Frames that cannot name a ``type`` (no ``"type"`` and no escape in the
    text) are not parsed here: the message path pays nothing.
    """
    if '"type"' not in text and "\\u" not in text:
        return None
    try:
        obj = loads_object(text)
    except InvalidJSON:
        return None
    kind = obj.get("type")
    if kind == "read":
        if set(obj) != {"type", "id"}:
            raise Refusal("invalid_message", "a read frame has exactly 'type' and 'id'")
        msg_id = obj["id"]
        if type(msg_id) is not int or not 1 <= msg_id <= MAX_MESSAGE_ID:
            raise Refusal("invalid_message", "'id' must be a message id (a positive integer)")
        return ReadFrame(msg_id)
    if kind == "watch":
        if set(obj) != {"type", "users"}:
            raise Refusal("invalid_message", "a watch frame has exactly 'type' and 'users'")
        users = obj["users"]
        if not isinstance(users, list):
            raise Refusal("invalid_message", "'users' must be a list of user ids")
        if len(users) > MAX_WATCH:
            raise Refusal("invalid_message", f"'users' may list at most {MAX_WATCH} users")
        if not all(is_user_id(u) for u in users):
            raise Refusal("invalid_message", "'users' must be a list of user ids")
        return WatchFrame(tuple(users))
    return None
