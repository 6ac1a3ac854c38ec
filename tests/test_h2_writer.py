"""The writer over HTTP/2 when the client's windows never hold it back (issue 18): what
waits in Twisted's queue for the stream counts toward --max-queue-bytes, toward /eps
conflation and against delivered. In memory, on Twisted's real H2Connection (see
test_compat), with the connection paused as a full socket pauses it."""

from __future__ import annotations

import json

import h2.events
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from emojistream.summarizer import summary_frame
from emojistream.writers import TRANSPORT_BUFFER, SummaryWriter, Writer
from test_compat import H2Pair


def detail_stream(pair: H2Pair, max_queue: int = 256 * 1024) -> Writer:
    """A detail stream's writer on a new request of C{pair}, told when it ends as its
    subscription does."""
    request = pair.get()
    stream = Writer(request, max_queue=max_queue)
    request.notifyFinish().addBoth(lambda _: stream.lost())
    stream.start()
    return stream


def test_past_the_bound_a_stream_whose_socket_is_full_is_reset_and_its_queue_freed():
    pair = H2Pair()
    stream = detail_stream(pair)
    finished: list[object] = []
    stream.when_finished().addBoth(finished.append)
    pair.server.pauseProducing()  # the socket is full
    message = b"data:" + b"x" * 20_000 + b"\n\n"
    sent = 0
    while stream.open:
        stream.message(message)
        sent += 1
        assert sent < 100, "never dropped"
    # 256 KiB less a transport buffer's worth (64 KiB) were allowed: 192 KiB.
    assert sent == (256 - 64) * 1024 // len(message) + 1
    assert stream.dropped and finished
    # Nothing was sent of them: none delivered, all discarded.
    assert stream.written == 0 and stream.discarded == sent
    # Twisted let the stream's queue go; the writer holds no reference to it either.
    assert stream._h2 is None
    assert not pair.server._outboundStreamQueues
    # The client, once it reads, sees the stream reset.
    pair.server.resumeProducing()
    assert any(isinstance(e, h2.events.StreamReset) for e in pair.pump())


def test_delivered_counts_messages_once_wholly_out_of_twisteds_queue():
    pair = H2Pair()
    stream = detail_stream(pair)
    pair.server.pauseProducing()
    stream.message(b"data:" + b"a" * 40_000 + b"\n\n")
    stream.message(b"data:b\n\n")
    assert stream.written == 0 and stream.queued == 40_007 + 8
    assert not stream.backed_up
    pair.server.resumeProducing()
    pair.turn()  # one frame goes: the first message partly
    assert stream.written == 0 and 0 < stream.queued < 40_015
    while pair.server._outboundStreamQueues[1]:
        pair.turn()
    assert stream.written == 2 and stream.queued == 0
    # A client that goes away with messages unsent: those are discarded.
    pair.server.pauseProducing()
    stream.message(b"data:c\n\n")
    pair.server.connectionLost(Failure(ConnectionLost("client gone")))
    assert stream.written == 2 and stream.discarded == 1 and not stream.open


def test_eps_conflates_while_twisteds_queue_is_long_and_sends_the_merge_once_drained():
    pair = H2Pair()
    eps = SummaryWriter(pair.get(), max_queue=64 * 1024)
    eps.start()
    pair.server.pauseProducing()
    sent = 0
    big = {f"{i:04X}": 1 for i in range(0x2600, 0x2600 + 600)}
    while not eps.backed_up:
        eps.summary(summary_frame(big), big)
        sent += 1
        assert sent < 100, "never backed up"
    assert sent * len(summary_frame(big)) >= TRANSPORT_BUFFER
    # Held back, merged, never dropped (its queue is past a 64 KiB bound).
    eps.summary(summary_frame({"A": 1}), {"A": 1})
    eps.summary(summary_frame({"A": 2, "B": 1}), {"A": 2, "B": 1})
    assert eps.open and not eps.dropped and eps.conflated == 1
    # Nothing resumes it when the queue drains: the next keepalive tick sends the merge.
    pair.server.resumeProducing()
    while pair.server._outboundStreamQueues[1]:
        pair.turn()
    assert not eps.backed_up
    eps.keepalive(b":\n\n", 1, 100)
    pair.turn()
    body = b"".join(e.data for e in pair.pump() if isinstance(e, h2.events.DataReceived))
    assert body.endswith(b'data:{"A":3,"B":1}\n\n')
    assert eps.written == sent + 1 == eps.handed


def test_a_replay_within_the_bound_is_not_held_against_the_stream():
    pair = H2Pair()
    stream = detail_stream(pair, max_queue=256 * 1024)
    pair.server.pauseProducing()
    # What a resuming client missed: up to --max-queue-bytes, bounded by the journal.
    frames = [b"data:" + json.dumps({"n": n, "x": "y" * 10_000}).encode() + b"\n\n"
              for n in range(25)]
    stream.replay(frames)
    assert stream.open and stream.queued > 192 * 1024
    stream.message(b"data:live\n\n")
    assert stream.open
    # Live messages that pile up behind it are bounded as ever.
    for _ in range(100):
        stream.message(b"data:" + b"z" * 20_000 + b"\n\n")
        if not stream.open:
            break
    assert stream.dropped


def test_a_server_side_close_counts_what_twisted_holds_as_written():
    pair = H2Pair()
    stream = detail_stream(pair)
    pair.server.pauseProducing()
    stream.message(b"data:1\n\n")
    stream.close()
    assert stream.written == 1 and stream.discarded == 0 and stream._h2 is None
