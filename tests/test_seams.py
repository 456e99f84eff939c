"""Where wsserver meets Twisted and Autobahn: names that must not collide, the
internals it replaces (canaries that fail the day a new version changes them),
the one helper allowed to touch Twisted's undocumented parts, the Autobahn pin,
and process-wide tuning that only a server process gets."""

from __future__ import annotations

import ast
import configparser
import gc
import importlib
import importlib.metadata
import inspect
import json
import os
import pkgutil
import struct
import sys
import textwrap
from pathlib import Path
from typing import Any

import autobahn.websocket.interfaces as autobahn_interfaces
import autobahn.websocket.protocol as autobahn_protocol
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from packaging.requirements import Requirement
from packaging.version import Version
from twisted.internet import defer, reactor
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementedBy

import wsserver
import wsserver.websocket as ws_module
from wsserver import broker, internals, web
from wsserver.websocket import (
    OPTIONS_NOT_FORMATTED,
    UNMASK_NATIVE_FROM,
    ServerFactory,
    ServerProtocol,
    skip_unlogged_option_dumps,
    use_fast_unmasking,
)

from .support import ROOT, LiveServer, _Collect, twistd_env, within

FOREIGN = ("twisted", "autobahn")

# Names of a base class that a subclass of ours redefines on purpose although
# no interface declares them: the documented ways these classes are extended.
DOCUMENTED_EXTENSIONS = {
    "getChild": "Resource: the documented override for dynamic children",
    "gotLength": "Request: called by the channel with the body's length (bounds the body)",
    "handleContentChunk": "Request: called by the channel with each body chunk",
    "protocol": "Factory: the class attribute naming the protocol to build",
    "transport": "ProtocolWrapper: _Counted keeps the transport of a refused connection",
    "message_data": "Autobahn: onMessageEnd releases the message as Autobahn's own does",
}


def _wsserver_modules() -> list[Any]:
    modules = [wsserver]
    for info in pkgutil.walk_packages(wsserver.__path__, "wsserver."):
        modules.append(importlib.import_module(info.name))
    return modules


def _is_foreign(cls: type) -> bool:
    return cls.__module__.split(".")[0] in FOREIGN


def _extending_classes(modules: list[Any]) -> list[type]:
    """Every class defined in ``modules`` with a Twisted or Autobahn base."""
    found = []
    for module in modules:
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and value.__module__ == module.__name__
                and any(_is_foreign(c) for c in value.__mro__)
            ):
                found.append(value)
    return found


def _self_assignments(cls: type) -> set[str]:
    """Names a class's own source assigns as ``self.NAME`` (or ``setattr(self, "NAME")``)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return set()
    names = set()
    for node in ast.walk(ast.parse(source)):
        targets: list[Any] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            elements = target.elts if isinstance(target, ast.Tuple | ast.List) else [target]
            for element in elements:
                if (
                    isinstance(element, ast.Attribute)
                    and isinstance(element.value, ast.Name)
                    and element.value.id == "self"
                ):
                    names.add(element.attr)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setattr"
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == "self"
            and isinstance(node.args[1], ast.Constant)
        ):
            names.add(node.args[1].value)
    return names


def _base_names(bases: list[type]) -> set[str]:
    """Every name the Twisted/Autobahn bases define or set on their instances,
    including attributes set in loops over their lists of option names."""
    names: set[str] = set()
    for base in bases:
        names |= set(dir(base)) | _self_assignments(base)
        for value in vars(base).values():
            if isinstance(value, tuple | list) and value and all(isinstance(v, str) for v in value):
                names |= set(value)
    return names


def _declared_hooks(bases: list[type]) -> set[str]:
    """Names the bases declare in an interface (zope or Autobahn's ABCs): the
    callbacks meant to be implemented by subclasses."""
    names: set[str] = set()
    for base in bases:
        for iface in implementedBy(base).flattened():
            names |= set(iface.names())
    for value in vars(autobahn_interfaces).values():
        if inspect.isclass(value) and any(issubclass(b, value) for b in bases):
            names |= set(getattr(value, "__abstractmethods__", ()))
    return names


def _ours(cls: type) -> tuple[list[type], list[type]]:
    ours = [c for c in cls.__mro__ if c.__module__.split(".")[0] == "wsserver"]
    bases = [c for c in cls.__mro__ if _is_foreign(c)]
    return ours, bases


def _positional(func: Any) -> list[str] | None:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


class ShadowingTests(unittest.TestCase):
    def test_no_name_of_ours_shadows_a_twisted_or_autobahn_name(self):
        """No class of wsserver that extends a Twisted or Autobahn class defines or
        sets a name its bases already use, except the hooks they declare in an
        interface and the documented extension points; and every such override
        takes the arguments the base's callers pass (the way ``_send(payload)``
        once broke Autobahn's own ``_send()``)."""
        classes = _extending_classes(_wsserver_modules())
        self.assertIn(ServerProtocol, classes)
        self.assertIn(web.LimitedRequest, classes)
        problems = []
        for cls in classes:
            ours, bases = _ours(cls)
            mine: set[str] = set()
            for c in ours:
                mine |= set(vars(c)) | _self_assignments(c)
            allowed = _declared_hooks(bases) | set(DOCUMENTED_EXTENSIONS)
            base_names = _base_names(bases)
            for name in sorted(mine & base_names):
                if name.startswith("__") and name.endswith("__"):
                    continue
                where = f"{cls.__module__}.{cls.__qualname__}.{name}"
                if name not in allowed:
                    problems.append(f"{where} shadows a name of {bases[0].__name__}")
                    continue
                base_value = next((vars(b)[name] for b in bases if name in vars(b)), None)
                our_value = next((vars(c)[name] for c in ours if name in vars(c)), None)
                theirs, mine_args = _positional(base_value), _positional(our_value)
                if (
                    callable(base_value)
                    and callable(our_value)
                    and theirs is not None
                    and len(theirs) != len(mine_args or [])
                ):
                    problems.append(f"{where} takes other arguments than its base's")
        self.assertEqual(problems, [])

    def test_what_we_add_to_autobahns_protocol_and_factory_is_private(self):
        """Every data attribute wsserver keeps on an Autobahn protocol or factory of
        the server has a private name (Autobahn's own plain names, ``log``,
        ``server``, ``state``..., leave no safe public one), and the only public
        methods the protocol adds are the broker's ``Connection`` interface."""
        for cls in (ServerProtocol, ServerFactory):
            ours, bases = _ours(cls)
            base_names = _base_names(bases)
            public = set()
            for c in ours:
                public |= {n for n in _self_assignments(c) if not n.startswith("_")}
                public |= {
                    n
                    for n, v in vars(c).items()
                    if not n.startswith("_") and not callable(v) and not isinstance(v, property)
                }
            self.assertEqual(public - base_names, set(), cls.__name__)
        kwargs = dict(
            store=None,
            broker=None,
            limiter=None,
            clock=reactor,
            max_content_bytes=1,
            max_frame_bytes=1,
            max_outbox_bytes=1,
            require_signatures=False,
        )
        factory = ServerFactory(**kwargs)
        plain_factory = WebSocketServerFactory(server="wsserver")
        added = set(vars(factory)) - set(vars(plain_factory))
        self.assertTrue(added)
        self.assertEqual({n for n in added if not n.startswith("_")}, set())
        added = set(vars(ServerProtocol())) - set(vars(WebSocketServerProtocol()))
        self.assertTrue(added)
        self.assertEqual({n for n in added if not n.startswith("_")}, set())
        declared = set(dir(broker.Connection)) | set(broker.Connection.__annotations__)
        interface = {n for n in declared if not n.startswith("_")} - set(dir(object))
        methods = {
            n
            for n, v in vars(ServerProtocol).items()
            if not n.startswith("_") and (callable(v) or isinstance(v, property))
        }
        hooks = _declared_hooks(_ours(ServerProtocol)[1])
        self.assertEqual(methods - hooks, interface)


def _private_names_of_ours(modules: list[Any]) -> set[str]:
    """Every ``_name`` defined by wsserver itself: functions, classes,
    attributes it assigns, methods and class attributes of its classes."""
    names = set()
    for module in modules:
        tree = ast.parse(Path(module.__file__).read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {n for n in names if n.startswith("_")}


class PrivateAccessTests(unittest.TestCase):
    def test_twisted_and_autobahn_privates_only_in_the_internals_helper(self):
        """Outside ``wsserver/internals.py`` no module reads or writes a private
        (``_name``) attribute that wsserver did not define itself, nor imports
        from a private Twisted or Autobahn module (``twisted.web._newclient``)."""
        modules = _wsserver_modules()
        ours = _private_names_of_ours(modules)
        problems = []
        for module in modules:
            if module is internals:
                continue
            path = Path(module.__file__)
            for node in ast.walk(ast.parse(path.read_text("utf-8"))):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.Attribute):
                    name = node.attr
                    if (
                        name.startswith("_")
                        and not (name.startswith("__") and name.endswith("__"))
                        and name not in ours
                    ):
                        problems.append(f"{where}: .{name}")
                elif isinstance(node, ast.ImportFrom) and node.module:
                    parts = node.module.split(".")
                    if parts[0] in FOREIGN and any(p.startswith("_") for p in parts):
                        problems.append(f"{where}: from {node.module}")
        self.assertEqual(problems, [])

    def test_release_upgraded_request_makes_the_channel_forget_it(self):
        """Canary for the one Twisted internal used: a request held by its HTTP
        channel (``HTTPChannel.requests``) is dropped by
        ``release_upgraded_request``, so the channel no longer reaches it (the
        channel's connectionLost no longer tells it)."""
        held = []

        class Hold(Resource):
            isLeaf = True

            def render(self, request):
                held.append(request)
                return server.NOT_DONE_YET

        site = web.build_site(Hold())
        connection = site.buildProtocol(None)
        connection.makeConnection(StringTransport())
        connection.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        (request,) = held
        channel = request.channel
        self.assertIn(request, channel.requests)
        internals.release_upgraded_request(channel, request)
        self.assertNotIn(request, channel.requests)
        connection.connectionLost(Failure(ConnectionError("gone")))
        self.assertFalse(request.gone)  # the channel did not reach it any more

    def test_a_request_knows_its_client_left(self):
        """A request whose connection closes before the answer is ``gone`` (through
        the public ``notifyFinish``), and answering it then writes nothing and
        raises nothing."""
        held = []

        class Hold(Resource):
            isLeaf = True

            def render(self, request):
                held.append(request)
                return server.NOT_DONE_YET

        site = web.build_site(Hold())
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        (request,) = held
        self.assertFalse(request.gone)
        channel.connectionLost(Failure(ConnectionError("gone")))
        self.assertTrue(request.gone)
        transport.clear()
        web._finish(request, 200, {"ok": True})
        self.assertEqual(transport.value(), b"")
        self.assertFalse(request.finished)


# -- Autobahn canaries ------------------------------------------------------------


class _Recorder(ServerProtocol):
    """ServerProtocol's receive path, with what reaches ``onMessage`` recorded."""

    def onOpen(self) -> None:
        self.factory.opened.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.got.append((payload, isBinary))


def _open_recorder(testcase: unittest.TestCase) -> tuple[_Recorder, StringTransport]:
    factory = WebSocketServerFactory("ws://localhost:9")
    factory.protocol = _Recorder
    factory.got = []
    factory.opened = []
    factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=0, closeHandshakeTimeout=0)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    transport.registerProducer(proto, True)  # as the reactor's TCP transport has one
    proto.makeConnection(transport)
    proto.dataReceived(
        b"GET / HTTP/1.1\r\nHost: localhost:9\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    testcase.assertEqual(factory.opened, [proto], transport.value())
    testcase.assertIn(b"101", transport.value())
    return proto, transport


def _masked_frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    head = bytes((opcode | (0x80 if fin else 0),))
    if size < 126:
        head += bytes((0x80 | size,))
    elif size < 65536:
        head += bytes((0x80 | 126,)) + struct.pack("!H", size)
    else:
        head += bytes((0x80 | 127,)) + struct.pack("!Q", size)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


class AutobahnCanaryTests(unittest.TestCase):
    def setUp(self):
        original = autobahn_protocol.create_xor_masker
        self.addCleanup(setattr, autobahn_protocol, "create_xor_masker", original)

    def test_received_frames_go_through_our_unmasker(self):
        """With ``use_fast_unmasking`` on, a real masked frame under
        ``UNMASK_NATIVE_FROM`` bytes received by a protocol is unmasked by our
        ``Unmasker`` (counted), and a longer one by Autobahn's own: the day
        Autobahn stops building maskers through ``create_xor_masker``, this fails."""
        made = []

        class Counting(ws_module.Unmasker):
            __slots__ = ()

            def __init__(self, mask: bytes) -> None:
                made.append(mask)
                super().__init__(mask)

        self.patch(ws_module, "Unmasker", Counting)
        use_fast_unmasking()
        proto, _ = _open_recorder(self)
        small = "ünïcode ✓ small".encode()
        proto.dataReceived(_masked_frame(small))
        self.assertEqual(proto.factory.got, [(small, False)])
        self.assertEqual(len(made), 1)
        big = os.urandom(UNMASK_NATIVE_FROM + 7)
        proto.dataReceived(_masked_frame(big, opcode=2))
        self.assertEqual(proto.factory.got[1], (big, True))
        self.assertEqual(len(made), 1)

    def test_autobahns_option_dump_goes_through_our_formatter(self):
        """With ``skip_unlogged_option_dumps`` on, opening a protocol calls the
        module-level ``pformat`` of ``autobahn.websocket.protocol`` with the
        list of its options (which ours leaves unformatted at txaio's default
        level): the day Autobahn formats that dump some other way, this fails
        (and the ~190 µs per connect are back, docs/performance.md, T11)."""
        original = autobahn_protocol.pformat
        self.addCleanup(setattr, autobahn_protocol, "pformat", original)
        skip_unlogged_option_dumps()
        installed = autobahn_protocol.pformat
        seen = []

        def counting(obj: Any, *args: Any, **kwargs: Any) -> str:
            seen.append(obj)
            return installed(obj, *args, **kwargs)

        autobahn_protocol.pformat = counting
        _open_recorder(self)
        dumps = [obj for obj in seen if isinstance(obj, list)]
        self.assertEqual(len(dumps), 1, seen)
        self.assertIn("autoPingInterval", [option[0] for option in dumps[0]])
        self.assertEqual(installed(dumps[0]), OPTIONS_NOT_FORMATTED)

    def test_on_message_end_gets_what_autobahn_collected(self):
        """Our ``onMessageEnd`` override (it skips Autobahn's per-message observer
        event) hands over exactly the message Autobahn assembled, fragmented or
        not, text or binary, and releases it; a message after a protocol error
        is not handed over.  Fails the day Autobahn renames ``message_data``,
        ``message_is_binary`` or ``failedByMe``."""
        proto, _ = _open_recorder(self)
        proto.dataReceived(_masked_frame(b"hello ", fin=False) + _masked_frame(b"world", 0))
        proto.dataReceived(_masked_frame(b"\x00\x01", opcode=2))
        self.assertEqual(proto.factory.got, [(b"hello world", False), (b"\x00\x01", True)])
        self.assertIsNone(proto.message_data)
        self.assertFalse(proto.failedByMe)
        # A reserved opcode: Autobahn fails the connection; nothing more is handed over.
        proto.dataReceived(_masked_frame(b"x", opcode=3))
        self.assertTrue(proto.failedByMe)
        proto.dataReceived(_masked_frame(b"late"))
        self.assertEqual(len(proto.factory.got), 2)

    def test_on_message_end_uses_only_what_autobahns_own_uses(self):
        """Every name our ``onMessageEnd`` reads is one Autobahn's own
        ``onMessageEnd`` reads too: if Autobahn's changes, ours is out of date."""
        ours = set(ServerProtocol.onMessageEnd.__code__.co_names) - set(vars(ServerProtocol))
        theirs = set(WebSocketProtocol.onMessageEnd.__code__.co_names)
        self.assertLessEqual({"message_data", "message_is_binary", "failedByMe"}, ours)
        self.assertEqual(ours - theirs, set())


class AutobahnPinTests(unittest.TestCase):
    def test_autobahn_is_pinned_below_its_next_major_version(self):
        """setup.cfg allows the installed Autobahn and refuses its next major
        version (year-numbered: 26.x now, 27.0 next), because websocket.py
        replaces Autobahn internals that a major release may change."""
        parser = configparser.ConfigParser()
        parser.read(ROOT / "setup.cfg")
        lines = parser["options"]["install_requires"].splitlines()
        (spec,) = [
            Requirement(line)
            for line in lines
            if line.strip() and not line.strip().startswith("#")
            if Requirement(line).name == "autobahn"
        ]
        installed = Version(importlib.metadata.version("autobahn"))
        self.assertIn(installed, spec.specifier)
        self.assertNotIn(Version(f"{installed.major + 1}.0"), spec.specifier)
        self.assertNotIn(Version(f"{installed.major + 1}.1.0"), spec.specifier)


# -- process-wide tuning -------------------------------------------------------------


_REPORT_TUNING = """
import gc, json, sys
import autobahn.websocket.protocol as p
from twisted.plugins.wsserver_plugin import wsserver
options = wsserver.options()
options.parseOptions(sys.argv[1:])
wsserver.makeService(options)
print(json.dumps({
    "switch": sys.getswitchinterval(),
    "frozen": gc.get_freeze_count(),
    "fast": bool(getattr(p.create_xor_masker, "wsserver_fast", False)),
    "lazy": bool(getattr(p.pformat, "wsserver_lazy", False)),
}))
"""


class ProcessTuningTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_an_in_process_service_leaves_the_interpreter_alone(self):
        """Building and starting a WsServerService in a process (as every
        in-process test does) changes neither the GIL switch interval, nor the
        gc freeze count, nor Autobahn's masker, nor its ``pformat``."""
        masker = autobahn_protocol.create_xor_masker
        self.addCleanup(setattr, autobahn_protocol, "create_xor_masker", masker)
        formatter = autobahn_protocol.pformat
        self.addCleanup(setattr, autobahn_protocol, "pformat", formatter)
        native_format = autobahn_protocol.pformat = _native_pformat()
        interval = sys.getswitchinterval()
        self.addCleanup(sys.setswitchinterval, interval)
        frozen = gc.get_freeze_count()
        if frozen:
            self.addCleanup(gc.freeze)
        gc.unfreeze()
        sys.setswitchinterval(0.005)
        native = autobahn_protocol.create_xor_masker = _native_masker()
        server = LiveServer(self)
        code, _ = yield server.get("/health")
        self.assertEqual(code, 200)
        self.assertEqual(sys.getswitchinterval(), 0.005)
        self.assertEqual(gc.get_freeze_count(), 0)
        self.assertIs(autobahn_protocol.create_xor_masker, native)
        self.assertIs(autobahn_protocol.pformat, native_format)
        yield server.stop()

    @defer.inlineCallbacks
    def test_twistds_path_tunes_the_process(self):
        """The plugin's ``makeService`` (what ``twistd wsserver`` calls) sets the
        switch interval to 0.5 ms, freezes the start-up heap, installs the
        fast unmasker and leaves Autobahn's unlogged option dumps unformatted,
        in a process of its own."""
        proc = _Collect()
        db = os.path.abspath(self.mktemp() + ".db")
        args = ["--port", "tcp:0:interface=127.0.0.1", "--database", db]
        reactor.spawnProcess(
            proc,
            sys.executable,
            [sys.executable, "-c", _REPORT_TUNING, *args],
            env=twistd_env(None),
            path=str(ROOT),
        )
        how = yield within(proc.ended, 60)
        self.assertEqual(how, ("exit", 0), proc.err)
        report = json.loads(proc.out.decode().strip().splitlines()[-1])
        self.assertEqual(report["switch"], 0.0005)
        self.assertGreater(report["frozen"], 0)
        self.assertTrue(report["fast"])
        self.assertTrue(report["lazy"])


def _native_pformat() -> Any:
    from pprint import pformat

    return pformat


def _native_masker() -> Any:
    from autobahn.websocket.xormasker import create_xor_masker

    return create_xor_masker
