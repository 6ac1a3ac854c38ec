"""What the shared history costs Redis in memory: C{python benchmarks/stream_memory.py
[--hits N] [--rate R]}, from a checkout.

Starts its own redis-server, appends N hits shaped like emojitracker's to a stream the
way the bridge does (the append script, C{XADD ... MAXLEN ~}, 1,000 messages a call):
each hit a score entry (the emoji's ID on C{stream.score_updates}) and a detail entry
(a tweet-shaped JSON object as the demo's feeder makes them, on
C{stream.tweet_updates.<ID>}), emoji drawn by their all-time scores. Then reads
C{MEMORY USAGE <key> SAMPLES 0} (every node counted) and C{used_memory} before and
after, and gives the bytes per entry, per hit and per hour of history at C{--rate}.
"""

from __future__ import annotations

import argparse
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from emojistream.demo import (  # noqa: E402
    TweetMaker,
    WeightedIds,
    find_redis_server,
    free_port,
    load_rankings,
    redis_server_args,
)
from emojistream.history import (  # noqa: E402
    APPEND_BATCH,
    APPEND_SCRIPT,
    DEFAULT_STREAM_KEY,
    append_call,
    sha1,
)
from emojistream.vocabulary import DETAIL_CHANNEL_PREFIX, SCORE_CHANNEL  # noqa: E402


def resp(*args: bytes) -> bytes:
    """One Redis command in the wire protocol."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class Redis:
    """Just enough of a blocking Redis client: one command, its whole reply."""

    def __init__(self, port: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rb")

    def send(self, *args: bytes | str | int) -> None:
        self.sock.sendall(resp(*(a if isinstance(a, bytes) else str(a).encode()
                                 for a in args)))

    def reply(self) -> Any:
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")

    def call(self, *args: bytes | str | int) -> Any:
        self.send(*args)
        return self.reply()

    def used_memory(self) -> int:
        info = self.call("INFO", "memory").decode()
        return int(next(line.split(":")[1] for line in info.splitlines()
                        if line.startswith("used_memory:")))


def measure(redis: Redis, hits: int, seed: int, key: str) -> dict[str, Any]:
    """Append C{hits} hits to C{key}, then read what it takes."""
    rng = random.Random(seed)
    ids = WeightedIds(load_rankings(), rng)
    tweets = TweetMaker(rng)
    before = redis.used_memory()
    redis.call("SCRIPT", "LOAD", APPEND_SCRIPT)
    digest = sha1(APPEND_SCRIPT)
    token = secrets.token_hex(8)
    payload_bytes = 0
    pending: list[tuple[bytes, bytes]] = []
    calls = 0

    def flush() -> None:
        nonlocal calls
        keys, argv = append_call(key, pending, maxlen=2 * hits + 10_000, epoch_token=token)
        redis.send("EVALSHA", digest, len(keys), *keys, *argv)
        calls += 1
        pending.clear()
        if calls == 16:
            # A bounded pipeline: Redis's buffers for it stay out of used_memory.
            for _ in range(calls):
                redis.reply()
            calls = 0

    for _ in range(hits):
        emoji = ids.draw()
        detail = tweets.tweet(emoji)
        payload_bytes += len(emoji.id) + len(detail)
        pending += [(SCORE_CHANNEL, emoji.id.encode()),
                    (DETAIL_CHANNEL_PREFIX + emoji.id.encode(), detail)]
        if len(pending) >= APPEND_BATCH:
            flush()
    if pending:
        flush()
    for _ in range(calls):
        redis.reply()
    entries = redis.call("XLEN", key)
    usage = redis.call("MEMORY", "USAGE", key, "SAMPLES", "0")
    after = redis.used_memory()
    return {"hits": hits, "entries": entries, "payload_bytes_per_hit": payload_bytes / hits,
            "memory_usage": usage, "used_memory_delta": after - before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/stream_memory.py",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hits", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=400, help="hits per second")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="emojistream-memory-redis-")
    port = free_port()
    server = subprocess.Popen(redis_server_args(find_redis_server(), port, directory),
                              stdout=subprocess.DEVNULL)
    try:
        redis = Redis(port)
        version = next(line for line in redis.call("INFO", "server").decode().splitlines()
                       if line.startswith("redis_version:"))
        node = redis.call("CONFIG", "GET", "stream-node-max-*")
        r = measure(redis, args.hits, args.seed, DEFAULT_STREAM_KEY)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(directory, ignore_errors=True)
    per_entry = r["memory_usage"] / r["entries"]
    per_hit = r["memory_usage"] / args.hits
    per_hour = per_hit * args.rate * 3600
    print(f"{version}, {dict(zip(node[::2], node[1::2], strict=True))}")
    print(f"hits appended                 {args.hits} ({r['entries']} entries)")
    print(f"payload bytes per hit         {r['payload_bytes_per_hit']:.1f} "
          "(score ID + detail JSON)")
    print(f"MEMORY USAGE of the stream    {r['memory_usage']} bytes")
    print(f"used_memory grew by           {r['used_memory_delta']} bytes")
    print(f"bytes per entry               {per_entry:.1f}")
    print(f"bytes per hit                 {per_hit:.1f}")
    grown_per_hour = r["used_memory_delta"] / args.hits * args.rate * 3600
    print(f"per hour at {args.rate:g} hits/s        {per_hour / 1e6:.0f} MB "
          f"({per_hour / 2**20:.0f} MiB) by MEMORY USAGE, {grown_per_hour / 1e6:.0f} MB "
          f"({grown_per_hour / 2**20:.0f} MiB) by used_memory; "
          f"{int(args.rate * 3600 * 2)} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
