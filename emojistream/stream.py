"""What a stream is to the code that holds many of them: the hub (indexes, delivers,
counts), the status report (describes), the drain and cleanup (close).

L{Stream} states it as a C{typing.Protocol}: the one implementation the daemon has
is L{emojistream.subscription.Subscription}, which owns a subscription's life and
its writer (L{emojistream.writers}); tests may index a small one of their own, and
mypy checks either against this. What happens to a message for a client that stopped
reading is the writer's business, not the hub's: an event stream's writer drops such
a client, the /eps writer conflates its summaries.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Stream"]


class Stream(Protocol):
    """One client's event stream, as the hub, status, drain and cleanup see it.

    The delivery methods (C{send}, C{send_summary}, C{send_control}, C{keepalive},
    C{coalesce}, C{tally}) may be the writer's own bound methods, stored on the stream, so that a
    delivery to one of thousands of streams costs no extra call.
    """

    @property
    def namespace(self) -> str:
        """What it listens to: C{/eps}, C{/raw}, C{/details/2665}..."""

    @property
    def kind(self) -> str:
        """The pool it counts in (L{emojistream.vocabulary.Kind})."""

    @property
    def client_ip(self) -> str:
        """The address it was opened from (per-address limits, cleanup)."""

    @property
    def request_path(self) -> str:
        """The path it was requested as (status lists and filters by it)."""

    @property
    def created_at(self) -> float:
        """When it opened, in the clock's seconds (status lists oldest first)."""

    @property
    def dropped(self) -> bool:
        """Whether the server dropped its client for not keeping up."""

    def send(self, frame: bytes) -> None:
        """Write one encoded SSE message (the very bytes every stream gets)."""

    def send_summary(self, frame: bytes, counts: dict[str, int]) -> None:
        """Write a score summary (C{frame} encodes C{counts}); a stream that conflates
        folds C{counts} into a pending one instead while its client is backed up."""

    def send_control(self, frame: bytes) -> None:
        """Write bytes that are not a message (a retry hint), unless backed up."""

    def keepalive(self, frame: bytes, tick: int, idle_ticks: int) -> None:
        """Keepalive tick C{tick}: write C{frame} if idle for C{idle_ticks} ticks."""

    def coalesce(self, on: bool) -> None:
        """From now on hold messages for one write per tick (C{on}), or write each at
        once (the hub decides by the stream's rate: L{emojistream.batching})."""

    def tally(self, counts: dict[str, int]) -> None:
        """Add its messages C{written}, C{discarded} and C{conflated} to C{counts}."""

    def close(self, hang_up: bool = False) -> None:
        """End the response from the server side (with C{hang_up}, the connection)."""

    def describe_json(self, now: float) -> bytes:
        """It as the admin status lists it, a compact JSON object: C{request_path},
        C{namespace}, C{tag}, C{created_at}, C{client_ip}, C{user_agent}, C{age},
        C{msgs_sent}."""
