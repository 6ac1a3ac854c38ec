"""What this daemon reads of Twisted's private API, in one place: its HTTP/2
implementation's queues, and the logger of C{ClientService}.

Twisted's C{H2Connection} pauses a stream's producer only when that stream's HTTP/2
flow-control window is used up, never when the socket below is full: a client that
advertises a 2 GiB window and stops reading makes every write "succeed" into the
connection's per-stream outbound queue (C{_outboundStreamQueues}). To bound what a
client costs, the writer must see that queue; Twisted has no public way to show it.

Each assumption made here has its own test in C{tests/test_compat.py}, which fails
loudly should Twisted change it. Where an attribute is missing, the functions answer
None and the daemon goes on without the bound over HTTP/2 (as before), rather than
breaking every HTTP/2 stream.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.application.internet import ClientService
from twisted.logger import ILogObserver, Logger
from twisted.web._http2 import H2Stream
from zope.interface import implementer

__all__ = ["H2Stream", "QuietClientService", "h2_outbound_queue", "is_h2_stream"]


@implementer(ILogObserver)
class _Discard:
    def __call__(self, event: Any) -> None:
        pass


class QuietClientService(ClientService):
    """C{ClientService} without its info line per retry ("Scheduling retry N to
    connect ..."): a kept connection logs once per change of state instead.

    Assumed of Twisted (tested): C{ClientService} logs through its class attribute
    C{_log}, which it hands to its state machine; there is no public way to quiet it.
    """

    _log = Logger(observer=_Discard())


def is_h2_stream(transport: object) -> bool:
    """Whether C{transport} (a request's channel) is one stream of an HTTP/2 connection."""
    return isinstance(transport, H2Stream)


def h2_outbound_queue(channel: object) -> deque[Any] | None:
    """The queue in which Twisted's HTTP/2 connection keeps what was written to the
    stream C{channel} and is not yet framed and handed to the transport, or None (not
    an HTTP/2 stream, or a Twisted that keeps no such queue).

    Assumed of Twisted (each tested): C{H2Stream._conn} is its C{H2Connection}, whose
    C{_outboundStreamQueues[streamID]} is a deque, the same object for the stream's
    life; each non-empty C{write} appends its bytes as one entry; the sending loop
    pops entries from the left, putting back at the left the rest of an entry too
    large for one frame; C{endRequest} appends a marker that is not bytes; the entry
    is removed when the stream ends or is reset.
    """
    if not isinstance(channel, H2Stream):
        return None
    queues = getattr(getattr(channel, "_conn", None), "_outboundStreamQueues", None)
    if not isinstance(queues, dict):
        return None
    queue = queues.get(getattr(channel, "streamID", None))
    return queue if isinstance(queue, deque) else None
