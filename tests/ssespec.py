"""An independent SSE parser that follows the WHATWG "event stream interpretation"
algorithm step by step, so tests check what a browser would see, not our encoder's
idea of it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Event:
    type: str
    data: str
    last_event_id: str = ""


@dataclass
class SpecParser:
    """Feed it bytes; it returns the events a conforming EventSource dispatches."""

    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retries: list[int] = field(default_factory=list)
    fields: list[tuple[str, str]] = field(default_factory=list)
    _buffer: bytes = b""
    _started: bool = False
    _data: str = ""
    _type: str = ""
    _last_id: str = ""

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        before = len(self.events)
        while True:
            m = re.search(rb"\r\n|\r|\n", self._buffer)
            # A CR at the very end may be the first half of a CRLF: wait for more.
            if m is None or (m.group() == b"\r" and m.end() == len(self._buffer)):
                break
            raw, self._buffer = self._buffer[: m.start()], self._buffer[m.end():]
            line = raw.decode("utf-8", "replace")
            if not self._started:
                self._started = True
                line = line.removeprefix("\ufeff")
            self._line(line)
        return self.events[before:]

    def _line(self, line: str) -> None:
        if line == "":
            self._dispatch()
            return
        if line.startswith(":"):
            self.comments.append(line[1:])
            return
        if ":" in line:
            name, value = line.split(":", 1)
            value = value.removeprefix(" ")
        else:
            name, value = line, ""
        self.fields.append((name, value))
        if name == "event":
            self._type = value
        elif name == "data":
            self._data += value + "\n"
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retries.append(int(value))

    def _dispatch(self) -> None:
        if self._data == "":
            self._type = ""
            return
        data = self._data[:-1] if self._data.endswith("\n") else self._data
        self.events.append(Event(self._type or "message", data, self._last_id))
        self._data = ""
        self._type = ""
