"""Split a py-spy raw profile's reactor-thread samples by component of the
message path (docs/performance.md, "The signed path (T1)").

    python docs/bench/t1-pyspy-split.py PROFILE.raw [THREAD]

A stack's samples go to the first rule matching its leaf-most frame that any
rule matches (frames read as "function (file:line)").
"""

import collections
import re
import sys

_FRAMES_OUT = (
    r"^Message\.encoded|^dumps |json/encoder|^ack_frame |^message_frame |"
    r"^text_frame |^format_timestamp |^b64encode |^system_frame "
)
_TRANSPORT = (
    r"twisted/internet/(abstract|tcp|_newtls|_producer_helpers)\.py|"
    r"_write \(wsserver|_send_text"
)
_VALIDATION = (
    r"^parse_client_frame |^is_user_id |^is_group_id |^Draft|"
    r"messages\.py.*__init__|^__create_fn__"
)
RULES = [
    (r"^VerifyKey\.verify |nacl/", "verify (PyNaCl)"),
    (r"^signing_input ", "signed string"),
    (r"^b64decode |base64\.py", "base64 in"),
    (r"^loads_object |json/decoder|^_unique_keys |^_lone_surrogate", "JSON decode"),
    (_VALIDATION, "validation + Draft/NewMessage objects"),
    (r"^parse_control_frame ", "control-frame check"),
    (r"^verification_of |^verify \(wsserver", "verify call glue"),
    (_FRAMES_OUT, "frames out: encoding"),
    (_TRANSPORT, "frames out: transport write + send()"),
    (r"^Unmasker|create_xor_masker", "frame in: unmasking"),
    (r"autobahn/", "frame in: Autobahn"),
    (r"wsserver/store/", "store: queue, batches, results"),
    (r"wsserver/broker/|wsserver/peers", "routing (broker)"),
    (r"wsserver/ratelimit", "rate limit"),
    (r"wsserver/metrics", "metrics"),
    (r"wsserver/inturn", "InTurn"),
    (r"wsserver/websocket\.py", "websocket.py glue"),
    (r"twisted/internet/defer\.py", "Deferreds"),
    (r"twisted/logger/|twisted/python/log\.py.*(msg|emit)", "logging"),
    (r"threadpool|_threads|callFromThread|adbapi|wakeUp|_Waker", "thread hand-offs"),
    (r"epoll|doPoll", "reactor loop (epoll, dispatch)"),
    (r"twisted/", "reactor loop (epoll, dispatch)"),
]
COMPILED = [(re.compile(pattern), name) for pattern, name in RULES]


def category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for pattern, name in COMPILED:
            if pattern.search(frame):
                return name
    return "other"


def main() -> None:
    thread = sys.argv[2] if len(sys.argv) > 2 else "MainThread"
    totals: collections.Counter = collections.Counter()
    with open(sys.argv[1]) as profile:
        for line in profile:
            stack, count = line.rstrip().rsplit(" ", 1)
            frames = stack.split(";")
            if thread in frames[0]:
                totals[category(frames[1:])] += int(count)
    samples = sum(totals.values())
    for name, count in totals.most_common():
        print(f"{100 * count / samples:5.1f}%  {count:5d}  {name}")
    print(samples, "samples")


if __name__ == "__main__":
    main()
