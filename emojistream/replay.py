"""Resumable streams (C{--event-ids}): event IDs, and the replay buffers behind
C{Last-Event-ID}.

An ID is C{<epoch>-<sequence>}: the epoch is random per process, so an ID from
another process (another node, a restart) is known as foreign; the sequence counts
every event of the process, so IDs of all namespaces are ordered together. Each
namespace keeps its recent events (at most C{max_events}, none older than
C{max_age}), and all of them together at most about C{max_bytes}: the largest
buffers give up their oldest events first, so a busy /raw does not push a quiet
detail stream's history out. A buffer remembers the newest sequence it gave up,
which is how a resume knows that it cannot be filled.

At most C{max_namespaces} namespaces have a buffer: past it, the one least recently
written to is forgotten, and its newest sequence is remembered as that namespace's
floor (at most C{max_floors} of them, the oldest then folded into one floor for the
namespaces the journal no longer knows). A resume is a gap only when events of its
own namespace (or, for /details, of the IDs below it) after its ID were given up.

/eps keeps the counts of its summaries instead of their bytes: a resuming /eps client
gets one catch-up summary with every hit it missed, per ID.
"""

from __future__ import annotations

import heapq
import re
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from emojistream.history import EntryId, HistoryReader, entry_of, position
from emojistream.sse import encode_event
from emojistream.summarizer import summary_frame
from emojistream.vocabulary import EPS_NAMESPACE, SCORE_CHANNEL, lineage

#: What an event costs in a buffer besides its frame's bytes (the bytes object, the
#: entry tuple, its time and sequence objects, the deque slot), as tracemalloc
#: measures it (tests/test_replay.py checks that the estimate is not short).
ENTRY_OVERHEAD = 190
#: A summary is kept as a dict of counts: roughly this many times its frame's bytes.
SUMMARY_FACTOR = 8
#: Namespaces with a buffer at most; past it the least recently written is forgotten.
MAX_NAMESPACES = 20_000
#: Forgotten namespaces whose floor is remembered at most (one entry each, about
#: 200 bytes); past it the oldest floor is folded into the common floor.
MAX_FLOORS = 20_000
#: Buffers written to lately that one new namespace spares at most before one goes.
MAX_SPARED = 64

_ID = re.compile(r"([0-9a-f]{8})-([0-9]{1,18})")
#: An ID of a stream source's event: its stream's epoch and its entry ID.
_ENTRY_ID = re.compile(r"([0-9a-f]{8,32})-([0-9]{1,20})-([0-9]{1,7})")

#: Seconds an ID of a stream source may be ahead of this node's clock (Redis's clock
#: against this host's): past it, the ID is no stream's, and is invalid.
FUTURE_TOLERANCE = 10.0

#: Why a resume cannot be filled, as the gap event and header say it.
EXPIRED = "expired"  # events after the ID were given up (too old, too many, too big)
FOREIGN = "foreign"  # the ID is another process's (another node, an earlier run)
INVALID = "invalid"  # not an ID this daemon writes
REPLACED = "replaced"  # the ID is of the stream source's earlier life (another epoch)
UNAVAILABLE = "unavailable"  # the stream source could not be read for it (Redis down)


class _Buffer:
    """One namespace's recent events, oldest first: (sequence, time, item, size)."""

    __slots__ = ("before", "entries", "lost", "size", "stamp")

    def __init__(self, before: int, stamp: int) -> None:
        self.entries: deque[tuple[int, float, Any, int]] = deque()
        self.size = 0
        #: The newest sequence given up from this buffer (0: none).
        self.lost = 0
        #: The newest sequence the namespace may have lost before this buffer: the
        #: floor of its forgotten buffer, or the common floor if it is not known.
        self.before = before
        #: The sequence when the buffer was made or last spared from being forgotten:
        #: written to since, it is spared again (a second chance).
        self.stamp = stamp


@dataclass
class Resume:
    """What a reconnecting client is sent before its live events."""

    #: Encoded SSE messages to send first (the missed events, or one gap event).
    frames: list[bytes] = field(default_factory=list)
    #: Why the gap could not be filled (L{EXPIRED}, L{FOREIGN}, L{INVALID},
    #: L{REPLACED}), or None.
    gap: str | None = None
    #: With a stream source, what the journal's memory does not hold and the stream
    #: may: the positions (after, until] to read from it (L{frames} is then empty).
    fetch: tuple[int, int] | None = None
    #: With a stream source, a position this node has not read up to yet: live events
    #: at or before it are the client's already, and are not sent.
    skip_until: int | None = None


class Journal:
    """Gives every event its ID and keeps what a reconnecting client may have missed.

    @param clock: stamps events, for the age bound.
    @param epoch: eight hex digits; random unless a test fixes it.
    @param positions: the events are a stream source's entries: their IDs are the
        stream's epoch and entry IDs (C{<epoch>-<ms>-<seq>}), the same on every node,
        given by L{start} and L{at}, not counted here; a resume the memory cannot
        fill from is read from the stream (L{Resume.fetch}).
    @param max_namespaces: namespaces with a buffer at most.
    @param max_floors: forgotten namespaces whose floor is remembered at most.
    """

    def __init__(self, clock: IReactorTime, *, max_events: int = 10_000,
                 max_age: float = 300.0, max_bytes: int = 32 << 20,
                 epoch: str | None = None, max_namespaces: int = MAX_NAMESPACES,
                 max_floors: int = MAX_FLOORS, positions: bool = False) -> None:
        self._clock = clock
        self._max_events = max_events
        self._max_age = max_age
        self._max_bytes = max_bytes
        self._max_namespaces = max_namespaces
        self._max_floors = max_floors
        self.positions = positions
        self.epoch = epoch if epoch is not None or positions else secrets.token_hex(4)
        self._id_prefix = b"id:" + (self.epoch or "").encode("ascii") + b"-"
        self._sequence = 0
        # With positions: the newest summary's (what a resuming /eps client's
        # catch-up counts up to, live summaries covering what follows).
        self._summarized = 0
        # In the order they were made or last spared from being forgotten (ordered
        # dicts: taking the first is O(1), where a dict scans what was taken before).
        self._buffers: OrderedDict[str, _Buffer] = OrderedDict()
        # Forgotten namespaces (no buffer now): the newest sequence each gave up.
        self._floors: OrderedDict[str, int] = OrderedDict()
        # The newest of the floors no longer remembered: a namespace with neither a
        # buffer nor a floor may have lost events up to it.
        self._floor = 0
        # Namespaces that are ancestors of a buffered one (/details), each with the
        # newest sequence given up by a forgotten buffer of it or below it: a resume
        # there merges its descendants' buffers.
        self._ancestors: dict[str, int] = {}
        #: Bytes (estimated) the buffers hold now.
        self.size = 0
        #: Resumes that were filled (perhaps with nothing), and those that were not.
        self.hits = 0
        #: Resumes read from the stream, filled (the subscription counts them).
        self.fetched = 0
        self.misses: dict[str, int] = (
            {EXPIRED: 0, INVALID: 0, REPLACED: 0, UNAVAILABLE: 0} if positions
            else {EXPIRED: 0, FOREIGN: 0, INVALID: 0})

    @property
    def events(self) -> int:
        """Events (and summaries) the buffers hold now."""
        return sum(len(b.entries) for b in self._buffers.values())

    def _id_line(self, sequence: int) -> bytes:
        if self.positions:
            entry = entry_of(sequence)
            return self._id_prefix + b"%d-%d\n" % (entry.ms, entry.seq)
        return self._id_prefix + b"%d\n" % sequence

    def event_id(self, sequence: int | None = None) -> str:
        """The ID of event C{sequence} (default: the newest so far)."""
        return self._id_line(self._sequence if sequence is None else sequence)[3:-1].decode()

    @property
    def started(self) -> bool:
        """Whether IDs can be given and read: always, unless the IDs are a stream
        source's positions and it has not started yet."""
        return self.epoch is not None

    # -- a stream source's positions -------------------------------------------

    def start(self, epoch: str, since: int) -> None:
        """A stream source's entries of epoch C{epoch} follow from the first after
        position C{since}. Unless that is just where the journal is, what it holds
        is forgotten: another epoch's positions mean nothing now, and after a hole
        (entries trimmed before they were read) its events are not contiguous; a
        resume from before C{since} is read from the stream."""
        assert self.positions
        if epoch == self.epoch and since == self._sequence:
            return
        self.epoch = epoch
        self._id_prefix = b"id:" + epoch.encode("ascii") + b"-"
        self._buffers.clear()
        self._floors.clear()
        self._ancestors.clear()
        self.size = 0
        self._floor = self._sequence = self._summarized = since

    def at(self, place: int) -> None:
        """The next events are of the entry at position C{place}."""
        self._sequence = place

    @property
    def max_events(self) -> int:
        """Events a namespace keeps at most (C{--replay-events}): also the most a
        resume read from the stream may bring."""
        return self._max_events

    def position_of(self, frame: bytes) -> int:
        """The position of a frame this journal encoded with positions (its C{id:})."""
        line = frame[len(self._id_prefix):frame.index(b"\n")]
        ms, _, seq = line.partition(b"-")
        return position(EntryId(int(ms), int(seq)))

    # -- recording ------------------------------------------------------------

    def event(self, namespace: str, data: bytes, event: bytes | None = None) -> bytes:
        """The next event of C{namespace}, encoded with its ID and kept for replay."""
        if self.positions:
            sequence = self._sequence
        else:
            self._sequence = sequence = self._sequence + 1
        frame = self._id_line(sequence) + encode_event(data, event)
        self._keep(namespace, sequence, frame, len(frame) + ENTRY_OVERHEAD)
        return frame

    def summary(self, counts: dict[str, int]) -> bytes:
        """The next score summary, encoded with its ID; its counts are kept for replay.
        With positions, its ID is the newest entry it covers."""
        if self.positions:
            self._summarized = sequence = self._sequence
        else:
            self._sequence = sequence = self._sequence + 1
        frame = summary_frame(counts, self._id_line(sequence))
        self._keep(EPS_NAMESPACE, sequence, counts,
                   len(frame) * SUMMARY_FACTOR + ENTRY_OVERHEAD)
        return frame

    def _keep(self, namespace: str, sequence: int, item: Any, size: int) -> None:
        buffer = self._buffers.get(namespace)
        if buffer is None:
            buffer = self._new_buffer(namespace)
        now = self._clock.seconds()
        entries = buffer.entries
        entries.append((sequence, now, item, size))
        buffer.size += size
        self.size += size
        if len(entries) > self._max_events or entries[0][1] < now - self._max_age:
            self._expire(buffer, now)
        if self.size > self._max_bytes:
            self._shrink()

    def _new_buffer(self, namespace: str) -> _Buffer:
        if len(self._buffers) >= self._max_namespaces:
            self._forget(self._least_recent())
        before = self._floors.pop(namespace, None)
        buffer = self._buffers[namespace] = _Buffer(
            self._floor if before is None else before, self._sequence)
        for ancestor in lineage(namespace)[1:]:
            if ancestor not in self._ancestors:
                # What it may have lost of its own events before it was an ancestor.
                self._ancestors[ancestor] = self._own_floor(ancestor)
        return buffer

    def _least_recent(self) -> str:
        """The namespace whose buffer goes: the first in order that was not written to
        since it was made or last spared (those that were are spared: moved to the
        end), or the first after L{MAX_SPARED} were spared (when all are busy)."""
        buffers = self._buffers
        for _ in range(MAX_SPARED):
            namespace = next(iter(buffers))
            buffer = buffers[namespace]
            if not buffer.entries or buffer.entries[-1][0] <= buffer.stamp:
                return namespace
            buffers.move_to_end(namespace)
            buffer.stamp = self._sequence
        return next(iter(buffers))

    def _forget(self, namespace: str) -> None:
        """Drop C{namespace}'s buffer, remembering the newest sequence it gave up."""
        gone = self._buffers.pop(namespace)
        self.size -= gone.size
        floor = max(gone.before, gone.lost, gone.entries[-1][0] if gone.entries else 0)
        for name in lineage(namespace):
            known = self._ancestors.get(name)
            if known is not None and known < floor:
                self._ancestors[name] = floor
        if len(self._floors) >= self._max_floors:
            _, oldest = self._floors.popitem(last=False)
            self._floor = max(self._floor, oldest)
        self._floors[namespace] = floor

    def _own_floor(self, namespace: str) -> int:
        """The newest sequence of C{namespace}'s own events that may have been given
        up, besides what its buffer (if any) says it gave up."""
        buffer = self._buffers.get(namespace)
        if buffer is not None:
            return buffer.before
        return self._floors.get(namespace, self._floor)

    def _give_up(self, buffer: _Buffer) -> None:
        sequence, _, _, size = buffer.entries.popleft()
        buffer.lost = sequence
        buffer.size -= size
        self.size -= size

    def _expire(self, buffer: _Buffer, now: float) -> None:
        """Give up what is over the count or the age bound."""
        entries, oldest = buffer.entries, now - self._max_age
        while entries and (len(entries) > self._max_events or entries[0][1] < oldest):
            self._give_up(buffer)

    def _shrink(self) -> None:
        """Over the memory bound: the largest buffers give up their oldest events,
        down to nine tenths of the bound (so that this runs now and then, not per event)."""
        target = self._max_bytes * 9 // 10
        by_size = sorted(self._buffers.values(), key=lambda b: b.size, reverse=True)
        for i, buffer in enumerate(by_size):
            # Trim this one down to the next one's size, or as far as the target needs.
            next_size = by_size[i + 1].size if i + 1 < len(by_size) else 0
            while buffer.entries and self.size > target and buffer.size > next_size:
                self._give_up(buffer)
            if self.size <= target:
                return
        # Several buffers of equal size: trim them in turn.
        for buffer in by_size:
            while buffer.entries and self.size > target:
                self._give_up(buffer)

    # -- resuming ---------------------------------------------------------------

    def resume(self, namespace: str, last_event_id: str, max_bytes: int) -> Resume:
        """What a client of C{namespace} that last saw C{last_event_id} missed: the
        events after it, in order (at most C{max_bytes} of them, else a gap).

        /eps gets one summary of all the hits it missed instead of the summaries.
        With positions, what the memory cannot give is to be read from the stream
        (L{Resume.fetch}), and an ID this node has not reached yet is skipped to
        (L{Resume.skip_until}).
        """
        if self.positions:
            return self._resume_position(namespace, last_event_id, max_bytes)
        sequence, gap = self._parse(last_event_id)
        buffers: list[_Buffer] = []
        if gap is None:
            buffers = self._buffers_of(namespace)
            floor = self._ancestors.get(namespace)
            if floor is None:
                floor = self._own_floor(namespace)
            now = self._clock.seconds()
            for buffer in buffers:
                self._expire(buffer, now)
            if sequence < floor or any(sequence < b.lost for b in buffers):
                gap = EXPIRED
        if gap is not None:
            return self._gap(gap)
        missed = list(_after(buffers, sequence))
        if namespace == EPS_NAMESPACE:
            frames = self._catch_up(missed)
        else:
            frames = [frame for _, _, frame, _ in missed]
        if sum(len(f) for f in frames) > max_bytes:
            return self._gap(EXPIRED)
        self.hits += 1
        return Resume(frames)

    def _resume_position(self, namespace: str, last_event_id: str, max_bytes: int
                         ) -> Resume:
        if not self.started:
            # The stream source has not been read yet (Redis unreachable at start).
            return self._gap(UNAVAILABLE)
        match = _ENTRY_ID.fullmatch(last_event_id.strip())
        if match is None:
            return self._gap(INVALID)
        if match.group(1) != self.epoch:
            return self._gap(REPLACED)
        try:
            sequence = position(EntryId(int(match.group(2)), int(match.group(3))))
        except ValueError:
            return self._gap(INVALID)
        now = self._clock.seconds()
        if entry_of(sequence).ms > (now + FUTURE_TOLERANCE) * 1000:
            # No node gave it (the stream's IDs are Redis's clock): waiting for it
            # would keep the client silent for good.
            return self._gap(INVALID)
        eps = namespace == EPS_NAMESPACE
        # /eps: the summaries sent so far cover up to _summarized; events: each is
        # its own entry, so up to the newest position read.
        newest = self._summarized if eps else self._sequence
        if sequence > newest:
            # Read further by another node than by this one: wait for it here.
            self.hits += 1
            return Resume(skip_until=sequence)
        if sequence == newest:
            self.hits += 1
            return Resume()
        if entry_of(sequence).ms < (now - self._max_age) * 1000:
            return self._gap(EXPIRED)
        buffers = self._buffers_of(namespace)
        floor = self._ancestors.get(namespace)
        if floor is None:
            floor = self._own_floor(namespace)
        for buffer in buffers:
            self._expire(buffer, now)
        if (sequence < floor or any(sequence < b.lost for b in buffers)
                or (eps and not any(e[0] == sequence for b in buffers for e in b.entries))):
            # Before what this node holds; or, for /eps, not one of its own summaries'
            # bounds (another node's ticks fall elsewhere): the stream counts exactly.
            return Resume(fetch=(sequence, newest))
        missed = list(_after(buffers, sequence))
        frames = (self._catch_up(missed) if eps
                  else [frame for _, _, frame, _ in missed])
        if sum(len(f) for f in frames) > max_bytes:
            return self._gap(EXPIRED)
        self.hits += 1
        return Resume(frames)

    def encode(self, place: int, data: bytes, event: bytes | None = None) -> bytes:
        """The event at position C{place}, encoded as its live one was (not kept): for
        a resume read from the stream."""
        return self._id_line(place) + encode_event(data, event)

    def catch_up(self, place: int, counts: dict[str, int]) -> bytes:
        """A resuming /eps client's catch-up summary of C{counts}, read from the
        stream up to position C{place}."""
        return summary_frame(counts, self._id_line(place))

    def gap(self, reason: str) -> Resume:
        """The gap event for C{reason}, counted (a resume read from the stream that
        could not be filled)."""
        return self._gap(reason)

    def _parse(self, last_event_id: str) -> tuple[int, str | None]:
        match = _ID.fullmatch(last_event_id.strip())
        if match is None:
            return 0, INVALID
        if match.group(1) != self.epoch:
            return 0, FOREIGN
        sequence = int(match.group(2))
        if sequence > self._sequence:
            return 0, INVALID
        return sequence, None

    def _buffers_of(self, namespace: str) -> list[_Buffer]:
        """The buffers a client of C{namespace} hears: its own and its descendants'."""
        if namespace not in self._ancestors:
            buffer = self._buffers.get(namespace)
            return [] if buffer is None else [buffer]
        prefix = namespace + "/"
        return [b for ns, b in self._buffers.items() if ns == namespace or ns.startswith(prefix)]

    def _catch_up(self, missed: list[tuple[int, float, Any, int]]) -> list[bytes]:
        if not missed:
            return []
        total: dict[str, int] = {}
        for _, _, counts, _ in missed:
            for emoji_id, n in counts.items():
                total[emoji_id] = total.get(emoji_id, 0) + n
        return [summary_frame(total, self._id_line(missed[-1][0]))]

    def _gap(self, reason: str) -> Resume:
        """The gap event: why, and an ID from which a later resume can go on."""
        self.misses[reason] += 1
        # Before a stream source is first read there is no ID to give: the client
        # keeps its own, and resumes from it later.
        id_line = self._id_line(self._sequence) if self.started else b""
        frame = id_line + encode_event(b'{"reason":"%s"}' % reason.encode("ascii"), b"gap")
        return Resume([frame], reason)


def _after(buffers: Iterable[_Buffer], sequence: int) -> Iterator[tuple[int, float, Any, int]]:
    """The entries of C{buffers} newer than C{sequence}, merged in sequence order."""
    tails = []
    for buffer in buffers:
        tail: list[tuple[int, float, Any, int]] = []
        for entry in reversed(buffer.entries):
            if entry[0] <= sequence:
                break
            tail.append(entry)
        if tail:
            tail.reverse()
            tails.append(tail)
    if len(tails) == 1:
        return iter(tails[0])
    return heapq.merge(*tails, key=lambda entry: entry[0])


#: Entries one resume reads from the stream at most: about five minutes (the default
#: --replay-sec) of emojitracker at 400 hits a second, two entries a hit, and some.
RECALL_ENTRIES = 250_000


class Recall:
    """Reads what a resuming client missed from the stream when the journal's memory
    does not hold it (a stream source: L{Resume.fetch}), as the very frames it would
    have had live, or for /eps the one catch-up summary of the hits.

    @param reader: reads the stream's entries.
    @param event_of: what an entry is to the clients that hear it: (namespace, data,
        event name) or None (the router's own L{emojistream.router.Router.event_of}).
    @param hit_of: a score update's emoji ID, or None.
    @param max_entries: entries one resume reads at most (past it: a gap).
    """

    def __init__(self, reader: HistoryReader, journal: Journal, *,
                 event_of: Callable[[bytes, bytes], tuple[str, bytes, bytes | None] | None],
                 hit_of: Callable[[bytes], str | None], max_entries: int) -> None:
        self._reader = reader
        self._journal = journal
        self._event_of = event_of
        self._hit_of = hit_of
        self._max_entries = max_entries

    def frames(self, namespace: str, after: int, until: int) -> Deferred[list[bytes] | None]:
        """The frames of C{namespace} (and what it hears below it) in positions
        (C{after}, C{until}]; None if the stream cannot give them all."""
        d = self._reader.entries_after(after, until, self._max_entries)
        return d.addCallback(self._made, namespace, until)

    def _made(self, entries: list[tuple[int, bytes, bytes]] | None, namespace: str,
              until: int) -> list[bytes] | None:
        if entries is None:
            return None
        journal = self._journal
        if namespace == EPS_NAMESPACE:
            counts: dict[str, int] = {}
            for _, channel, payload in entries:
                emoji_id = self._hit_of(payload) if channel == SCORE_CHANNEL else None
                if emoji_id is not None:
                    counts[emoji_id] = counts.get(emoji_id, 0) + 1
            return [journal.catch_up(until, counts)] if counts else []
        frames = []
        for place, channel, payload in entries:
            routed = self._event_of(channel, payload)
            if routed is not None and namespace in lineage(routed[0]):
                frames.append(journal.encode(place, routed[1], routed[2]))
        return frames
