"""Who a user is: registration, the Ed25519 login, JWTs, and signature checks.

Cryptography lives here and nowhere else: PyNaCl for Ed25519, PyJWT for
tokens (HS256 pinned).  Time comes from an injected clock, so tokens and
challenges expire on the reactor's time, which tests control.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from . import keylog
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
    format_timestamp,
    is_user_id,
    normalize_username,
    signing_input,
)
from .metrics import DISCARD, Metrics
from .store import (
    CHALLENGE_NONE,
    CHALLENGE_OK,
    EVENT_DELETED,
    EVENT_KEY_REVOKED,
    EVENT_SIGNED_OUT,
    EVENT_SIGNED_OUT_ALL,
    Store,
    User,
    UserKeys,
)

ISSUER = "wsserver"
ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32
# Seconds a token's ``iat`` may lie ahead of this process's clock: processes
# sharing a database (and its secret) may disagree on the time by that much.
IAT_LEEWAY = 30
_KEY_CACHE_SIZE = 10_000
# Tokens whose signature was checked, remembered (about 0.5 KiB each): the
# JWT decode is about 60 µs of an authenticated connect (docs/performance.md).
_CHECKED_TOKENS = 4096
# Only tokens of at most this many characters are remembered (ours are about
# 300): the memo's bound in memory holds whatever spellings a JWT library
# might accept for one signature.
_REMEMBERED_TOKEN_CHARS = 1024
_DELETED_KEPT = 10_000  # ids of users deleted while this node runs, newest kept
# Seconds between two sweeps of the signed-out tokens that have expired.
_PRUNE_EVERY = 60.0

# How an open connection is closed when its token no longer holds (protocol
# section 9): (close code, reason).
KEY_REVOKED = (4003, "key revoked")
ACCOUNT_DELETED = (4003, "account deleted")
SIGNED_OUT = (4004, "signed out")


class AuthError(Exception):
    """A refusal with a stable ``code`` (see the HTTP error table in web.py).

    ``close``, for a token refused because of section 12 (``SIGNED_OUT``,
    ``KEY_REVOKED``, ``ACCOUNT_DELETED``), is how an open connection holding
    that token is closed."""

    def __init__(self, code: str, message: str, close: tuple[int, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close = close


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
    """An authenticated WebSocket user: who, the key the token names (its
    ``kid``), until when; the token's ``jti`` and generation; and the
    authenticator's ``epoch`` when the check began (an account change handled
    since then makes the connection check its token again when it opens)."""

    user_id: str
    verify_key: VerifyKey | None
    expires_at: float  # seconds on the reactor clock
    key_id: str | None = None
    jti: str | None = None
    gen: int = 0
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Claims:
    """What a valid token says.  ``kid`` None: a token of the version before
    keys per device, which counts as the registration key's (entry 0)."""

    user_id: str
    exp: int
    jti: str
    kid: str | None
    gen: int


class Tokens:
    """Issue and check HS256 JWTs; the algorithm is pinned."""

    def __init__(self, secret: bytes, ttl: int, clock: IReactorTime) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self._ttl = ttl
        self._clock = clock
        # Tokens checked already: token -> (claims, iat, nbf), oldest first.
        self._checked: OrderedDict[str, tuple[Claims, int, int]] = OrderedDict()

    @property
    def ttl(self) -> int:
        """Seconds a token lives."""
        return self._ttl

    def issue(self, user_id: str, kid: str | None = None, gen: int = 0) -> tuple[str, int]:
        """A token for ``user_id`` logged in with key ``kid`` at token generation
        ``gen``, and its expiry (seconds since the epoch)."""
        now = int(self._clock.seconds())
        exp = now + self._ttl
        claims: dict = {
            "sub": user_id,
            "iat": now,
            "exp": exp,
            "iss": ISSUER,
            "jti": secrets.token_urlsafe(16),
            "gen": gen,
        }
        if kid is not None:
            claims["kid"] = kid
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM), exp

    def check(self, token: str) -> tuple[str, int]:
        """The (user_id, exp) of a valid token, else ``AuthError('unauthorized')``."""
        claims = self.claims(token)
        return claims.user_id, claims.exp

    def claims(self, token: str) -> Claims:
        """The ``Claims`` of a valid token (signature, issuer, times), else
        ``AuthError('unauthorized')``.  Whether it was signed out or its key
        revoked is the ``Authenticator``'s to say.

        A token whose signature and claims were checked once is remembered
        (the exact string, bounded): a reconnect with it skips the JWT decode
        and the HMAC, while its times are checked on the clock every time.
        Tokens longer than ours can be are checked in full every time."""
        checked = self._checked.get(token)
        if checked is None:
            checked = self._decode(token)
            if len(token) <= _REMEMBERED_TOKEN_CHARS:
                if len(self._checked) >= _CHECKED_TOKENS:
                    self._checked.popitem(last=False)  # the oldest
                self._checked[token] = checked
        claims, iat, nbf = checked
        now = self._clock.seconds()
        # RFC 8725 section 3.10 / RFC 7519 4.1.4-4.1.6: not before nbf, not
        # issued (much) later than now, not at or after exp.
        if nbf > now or iat > now + IAT_LEEWAY:
            raise AuthError("unauthorized", "token not valid yet")
        if claims.exp <= now:
            raise AuthError("unauthorized", "token expired")
        return claims

    def _decode(self, token: str) -> tuple[Claims, int, int]:
        """(claims, iat, nbf) of a token whose signature, issuer and claim
        types hold, else ``AuthError('unauthorized')``; times not checked."""
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
        sub, exp, iat, jti = claims["sub"], claims["exp"], claims["iat"], claims["jti"]
        nbf = claims.get("nbf", 0)
        kid, gen = claims.get("kid"), claims.get("gen", 0)
        if not is_user_id(sub) or not all(_is_int(v) for v in (exp, iat, nbf, gen)):
            raise AuthError("unauthorized", "invalid token")
        if not isinstance(jti, str) or (kid is not None and not isinstance(kid, str)) or gen < 0:
            raise AuthError("unauthorized", "invalid token")
        return Claims(sub, exp, jti, kid, gen), iat, nbf


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


# An account change made by this node, to be applied here at once (the kind
# of account event the store recorded for it, the user, the event's detail).
Change = tuple[str, str, "str | None"]


@dataclass(frozen=True, slots=True)
class _Keys:
    """What token checks need of a user: the active keys (key_id ->
    ``VerifyKey``, oldest first) and the token generation."""

    keys: dict[str, VerifyKey]
    gen: int


class Authenticator:
    """Registration, the challenge-response login, token checks, key look-ups,
    and the key log's changes (protocol section 12)."""

    metrics: Metrics = DISCARD  # the node's metrics (set by tap.py; web.py counts logins)

    def __init__(
        self,
        store: Store,
        tokens: Tokens,
        clock: IReactorTime,
        challenge_ttl: int,
        max_keys: int = 16,
    ) -> None:
        self._store = store
        self.tokens = tokens
        self._clock = clock
        self._challenge_ttl = challenge_ttl
        self._max_keys = max_keys
        # A user's active keys and token generation, cached (bounded LRU):
        # account events drop an entry when it changes (``key_revoked``,
        # ``signed_out_all``, ``forget``).
        self._keys: OrderedDict[str, _Keys] = OrderedDict()
        # Users deleted while this node runs (their ids stay taken for good):
        # a look-up that began before the deletion must not cache them again.
        # Bounded: only a look-up under way at the deletion needs it, and the
        # epoch check covers those too; ids deleted long ago are not found.
        self._deleted: OrderedDict[str, None] = OrderedDict()
        # Tokens signed out one by one: jti -> when it may be forgotten (its
        # token has expired by then), on the clock.
        self._signed_out: dict[str, float] = {}
        self._next_prune = 0.0
        # Counts the account changes handled; a look-up that began before one
        # does not cache what it read, and a connection whose check began
        # before one checks its token again when it opens.
        self.epoch = 0
        # Set by ``expect_priming``: token checks wait until ``prime`` loaded
        # the signed-out tokens.
        self._primed: list[defer.Deferred] | None = None

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    # -- what account events tell this node ---------------------------------------

    def expect_priming(self) -> None:
        """Hold every token check until ``prime`` has run once (a node calls
        this before it serves, and ``prime`` once it noted the newest account
        event, so that no sign-out falls between the two)."""
        if self._primed is None:
            self._primed = []

    @defer.inlineCallbacks
    def prime(self) -> Any:
        """Load the tokens signed out and not yet expired; later sign-outs come
        as account events (``signed_out``)."""
        jtis = yield self._store.revoked_tokens(self._now_ms())
        for jti in jtis:
            self._remember_signed_out(jti)
        waiting, self._primed = self._primed or [], None
        for d in waiting:
            d.callback(None)

    def _ready(self) -> defer.Deferred:
        if self._primed is None:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._primed.append(d)
        return d

    def forget(self, user_id: str) -> None:
        """The user was deleted: their tokens are refused from now on, since
        the user is no longer found."""
        self._keys.pop(user_id, None)
        self._deleted[user_id] = None
        if len(self._deleted) > _DELETED_KEPT:
            self._deleted.popitem(last=False)
        self.epoch += 1

    def key_revoked(self, user_id: str) -> None:
        """One of the user's keys was revoked: read their keys again."""
        self._keys.pop(user_id, None)
        self.epoch += 1

    def signed_out_all(self, user_id: str) -> None:
        """The user's token generation was raised: read it again."""
        self._keys.pop(user_id, None)
        self.epoch += 1

    def signed_out(self, jti: str) -> None:
        """The token ``jti`` was signed out: refuse it from now on."""
        self._remember_signed_out(jti)
        self.epoch += 1

    def _remember_signed_out(self, jti: str) -> None:
        now = self._clock.seconds()
        # Every token lives at most TOKEN_TTL (the nodes of a cluster share
        # it), and none is accepted after its exp.
        self._signed_out[jti] = now + self.tokens.ttl + IAT_LEEWAY
        if now >= self._next_prune:
            self._next_prune = now + _PRUNE_EVERY
            for old in [j for j, until in self._signed_out.items() if until <= now]:
                del self._signed_out[old]

    # -- registration and login ---------------------------------------------------

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
    def directory(self, user_id: object) -> defer.Deferred:
        """Fire with the ``User`` and their ``UserKeys`` (GET /auth/users/{id}),
        or fail with ``AuthError('unknown_user')``."""
        user = yield self.lookup(user_id)
        keys = yield self._store.user_keys(user.user_id)
        if keys is None or not keys.keys:
            raise AuthError("unknown_user", "no such user")
        return user, keys

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
        """Finish a login with a challenge signed by any active key of the user
        (``key_id``, optional, says which): fire with (token, exp)."""
        user_id = _user_id_field(body)
        epoch = self.epoch
        # Read from the database, not the cache: a key revoked or a sign-out
        # everywhere made through another node a moment ago (which this node
        # learns of within a second) already counts for a new login.
        found: UserKeys | None = yield self._store.user_keys(user_id)
        if found is None or user_id in self._deleted:
            raise AuthError("unknown_user", "no such user")
        state = _Keys({k.key_id: VerifyKey(k.public_key) for k in found.keys}, found.token_gen)
        challenge = body.get("challenge")
        if challenge is not None and not isinstance(challenge, str):
            raise AuthError("invalid_request", "challenge must be a string")
        wanted = body.get("key_id")
        if wanted is not None and not isinstance(wanted, str):
            raise AuthError("invalid_request", "key_id must be a string")
        raw_sig = body.get("signature")
        if not isinstance(raw_sig, str):
            raise AuthError("invalid_request", "signature must be a base64 string")
        try:
            signature = b64decode(raw_sig)
        except ValueError:
            signature = b""  # malformed: still consumes what it is tried against
        if wanted is None:
            candidates = list(state.keys.items())
        else:
            # An unknown or revoked key_id matches nothing: the challenges
            # tried are consumed all the same.
            key = state.keys.get(wanted)
            candidates = [] if key is None else [(wanted, key)]
        matched: list[str] = []

        def check(candidate: str) -> bool:
            if len(signature) != 64:
                return False
            data = candidate.encode("utf-8")
            for kid, key in candidates:
                if verify(key, data, signature):
                    matched.append(kid)
                    return True
            return False

        outcome = yield self._store.consume_challenge(user_id, challenge, self._now_ms(), check)
        if outcome == CHALLENGE_NONE:
            raise AuthError("no_challenge", "no live challenge: ask for a new one")
        if outcome != CHALLENGE_OK or not matched:
            raise AuthError("invalid_signature", "the signature does not match the challenge")
        # The token is about to open a WebSocket: what was read is what its
        # check needs, so keep it, unless an account change was handled since
        # the read began (then the read may come from before the change).
        if epoch == self.epoch and user_id not in self._deleted:
            self._cache_keys(user_id, state)
        return self.tokens.issue(user_id, matched[-1], state.gen)

    # -- token checks ------------------------------------------------------------

    @defer.inlineCallbacks
    def session(self, token: str) -> defer.Deferred:
        """Check a WebSocket token: fire with a ``Session`` or fail ``unauthorized``
        (also when it was signed out, its generation is older than the user's,
        or the key it names is not active)."""
        epoch = self.epoch
        claims = self.tokens.claims(token)
        kid, key = yield self._check(claims)
        return Session(claims.user_id, key, float(claims.exp), kid, claims.jti, claims.gen, epoch)

    def recheck(self, session: Session) -> defer.Deferred:
        """Check an admitted session again (an account change was handled while
        it was being admitted): fire, or fail with an ``AuthError`` whose
        ``close`` says how to close its connection."""
        claims = Claims(
            session.user_id, int(session.expires_at), session.jti or "", session.key_id, session.gen
        )
        return self._check(claims)

    @defer.inlineCallbacks
    def _check(self, claims: Claims) -> defer.Deferred:
        """Fire with (key_id, VerifyKey) of a token whose signature and times
        were checked, or fail ``unauthorized`` with the close code that fits."""
        yield self._ready()
        state = yield self.user_keys(claims.user_id)
        if state is None:
            raise AuthError("unauthorized", "the token's user does not exist", ACCOUNT_DELETED)
        kid = claims.kid
        if kid is None:
            # A token from before keys per device: the registration key's.
            kid = yield self._registration_key_id(claims.user_id)
        if (kid is not None and kid not in state.keys) or claims.gen > state.gen:
            # A key added (no account event announces an addition) or a
            # generation raised since the user's keys were cached: read them
            # again before refusing.
            self._keys.pop(claims.user_id, None)
            state = yield self.user_keys(claims.user_id)
            if state is None:
                raise AuthError("unauthorized", "the token's user does not exist", ACCOUNT_DELETED)
        if claims.jti in self._signed_out or claims.gen < state.gen:
            raise AuthError("unauthorized", "the token was signed out", SIGNED_OUT)
        key = state.keys.get(kid) if kid is not None else None
        if key is None:
            raise AuthError("unauthorized", "the token's key was revoked", KEY_REVOKED)
        return kid, key

    @defer.inlineCallbacks
    def _registration_key_id(self, user_id: str) -> defer.Deferred:
        entries = yield self._store.key_log(user_id)
        return entries[0].key_id if entries else None

    @defer.inlineCallbacks
    def user_keys(self, user_id: str) -> defer.Deferred:
        """Fire with the user's active keys and token generation (cached), or
        None if no such user."""
        cached = self._keys.get(user_id)
        if cached is not None:
            self._keys.move_to_end(user_id)
            return cached
        for _ in range(3):
            epoch = self.epoch
            found: UserKeys | None = yield self._store.user_keys(user_id)
            if found is None or user_id in self._deleted:
                return None
            state = _Keys({k.key_id: VerifyKey(k.public_key) for k in found.keys}, found.token_gen)
            if epoch == self.epoch:
                self._cache_keys(user_id, state)
                return state
            # An account change was handled while this read was out: what it
            # read may come from before the change, so it is not cached, and
            # is read again.
        return state

    def _cache_keys(self, user_id: str, state: _Keys) -> None:
        self._keys[user_id] = state
        self._keys.move_to_end(user_id)
        if len(self._keys) > _KEY_CACHE_SIZE:
            self._keys.popitem(last=False)

    @defer.inlineCallbacks
    def verify_key(self, user_id: str) -> defer.Deferred:
        """Fire with the ``VerifyKey`` of the user's first active key, or None."""
        state = yield self.user_keys(user_id)
        if state is None or not state.keys:
            return None
        return next(iter(state.keys.values()))

    # -- the key log, sign-out, deletion (protocol section 12) ----------------------

    @defer.inlineCallbacks
    def key_log(self, user_id: object) -> defer.Deferred:
        """Fire with the user's key log (``keylog.Entry`` items, oldest first),
        or fail ``unknown_user``."""
        entries = (yield self._store.key_log(user_id)) if is_user_id(user_id) else None
        if entries is None:
            raise AuthError("unknown_user", "no such user")
        return entries

    @defer.inlineCallbacks
    def append_entry(self, user_id: object, body: dict) -> defer.Deferred:
        """Append the entry a POST .../keylog body holds, checked against the
        whole stored log in the store's transaction: fire with (the stored
        ``Entry``, the ``Change`` to apply at once, or None for an ``add``)."""
        try:
            entry = keylog.entry_from_json(body)
        except keylog.KeyLogError as exc:
            raise AuthError(exc.code, exc.message) from None
        if entry.action not in (keylog.ADD, keylog.REVOKE):
            raise AuthError("invalid_request", "action must be add or revoke")
        if entry.action == keylog.REVOKE and entry.key_signature is not None:
            raise AuthError("invalid_request", "key_signature must be null for a revoke")
        if entry.action == keylog.REVOKE and entry.name is not None:
            raise AuthError("invalid_request", "name must be null for a revoke")
        if not is_user_id(user_id):
            raise AuthError("unknown_user", "no such user")
        entry = dataclasses.replace(entry, at_ms=self._now_ms())
        max_keys = self._max_keys

        def check(entries: list[keylog.Entry]) -> None:
            # In the store's transaction: the stored log was checked entry by
            # entry when it was appended; the new entry is checked in full.
            state = keylog.replay(user_id, entries, verify=False)
            keylog.apply(state, user_id, entry, verify=True, max_keys=max_keys)

        try:
            stored = yield self._store.append_key_entry(user_id, entry, check)
        except keylog.KeyLogError as exc:
            raise AuthError(exc.code, exc.message) from None
        if stored is None:
            raise AuthError("unknown_user", "no such user")
        change = None
        if stored.action == keylog.REVOKE:
            change = (EVENT_KEY_REVOKED, user_id, stored.key_id)
        return stored, change

    @defer.inlineCallbacks
    def delete_account(self, user_id: object, body: dict) -> defer.Deferred:
        """Delete the user, given ``{key_id, signature}`` by an active key over
        the deletion string at the log's next seq: fire with the ``Change``."""
        kid = body.get("key_id")
        if not isinstance(kid, str):
            raise AuthError("invalid_request", "key_id must be a string")
        raw_sig = body.get("signature")
        if not isinstance(raw_sig, str):
            raise AuthError("invalid_request", "signature must be a base64 string")
        try:
            signature = b64decode(raw_sig)
        except ValueError:
            raise AuthError("invalid_signature", "signature is not base64") from None
        if not is_user_id(user_id):
            raise AuthError("unknown_user", "no such user")

        def check(entries: list[keylog.Entry]) -> None:
            state = keylog.replay(user_id, entries, verify=False)
            key = state.active.get(kid)
            if key is None:
                raise keylog.KeyLogError("invalid_signature", "key_id is not an active key")
            statement = keylog.delete_string(user_id, state.next_seq)
            if not keylog.signature_ok(key, statement, signature):
                raise keylog.KeyLogError(
                    "invalid_signature",
                    "the signature does not match the deletion at the log's next seq",
                )

        # This node's queued group cursor moves first: leaving the groups then
        # settles what only this user still waited for (store/groups.py).
        yield self._store.drain()
        try:
            deleted = yield self._store.delete_account(user_id, self._now_ms(), check)
        except keylog.KeyLogError as exc:
            raise AuthError(exc.code, exc.message) from None
        if deleted is None:
            raise AuthError("unknown_user", "no such user")
        return (EVENT_DELETED, user_id, None)

    @defer.inlineCallbacks
    def logout(self, token: str, everywhere: bool) -> defer.Deferred:
        """Sign out the token (``everywhere``: every token of its user issued so
        far); fire with the ``Change``, or fail ``unauthorized`` for a token
        that is not valid now."""
        claims = self.tokens.claims(token)
        yield self._check(claims)
        now = self._now_ms()
        if everywhere:
            gen = yield self._store.revoke_tokens(claims.user_id, now)
            if gen is None:
                raise AuthError("unauthorized", "the token's user does not exist")
            return (EVENT_SIGNED_OUT_ALL, claims.user_id, str(gen))
        stored = yield self._store.revoke_token(claims.user_id, claims.jti, claims.exp * 1000, now)
        if not stored:  # deleted since the token was checked: nothing was stored
            raise AuthError("unauthorized", "the token's user does not exist")
        return (EVENT_SIGNED_OUT, claims.user_id, claims.jti)


def public_user(user: User, keys: UserKeys | None = None) -> dict:
    """The public view of a user, as GET /auth/users/{id} shows it (with
    ``keys``: the active keys, and ``public_key`` the first of them)."""
    body = {
        "user_id": user.user_id,
        "username": user.username,
        "public_key": b64encode(user.public_key),
    }
    if keys is not None:
        body["public_key"] = b64encode(keys.keys[0].public_key)
        body["keys"] = [
            {
                "key_id": k.key_id,
                "public_key": b64encode(k.public_key),
                "name": k.name,
                "added_at": format_timestamp(k.added_ms),
            }
            for k in keys.keys
        ]
    return body
