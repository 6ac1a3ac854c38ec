"""The cluster view: every node's latest report in C{admin_stream_status}, at a glance.

Each node HSETs its status document there every L{ADMIN_INTERVAL} seconds (this one
too, with C{--admin-report}); emojistream nodes also HSET it without its connections
into C{admin_stream_summary}, which the view reads instead where it can: kilobytes,
not the megabytes of 20,000 connections. The view keeps what an overview needs of each: its
state, pools and totals, how many connections it holds, its message rates (as it
reported them, or from its two latest reports) and whether it is stale (no report
for three intervals: crashed, or cut off from Redis). A node silent for twelve
intervals is left out; one stopped cleanly deletes its own entries. Documents of
other implementations lack pools and totals; they are listed with what they have.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from emojistream.cache import fresh
from emojistream.reporting import ADMIN_INTERVAL, ADMIN_KEY, SUMMARY_KEY
from emojistream.status import RATES, RateMeter
from emojistream.waiting import Waiters

#: Report intervals without a report after which a node is stale.
STALE_INTERVALS = 3
#: Report intervals without a report after which a node is no longer listed (a
#: minute: crashed, or stopped while Redis was away; a clean stop deletes its
#: entries itself). Its entries stay in Redis, for when it comes back.
FORGET_INTERVALS = 12


class ClusterUnavailable(Exception):
    """Redis cannot be read now; the message says why, in one line."""


class ClusterView:
    """Reads the C{admin_stream_status} hash at most once per L{CACHE_SECONDS
    <emojistream.cache.CACHE_SECONDS>}.

    @param connection: a kept Redis connection (its C{protocol} is None while down).
    """

    log = Logger()

    def __init__(self, connection: Any, *, clock: IReactorTime,
                 interval: float = ADMIN_INTERVAL) -> None:
        self._connection = connection
        self._clock = clock
        self._interval = interval
        self._cached: tuple[float, bytes] | None = None
        self._reading: Deferred[dict[bytes, bytes]] | None = None
        self._waiting: Waiters[bytes] = Waiters()
        # Per node: the rates between its two latest distinct reports.
        self._meters: dict[str, RateMeter] = {}

    def encoded(self) -> Deferred[bytes]:
        """The cluster document as compact JSON, at most L{CACHE_SECONDS
        <emojistream.cache.CACHE_SECONDS>} old; fails with L{ClusterUnavailable} while
        Redis is down."""
        now = self._clock.seconds()
        if self._cached is not None and fresh(self._cached[0], now):
            return succeed(self._cached[1])
        if self._reading is None:
            protocol = self._connection.protocol
            if protocol is None:
                return fail(ClusterUnavailable(
                    f"Redis is {self._connection.state}: the cluster view is unavailable"))
            self._reading = reading = self._reports(protocol)
            reading.addCallbacks(self._read, self._failed)
        return self._waiting.wait()

    @inlineCallbacks
    def _reports(self, protocol: Any) -> Generator[Deferred[Any], Any, dict[bytes, bytes]]:
        """Every node of C{admin_stream_status}: its summary where it writes one (an
        emojistream node), else its whole status (other implementations)."""
        nodes = list((yield protocol.hkeys(ADMIN_KEY)) or [])
        if not nodes:
            return {}
        summaries = yield protocol.hmget(SUMMARY_KEY, nodes)
        reports = {n: s for n, s in zip(nodes, summaries, strict=True) if s is not None}
        missing = [n for n in nodes if n not in reports]
        if missing:
            wholes = yield protocol.hmget(ADMIN_KEY, missing)
            reports.update((n, s) for n, s in zip(missing, wholes, strict=True)
                           if s is not None)
        return reports

    def _read(self, reports: Mapping[bytes, bytes]) -> None:
        now = self._clock.seconds()
        encoded = json.dumps(self.document(reports, now), separators=(",", ":")).encode()
        self._cached = (now, encoded)
        self._reading = None
        self._waiting.fire(encoded)

    def _failed(self, reason: Failure) -> None:
        self._reading = None
        error = ClusterUnavailable(f"reading {ADMIN_KEY} failed: {reason.getErrorMessage()}")
        self._waiting.fail(error)

    def document(self, reports: Mapping[bytes, bytes], now: float) -> dict[str, Any]:
        """The view of C{reports} (node name -> status JSON) at time C{now}."""
        nodes = []
        listed = set()
        forget_after = FORGET_INTERVALS * self._interval
        for field, raw in sorted(reports.items()):
            name = field.decode("utf-8", "replace")
            node = self._node(name, raw, now)
            if node["age"] is None or node["age"] <= forget_after:
                nodes.append(node)
                listed.add(name)
        for gone in set(self._meters) - listed:
            del self._meters[gone]
        fresh = [n for n in nodes if not n["stale"]]
        pools: dict[str, int] = {}
        for node in fresh:
            for pool, n in node["pools"].items():
                pools[pool] = pools.get(pool, 0) + n
        return {
            "reported_at": int(now),
            "stale_after": STALE_INTERVALS * self._interval,
            "forget_after": forget_after,
            "nodes": nodes,
            "totals": {
                "nodes": len(nodes), "stale": len(nodes) - len(fresh), "pools": pools,
                "connections": sum(n["connections"] for n in fresh),
                "rates": {key: round(sum(n["rates"].get(key, 0.0) for n in fresh), 1)
                          for key in RATES},
            },
        }

    def _node(self, name: str, raw: bytes, now: float) -> dict[str, Any]:
        try:
            report = parse_report(raw)
        except ValueError:
            return {"node": name, "status": "UNREADABLE", "stale": True, "reported_at": None,
                    "age": None, "redis": None, "pools": {}, "connections": 0,
                    "totals": {}, "rates": {}}
        reported_at = _number(report.get("reported_at"))
        totals: dict[str, Any] = _object(report.get("totals"))
        pools: dict[str, Any] = _object(report.get("pools"))
        connections = report.get("connections")
        count = (len(connections) if isinstance(connections, list)
                 else _number(report.get("connections_total")) or 0)
        age = None if reported_at is None else max(0.0, now - reported_at)
        return {
            "node": str(report.get("node") or name),
            "status": str(report.get("status", "")),
            "redis": report.get("redis"),
            "reported_at": reported_at,
            "age": None if age is None else round(age, 1),
            "stale": age is None or age > STALE_INTERVALS * self._interval,
            "pools": {str(k): int(v) for k, v in pools.items() if _number(v) is not None},
            "connections": int(count),
            "totals": {str(k): v for k, v in totals.items() if _number(v) is not None},
            "rates": self._rates(name, reported_at, totals, _object(report.get("rates"))),
        }

    def _rates(self, name: str, reported_at: float | None, totals: Mapping[str, Any],
               reported: Mapping[str, Any]) -> dict[str, float]:
        """Per second: as the node reported them (emojistream measures its own), else
        between the node's two latest distinct reports that this view has read."""
        if reported_at is None:
            return {}
        meter = self._meters.get(name)
        if meter is None:
            meter = self._meters[name] = RateMeter(samples=2)
        between = meter.sample(reported_at, {total: _number(totals.get(total)) or 0.0
                                             for total in RATES.values()})
        if all(_number(reported.get(key)) is not None for key in RATES):
            return {key: float(reported[key]) for key in RATES}
        return between


#: JSON whitespace, and a JSON string token (validated where it is decoded).
_WS = re.compile(rb"[ \t\n\r]*+")
_STRING_TOKEN = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_STRING = re.compile(_STRING_TOKEN, re.DOTALL)
#: Everything up to and including the next bracket or brace outside a string: the
#: scanner's one step, so a connection object costs two matches, both in C.
_TO_BRACKET = re.compile(rb'(?:[^"\[\]{}]++|' + _STRING_TOKEN + rb")*+[\[\]{}]", re.DOTALL)
#: A number, true, false or null (json.loads judges it).
_SCALAR = re.compile(rb"[^ \t\n\r,\]}]++")
_OPEN = frozenset(b"[{")


def parse_report(raw: bytes) -> dict[str, Any]:
    """A node's status document, its connections counted (C{connections_total})
    rather than decoded: 20,000 of them are megabytes, and the view needs only how many.

    Reads a top-level object key by key, whatever their order (other implementations
    put C{connections} anywhere): each other value is decoded with C{json.loads}, the
    C{connections} array is stepped over bracket by bracket, strings and all, by C
    regular expressions, and not validated. The result is C{json.loads(raw)} without
    C{connections} (when an array) and with C{connections_total}, its length.
    Raises ValueError if C{raw} is not a JSON object.
    """
    pos = _after_ws(raw, 0)
    if raw[pos:pos + 1] != b"{":
        return _whole(raw)  # not an object (or a BOM): json.loads says what it is
    report: dict[str, Any] = {}
    counted: int | None = None
    pos = _after_ws(raw, pos + 1)
    if raw[pos:pos + 1] == b"}":
        pos += 1
    else:
        while True:
            key_match = _STRING.match(raw, pos)
            if key_match is None:
                raise ValueError(f"expected a key at byte {pos}")
            key = json.loads(key_match.group())
            pos = _after_ws(raw, key_match.end())
            if raw[pos:pos + 1] != b":":
                raise ValueError(f"expected ':' at byte {pos}")
            pos = _after_ws(raw, pos + 1)
            if key == "connections" and raw[pos:pos + 1] == b"[":
                counted, pos = _skip(raw, pos, count=True)
                report.pop(key, None)
            else:
                _, end = _skip(raw, pos, count=False)
                report[key] = json.loads(raw[pos:end])
                if key == "connections":
                    counted = None
                pos = end
            pos = _after_ws(raw, pos)
            separator = raw[pos:pos + 1]
            pos = _after_ws(raw, pos + 1)
            if separator == b"}":
                break
            if separator != b",":
                raise ValueError(f"expected ',' or '}}' at byte {pos}")
    if _after_ws(raw, pos) != len(raw):
        raise ValueError(f"extra data at byte {pos}")
    if counted is not None:
        report["connections_total"] = counted
    return report


def _after_ws(raw: bytes, pos: int) -> int:
    """Where the JSON whitespace at C{pos} ends."""
    return _WS.match(raw, pos).end()  # type: ignore[union-attr]  # it matches anywhere


def _skip(raw: bytes, pos: int, *, count: bool) -> tuple[int, int]:
    """Where the JSON value at C{pos} ends, and (with C{count}, for an array) how
    many elements it has. Strings are skipped whole, so brackets and quotes in them
    do not count."""
    first = raw[pos:pos + 1]
    if first == b'"':
        string = _STRING.match(raw, pos)
        if string is None:
            raise ValueError(f"unterminated string at byte {pos}")
        return 0, string.end()
    if not first or first[0] not in _OPEN:
        scalar = _SCALAR.match(raw, pos)
        if scalar is None:
            raise ValueError(f"expected a value at byte {pos}")
        return 0, scalar.end()
    depth = commas = 0
    content = False
    while True:
        step = _TO_BRACKET.match(raw, pos)
        if step is None:
            raise ValueError(f"unterminated array or object after byte {pos}")
        end = step.end()
        if count and depth == 1 and end - pos > 1:
            # Between elements at the array's own level: commas, maybe scalars.
            between = raw[pos:end - 1]
            if b'"' in between:
                between = _STRING.sub(b'""', between)
            commas += between.count(b",")
            content = content or bool(between.strip(b" \t\n\r,"))
        pos = end
        if raw[end - 1] in _OPEN:
            depth += 1
            content = content or depth == 2
        else:
            depth -= 1
            if depth == 0:
                return (commas + 1 if content else 0), pos


def _whole(raw: bytes) -> dict[str, Any]:
    report = json.loads(raw)
    if not isinstance(report, dict):
        raise ValueError("not a JSON object")
    return report


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
