"""What each JSON library does with the inputs wsserver's loads_object refuses."""

import importlib
import timeit

from wsserver.messages import InvalidJSON, loads_object

CASES = {
    "duplicate key": b'{"to":"bob","to":"eve","content":"x"}',
    "nested duplicate": b'{"to":"bob","content":"x","e":{"a":1,"a":2}}',
    "NaN": b'{"to":"bob","content":"x","e":NaN}',
    "Infinity": b'{"to":"bob","content":"x","e":[Infinity]}',
    "-Infinity": b'{"to":"bob","content":"x","e":-Infinity}',
    "lone surrogate escape": b'{"to":"bob","content":"a\\ud800"}',
    "lone low surrogate": b'{"to":"bob","content":"\\udfff"}',
    "invalid UTF-8": b'{"to":"bob","content":"\xff"}',
    "UTF-8-encoded surrogate (ED A0 80)": b'{"to":"bob","content":"\xed\xa0\x80"}',
    "raw control char in string": b'{"to":"bob","content":"a\x01b"}',
    "raw newline in string": b'{"to":"bob","content":"a\nb"}',
    "trailing comma": b'{"to":"bob","content":"x",}',
    "single quotes": b"{'to':'bob'}",
    "leading zero": b'{"to":"bob","content":"x","n":01}',
    "hex number": b'{"to":"bob","content":"x","n":0x1}',
    "comment": b'{"to":"bob",/*c*/"content":"x"}',
    "trailing garbage": b'{"to":"bob","content":"x"} x',
    "two objects": b'{"a":1}{"b":2}',
    "BOM": b'\xef\xbb\xbf{"to":"bob","content":"x"}',
    "huge number": b'{"to":"bob","content":"x","n":1' + b"0" * 5000 + b"}",
    "deep nesting": b"[" * 100000 + b"]" * 100000,
    "unescaped DEL (allowed)": b'{"to":"bob","content":"a\x7fb"}',
    "not an object": b"[1,2]",
}


def ours(b):
    loads_object(b)
    return "accepts"


libs = {"stdlib+hooks (wsserver)": ours}
for name in ("orjson", "msgspec", "ujson"):
    try:
        mod = importlib.import_module(name)
    except ImportError:
        continue
    f = {
        "orjson": lambda b, m=mod: m.loads(b),
        "msgspec": lambda b, m=mod: m.json.decode(b),
        "ujson": lambda b, m=mod: m.loads(b),
    }[name]
    libs[f"{name} {getattr(mod, '__version__', '?')}"] = f


def run(f, b):
    try:
        v = f(b)
    except InvalidJSON:
        return "refuses"
    except RecursionError:
        return "refuses (RecursionError)"
    except Exception as e:
        return f"refuses ({type(e).__name__})"
    if isinstance(v, str):
        return v
    s = repr(v)
    return "ACCEPTS " + (s[:40] if len(s) < 60 else s[:40] + "...")


print("| input | " + " | ".join(libs) + " |")
print("| --- |" + " --- |" * len(libs))
for case, b in CASES.items():
    print(f"| {case} | " + " | ".join(run(f, b) for f in libs.values()) + " |")
frame = (
    b'{"to":"user00042","content":"'
    + b"x" * 100
    + b'","nonce":"n123456","signature":"'
    + b"A" * 86
    + b'=="}'
)
text = frame.decode()
for n, f in libs.items():
    t = (
        min(
            timeit.repeat(
                lambda f=f, n=n: f(text if n.startswith("stdlib") else frame),
                number=20000,
                repeat=5,
            )
        )
        / 20000
        * 1e6
    )
    print(f"{n}: {t:.2f} us per direct-sized frame")
