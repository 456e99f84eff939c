"""The wire format: signing input, client-frame parsing and every refusal it decides."""

from __future__ import annotations

import json

from twisted.trial import unittest

from wsserver import messages as m

from .support import VECTORS


def frame(**fields) -> bytes:
    return json.dumps(fields).encode("utf-8")


class SigningInputTests(unittest.TestCase):
    def test_signing_input_matches_every_vector(self):
        """signing_input() gives the exact bytes of every known-answer vector."""
        for vec in VECTORS["messages"] + VECTORS["invalid_messages"]:
            got = m.signing_input(vec["from"], vec["to"], vec["nonce"] or None, vec["content"])
            self.assertEqual(got.hex(), vec["signing_input_hex"], vec)

    def test_absent_nonce_signs_as_empty_string(self):
        """A message without a nonce signs the empty string in the nonce slot."""
        self.assertEqual(m.signing_input("a", "b", None, "x"), m.signing_input("a", "b", "", "x"))
        self.assertEqual(m.signing_input("a", "b", None, "x"), b"wsserver-msg-v1\na\nb\n\nx")


class ParseTests(unittest.TestCase):
    def parse(self, payload: bytes, limit: int = 65536) -> m.Draft:
        return m.parse_client_frame(payload, "alice", limit)

    def assertRefused(self, payload: bytes, code: str, limit: int = 65536) -> m.Refusal:
        with self.assertRaises(m.Refusal) as ctx:
            self.parse(payload, limit)
        self.assertEqual(ctx.exception.code, code)
        return ctx.exception

    def test_well_formed_frame(self):
        """A full frame parses into recipient, content, raw signature and nonce."""
        sig = VECTORS["messages"][0]["signature"]
        draft = self.parse(frame(to="bob", content="hi", signature=sig, nonce="c-1"))
        self.assertEqual(draft.recipient, "bob")
        self.assertEqual(draft.content, "hi")
        self.assertEqual(len(draft.signature), 64)
        self.assertEqual(draft.nonce, "c-1")

    def test_server_fields_are_ignored_and_type_message_accepted(self):
        """id, timestamp, status and verification from a client are ignored."""
        draft = self.parse(
            frame(
                to="bob",
                content="x",
                id=5,
                timestamp="t",
                status="delivered",
                verification="verified",
                type="message",
                **{"from": "alice"},
            )
        )
        self.assertEqual((draft.recipient, draft.signature, draft.nonce), ("bob", None, None))

    def test_absent_null_and_empty_nonce_and_signature_mean_none(self):
        """nonce and signature: absent, null and "" all mean none."""
        for value in (None, ""):
            draft = self.parse(frame(to="bob", content="x", nonce=value, signature=value))
            self.assertIsNone(draft.nonce)
            self.assertIsNone(draft.signature)

    def test_signature_padding_is_optional(self):
        """A signature without base64 padding decodes the same."""
        sig = VECTORS["messages"][0]["signature"]
        a = self.parse(frame(to="bob", content="x", signature=sig))
        b = self.parse(frame(to="bob", content="x", signature=sig.rstrip("=")))
        self.assertEqual(a.signature, b.signature)

    def test_invalid_message_cases(self):
        """Not JSON, not an object, duplicate keys, deep nesting, missing or ill-typed
        fields, a bad nonce and an unknown type are invalid_message."""
        cases = [
            b"not json",
            b"[1, 2]",
            b'"text"',
            b'{"to": "bob", "to": "eve", "content": "x"}',
            b"[" * 100000 + b"]" * 100000,
            frame(content="x"),
            frame(to="bob"),
            frame(to=5, content="x"),
            frame(to="bob", content=5),
            frame(to="bob", content=None),
            frame(to="bob", content="x", signature=5),
            frame(to="bob", content="x", nonce="has space"),
            frame(to="bob", content="x", nonce="n" * 65),
            frame(to="bob", content="x", nonce=7),
            frame(to="bob", content="x", type="ping"),
            b"\xff\xfe",
            # RFC 8259 has no NaN or infinities (Python's decoder takes them)
            b'{"to": "bob", "content": "x", "extra": NaN}',
            b'{"to": "bob", "content": "x", "extra": [Infinity]}',
            b'{"to": "bob", "content": "x", "extra": {"a": -Infinity}}',
        ]
        for payload in cases:
            self.assertRefused(payload, "invalid_message")

    def test_refusal_echoes_nonce(self):
        """A refusal carries the refused frame's nonce when it had one."""
        refusal = self.assertRefused(frame(to="bob", content=5, nonce="c-9"), "invalid_message")
        self.assertEqual(refusal.nonce, "c-9")

    def test_unknown_recipient_syntax(self):
        """A recipient that cannot be a user_id, or is 'system', is unknown_recipient."""
        for to in ("", "has space", "x" * 65, "system", "a/b"):
            self.assertRefused(frame(to=to, content="x"), "unknown_recipient")
        self.assertEqual(self.parse(frame(to=m.BROADCAST, content="x")).recipient, "broadcast")

    def test_content_size_is_counted_in_utf8_bytes(self):
        """The limit is on UTF-8 bytes: 'é' * n is 2n bytes."""
        self.parse(frame(to="bob", content="a" * 10), limit=10)
        self.assertRefused(frame(to="bob", content="a" * 11), "message_too_large", limit=10)
        self.assertRefused(frame(to="bob", content="é" * 6), "message_too_large", limit=10)
        self.parse(frame(to="bob", content="é" * 5), limit=10)

    def test_from_must_be_the_sender(self):
        """'from' naming someone else is from_mismatch."""
        self.assertRefused(frame(to="bob", content="x", **{"from": "mallory"}), "from_mismatch")

    def test_malformed_signatures(self):
        """Bad base64 or a wrong length is invalid_signature."""
        self.assertRefused(frame(to="bob", content="x", signature="!!!"), "invalid_signature")
        self.assertRefused(frame(to="bob", content="x", signature="AAAA"), "invalid_signature")


class FormatTests(unittest.TestCase):
    def test_timestamp_is_rfc3339_milliseconds_utc(self):
        """Timestamps look like 2026-11-25T12:34:56.789Z."""
        self.assertEqual(m.format_timestamp(1795610096789), "2026-11-25T12:34:56.789Z")
        self.assertEqual(m.format_timestamp(0), "1970-01-01T00:00:00.000Z")

    def test_message_frame_and_ack(self):
        """Frames carry every field; no nonce is null; the signature is padded base64."""
        msg = m.Message(7, "alice", "bob", "hi", b"\x01" * 64, None, m.VERIFIED, m.PENDING, 0)
        frame_ = json.loads(m.message_frame(msg))
        self.assertEqual(frame_["type"], "message")
        self.assertEqual(frame_["status"], "delivered")
        self.assertIsNone(frame_["nonce"])
        self.assertTrue(frame_["signature"].endswith("="))
        ack = json.loads(m.ack_frame(msg))
        self.assertEqual((ack["type"], ack["status"], ack["id"]), ("ack", "pending", 7))
        self.assertEqual(set(ack) - {"type"}, set(frame_) - {"type"})

    def test_dumps_is_the_standard_compact_encoding(self):
        """dumps gives exactly json.dumps(ensure_ascii=False, separators=(",", ":"))
        as UTF-8, for every kind of value a frame or body holds (the C encoder
        is built once instead of per call)."""
        values = [
            {},
            [],
            "text",
            7,
            None,
            {"id": 2**63 - 1, "neg": -1, "big": 10**30, "f": 1.5, "e": 1e300, "z": -0.0},
            {"t": True, "f": False, "n": None, "l": [1, [2, [3, {"d": {}}]]]},
            {"content": 'é€😀 \n\t"\\ \u2028 \x00\x1f\x7f', "ключ": "значение"},
            {"nan": float("nan"), "inf": [float("inf"), -float("inf")]},
            [{"a": 1}, {"a": 2}, "x" * 5000],
        ]
        for value in values:
            expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            self.assertEqual(m.dumps(value), expected.encode("utf-8"))
        # Twice: nothing is left behind by the first call.
        self.assertEqual(m.dumps(values[6]), m.dumps(values[6]))

    def test_system_frame_shape(self):
        """A system frame is shaped like a message from 'system'."""
        f = json.loads(m.system_frame("alice", "rate_limited", "slow down", 0, "c-1", 200))
        self.assertEqual(f["from"], "system")
        self.assertEqual(f["to"], "alice")
        self.assertEqual(f["code"], "rate_limited")
        self.assertEqual(f["retry_after_ms"], 200)
        self.assertEqual(f["nonce"], "c-1")

    def test_nonce_from_raw(self):
        """The nonce of an unparsed frame is found without parsing it."""
        self.assertEqual(m.nonce_from_raw(b'{"to":"b","nonce": "c-7"}'), "c-7")
        self.assertIsNone(m.nonce_from_raw(b'{"to":"b"}'))


class IdentityTests(unittest.TestCase):
    def test_user_ids(self):
        """user_id: 1-64 of A-Z a-z 0-9 _ . -, case-sensitive."""
        for ok in ("a", "Alice_1.x-y", "x" * 64):
            self.assertTrue(m.is_user_id(ok))
        for bad in ("", "x" * 65, "a b", "ä", None, 5, "a\n"):
            self.assertFalse(m.is_user_id(bad))

    def test_group_ids(self):
        """group_id: '#' and 1-64 characters of the user id alphabet; a user
        id is not a group id, nor is a group id a user id."""
        for ok in ("#a", "#Team_1.x-y", "#" + "x" * 64):
            self.assertTrue(m.is_group_id(ok))
            self.assertFalse(m.is_user_id(ok))
        for bad in ("#", "team", "#" + "x" * 65, "#a b", "#ä", "##a", None, "#a\n"):
            self.assertFalse(m.is_group_id(bad))

    def test_conversation_of_is_one_key_for_both_directions(self):
        """conv: the two ids sorted bytewise and joined by a space, whoever
        sent; a note to self is the id twice."""
        self.assertEqual(m.conversation_of("bob", "alice"), "alice bob")
        self.assertEqual(m.conversation_of("alice", "bob"), "alice bob")
        self.assertEqual(m.conversation_of("B", "a"), "B a")  # bytewise: upper case first
        self.assertEqual(m.conversation_of("u", "u"), "u u")

    def test_username_is_nfc_normalised(self):
        """A decomposed name is stored composed."""
        self.assertEqual(m.normalize_username("Jose\u0301"), "Jos\u00e9")

    def test_username_limits(self):
        """Usernames: 1-128 code points, no Cc/Cf/Zl/Zp except the emoji joiner."""
        self.assertEqual(m.normalize_username("👩\u200d💻"), "👩\u200d💻")
        self.assertEqual(len(m.normalize_username("x" * 128)), 128)
        for bad in ("", "x" * 129, "a\x00b", "a\u200bb", "a\u2028b", "a\u2029b", "a\nb", 5):
            with self.assertRaises(ValueError):
                m.normalize_username(bad)


LONE = "\ud800"  # json.dumps writes it as the escape \ud800


class InvalidUnicodeTests(unittest.TestCase):
    """A JSON escape may spell a lone surrogate, which no UTF-8 text can hold."""

    def test_lone_surrogates_are_refused_where_json_is_parsed(self):
        """loads_object refuses a lone (high or low) surrogate in any string, a member
        name or a nested value, naming the top-level field; proper pairs pass."""
        for value in ("\ud800", "\udfff", "a\udc00b", "\ude00\ud83d"):
            for body, field in (
                ({"username": value}, "username"),
                ({"user_id": "a", "x": [1, {"y": value}]}, "x"),
                ({"ok": "fine", value: 1}, "a member name"),
            ):
                with self.assertRaises(m.InvalidJSON) as ctx:
                    m.loads_object(json.dumps(body))
                self.assertIn(field, str(ctx.exception))
                self.assertIn("Unicode", str(ctx.exception))
        self.assertEqual(m.loads_object(json.dumps({"c": "\U0001f600"}))["c"], "\U0001f600")
        self.assertEqual(m.loads_object(b'{"c": "\\\\ud800"}')["c"], "\\ud800")

    def test_a_lone_surrogate_in_text_is_refused_and_ascii_text_passes(self):
        """Text (not bytes) handed to loads_object may hold a surrogate itself,
        not only as an escape: refused with non-ASCII text around it too; ASCII
        text (which cannot hold one) and text with proper characters parse."""
        for text in ('{"c": "\ud800"}', '{"c": "é\udfff"}', '{"c": "😀", "d": ["\udc00"]}'):
            with self.assertRaises(m.InvalidJSON) as ctx:
                m.loads_object(text)
            self.assertIn("Unicode", str(ctx.exception))
        self.assertEqual(m.loads_object('{"c": "plain"}'), {"c": "plain"})
        self.assertEqual(m.loads_object('{"c": "é😀"}'), {"c": "é😀"})

    def test_content_holding_u0000_is_invalid_message(self):
        """U+0000 anywhere in content (which PostgreSQL's text cannot store) is
        invalid_message echoing the nonce; an escaped backslash before u0000 is text."""
        for content in ("\x00", "a\x00", "\x00b", "a\x00b\x00"):
            payload = json.dumps({"to": "bob", "content": content, "nonce": "n-1"})
            with self.assertRaises(m.Refusal) as ctx:
                m.parse_client_frame(payload.encode("ascii"), "alice", 65536)
            self.assertEqual((ctx.exception.code, ctx.exception.nonce), ("invalid_message", "n-1"))
            self.assertIn("U+0000", ctx.exception.message)
        draft = m.parse_client_frame(b'{"to": "bob", "content": "\\\\u0000"}', "alice", 65536)
        self.assertEqual(draft.content, "\\u0000")

    def test_every_frame_field_with_a_lone_surrogate_is_invalid_message(self):
        """to, content, nonce, signature, type, from and ignored fields holding a lone
        surrogate make the frame invalid_message (never a crash), echoing a valid nonce."""
        good = {"to": "bob", "content": "x", "nonce": "c-1", "signature": None}
        for name in ("to", "content", "nonce", "signature", "type", "from", "timestamp"):
            payload = json.dumps({**good, name: "a" + LONE}).encode("ascii")
            with self.assertRaises(m.Refusal) as ctx:
                m.parse_client_frame(payload, "alice", 65536)
            self.assertEqual(ctx.exception.code, "invalid_message", name)
            self.assertIn(name, ctx.exception.message)
            self.assertEqual(ctx.exception.nonce, None if name == "nonce" else "c-1")
            # The refusal frame itself can be encoded (it holds no surrogate).
            m.system_frame("alice", ctx.exception.code, ctx.exception.message, 0, None)
