"""Accept/reject of each Ed25519 package against PyNaCl (libsodium) on the
project's vectors and malleability cases."""

import base64
import json

import ed25519_zebra as z
import eddsa
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

L = 2**252 + 27742317777372353535851937790883648493
P = 2**255 - 19
with open("/work/shared/test-vectors.json") as fh:
    v = json.load(fh)
cases = []
for group, _expect in (("messages", True), ("invalid_messages", False)):
    for m in v[group]:
        pk = base64.b64decode(v["users"][m["from"]]["public_key"])
        data = (
            "wsserver-msg-v1\n"
            + m["from"]
            + "\n"
            + m["to"]
            + "\n"
            + (m.get("nonce") or "")
            + "\n"
            + m["content"]
        ).encode()
        cases.append(
            (f"vector {group} {m.get('nonce')}", pk, data, base64.b64decode(m["signature"]))
        )
sk = SigningKey(bytes.fromhex(v["users"]["alice"]["secret_seed_hex"]))
pk = bytes(sk.verify_key)
msg = b"wsserver-msg-v1\nalice\nbob\nn-1\nhello"
sig = sk.sign(msg).signature
R, S = sig[:32], int.from_bytes(sig[32:], "little")
cases.append(("valid signature", pk, msg, sig))
cases.append(("S + L (non-canonical S)", pk, msg, R + (S + L).to_bytes(32, "little")))
cases.append(("S + 2^253 (top bits set)", pk, msg, R + (S + 2**253).to_bytes(32, "little")))
ident = (1).to_bytes(32, "little")
cases.append(("small-order A (identity), R identity, S 0", ident, msg, ident + bytes(32)))
# the point of order 2: y = -1
order2 = (P - 1).to_bytes(32, "little")
cases.append(("small-order A (order 2), R identity, S 0", order2, msg, ident + bytes(32)))
# non-canonical encoding of the identity: y = 1 + p
nc_ident = (1 + P).to_bytes(32, "little")
cases.append(("non-canonical A (y = p+1), R identity, S 0", nc_ident, msg, ident + bytes(32)))
cases.append(("non-canonical R (y = p+1), small-order A, S 0", ident, msg, nc_ident + bytes(32)))
# identity with the sign bit set (x = 0, sign 1): non-canonical
cases.append(
    (
        "identity A with sign bit set, S 0",
        (1 | (1 << 255)).to_bytes(32, "little"),
        msg,
        ident + bytes(32),
    )
)
tampered = bytearray(sig)
tampered[0] ^= 1
cases.append(("tampered R", pk, msg, bytes(tampered)))
cases.append(("tampered message", pk, msg + b"!", sig))


def nacl_ok(pk, m, s):
    try:
        VerifyKey(pk).verify(m, s)
        return True
    except (BadSignatureError, ValueError, TypeError):
        return False


def zebra_ok(pk, m, s):
    try:
        return bool(z.ed_verify(s, m, pk))
    except Exception:
        return False


def eddsa_ok(pk, m, s):
    try:
        return bool(eddsa.ed25519_verify(s, pk, m))
    except Exception as e:
        return f"error {type(e).__name__}"


print("| case | PyNaCl 1.6.2 | py-ed25519-zebra-bindings 1.3.0 | eddsa 0.8.0 |")
print("| --- | --- | --- | --- |")
for name, pk_, m, s in cases:
    a, b, c = nacl_ok(pk_, m, s), zebra_ok(pk_, m, s), eddsa_ok(pk_, m, s)

    def mark(x, a=a):
        word = "accept" if x is True else "reject" if x is False else x
        return word + ("" if x == a else " **differs**")

    print(f"| {name} | {mark(a)} | {mark(b)} | {mark(c)} |")
