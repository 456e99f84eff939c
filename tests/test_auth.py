"""Keys, signatures (against the known-answer vectors), tokens and the login dance."""

from __future__ import annotations

import base64

import jwt
from nacl.signing import SigningKey, VerifyKey
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from wsserver import auth, keylog
from wsserver.messages import Draft, b64decode, signing_input
from wsserver.store import KeyRecord, Store, UserKeys, prepare_database

from .support import VECTORS, b64, public_b64, vector_key

SECRET = b"s" * 32


class VectorTests(unittest.TestCase):
    def test_vector_keys_derive_the_listed_public_keys(self):
        """The secret seeds of the vectors give their public keys."""
        for name, user in VECTORS["users"].items():
            self.assertEqual(public_b64(vector_key(name)), user["public_key"])

    def test_login_vector(self):
        """Signing the challenge bytes reproduces the vector, and verify() accepts it."""
        vec = VECTORS["login"][0]
        self.assertEqual(vec["challenge"].encode("utf-8").hex(), vec["signed_bytes_hex"])
        key = vector_key(vec["user_id"])
        sig = key.sign(vec["challenge"].encode("utf-8")).signature
        self.assertEqual(b64(sig), vec["signature"])
        self.assertTrue(auth.verify(key.verify_key, vec["challenge"].encode(), sig))

    def test_message_vectors_verify(self):
        """Every valid message vector verifies; signing reproduces it exactly."""
        for vec in VECTORS["messages"]:
            key = vector_key(vec["from"])
            draft = Draft(
                vec["to"], vec["content"], b64decode(vec["signature"]), vec["nonce"] or None
            )
            self.assertEqual(auth.verification_of(vec["from"], draft, key.verify_key), "verified")
            data = signing_input(vec["from"], vec["to"], vec["nonce"], vec["content"])
            self.assertEqual(b64(key.sign(data).signature), vec["signature"])

    def test_invalid_message_vectors_are_invalid(self):
        """The tampered vector is invalid_signature."""
        for vec in VECTORS["invalid_messages"]:
            key = vector_key(vec["from"]).verify_key
            draft = Draft(vec["to"], vec["content"], b64decode(vec["signature"]), vec["nonce"])
            self.assertEqual(auth.verification_of(vec["from"], draft, key), vec["expect"])

    def test_wrong_key_and_unsigned_and_no_key(self):
        """Another user's key is invalid; no signature is unsigned; no key is unverified."""
        vec = VECTORS["messages"][0]
        draft = Draft(vec["to"], vec["content"], b64decode(vec["signature"]), vec["nonce"])
        bob = vector_key("bob").verify_key
        self.assertEqual(auth.verification_of("alice", draft, bob), "invalid_signature")
        unsigned = Draft("bob", "x", None, None)
        self.assertEqual(auth.verification_of("alice", unsigned, bob), "unsigned")
        self.assertEqual(auth.verification_of("alice", draft, None), "unverified")

    def test_shared_vectors_are_in_step(self):
        """tests/vectors.json is the shared file, unchanged (when the shared copy is present)."""
        from pathlib import Path

        shared = Path(__file__).resolve().parents[2] / "shared" / "test-vectors.json"
        if not shared.exists():
            raise unittest.SkipTest("../shared/test-vectors.json is not beside this clone")
        here = Path(__file__).with_name("vectors.json")
        self.assertEqual(shared.read_bytes(), here.read_bytes())

    def test_published_protocol_is_in_step(self):
        """docs/protocol.md is the shared PROTOCOL.md verbatim, followed only by
        this implementation's decisions (when the shared copy is present)."""
        from pathlib import Path

        root = Path(__file__).resolve().parents[1]
        shared = root.parent / "shared" / "PROTOCOL.md"
        if not shared.exists():
            raise unittest.SkipTest("../shared/PROTOCOL.md is not beside this clone")
        contract = shared.read_text("utf-8").rstrip("\n")
        published = (root / "docs" / "protocol.md").read_text("utf-8")
        self.assertTrue(published.startswith(contract + "\n"))
        rest = published[len(contract) :].strip()
        self.assertTrue(rest.startswith("## 15. Decisions of this implementation"), rest[:80])
        self.assertEqual(rest.count("\n## "), 0, "the decisions must be the last section")


class PublicKeyTests(unittest.TestCase):
    def test_valid_keys_with_and_without_padding(self):
        """A valid key decodes to 32 bytes, padding optional."""
        key = VECTORS["users"]["alice"]["public_key"]
        self.assertEqual(len(auth.decode_public_key(key)), 32)
        self.assertEqual(auth.decode_public_key(key.rstrip("=")), auth.decode_public_key(key))

    def test_refused_keys(self):
        """Wrong length, bad base64, a non-string and an invalid point are refused."""
        small_order = base64.b64encode(b"\x01" + b"\x00" * 31).decode()  # the identity point
        for bad in ("AAAA", "!!", 5, None, b64(b"\x00" * 33), small_order):
            with self.assertRaises(ValueError):
                auth.decode_public_key(bad)


class TokenTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.tokens = auth.Tokens(SECRET, 3600, self.clock)

    def test_issue_and_check(self):
        """A fresh token names its user and carries every required claim."""
        token, exp = self.tokens.issue("alice")
        self.assertEqual(self.tokens.check(token), ("alice", exp))
        claims = jwt.decode(
            token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False}
        )
        self.assertEqual(claims["iss"], "wsserver")
        self.assertEqual(claims["exp"] - claims["iat"], 3600)
        self.assertTrue(claims["jti"])

    def test_expired_on_the_clock(self):
        """At its expiry time a token is refused."""
        token, _ = self.tokens.issue("alice")
        self.clock.advance(3600)
        with self.assertRaises(auth.AuthError):
            self.tokens.check(token)

    def test_a_token_checked_before_still_expires_on_the_clock(self):
        """A token remembered from an earlier check (a reconnect) is still
        refused at its expiry time, and still not valid before its nbf."""
        token, _ = self.tokens.issue("alice")
        self.assertEqual(self.tokens.check(token)[0], "alice")
        self.assertIn(token, self.tokens._checked)
        self.clock.advance(3600)
        with self.assertRaises(auth.AuthError) as caught:
            self.tokens.check(token)
        self.assertEqual(caught.exception.message, "token expired")
        now = int(self.clock.seconds())
        claims = {"sub": "bob", "iat": now, "exp": now + 60, "nbf": now + 30}
        early = jwt.encode({**claims, "iss": "wsserver", "jti": "y"}, SECRET, algorithm="HS256")
        for _ in range(2):  # refused the first time, and when remembered
            with self.assertRaises(auth.AuthError) as caught:
                self.tokens.check(early)
            self.assertEqual(caught.exception.message, "token not valid yet")
        self.clock.advance(30)
        self.assertEqual(self.tokens.check(early)[0], "bob")

    def test_a_remembered_token_does_not_vouch_for_a_forgery(self):
        """A token with a remembered token's header and payload but another
        signature is checked in full, and refused; the remembered tokens are
        bounded, the oldest dropped first."""
        token, _ = self.tokens.issue("alice")
        self.tokens.check(token)
        head, body, sig = token.split(".")
        forged = f"{head}.{body}.{'A' * len(sig)}"
        with self.assertRaises(auth.AuthError):
            self.tokens.check(forged)
        self.assertNotIn(forged, self.tokens._checked)
        self.patch(auth, "_CHECKED_TOKENS", 3)
        issued = [self.tokens.issue(f"u{i}")[0] for i in range(3)]
        for t in issued:
            self.tokens.check(t)
        self.assertEqual(list(self.tokens._checked), issued)

    def test_a_long_token_is_checked_but_not_remembered(self):
        """A valid token longer than ours can be (an extra claim padding it)
        is accepted, checked in full each time, and never remembered: what
        an attacker holding a token can put in the memo stays small."""
        now = int(self.clock.seconds())
        claims = {"sub": "alice", "iat": now, "exp": now + 60, "iss": "wsserver", "jti": "x"}
        long = jwt.encode({**claims, "pad": "p" * 2000}, SECRET, algorithm="HS256")
        self.assertGreater(len(long), 2000)
        for _ in range(2):
            self.assertEqual(self.tokens.check(long)[0], "alice")
        self.assertEqual(len(self.tokens._checked), 0)

    def test_forged_and_other_algorithms_refused(self):
        """Another secret, alg none, HS512, a missing claim, a wrong issuer and garbage
        (a lone surrogate included) fail as unauthorized."""
        now = int(self.clock.seconds())
        claims = {"sub": "alice", "iat": now, "exp": now + 60, "iss": "wsserver", "jti": "x"}
        bad = [
            jwt.encode(claims, b"t" * 32, algorithm="HS256"),
            jwt.encode(claims, None, algorithm="none"),
            jwt.encode(claims, SECRET * 2, algorithm="HS512"),
            jwt.encode({k: v for k, v in claims.items() if k != "jti"}, SECRET, algorithm="HS256"),
            jwt.encode({**claims, "iss": "other"}, SECRET, algorithm="HS256"),
            jwt.encode({**claims, "sub": "no spaces allowed"}, SECRET, algorithm="HS256"),
            "not-a-token",
            "eyJhbGciOiJIUzI1NiJ9.\ud800.x",
        ]
        for token in bad:
            with self.assertRaises(auth.AuthError) as ctx:
                self.tokens.check(token)
            self.assertEqual(ctx.exception.code, "unauthorized")

    def test_not_before_in_the_future_refused(self):
        """A token whose nbf is later than the reactor clock is refused until that
        time comes (RFC 8725 section 3.10); at nbf it is accepted."""
        now = int(self.clock.seconds())
        claims = {"sub": "alice", "iat": now, "exp": now + 600, "iss": "wsserver", "jti": "x"}
        token = jwt.encode({**claims, "nbf": now + 1}, SECRET, algorithm="HS256")
        with self.assertRaises(auth.AuthError) as ctx:
            self.tokens.check(token)
        self.assertEqual(ctx.exception.code, "unauthorized")
        self.clock.advance(1)
        self.assertEqual(self.tokens.check(token), ("alice", now + 600))
        for bad_nbf in ("soon", None, True, [1]):
            token = jwt.encode({**claims, "nbf": bad_nbf}, SECRET, algorithm="HS256")
            with self.assertRaises(auth.AuthError):
                self.tokens.check(token)

    def test_issued_in_the_future_beyond_the_leeway_refused(self):
        """A token issued more than IAT_LEEWAY seconds ahead of the reactor clock is
        refused; one within the leeway (clock skew between processes) is accepted;
        an iat that is not a number is refused."""
        now = int(self.clock.seconds())
        leeway = auth.IAT_LEEWAY
        self.assertTrue(0 < leeway <= 120)
        claims = {"sub": "alice", "exp": now + 3600, "iss": "wsserver", "jti": "x"}
        ahead = jwt.encode({**claims, "iat": now + leeway + 1}, SECRET, algorithm="HS256")
        with self.assertRaises(auth.AuthError) as ctx:
            self.tokens.check(ahead)
        self.assertEqual(ctx.exception.code, "unauthorized")
        within_leeway = jwt.encode({**claims, "iat": now + leeway}, SECRET, algorithm="HS256")
        self.assertEqual(self.tokens.check(within_leeway), ("alice", now + 3600))
        self.clock.advance(1)
        self.assertEqual(self.tokens.check(ahead), ("alice", now + 3600))
        for bad_iat in ("now", None, True, 1.5e300):
            token = jwt.encode({**claims, "iat": bad_iat}, SECRET, algorithm="HS256")
            with self.assertRaises(auth.AuthError):
                self.tokens.check(token)

    def test_short_secret_refused(self):
        """A secret under 32 bytes cannot be used."""
        with self.assertRaises(ValueError):
            auth.Tokens(b"short", 60, self.clock)


class LoginTests(unittest.TestCase):
    """The challenge-response on a real SQLite file and a fake clock."""

    def setUp(self):
        path = self.mktemp()
        prepare_database(path, auth.new_secret)
        from twisted.internet import reactor

        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = Store(path, reactor)
        self.addCleanup(self.store.close)
        self.auth = auth.Authenticator(
            self.store, auth.Tokens(SECRET, 60, self.clock), self.clock, challenge_ttl=60
        )
        self.key = SigningKey.generate()

    def register(self, user_id="alice"):
        return self.auth.register(
            {"user_id": user_id, "username": "A", "public_key": public_b64(self.key)}
        )

    def sign(self, challenge: str, key=None) -> str:
        return b64((key or self.key).sign(challenge.encode()).signature)

    @defer.inlineCallbacks
    def assertAuthError(self, d, code):
        try:
            yield d
        except auth.AuthError as err:
            self.assertEqual(err.code, code)
        else:
            self.fail(f"expected {code}")

    @defer.inlineCallbacks
    def test_a_look_up_racing_a_deletion_does_not_bring_the_key_back(self):
        """A key look-up that read the user just before the deletion committed,
        and returns after the node forgot the user, answers None and caches
        nothing: the deleted user's tokens stay refused on this node."""
        yield self.register()
        reading: defer.Deferred = defer.Deferred()
        found = yield self.store.user_keys("alice")
        self.patch(self.store, "user_keys", lambda user_id: reading)
        looking = self.auth.verify_key("alice")
        self.auth.forget("alice")  # the account event arrives meanwhile
        reading.callback(found)  # the read made before the deletion
        key = yield looking
        self.assertIsNone(key)
        self.assertNotIn("alice", self.auth._keys)

    @defer.inlineCallbacks
    def test_a_look_up_racing_a_revocation_reads_again(self):
        """A key look-up that read the user's keys just before a revocation
        committed, and returns after the node handled the revocation, caches
        nothing it read then: it reads again, and only the fresh answer (the
        revoked key gone) is cached."""
        yield self.register()
        other = SigningKey.generate()
        before = yield self.store.user_keys("alice")
        second = KeyRecord(keylog.key_id(bytes(other.verify_key)), bytes(other.verify_key), "x", 1)
        stale = UserKeys((*before.keys, second), before.token_gen)
        first_read: defer.Deferred = defer.Deferred()
        reads = [first_read, defer.succeed(before)]
        self.patch(self.store, "user_keys", lambda user_id: reads.pop(0))
        looking = self.auth.user_keys("alice")
        self.auth.key_revoked("alice")  # the account event arrives meanwhile
        first_read.callback(stale)  # the read made before the revocation
        state = yield looking
        self.assertEqual(list(state.keys), [before.keys[0].key_id])
        self.assertEqual(list(self.auth._keys["alice"].keys), [before.keys[0].key_id])
        self.assertEqual(reads, [])

    @defer.inlineCallbacks
    def login_token(self) -> defer.Deferred:
        challenge, _ = yield self.auth.challenge({"user_id": "alice"})
        token, _ = yield self.auth.login({"user_id": "alice", "signature": self.sign(challenge)})
        return token

    @defer.inlineCallbacks
    def test_a_login_leaves_the_keys_for_the_connect(self):
        """The keys a login read are cached: the token it issues is checked
        (as /ws does) without reading the database again."""
        yield self.register()
        token = yield self.login_token()

        def no_read(user_id: str) -> defer.Deferred:
            return defer.fail(AssertionError(f"read the keys of {user_id} again"))

        self.patch(self.store, "user_keys", no_read)
        session = yield self.auth.session(token)
        self.assertEqual(
            (session.user_id, session.key_id), ("alice", keylog.key_id(bytes(self.key.verify_key)))
        )

    @defer.inlineCallbacks
    def test_a_login_racing_an_account_change_caches_nothing(self):
        """A login whose key read came before an account change the node
        handled while the login was under way (a revocation, a deletion) keeps
        nothing it read: the token's check reads the keys again."""
        yield self.register()
        for change in (lambda: self.auth.key_revoked("alice"), lambda: self.auth.forget("bob")):
            self.auth._keys.clear()
            challenge, _ = yield self.auth.challenge({"user_id": "alice"})
            consume = self.store.consume_challenge
            held: defer.Deferred = defer.Deferred()

            def late(*args, consume=consume, held=held):
                return held.addCallback(lambda _: consume(*args))

            self.patch(self.store, "consume_challenge", late)
            logging_in = self.auth.login({"user_id": "alice", "signature": self.sign(challenge)})
            change()  # the account event arrives meanwhile
            held.callback(None)
            yield logging_in
            self.assertNotIn("alice", self.auth._keys)

    @defer.inlineCallbacks
    def test_challenge_format_and_login(self):
        """The challenge is wsserver-login-v1:<id>:<43 base64url chars>; signing it logs in."""
        yield self.register()
        challenge, expires = yield self.auth.challenge({"user_id": "alice"})
        prefix, user, nonce = challenge.split(":")
        self.assertEqual((prefix, user, len(nonce)), ("wsserver-login-v1", "alice", 43))
        self.assertEqual(len(base64.urlsafe_b64decode(nonce + "=")), 32)
        self.assertEqual(expires, int(self.clock.seconds() * 1000) + 60_000)
        token, _ = yield self.auth.login({"user_id": "alice", "signature": self.sign(challenge)})
        self.assertEqual(self.auth.tokens.check(token)[0], "alice")

    @defer.inlineCallbacks
    def test_challenge_is_single_use(self):
        """A used challenge cannot log in again."""
        yield self.register()
        challenge, _ = yield self.auth.challenge({"user_id": "alice"})
        body = {"user_id": "alice", "signature": self.sign(challenge)}
        yield self.auth.login(body)
        yield self.assertAuthError(self.auth.login(body), "no_challenge")

    @defer.inlineCallbacks
    def test_failure_consumes_what_it_was_tried_against(self):
        """A wrong signature burns every live challenge: the right one then finds none."""
        yield self.register()
        first, _ = yield self.auth.challenge({"user_id": "alice"})
        second, _ = yield self.auth.challenge({"user_id": "alice"})
        wrong = self.sign(second, SigningKey.generate())
        yield self.assertAuthError(
            self.auth.login({"user_id": "alice", "signature": wrong}), "invalid_signature"
        )
        for ch in (first, second):
            yield self.assertAuthError(
                self.auth.login({"user_id": "alice", "signature": self.sign(ch)}), "no_challenge"
            )

    @defer.inlineCallbacks
    def test_success_consumes_only_the_match(self):
        """Signing the older of two challenges consumes both tried (newest first), not more."""
        yield self.register()
        old, _ = yield self.auth.challenge({"user_id": "alice"})
        new, _ = yield self.auth.challenge({"user_id": "alice"})
        newest, _ = yield self.auth.challenge({"user_id": "alice"})
        # Naming the challenge tries only that one.
        yield self.auth.login({"user_id": "alice", "challenge": old, "signature": self.sign(old)})
        yield self.auth.login({"user_id": "alice", "signature": self.sign(newest)})
        # 'new' was never tried, so it is still live.
        yield self.auth.login({"user_id": "alice", "signature": self.sign(new)})

    @defer.inlineCallbacks
    def test_malformed_signature_is_invalid_and_consumes(self):
        """A signature that is not base64 is invalid_signature and burns the challenge."""
        yield self.register()
        challenge, _ = yield self.auth.challenge({"user_id": "alice"})
        yield self.assertAuthError(
            self.auth.login({"user_id": "alice", "signature": "%%%"}), "invalid_signature"
        )
        yield self.assertAuthError(
            self.auth.login({"user_id": "alice", "signature": self.sign(challenge)}),
            "no_challenge",
        )

    @defer.inlineCallbacks
    def test_challenge_expires(self):
        """After CHALLENGE_TTL seconds the challenge is gone."""
        yield self.register()
        challenge, _ = yield self.auth.challenge({"user_id": "alice"})
        self.clock.advance(60)
        yield self.assertAuthError(
            self.auth.login({"user_id": "alice", "signature": self.sign(challenge)}),
            "no_challenge",
        )

    @defer.inlineCallbacks
    def test_sixth_challenge_drops_the_oldest(self):
        """At most five live challenges: the first of six is gone, the second still works."""
        yield self.register()
        made = []
        for _ in range(6):
            ch, _ = yield self.auth.challenge({"user_id": "alice"})
            made.append(ch)
        yield self.assertAuthError(
            self.auth.login(
                {"user_id": "alice", "challenge": made[0], "signature": self.sign(made[0])}
            ),
            "no_challenge",
        )
        yield self.auth.login(
            {"user_id": "alice", "challenge": made[1], "signature": self.sign(made[1])}
        )

    @defer.inlineCallbacks
    def test_unknown_users(self):
        """Challenges and logins for unknown ids are unknown_user."""
        yield self.assertAuthError(self.auth.challenge({"user_id": "nobody"}), "unknown_user")
        yield self.assertAuthError(
            self.auth.login({"user_id": "nobody", "signature": "AAAA"}), "unknown_user"
        )

    @defer.inlineCallbacks
    def test_session_needs_an_existing_user(self):
        """A valid token of a user the database does not know is refused."""
        token, _ = self.auth.tokens.issue("ghost")
        yield self.assertAuthError(self.auth.session(token), "unauthorized")
        yield self.register()
        token, _ = self.auth.tokens.issue("alice")
        session = yield self.auth.session(token)
        self.assertEqual(session.user_id, "alice")
        self.assertIsInstance(session.verify_key, VerifyKey)
