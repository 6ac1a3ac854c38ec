"""Log output for log shippers: one JSON object per line.

Use with C{--log-format json} (or C{LOG_FORMAT=json}), or name the factory to twistd
directly: C{twistd --logger emojistream.logs.json_stdout -n emojistream}.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer


def json_record(event: dict[str, Any]) -> dict[str, Any]:
    """A flat, shipper-friendly record of one twisted.logger event."""
    seconds = event.get("log_time", time.time())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": f"{stamp}.{int(seconds % 1 * 1000):03d}Z",
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    if "worker" in event:
        # Relayed from a --workers worker: which one.
        record["worker"] = event["worker"]
        record["pid"] = event.get("worker_pid")
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return record


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes each event as one line of JSON."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        line = json.dumps(json_record(event), ensure_ascii=False, default=str)
        self._out.write(line + "\n")
        self._out.flush()


def json_stdout() -> JsonLinesObserver:
    """twistd C{--logger} factory: JSON lines on the process's real standard output."""
    return JsonLinesObserver(sys.__stdout__ or sys.stdout)
