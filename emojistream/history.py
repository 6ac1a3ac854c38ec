"""The shared history: emojitracker's pub/sub messages kept in one Redis Stream.

The format, in full (pure: no reactor, no connection; what the bridge writes and what a
reader reads):

- B{The stream}, key L{DEFAULT_STREAM_KEY} (C{--stream-key}, C{EMOJISTREAM_STREAM_KEY}),
  holds one entry per pub/sub message, in the order Redis delivered them. Each entry
  has exactly two fields: C{c}, the channel the message was published on, as bytes
  (C{stream.score_updates}, C{stream.tweet_updates.2665}, C{stream.interaction.<kiosk>};
  see L{emojistream.vocabulary}), and C{p}, the payload, byte for byte as published.
  Entries are only ever added by L{APPEND_SCRIPT}, which trims the stream to about
  C{maxlen} entries (C{XADD ... MAXLEN ~ N}): the oldest go first.
- B{The epoch}, key C{<stream-key>:epoch} (L{epoch_key}): a random token that names
  this stream's life. L{APPEND_SCRIPT} sets it to a new token whenever it finds the
  stream missing (first append, or the stream was deleted or expired), and sets it if
  it finds the epoch itself missing. Entry IDs are comparable only within one epoch: a
  reader that remembers an ID with another epoch must treat the history as replaced.
  Only the script creates the stream; one written by hand (a plain XADD) after a DEL
  keeps the old epoch until the next append finds it missing, so don't.
- B{The bridge's lease}, key C{<stream-key>:bridge} (L{lease_key}): the id of the one
  bridge allowed to append, set with an expiry (L{ACQUIRE_SCRIPT}, L{RELEASE_SCRIPT}).
  L{APPEND_SCRIPT}, given a holder, appends only while the lease still names it, so a
  bridge that stalled past its lease cannot append after another took over. A bridge
  that gives the lease up publishes its id on the channel C{<stream-key>:bridge}
  (L{release_channel}), so standbys take over at once.

In Redis Cluster the three keys must share a hash slot (the scripts touch them
together): give a key with a hash tag, e.g. C{{emojistream}:events}.

Why a lease and not an idempotent key per message: a pub/sub message carries no
identity (the same score payload, an emoji ID, repeats many times a second), so two
bridges cannot tell "the same message" from "the same payload again" by anything in
it; one appender at a time can.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

#: The stream's key unless told otherwise.
DEFAULT_STREAM_KEY = "emojistream:events"
#: The entry field naming the channel a message was published on.
CHANNEL_FIELD = b"c"
#: The entry field holding the payload, unchanged.
PAYLOAD_FIELD = b"p"

#: Entries kept by default: about one hour of emojitracker at 400 hits a second. Each
#: hit is two messages (its score update and its detail update), so 400 x 2 x 3600 =
#: 2,880,000 entries; C{MAXLEN ~} keeps a little more (whole stream nodes).
DEFAULT_MAXLEN = 2_880_000

#: Longest stream key accepted (the derived keys add a few characters).
MAX_KEY_LENGTH = 200
_KEY = re.compile(r"^[A-Za-z0-9_.:{}/-]+$")


def parse_stream_key(text: str) -> str:
    """A stream key: letters, digits and C{_ . : { } / -} (braces for a Redis Cluster
    hash tag), 200 characters at most. It goes into log lines and other key names,
    where a space or a newline would break them."""
    key = text.strip()
    if not _KEY.match(key) or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"{text!r} is not a stream key (letters, digits, '_', '.', ':', "
                         f"'{{', '}}', '/' and '-', {MAX_KEY_LENGTH} at most)")
    return key


def epoch_key(stream_key: str) -> str:
    """The key of the stream's epoch token."""
    return f"{stream_key}:epoch"


def lease_key(stream_key: str) -> str:
    """The key of the appending bridge's lease."""
    return f"{stream_key}:bridge"


def release_channel(stream_key: str) -> bytes:
    """The channel a bridge publishes its id on when it gives the lease up."""
    return lease_key(stream_key).encode()


def encode_entry(channel: bytes, payload: bytes) -> list[bytes]:
    """An entry's fields as C{XADD} takes them: C{c <channel> p <payload>}."""
    return [CHANNEL_FIELD, channel, PAYLOAD_FIELD, payload]


def decode_entry(fields: Sequence[object]) -> tuple[bytes, bytes]:
    """(channel, payload) of an entry's flat field list as C{XRANGE} returns it.

    Raises ValueError for anything but exactly the fields C{c} and C{p} as bytes: an
    entry of another writer is not a message."""
    if (len(fields) != 4 or fields[0] != CHANNEL_FIELD or fields[2] != PAYLOAD_FIELD
            or not isinstance(fields[1], bytes) or not isinstance(fields[3], bytes)):
        raise ValueError(f"not an emojistream entry: {list(fields)!r:.100}")
    return fields[1], fields[3]


@dataclass(frozen=True, order=True)
class EntryId:
    """A stream entry's ID, C{<milliseconds>-<sequence>}, ordered as Redis orders them."""

    ms: int
    seq: int

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"

    def encode(self) -> bytes:
        return str(self).encode()


_ENTRY_ID = re.compile(rb"^(\d{1,20})-(\d{1,20})$")


def parse_entry_id(raw: bytes | str) -> EntryId:
    """An entry ID as Redis writes it; ValueError for anything else."""
    data = raw.encode() if isinstance(raw, str) else raw
    match = _ENTRY_ID.match(data)
    if match is None or max(int(match[1]), int(match[2])) >= 1 << 64:
        raise ValueError(f"{raw!r} is not a stream entry ID")
    return EntryId(int(match[1]), int(match[2]))


def sha1(script: str) -> str:
    """The script's SHA1, as C{EVALSHA} names it."""
    return hashlib.sha1(script.encode()).hexdigest()


#: Append messages. KEYS: the stream, its epoch, and (fenced) the lease. ARGV: maxlen,
#: a fresh epoch token, the holder's id ("" when there is no lease: an appender that
#: owns the stream alone), then channel, payload pairs. Returns {count, last ID}, or
#: {-1, ""} when the lease does not name the holder (nothing appended).
APPEND_SCRIPT = """\
if ARGV[3] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[3] then
  return {-1, ''}
end
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], ARGV[2])
end
local id = ''
local n = 0
for i = 4, #ARGV, 2 do
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                  'c', ARGV[i], 'p', ARGV[i + 1])
  n = n + 1
end
return {n, id}
"""

#: Take or keep the lease. KEYS: the lease. ARGV: the bridge's id, the lease in ms.
#: Returns {2, id} when newly taken (SET NX PX), {1, id} when renewed (it named us:
#: PEXPIRE), {0, holder} when another bridge holds it.
ACQUIRE_SCRIPT = """\
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, holder}
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  return {2, ARGV[1]}
end
return {0, holder}
"""

#: Give the lease up. KEYS: the lease. ARGV: the bridge's id, the release channel.
#: Deletes the lease only if it names us, then publishes our id on the channel (so
#: standbys, subscribed, try at once). Returns 1 if it was ours, else 0.
RELEASE_SCRIPT = """\
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[1])
  return 1
end
return 0
"""

#: Messages per append script call at most: a script blocks Redis while it runs, and
#: a thousand XADDs take about a millisecond.
APPEND_BATCH = 1000


def append_call(stream_key: str, messages: Sequence[tuple[bytes, bytes]], *,
                maxlen: int, epoch_token: str, holder: str = ""
                ) -> tuple[list[str], list[bytes | str | int]]:
    """The (KEYS, ARGV) of one L{APPEND_SCRIPT} call appending C{messages} in order;
    C{holder} fences it with the lease (empty: not fenced)."""
    keys = [stream_key, epoch_key(stream_key)]
    if holder:
        keys.append(lease_key(stream_key))
    args: list[bytes | str | int] = [maxlen, epoch_token, holder]
    for channel, payload in messages:
        args += [channel, payload]
    return keys, args


#: Entries a candidate must agree on with the tail (or the whole tail, if shorter)
#: before it is taken for where the stream ends: one alone could be any score update.
ALIGN_LEAST = 8


def align(heard: Sequence[tuple[bytes, bytes]], tail: Sequence[tuple[bytes, bytes]], *,
          least: int = ALIGN_LEAST) -> int | None:
    """Where the stream's newest entries C{tail} (oldest first) end in C{heard}, the
    messages one subscriber heard (oldest first): the index in C{heard} of the first
    message the stream does not hold yet, or None if it cannot be told.

    Pub/sub delivers to every subscriber of one Redis in one order, so what the stream
    holds is a run of what any subscriber heard. The tail's newest entry is looked for
    from the newest message back; a candidate must agree with the tail entry by entry,
    back as far as both go, and on C{least} entries at least (or the whole tail): a
    candidate near the start of what was heard, with only a score update or two to
    compare, could be a coincidence. The latest candidate wins: if the same run of
    C{len(tail)} messages was heard twice, the ones between are taken for appended
    already (lost, never duplicated).
    """
    if not tail:
        return 0
    newest = tail[-1]
    enough = min(least, len(tail))
    for j in range(len(heard) - 1, enough - 2, -1):
        if heard[j] != newest:
            continue
        depth = min(len(tail), j + 1)
        if all(heard[j - i] == tail[-1 - i] for i in range(1, depth)):
            return j + 1
    return None


# -- reading: positions, and what a reader hands on -------------------------------

#: Bits of a position that hold an entry ID's sequence part: a position orders entries
#: as their IDs do, in one integer (the replay journal's sequence).
SEQUENCE_BITS = 22


def position(entry: EntryId) -> int:
    """The entry ID as one integer, ordered as the IDs are: C{ms << 22 | seq}. Raises
    ValueError for a sequence part of 2**22 or more (four million entries in one
    millisecond: not one the append script writes)."""
    if entry.seq >> SEQUENCE_BITS:
        raise ValueError(f"{entry} has a sequence part too large for a position")
    return entry.ms << SEQUENCE_BITS | entry.seq


def entry_of(place: int) -> EntryId:
    """The entry ID of position C{place} (the inverse of L{position})."""
    return EntryId(place >> SEQUENCE_BITS, place & ((1 << SEQUENCE_BITS) - 1))


class StreamHandler(Protocol):
    """What a stream reader hands the entries it reads to (the router): as a pub/sub
    subscriber does, each read's messages bracketed by C{read_started}/C{read_done},
    each message with its position; and first, where it starts (L{start})."""

    def start(self, epoch: str, since: int) -> None:
        """Entries of the stream whose epoch is C{epoch} follow, from the first after
        position C{since} on, with nothing left out; called when a reader starts, and
        again whenever it cannot go on exactly where it left off (another epoch: the
        stream was replaced; or entries it had not read were trimmed meanwhile)."""

    def read_started(self) -> None:
        """The entries of one read follow."""

    def message(self, channel: bytes, payload: bytes, place: int | None = None) -> None:
        """One entry: the message as published, at position C{place}."""

    def read_done(self) -> None:
        """The entries of that read are all handed over."""


class HistoryReader(Protocol):
    """Reads what the stream holds, for a client resuming from a position the node's
    memory no longer (or never) held."""

    def entries_after(self, after: int, until: int, max_entries: int
                      ) -> Deferred[list[tuple[int, bytes, bytes]] | None]:
        """The entries with positions in (C{after}, C{until}], oldest first, as
        (position, channel, payload): read in pages, off the reactor's critical path.

        Fires with None when they cannot all be had: the stream no longer holds the
        entry at C{after} (trimmed, or it never existed), or more than C{max_entries}
        lie between. Fails if Redis cannot be asked."""
