"""How long one answer serves every request, written once: the status document, the
cluster view and the rankings are each built or read at most once per
L{CACHE_SECONDS}, the same bytes going to every request in between."""

from __future__ import annotations

#: Seconds one built status document, read of the cluster hash or read of the
#: rankings serves every request for.
CACHE_SECONDS = 1.0


def fresh(made_at: float, now: float, seconds: float = CACHE_SECONDS) -> bool:
    """Whether what was made at C{made_at} still serves at C{now}: less than C{seconds}
    old, and not from the future (a clock set back makes it stale, not fresh for ever)."""
    return 0 <= now - made_at < seconds
