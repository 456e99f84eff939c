"""``LOG_FORMAT=json``: one JSON object per log line, for log collectors.

The formatter is our own, on twisted.logger's events, rather than
twisted.logger's ``jsonFileLogObserver`` (``eventAsJSON``): that one writes
every key of the event, those its message never shows included (objects such
as the request or the protocol behind the event, as far as they can be
turned into JSON), and no rendered message, so a collector needs Twisted to
read it.  The object written here carries exactly what the text line
carries, no more:

``{"time": "2026-12-07T01:02:03.456Z", "level": "info", "system": "-",
"namespace": "wsserver.websocket", "message": "closed: alice code=1000",
"user": "alice", "code": 1000}``

``message`` is the text line's message (``formatEvent``); each field its
format names is added under its own name (a string, or a number or boolean
as the event holds it), after the fixed keys, which a field of the same
name never replaces (it is written as ``name_``); fields of Twisted's own
(``log_*``) are left out; ``traceback`` is added when the event carries a
failure, as the text line's indented traceback.  So a token, a signature or
a message's content is in a JSON line exactly when it would be in the text
line: never (tests/test_logging.py checks both).

Under twistd, the JSON observer is given to the application as its
``ILogObserver`` (the way twistd lets an application choose its observer),
writing where twistd would have: standard output with ``-n`` (or
``--logfile=-``), else ``--logfile`` (default ``twistd.log``), rotated by
size and on SIGUSR1 like twistd's own.  ``--syslog`` and ``--logger`` keep
twistd's own choice (syslog lines are text).
"""

from __future__ import annotations

import json
import math
import signal
import sys
from datetime import UTC, datetime
from string import Formatter
from typing import Any

from twisted.application.service import Service
from twisted.logger import FileLogObserver, ILogObserver, formatEvent
from twisted.python import logfile
from twisted.python.components import Componentized

_FIXED = ("time", "level", "system", "namespace", "message", "traceback")
_formatter = Formatter()


def _fields(fmt: str) -> list[str]:
    names = []
    try:
        for _, name, _, _ in _formatter.parse(fmt):
            if name and name not in names:
                names.append(name)
    except ValueError:
        return []
    return names


def _value(event: dict, name: str) -> Any:
    """A field as the text line shows it: the event's own value when it is a
    plain JSON value, else the text the format makes of it."""
    if name.isidentifier() and name in event:
        value = event[name]
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
    return formatEvent({"log_format": "{" + name + "}", **event})


def child_record(line: str) -> dict | None:
    """A ``--workers`` child's log line read as the JSON object it is under
    ``LOG_FORMAT=json`` (None for a text line)."""
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "message" in record else None


def json_line(event: dict) -> str | None:
    """One log event as a line of JSON (None for an event with nothing to say)."""
    child = event.get("child_record")
    if isinstance(child, dict):
        # A line of a --workers child, relayed by the parent: the child's own
        # object, with which worker wrote it.
        relayed = {**child, "worker": event.get("worker"), "pid": event.get("pid")}
        return json.dumps(relayed, ensure_ascii=False, separators=(",", ":")) + "\n"
    message = formatEvent(event)
    failure = event.get("log_failure")
    if not message and failure is None:
        return None
    when = event.get("log_time")
    level = event.get("log_level")
    namespace = event.get("log_namespace") or "-"
    record: dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(when, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
            if isinstance(when, int | float)
            else None
        ),
        "level": getattr(level, "name", "-"),
        "system": event.get("log_system") or "-",
        "namespace": namespace,
        "message": message,
    }
    fmt = event.get("log_format")
    if isinstance(fmt, str):
        for name in _fields(fmt):
            key = name.removesuffix("()")
            if key.startswith("log_"):
                continue
            record[f"{key}_" if key in _FIXED else key] = _value(event, name)
    if failure is not None:
        record["traceback"] = _traceback(failure)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def _traceback(failure: Any) -> str:
    try:
        return failure.getTraceback()
    except Exception:
        return "(unable to obtain the traceback)"


def json_observer(out: Any) -> ILogObserver:
    """A log observer writing ``json_line`` to the file ``out``."""
    return FileLogObserver(out, json_line)


def twistd_json_observer(twistd_options: Any) -> ILogObserver | None:
    """The JSON observer for the place twistd's options send the log to, or
    None where twistd's own choice stays (``--syslog``, ``--logger``, and
    ``--logfile=-`` without ``-n``, which twistd refuses itself)."""
    if twistd_options is None:
        return None
    get = twistd_options.get
    if get("syslog") or get("logger"):
        return None
    name = get("logfile") or ""
    if name == "-":
        return json_observer(sys.stdout) if get("nodaemon") else None
    if get("nodaemon") and not name:
        return json_observer(sys.stdout)
    out = logfile.LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        # As twistd does for its own log file: SIGUSR1 rotates it.
        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return json_observer(out)


class ChoosesLogObserver(Service):
    """A service that, when twistd makes it part of its application, gives the
    application the log observer in ``log_observer`` (if any): twistd then
    logs to it instead of its own text observer."""

    log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)


__all__ = [
    "ChoosesLogObserver",
    "child_record",
    "json_line",
    "json_observer",
    "twistd_json_observer",
]
