"""The key log's pure functions against the shared known answers (section 12)."""

from __future__ import annotations

import unittest

from nacl.signing import SigningKey

from wsserver import keylog
from wsserver.keylog import Entry, KeyLogError
from wsserver.messages import b64decode

from .support import VECTORS, vector_entry

LOG = VECTORS["keylog"]


def _entries() -> list[Entry]:
    return [vector_entry(i) for i in range(len(LOG["entries"]))]


def _seed(hex_seed: str) -> SigningKey:
    return SigningKey(bytes.fromhex(hex_seed))


class VectorTests(unittest.TestCase):
    def test_key_ids(self) -> None:
        for case in VECTORS["key_ids"]:
            self.assertEqual(keylog.key_id(b64decode(case["public_key"])), case["key_id"])

    def test_entry_strings_and_prev(self) -> None:
        prev = ""
        for vector, entry in zip(LOG["entries"], _entries(), strict=True):
            self.assertEqual(vector["prev"], prev)
            string = entry.string(LOG["user_id"], prev)
            self.assertEqual(string, vector["string"])
            prev = keylog.digest(string)

    def test_signatures_are_the_vectors(self) -> None:
        alice = _seed(VECTORS["users"]["alice"]["secret_seed_hex"])
        second = _seed(LOG["second_device"]["secret_seed_hex"])
        signers = {keylog.key_id(bytes(k.verify_key)): k for k in (alice, second)}
        for vector, entry in zip(LOG["entries"][1:], _entries()[1:], strict=True):
            signed = signers[vector["by"]].sign(vector["string"].encode()).signature
            self.assertEqual(signed, entry.signature)
            if entry.action == keylog.ADD:
                self.assertEqual(
                    second.sign(vector["string"].encode()).signature, entry.key_signature
                )

    def test_the_whole_log_replays(self) -> None:
        state = keylog.replay(LOG["user_id"], _entries())
        second = b64decode(LOG["second_device"]["public_key"])
        self.assertEqual(state.active, {keylog.key_id(second): second})
        self.assertEqual(len(state.every), 2)
        self.assertEqual(state.next_seq, 3)

    def test_the_deletion_string(self) -> None:
        delete = LOG["delete"]
        self.assertEqual(keylog.delete_string(LOG["user_id"], 3), delete["string"])
        key = b64decode(LOG["second_device"]["public_key"])
        self.assertEqual(keylog.key_id(key), delete["key_id"])
        self.assertTrue(keylog.signature_ok(key, delete["string"], b64decode(delete["signature"])))


class RefusalTests(unittest.TestCase):
    def _replay_with(self, index: int, **changes: object) -> None:
        entries = _entries()
        e = entries[index]
        fields = {f: getattr(e, f) for f in Entry.__slots__}
        fields.update(changes)
        entries[index] = Entry(**fields)
        keylog.replay(LOG["user_id"], entries)

    def assert_code(self, code: str, index: int, **changes: object) -> None:
        with self.assertRaises(KeyLogError) as caught:
            self._replay_with(index, **changes)
        self.assertEqual(caught.exception.code, code)

    def test_a_tampered_signature(self) -> None:
        self.assert_code("invalid_signature", 1, signature=bytes(64))

    def test_a_missing_key_signature(self) -> None:
        self.assert_code("invalid_signature", 1, key_signature=None)

    def test_a_signer_that_is_not_active(self) -> None:
        # Entry 2 signed "by" alice's first key, which it then revokes: not
        # the signer of record, so the claimed signer's signature fails.
        self.assert_code("invalid_signature", 2, by="If4x36FUomFia_hU")

    def test_a_skipped_seq(self) -> None:
        self.assert_code("keylog_conflict", 2, seq=3)

    def test_a_rewritten_earlier_entry_breaks_every_later_one(self) -> None:
        other = bytes(SigningKey.generate().verify_key)
        # Entry 0 names another key: entry 1's prev (and so its signatures) no longer hold.
        with self.assertRaises(KeyLogError):
            self._replay_with(0, public_key=other)

    def test_the_last_key_cannot_be_revoked(self) -> None:
        key = SigningKey(bytes(32))
        pub = bytes(key.verify_key)
        string = keylog.entry_string("u", 1, keylog.REVOKE, pub, "")
        state = keylog.LogState()
        keylog.apply(state, "u", Entry(0, keylog.REGISTER, pub))
        string = keylog.entry_string("u", 1, keylog.REVOKE, pub, state.head)
        entry = Entry(
            1, keylog.REVOKE, pub, None, keylog.key_id(pub), key.sign(string.encode()).signature
        )
        with self.assertRaises(KeyLogError) as caught:
            keylog.apply(state, "u", entry)
        self.assertEqual(caught.exception.code, "last_key")

    def test_an_added_key_already_in_the_log(self) -> None:
        key = SigningKey(bytes(32))
        pub = bytes(key.verify_key)
        state = keylog.LogState()
        keylog.apply(state, "u", Entry(0, keylog.REGISTER, pub))
        string = keylog.entry_string("u", 1, keylog.ADD, pub, state.head)
        sig = key.sign(string.encode()).signature
        with self.assertRaises(KeyLogError) as caught:
            keylog.apply(state, "u", Entry(1, keylog.ADD, pub, None, keylog.key_id(pub), sig, sig))
        self.assertEqual(caught.exception.code, "key_exists")

    def test_too_many_keys(self) -> None:
        first = SigningKey(bytes(32))
        new = SigningKey(bytes([1]) * 32)
        state = keylog.LogState()
        keylog.apply(state, "u", Entry(0, keylog.REGISTER, bytes(first.verify_key)))
        pub = bytes(new.verify_key)
        string = keylog.entry_string("u", 1, keylog.ADD, pub, state.head)
        entry = Entry(
            1,
            keylog.ADD,
            pub,
            None,
            keylog.key_id(bytes(first.verify_key)),
            first.sign(string.encode()).signature,
            new.sign(string.encode()).signature,
        )
        with self.assertRaises(KeyLogError) as caught:
            keylog.apply(state, "u", entry, max_keys=1)
        self.assertEqual(caught.exception.code, "too_many_keys")
        keylog.apply(state, "u", entry, max_keys=2)
        self.assertEqual(len(state.active), 2)


class NameTests(unittest.TestCase):
    def test_names(self) -> None:
        self.assertIsNone(keylog.normalize_name(None))
        self.assertEqual(keylog.normalize_name("Cafe\u0301"), "Caf\u00e9")
        for bad in ("", "x" * 65, "a\u0000b", "a\u202eb", 5):
            with self.assertRaises(KeyLogError):
                keylog.normalize_name(bad)


class PairingTests(unittest.TestCase):
    def test_round_trip_and_wrapped_text(self) -> None:
        pairing = keylog.Pairing("alice.b", 7, bytes(range(32)), bytes(range(64)))
        text = keylog.pairing_text(pairing)
        self.assertTrue(text.startswith("wsserver-pair-v1:alice.b:7:"))
        self.assertEqual(keylog.parse_pairing_text(text), pairing)
        wrapped = "  " + text[:30] + "\n" + text[30:] + "\n"
        self.assertEqual(keylog.parse_pairing_text(wrapped), pairing)

    def test_what_is_not_a_pairing_text(self) -> None:
        good = keylog.pairing_text(keylog.Pairing("a", 1, bytes(32), bytes(64)))
        head, user, seq, key, sig = good.split(":")
        for bad in (
            "",
            "hello",
            good + ":x",
            ":".join(("wsserver-pair-v2", user, seq, key, sig)),
            ":".join((head, "a/b", seq, key, sig)),
            ":".join((head, user, "-1", key, sig)),
            ":".join((head, user, "\u0661", key, sig)),
            ":".join((head, user, seq, key[:-1], sig)),
            ":".join((head, user, seq, key, sig + "AA")),
            ":".join((head, user, seq, key.replace("A", "+"), sig)),
        ):
            with self.assertRaises(KeyLogError, msg=bad):
                keylog.parse_pairing_text(bad)
