"""The signed message path, component by component, in one process.

Not a test and not part of ``wsserver-bench``: a profiling aid for the T1
work (docs/performance.md, "The signed path (T1)").  It drives the server's
own functions on a frame like the ones the ``direct`` workload sends (about
100 bytes of content, a nonce, a signature) and prints the median
microseconds of each step, so the part of a message that is not the verify
can be split without sampling noise.  The WebSocket layer, the Deferreds,
routing and the store hand-off run inside the reactor and are measured with
py-spy instead (the same section).

    python -m wsserver.bench.components [--rounds 7] [--number 20000] [--interleaved]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import timeit
from collections.abc import Callable

from nacl.signing import SigningKey

from wsserver.auth import verification_of, verify
from wsserver.messages import (
    VERIFIED,
    Message,
    ack_frame,
    b64decode,
    loads_object,
    message_frame,
    parse_client_frame,
    parse_control_frame,
    signing_input,
)
from wsserver.ratelimit import RateLimiter
from wsserver.store import NewMessage
from wsserver.websocket import Unmasker, text_frame


class _Clock:
    def seconds(self) -> float:
        return 1_765_000_000.0


def _frame() -> tuple[bytes, SigningKey, str]:
    key = SigningKey(b"\x01" * 32)
    sender, recipient, nonce = "user00017", "user00042", "n123456"
    content = "x" * 100
    data = signing_input(sender, recipient, nonce, content)
    sig = base64.b64encode(key.sign(data).signature).decode()
    frame = {"to": recipient, "content": content, "nonce": nonce, "signature": sig}
    return json.dumps(frame, separators=(",", ":")).encode(), key, sender


def steps() -> list[tuple[str, Callable[[], object]]]:
    payload, key, sender = _frame()
    verify_key = key.verify_key
    text = payload.decode("utf-8")
    draft = parse_client_frame(text, sender, 4096)
    signed = signing_input(sender, draft.recipient, draft.nonce, draft.content)
    sig_text = loads_object(text)["signature"]
    limiter = RateLimiter(1e9, 1e9, _Clock())
    mask = b"\x11\x22\x33\x44"
    clock = _Clock()

    def unmask() -> bytes:
        return Unmasker(mask).process(payload)

    def new_message() -> NewMessage:
        return NewMessage(
            sender,
            draft.recipient,
            draft.content,
            draft.signature,
            draft.nonce,
            VERIFIED,
            int(clock.seconds() * 1000),
            "k1",
        )

    def out_frames() -> tuple[bytes, bytes]:
        msg = Message(
            1,
            sender,
            draft.recipient,
            draft.content,
            draft.signature,
            draft.nonce,
            VERIFIED,
            "delivered",
            1_765_000_000_123,
            key_id="k1",
        )
        return text_frame(message_frame(msg)), text_frame(ack_frame(msg))

    return [
        ("unmask (Unmasker, ~200 B)", unmask),
        ("UTF-8 decode", lambda: payload.decode("utf-8")),
        ("rate-limit take", lambda: limiter.take(sender)),
        ("control-frame check", lambda: parse_control_frame(text)),
        ("JSON decode (loads_object)", lambda: loads_object(text)),
        (
            "parse_client_frame (JSON + validation + base64)",
            lambda: parse_client_frame(text, sender, 4096),
        ),
        ("  of which base64 of the signature", lambda: b64decode(sig_text)),
        (
            "signed string (signing_input)",
            lambda: signing_input(sender, draft.recipient, draft.nonce, draft.content),
        ),
        ("verify (PyNaCl)", lambda: verify(verify_key, signed, draft.signature)),
        (
            "verification_of (signed string + verify)",
            lambda: verification_of(sender, draft, verify_key),
        ),
        ("NewMessage", new_message),
        ("Message + its frame and ack, encoded", out_frames),
    ]


def interleaved(rounds: int, number: int) -> tuple[float, float, float]:
    """A verify's µs alone (in a loop, as ``wsserver-bench verify`` times it),
    between the other steps of the path, three times each, as a server runs
    it (other code in between evicts what the verify keeps warm), and eight
    verifies in a row after eight such paths: each the time of paths +
    verifies less that of the paths alone, per message."""
    named = dict(steps())
    verify_step = named["verify (PyNaCl)"]
    others = [fn for name, fn in named.items() if "verify" not in name]

    def paths() -> None:
        for _ in range(8):
            for _ in range(3):
                for fn in others:
                    fn()

    def each_between() -> None:
        for _ in range(8):
            for _ in range(3):
                for fn in others:
                    fn()
            verify_step()

    def in_a_row() -> None:
        paths()
        for _ in range(8):
            verify_step()

    def median(fn: Callable[[], object], per: int) -> float:
        times = timeit.repeat(fn, number=number, repeat=rounds)
        return statistics.median(times) / number / per * 1e6

    base = median(paths, 8)
    return median(verify_step, 1), median(each_between, 8) - base, median(in_a_row, 8) - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument(
        "--interleaved", action="store_true", help="a verify alone and between the other steps"
    )
    args = parser.parse_args()
    if args.interleaved:
        alone, between, in_a_row = interleaved(args.rounds, max(1, args.number // 80))
        print(f"{alone:8.2f} µs  verify alone")
        print(f"{between:8.2f} µs  verify between the path's steps")
        print(f"{in_a_row:8.2f} µs  verify, eight in a row after eight paths")
        return
    for name, fn in steps():
        number = max(1, args.number // 20) if "verify" in name else args.number
        times = timeit.repeat(fn, number=number, repeat=args.rounds)
        print(f"{statistics.median(times) / number * 1e6:8.2f} µs  {name}")


if __name__ == "__main__":
    main()
