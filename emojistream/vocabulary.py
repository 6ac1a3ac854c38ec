"""The words emojistream shares with its feeder and its clients, in one place.

Stream kinds (the pools the hub, status, metrics and graphite count), the namespaces
streams listen on (the request path after C{/subscribe}), the Redis channels the feeder
publishes on, the emoji ID pattern, and L{lineage}, which says which namespaces hear a
message. Everything here is a plain C{str} or C{bytes} (L{Kind}'s members are C{str}
too), so the hot path compares and hashes them as it did the literals they replace.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Kind(StrEnum):
    """What a stream carries; also the name of its pool (C{stream.<kind>.clients})."""

    EPS = "eps"  # score summaries, /eps
    RAW = "raw"  # one message per score hit, /raw
    DETAIL = "detail"  # detail updates, /details and /details/<ID>
    KIOSK = "kiosk"  # kiosk interactions, /kiosk_interaction


#: Every pool, in the order reports list them.
POOLS: tuple[Kind, ...] = tuple(Kind)
#: Kinds whose forced-refresh settings are the score ones; the others use the detail ones.
SCORE_KINDS = frozenset({Kind.EPS, Kind.RAW})

#: Emoji IDs as they appear in detail paths and channel names: 1F1FA-1F1F8, 2665...
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: L{ID_PATTERN} in words, for the client who sent something else.
ID_RULE = "1 to 64 letters, digits, '-' or '_'"

# -- namespaces: the request path after SUBSCRIBE ----------------------------------

#: Where every stream's path starts.
SUBSCRIBE = "/subscribe"
#: Score summaries, 60 a second at most.
EPS_NAMESPACE = "/eps"
#: Every score hit (with --raw-stream).
RAW_NAMESPACE = "/raw"
#: Every detail update: the parent of each C{/details/<ID>}.
DETAILS_NAMESPACE = "/details"
#: What an emoji ID follows in its detail namespace.
DETAIL_NAMESPACE_PREFIX = DETAILS_NAMESPACE + "/"
#: Kiosk interactions (with --kiosk-stream).
KIOSK_NAMESPACE = "/kiosk_interaction"

# -- Redis: channels (as bytes, as the subscription delivers them) and keys ---------

#: A score hit; the payload is the emoji ID.
SCORE_CHANNEL = b"stream.score_updates"
#: What an emoji ID follows in its detail channel; the payload is the tweet JSON.
DETAIL_CHANNEL_PREFIX = b"stream.tweet_updates."
#: The pattern subscribed to for every detail channel.
DETAIL_PATTERN = DETAIL_CHANNEL_PREFIX + b"*"
#: What a kiosk's own name follows in its interaction channel.
KIOSK_CHANNEL_PREFIX = b"stream.interaction."
#: The pattern subscribed to for every kiosk channel (with --kiosk-stream).
KIOSK_PATTERN = KIOSK_CHANNEL_PREFIX + b"*"

#: The sorted set of all-time scores the feeder keeps (member: unified ID, score: hits).
SCORE_KEY = "emojitrack_score"


def detail_namespace(emoji_id: str) -> str:
    """The namespace of one emoji's detail updates: C{/details/<ID>}."""
    return DETAIL_NAMESPACE_PREFIX + emoji_id


def lineage(namespace: str) -> list[str]:
    """The namespace and its ancestors at C{/} boundaries, most specific first: a
    message published to a namespace reaches the streams of all of them."""
    chain = [namespace]
    cut = namespace.rfind("/")
    while cut > 0:
        namespace = namespace[:cut]
        chain.append(namespace)
        cut = namespace.rfind("/")
    return chain
