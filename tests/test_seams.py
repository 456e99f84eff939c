"""Where wsserver meets Twisted and Autobahn: names that must not collide, the
internals it replaces (canaries that fail the day a new version changes them),
the one helper allowed to touch Twisted's undocumented parts, the Autobahn pin,
and process-wide tuning that only a server process gets."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import pkgutil
import textwrap
from typing import Any

import autobahn.websocket.interfaces as autobahn_interfaces
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.trial import unittest
from zope.interface import implementedBy

import wsserver
from wsserver import broker, web
from wsserver.websocket import ServerFactory, ServerProtocol

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
