"""One client's long-lived SSE response: what it subscribed to, writing to it, closing it."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.web.server import Request


class Stream:
    """A connected EventSource client and the response it is reading.

    The web route hands L{done} to Klein as the response; firing it ends the
    response, and Klein cancels it when the client goes away first.
    """

    __slots__ = (
        "_request",
        "client_ip",
        "created_at",
        "done",
        "expiry",
        "kind",
        "msgs_sent",
        "namespace",
        "open",
        "request_path",
        "tag",
        "user_agent",
    )

    def __init__(
        self,
        request: Request,
        *,
        namespace: str,
        kind: str,
        request_path: str,
        created_at: float,
        client_ip: str,
        user_agent: str,
        tag: str | None = None,
    ) -> None:
        self._request = request
        self.namespace = namespace
        self.kind = kind
        self.request_path = request_path
        self.created_at = created_at
        self.client_ip = client_ip
        self.user_agent = user_agent
        self.tag = tag
        self.msgs_sent = 0
        self.open = True
        self.done: Deferred[None] = Deferred()
        #: The forced-refresh close, pending while the stream is open.
        self.expiry: IDelayedCall | None = None

    def send(self, frame: bytes) -> None:
        """Write one encoded message; counted in C{msgs_sent}."""
        self._request.write(frame)
        self.msgs_sent += 1

    def send_control(self, frame: bytes) -> None:
        """Write bytes that are not a message (keepalive comment, retry hint)."""
        self._request.write(frame)

    def close(self) -> None:
        """End the response from the server side (the client sees the stream end)."""
        if self.open:
            self.open = False
            if not self.done.called:
                self.done.callback(None)

    def lost(self) -> None:
        """Note that the response is over, whoever ended it."""
        self.open = False

    def describe(self, now: float) -> dict[str, Any]:
        """This connection as the admin status report lists it."""
        return {
            "request_path": self.request_path,
            "namespace": self.namespace,
            "tag": self.tag,
            "created_at": int(self.created_at),
            "age": int(now - self.created_at),
            "client_ip": self.client_ip,
            "user_agent": self.user_agent,
            "msgs_sent": self.msgs_sent,
        }
