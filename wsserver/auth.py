"""Who a user is: registration, the Ed25519 login, JWTs, and signature checks.

Cryptography lives here and nowhere else: PyNaCl for Ed25519, PyJWT for
tokens (HS256 pinned).  Time comes from an injected clock, so tokens and
challenges expire on the reactor's time, which tests control.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass

import jwt
from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from .messages import (
    INVALID_SIGNATURE,
    LOGIN_PREFIX,
    RESERVED_IDS,
    UNSIGNED,
    UNVERIFIED,
    VERIFIED,
    Draft,
    b64decode,
    b64encode,
    is_user_id,
    normalize_username,
    signing_input,
)
from .metrics import DISCARD, Metrics
from .store import CHALLENGE_NONE, CHALLENGE_OK, Store, User

ISSUER = "wsserver"
ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32
# Seconds a token's ``iat`` may lie ahead of this process's clock: processes
# sharing a database (and its secret) may disagree on the time by that much.
IAT_LEEWAY = 30
_KEY_CACHE_SIZE = 10_000


class AuthError(Exception):
    """A refusal with a stable ``code`` (see the HTTP error table in web.py)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def new_secret() -> bytes:
    """A fresh 32-byte JWT signing secret."""
    return os.urandom(32)


def decode_public_key(value: object) -> bytes:
    """The 32 raw bytes of a base64 Ed25519 public key, or ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError("public_key must be a base64 string")
    raw = b64decode(value)
    if len(raw) != 32:
        raise ValueError("public_key must decode to 32 bytes")
    if not crypto_core_ed25519_is_valid_point(raw):
        raise ValueError("public_key is not a valid Ed25519 point")
    return raw


def verify(key: VerifyKey, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message``."""
    try:
        key.verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def verification_of(sender: str, draft: Draft, key: VerifyKey | None) -> str:
    """The ``verification`` value of a draft (protocol section 4)."""
    if draft.signature is None:
        return UNSIGNED
    if key is None:
        return UNVERIFIED
    data = signing_input(sender, draft.recipient, draft.nonce, draft.content)
    return VERIFIED if verify(key, data, draft.signature) else INVALID_SIGNATURE


@dataclass(frozen=True, slots=True)
class Session:
    """An authenticated WebSocket user: who, their key, until when."""

    user_id: str
    verify_key: VerifyKey | None
    expires_at: float  # seconds on the reactor clock


class Tokens:
    """Issue and check HS256 JWTs; the algorithm is pinned."""

    def __init__(self, secret: bytes, ttl: int, clock: IReactorTime) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self._ttl = ttl
        self._clock = clock

    def issue(self, user_id: str) -> tuple[str, int]:
        """A token for ``user_id`` and its expiry (seconds since the epoch)."""
        now = int(self._clock.seconds())
        exp = now + self._ttl
        claims = {
            "sub": user_id,
            "iat": now,
            "exp": exp,
            "iss": ISSUER,
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM), exp

    def check(self, token: str) -> tuple[str, int]:
        """The (user_id, exp) of a valid token, else ``AuthError('unauthorized')``."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                # Times are checked below on the reactor's clock, not the wall clock.
                options={
                    "require": ["sub", "iat", "exp", "iss", "jti"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except (jwt.PyJWTError, UnicodeError):
            # UnicodeError: a str that is no UTF-8 text (a lone surrogate).
            raise AuthError("unauthorized", "invalid token") from None
        sub, exp, iat = claims["sub"], claims["exp"], claims["iat"]
        nbf = claims.get("nbf", 0)
        if not is_user_id(sub) or not all(_is_int(v) for v in (exp, iat, nbf)):
            raise AuthError("unauthorized", "invalid token")
        now = self._clock.seconds()
        # RFC 8725 section 3.10 / RFC 7519 4.1.4-4.1.6: not before nbf, not
        # issued (much) later than now, not at or after exp.
        if nbf > now or iat > now + IAT_LEEWAY:
            raise AuthError("unauthorized", "token not valid yet")
        if exp <= now:
            raise AuthError("unauthorized", "token expired")
        return sub, exp


def _is_int(value: object) -> bool:
    """True for a JSON integer (``bool`` is an ``int`` to Python, not to JSON)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _user_id_field(body: dict) -> str:
    """The body's ``user_id``, or ``AuthError('invalid_request')`` naming the field."""
    user_id = body.get("user_id")
    if not is_user_id(user_id):
        raise AuthError(
            "invalid_request", "user_id must be 1 to 64 characters of A-Z a-z 0-9 _ . -"
        )
    return user_id


class Authenticator:
    """Registration, the challenge-response login, token checks, key look-ups."""

    metrics: Metrics = DISCARD  # the node's metrics (set by tap.py; web.py counts logins)

    def __init__(
        self, store: Store, tokens: Tokens, clock: IReactorTime, challenge_ttl: int
    ) -> None:
        self._store = store
        self.tokens = tokens
        self._clock = clock
        self._challenge_ttl = challenge_ttl
        # Users never change key, so a found key can be cached; bounded LRU.
        self._keys: OrderedDict[str, VerifyKey] = OrderedDict()
        # Users deleted while this node runs (their ids stay taken for good):
        # a look-up that began before the deletion must not cache them again.
        self._deleted: set[str] = set()

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    @defer.inlineCallbacks
    def register(self, body: dict) -> defer.Deferred:
        """Register ``{user_id, username, public_key}``; fire with the ``User``."""
        user_id = _user_id_field(body)
        if user_id in RESERVED_IDS:
            raise AuthError("invalid_request", f"user_id '{user_id}' is reserved")
        try:
            username = normalize_username(body.get("username"))
        except ValueError as exc:
            raise AuthError("invalid_request", str(exc)) from None
        try:
            key = decode_public_key(body.get("public_key"))
        except ValueError as exc:
            raise AuthError("invalid_request", str(exc)) from None
        user = User(user_id, username, key, self._now_ms())
        added = yield self._store.add_user(user)
        if not added:
            raise AuthError("user_exists", f"user_id '{user_id}' is already registered")
        return user

    @defer.inlineCallbacks
    def lookup(self, user_id: object) -> defer.Deferred:
        """Fire with the ``User``, or fail with ``AuthError('unknown_user')``."""
        user = (yield self._store.get_user(user_id)) if is_user_id(user_id) else None
        if user is None:
            raise AuthError("unknown_user", "no such user")
        return user

    @defer.inlineCallbacks
    def challenge(self, body: dict) -> defer.Deferred:
        """Start a login: fire with (challenge, expiry in ms)."""
        user = yield self.lookup(_user_id_field(body))
        nonce = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")
        challenge = f"{LOGIN_PREFIX}{user.user_id}:{nonce}"
        now = self._now_ms()
        expires = now + self._challenge_ttl * 1000
        yield self._store.add_challenge(user.user_id, challenge, now, expires)
        return challenge, expires

    @defer.inlineCallbacks
    def login(self, body: dict) -> defer.Deferred:
        """Finish a login with a signed challenge: fire with (token, exp)."""
        user = yield self.lookup(_user_id_field(body))
        challenge = body.get("challenge")
        if challenge is not None and not isinstance(challenge, str):
            raise AuthError("invalid_request", "challenge must be a string")
        raw_sig = body.get("signature")
        if not isinstance(raw_sig, str):
            raise AuthError("invalid_request", "signature must be a base64 string")
        try:
            signature = b64decode(raw_sig)
        except ValueError:
            signature = b""  # malformed: still consumes what it is tried against
        key = VerifyKey(user.public_key)

        def check(candidate: str) -> bool:
            return len(signature) == 64 and verify(key, candidate.encode("utf-8"), signature)

        outcome = yield self._store.consume_challenge(
            user.user_id, challenge, self._now_ms(), check
        )
        if outcome == CHALLENGE_NONE:
            raise AuthError("no_challenge", "no live challenge: ask for a new one")
        if outcome != CHALLENGE_OK:
            raise AuthError("invalid_signature", "the signature does not match the challenge")
        return self.tokens.issue(user.user_id)

    @defer.inlineCallbacks
    def session(self, token: str) -> defer.Deferred:
        """Check a WebSocket token: fire with a ``Session`` or fail ``unauthorized``."""
        user_id, exp = self.tokens.check(token)
        key = yield self.verify_key(user_id)
        if key is None:
            raise AuthError("unauthorized", "the token's user does not exist")
        return Session(user_id, key, float(exp))

    def forget(self, user_id: str) -> None:
        """Drop the cached key of ``user_id`` (the user was deleted): its tokens
        are refused from now on, since the user is no longer found."""
        self._keys.pop(user_id, None)
        self._deleted.add(user_id)

    @defer.inlineCallbacks
    def verify_key(self, user_id: str) -> defer.Deferred:
        """Fire with the user's ``VerifyKey`` (cached), or None if no such user."""
        key = self._keys.get(user_id)
        if key is not None:
            self._keys.move_to_end(user_id)
            return key
        user = yield self._store.get_user(user_id)
        if user is None or user_id in self._deleted:
            return None
        key = VerifyKey(user.public_key)
        self._keys[user_id] = key
        if len(self._keys) > _KEY_CACHE_SIZE:
            self._keys.popitem(last=False)
        return key


def public_user(user: User) -> dict:
    """The public view of a user, as GET /auth/users/{id} shows it."""
    return {
        "user_id": user.user_id,
        "username": user.username,
        "public_key": b64encode(user.public_key),
    }
