"""Histograms of delays kept on the hot path for /metrics: the tick's lateness and
each detail update's time to its clients. Pure counting, read at scrape time."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

#: Upper bounds (seconds) of the delivery delay histogram's buckets.
DELAY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Delays:
    """A histogram of delays that costs a bisect per observation (no locks, no
    labels): observed once per Redis read, weighted by the messages it carried."""

    def __init__(self, buckets: tuple[float, ...] = DELAY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, seconds: float, times: int = 1) -> None:
        self.counts[bisect_left(self.buckets, seconds)] += times
        self.sum += seconds * times

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations at or below it), ending with C{+Inf}."""
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass
class DeliveryDelays:
    """Detail updates' time to their write to clients: from their publication when the
    payload says when it was (C{published_at}), else from the Redis read."""

    since_publish: Delays = field(default_factory=Delays)
    since_read: Delays = field(default_factory=Delays)
