"""Server-Sent Events wire encoding: pure functions, bytes in, bytes out.

Each message is its fields, one per line, then a blank line. A payload is split at
every line break (CRLF, CR or LF, as the SSE standard reads them) into several
C{data:} lines, which a client joins again with LF, so no payload can start a new
field or event. A value that begins with a space gets one extra space after the
colon, because a client strips exactly one.
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")

KEEPALIVE = b":\n\n"


def _field(name: bytes, value: bytes) -> bytes:
    if value[:1] == b" ":
        return name + b": " + value + b"\n"
    return name + b":" + value + b"\n"


def encode_event(data: bytes, event: bytes | None = None) -> bytes:
    """Encode one message: an optional C{event:} line, C{data:} lines, a blank line.

    @raise ValueError: the event name contains a line break (it could not be sent
        without changing its meaning).
    """
    if event is None:
        head = b""
    elif b"\n" in event or b"\r" in event:
        raise ValueError("an SSE event name cannot contain a line break")
    else:
        head = _field(b"event", event)
    if b"\n" not in data and b"\r" not in data:
        return head + _field(b"data", data) + b"\n"
    return head + b"".join(_field(b"data", line) for line in _LINE_BREAK.split(data)) + b"\n"


def encode_comment(text: bytes = b"") -> bytes:
    """Encode a comment (ignored by clients, used as keepalive) as its own message."""
    return b"".join(b":" + line + b"\n" for line in _LINE_BREAK.split(text)) + b"\n"


def encode_retry(milliseconds: int) -> bytes:
    """Encode a reconnection-delay hint for the client."""
    if milliseconds < 0:
        raise ValueError("a retry delay cannot be negative")
    return b"retry:%d\n\n" % milliseconds


def id_line_of(frame: bytes) -> bytes:
    """The C{id:} line a frame starts with (newline included), or C{b""}."""
    if frame[:3] != b"id:":
        return b""
    return frame[:frame.index(b"\n") + 1]
