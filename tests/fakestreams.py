"""An in-memory Redis that keeps streams, for the stream reader's and the history's
tests on a Clock: just the commands they send (GET, PTTL, XLEN, XRANGE, XREVRANGE,
XREAD with BLOCK, MULTI/EXEC, PING), spoken over RESP through iosim connections, so
that the real txredisapi protocol parses every reply. A blocked XREAD holds back the
commands pipelined after it, as Redis does."""

from __future__ import annotations

import re
import secrets
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from emojistream.history import (
    EntryId,
    encode_entry,
    epoch_key,
    lease_key,
    parse_entry_id,
)

#: A nil array (an XREAD that timed out), as against a nil bulk string.
NIL_ARRAY = object()


def split_commands(buffer: bytes) -> tuple[list[list[bytes]], bytes]:
    """The whole RESP commands (arrays of bulk strings) at the start of C{buffer}, as
    their arguments, and what follows them (a command not all received yet)."""
    commands = []
    while True:
        match = re.match(rb"\*(\d+)\r\n", buffer)
        if match is None:
            return commands, buffer
        rest, args = buffer[match.end():], []
        for _ in range(int(match.group(1))):
            head = re.match(rb"\$(\d+)\r\n", rest)
            if head is None or len(rest) < head.end() + int(head.group(1)) + 2:
                return commands, buffer
            size = int(head.group(1))
            args.append(rest[head.end():head.end() + size])
            rest = rest[head.end() + size + 2:]
        buffer = rest
        commands.append(args)


class Error(Exception):
    """An error reply."""


def encode(value: Any) -> bytes:
    if value is None:
        return b"$-1\r\n"
    if value is NIL_ARRAY:
        return b"*-1\r\n"
    if isinstance(value, Error):
        return b"-%s\r\n" % str(value).encode()
    if isinstance(value, str):
        return b"+%s\r\n" % value.encode()
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    return b"*%d\r\n" % len(value) + b"".join(encode(v) for v in value)


class Store:
    """What the fake connections share: streams, strings (with expiry) and the
    XREADs blocked on them."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.streams: dict[bytes, list[tuple[EntryId, list[bytes]]]] = {}
        self.last_ids: dict[bytes, EntryId] = {}
        self.strings: dict[bytes, tuple[bytes, float | None]] = {}
        self.peers: list[Peer] = []

    # -- the test's side -----------------------------------------------------------

    def append(self, key: str, messages: list[tuple[bytes, bytes]], *,
               fields: list[bytes] | None = None) -> list[EntryId]:
        """As the append script: a new epoch if the stream or its epoch is missing,
        then one entry per message (C{fields} instead: a foreign entry)."""
        k = key.encode()
        if k not in self.streams or epoch_key(key).encode() not in self.strings:
            self.set(epoch_key(key), secrets.token_hex(8).encode())
        stream = self.streams.setdefault(k, [])
        ids = []
        for channel, payload in messages or [(b"", b"")]:
            ms = int(self.clock.seconds() * 1000)
            last = self.last_ids.get(k, EntryId(0, 0))
            entry = EntryId(last.ms, last.seq + 1) if ms <= last.ms else EntryId(ms, 0)
            self.last_ids[k] = entry
            stream.append((entry, fields if fields is not None
                           else encode_entry(channel, payload)))
            ids.append(entry)
        for peer in list(self.peers):
            peer.wake()
        return ids

    def trim(self, key: str, keep: int) -> None:
        k = key.encode()
        self.streams[k] = self.streams[k][-keep:] if keep else []

    def delete(self, key: str) -> None:
        self.streams.pop(key.encode(), None)
        self.last_ids.pop(key.encode(), None)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self.strings[key.encode()] = (value, None if ttl is None
                                      else self.clock.seconds() + ttl)

    def epoch(self, key: str) -> str:
        return self.get(epoch_key(key).encode()).decode()  # type: ignore[union-attr]

    # -- commands ------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        value = self.strings.get(key)
        if value is None or (value[1] is not None and value[1] <= self.clock.seconds()):
            return None
        return value[0]

    def pttl(self, key: bytes) -> int:
        value = self.strings.get(key)
        if self.get(key) is None or value is None:
            return -2
        return -1 if value[1] is None else int((value[1] - self.clock.seconds()) * 1000)

    def range(self, key: bytes, start: bytes, end: bytes, count: int,
              reverse: bool = False) -> list[Any]:
        def bound(raw: bytes, low: bool) -> tuple[EntryId, bool]:
            if raw in (b"-", b"+"):
                return (EntryId(0, 0) if raw == b"-" else EntryId(1 << 64, 0)), False
            exclusive = raw.startswith(b"(")
            return parse_entry_id(raw.lstrip(b"(")), exclusive

        lo, lo_x = bound(start, True)
        hi, hi_x = bound(end, False)
        chosen = [(e, f) for e, f in self.streams.get(key, [])
                  if (lo < e if lo_x else lo <= e) and (e < hi if hi_x else e <= hi)]
        if reverse:
            chosen.reverse()
        return [[e.encode(), f] for e, f in chosen[:count]]


class Peer(Protocol):
    """One client connection to the L{Store}."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.buffer = b""
        self.commands: list[list[bytes]] = []
        self.pending: list[list[bytes]] = []
        self.multi: list[list[bytes]] | None = None
        #: An XREAD waiting: (key, after, count, its timeout call).
        self.blocked: tuple[bytes, EntryId, int, Any] | None = None
        #: Answer nothing at all (a wedged path).
        self.wedged = False

    def connectionMade(self) -> None:
        self.store.peers.append(self)

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.store.peers:
            self.store.peers.remove(self)
        if self.blocked is not None and self.blocked[3].active():
            self.blocked[3].cancel()

    def dataReceived(self, data: bytes) -> None:
        commands, self.buffer = split_commands(self.buffer + data)
        self.commands += commands
        self.pending += commands
        self.run()

    def run(self) -> None:
        while self.pending and self.blocked is None and not self.wedged:
            self.execute(self.pending.pop(0))

    def reply(self, value: Any) -> None:
        assert self.transport is not None
        self.transport.write(encode(value))

    def execute(self, args: list[bytes]) -> None:
        name = args[0].upper()
        if self.multi is not None and name != b"EXEC":
            self.multi.append(args)
            self.reply("QUEUED")
            return
        if name == b"MULTI":
            self.multi = []
            self.reply("OK")
        elif name == b"EXEC":
            queued, self.multi = self.multi or [], None
            self.reply([self.answer(c) for c in queued])
        elif name == b"XREAD":
            count, block, key, after = (int(args[2]), int(args[4]), args[6],
                                        parse_entry_id(args[7]))
            found = self.store.range(key, b"(" + after.encode(), b"+", count)
            if found:
                self.reply([[key, found]])
            else:
                timeout = self.store.clock.callLater(block / 1000, self.timed_out)
                self.blocked = (key, after, count, timeout)
        else:
            self.reply(self.answer(args))

    def answer(self, args: list[bytes]) -> Any:
        name, store = args[0].upper(), self.store
        if name == b"PING":
            return "PONG"
        if name == b"GET":
            return store.get(args[1])
        if name == b"PTTL":
            return store.pttl(args[1])
        if name == b"XLEN":
            return len(store.streams.get(args[1], []))
        if name in (b"XRANGE", b"XREVRANGE"):
            count = int(args[5]) if len(args) > 5 else 1 << 30
            if name == b"XREVRANGE":
                return store.range(args[1], args[3], args[2], count, reverse=True)
            return store.range(args[1], args[2], args[3], count)
        return Error(f"ERR unknown command {name.decode()}")

    def wake(self) -> None:
        blocked = self.blocked
        if blocked is None or self.wedged:
            return
        key, after, count, timeout = blocked
        found = self.store.range(key, b"(" + after.encode(), b"+", count)
        if found:
            timeout.cancel()
            self.blocked = None
            self.reply([[key, found]])
            self.run()

    def timed_out(self) -> None:
        self.blocked = None
        self.reply(NIL_ARRAY)
        self.run()

    def hang_up(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


def lease(store: Store, key: str, holder: bytes, ttl: float) -> None:
    store.set(lease_key(key), holder, ttl)
