"""The fan-out benchmark: C{python benchmarks/bench.py [--quick] [options]}, from a
checkout (the daemon it starts runs the checkout's code).

Starts its own Redis and the daemon (C{twistd -n emojistream}) as separate processes,
or targets a running daemon with C{--url} and C{--redis}. It publishes like the
upstream feeder (each hit a score update and a ~300-byte detail carrying a sequence
number and its publish time, IDs from a Zipf distribution), holds N SSE clients in
separate client processes, and measures over a fixed window after a warm-up: delivered
messages/s per stream kind, server CPU per delivered message, server RSS, detail
and /raw latency (from each hit's publish time), eps rate and exactness, loss,
duplicates and reordering per subscriber.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import random
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from bisect import bisect
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from emojistream.config import default_max_streams  # noqa: E402
from emojistream.demo import (  # noqa: E402
    find_redis_server,
    free_port,
    load_rankings,
    redis_server_args,
)
from emojistream.history import (  # noqa: E402
    APPEND_BATCH,
    APPEND_SCRIPT,
    DEFAULT_MAXLEN,
    DEFAULT_STREAM_KEY,
    append_call,
    sha1,
)
from emojistream.lifecycle import raise_fd_limit  # noqa: E402
from emojistream.vocabulary import (  # noqa: E402
    DETAIL_CHANNEL_PREFIX,
    KIOSK_CHANNEL_PREFIX,
    SCORE_CHANNEL,
)

KINDS = ("eps", "raw", "details")
_SEQ = re.compile(rb'"seq":(\d+),"t":([0-9.]+)')
_TICKS = os.sysconf("SC_CLK_TCK")


def zipf_ids(n: int = 900, s: float = 1.1) -> tuple[list[str], list[float]]:
    """About 900 unified IDs (the real ones, padded) and their Zipf(s) cumulative weights."""
    ids = [e.id for e in load_rankings()]
    ids += [f"E{i:04X}" for i in range(n - len(ids))]
    weights = [1 / (rank ** s) for rank in range(1, len(ids) + 1)]
    return ids, list(accumulate(weights))


def draw(rng: random.Random, ids: list[str], cumulative: list[float]) -> str:
    return ids[min(bisect(cumulative, rng.random() * cumulative[-1]), len(ids) - 1)]


def resp(*args: bytes) -> bytes:
    """One Redis command in the wire protocol."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


# -- clients (run in their own processes) -----------------------------------------


def connect_retrying(host: str, port: int, seconds: float = 30, source: str = ""
                     ) -> socket.socket:
    """Connect as a client would (from C{source}, if given), trying again while the
    server's queue is full."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return socket.create_connection((host, port), timeout=10,
                                            source_address=(source, 0) if source else None)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@dataclass
class Sub:
    """One SSE connection held by a client process."""

    kind: str
    emoji_id: str
    sample: bool
    sock: socket.socket
    buffer: bytes = b""
    tail: bytes = b""
    messages: int = 0
    seqs: set[int] = field(default_factory=set)
    last_seq: int = -1
    dups: int = 0
    reorders: int = 0
    eps_totals: Counter[str] = field(default_factory=Counter)
    # Detail streams: when bytes last came, and the longest silence in the window.
    last_rx: float = 0.0
    max_gap: float = 0.0
    # Sampled raw streams: (index of the first message, messages, when) of each read
    # in the window; the Nth raw message is the Nth hit published.
    raw_reads: list[tuple[int, int, float]] = field(default_factory=list)


def client_main(host: str, port: int, plan: list[tuple[str, str, bool]], shared: Any,
                results: Any, nice: int = 0, sources: tuple[str, ...] = ("",)) -> None:
    """Open every planned stream, read until told to stop, report per-stream figures."""
    raise_fd_limit(len(plan) + 256)
    if nice:
        os.nice(nice)
    # A run lasts a minute or so; a collection walking millions of recorded
    # latencies would stall this reader and show up as the daemon's latency.
    gc.disable()
    poller = select.epoll()
    by_fd: dict[int, Sub] = {}
    subs: list[Sub] = []
    for n, (kind, emoji_id, sample) in enumerate(plan):
        path = {"eps": "/subscribe/eps", "raw": "/subscribe/raw"}.get(
            kind, f"/subscribe/details/{emoji_id}")
        # Several source addresses: one has only ~28,000 ephemeral ports to one port.
        sock = connect_retrying(host, port, source=sources[n % len(sources)])
        # HTTP/1.0: the body comes unchunked, so the client parses nothing but SSE.
        sock.sendall(f"GET {path} HTTP/1.0\r\nUser-Agent: emojistream-bench\r\n\r\n".encode())
        sock.setblocking(False)
        sub = Sub(kind, emoji_id, sample, sock)
        subs.append(sub)
        by_fd[sock.fileno()] = sub
        poller.register(sock.fileno(), select.EPOLLIN)
    # A stream counts as connected once its headers arrive: the daemon sends them
    # after the stream joined its namespace, so from then on nothing published is
    # missed (the publisher starts when every stream is connected).
    waiting = {sub.sock: sub for sub in subs}
    while waiting and not shared["stop"].value:
        for fd, _ in poller.poll(0.05):
            sub = by_fd[fd]
            if sub.sock not in waiting:
                continue
            try:
                data = sub.sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                raise SystemExit(f"the daemon closed a {sub.kind} stream before its headers")
            sub.buffer += data
            head, sep, _ = sub.buffer.partition(b"\r\n\r\n")
            if sep:
                if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
                    raise SystemExit(f"the daemon refused a stream: {head.splitlines()[0]!r}")
                # What follows the headers predates our publisher (a retry hint at most).
                sub.buffer = b""
                sub.tail = b"\n"
                del waiting[sub.sock]
                with shared["connected"].get_lock():
                    shared["connected"].value += 1
    latencies: list[float] = []
    # (publish time, latency) of detail messages published after the window.
    after: list[tuple[float, float]] = []
    delivered = shared["delivered"]
    # Streams that are only counted are read into one reused buffer, behind the
    # last five bytes of their previous read (so that a split "\ndata:" counts).
    buffer = bytearray(1 << 18)
    view = memoryview(buffer)
    kind_index = {kind: i for i, kind in enumerate(KINDS)}
    while not shared["stop"].value:
        counts = [0, 0, 0]
        for fd, _ in poller.poll(0.05):
            sub = by_fd[fd]
            if not (sub.kind == "details" or sub.sample):
                tail = sub.tail
                start = len(tail)
                buffer[:start] = tail
                try:
                    got = sub.sock.recv_into(view[start:])
                except BlockingIOError:
                    continue
                if not got:
                    poller.unregister(fd)
                    continue
                end = start + got
                n = buffer.count(b"\ndata:", 0, end)
                sub.tail = bytes(buffer[max(0, end - 5):end])
                sub.messages += n
                counts[kind_index[sub.kind]] += n
                continue
            try:
                data = sub.sock.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                poller.unregister(fd)
                continue
            # Every message here is one data: line; the tail keeps a split one countable.
            joined = sub.tail + data
            n = joined.count(b"\ndata:")
            sub.tail = joined[-5:]
            data = sub.buffer + data
            end = data.rfind(b"\n\n")
            whole, sub.buffer = (data[:end + 2], data[end + 2:]) if end >= 0 else (b"", data)
            if sub.kind == "details":
                now = time.time()
                measuring = shared["measuring"].value
                if measuring == 1:
                    if sub.last_rx:
                        sub.max_gap = max(sub.max_gap, now - sub.last_rx)
                    sub.last_rx = now
                for m in _SEQ.finditer(whole):
                    seq = int(m.group(1))
                    if seq in sub.seqs:
                        sub.dups += 1
                    elif seq < sub.last_seq:
                        sub.reorders += 1
                    sub.seqs.add(seq)
                    sub.last_seq = max(sub.last_seq, seq)
                    if measuring:
                        published = float(m.group(2))
                        if measuring == 1:
                            latencies.append(now - published)
                        else:
                            after.append((published, now - published))
            elif sub.kind == "raw":
                if n and shared["measuring"].value == 1:
                    sub.raw_reads.append((sub.messages, n, time.time()))
            elif sub.kind == "eps":
                for line in whole.split(b"\n"):
                    if line.startswith(b"data:"):
                        sub.eps_totals.update(json.loads(line[5:]))
            sub.messages += n
            counts[kind_index[sub.kind]] += n
        if any(counts):
            with delivered.get_lock():
                for i, c in enumerate(counts):
                    delivered[i] += c
    s0, s1 = shared["seq_range"][0], shared["seq_range"][1]
    report = []
    for sub in subs:
        report.append({
            "kind": sub.kind, "id": sub.emoji_id, "messages": sub.messages,
            "in_window": sum(1 for q in sub.seqs if s0 <= q <= s1), "dups": sub.dups,
            "reorders": sub.reorders, "eps_totals": dict(sub.eps_totals) if sub.sample else None,
            "max_gap": sub.max_gap, "raw_reads": sub.raw_reads if sub.sample else None,
        })
        sub.sock.close()
    poller.close()
    results.put((report, latencies, after))


# -- the run -----------------------------------------------------------------------


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process and its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user, system, child_user, child_system = (int(fields[i]) for i in (11, 12, 13, 14))
    return (user + child_user) / _TICKS, (system + child_system) / _TICKS


def steal_seconds() -> float:
    """CPU time the hypervisor gave to others while this machine wanted it (all CPUs)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / _TICKS if len(fields) > 8 else 0.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and its waited-for children, in seconds."""
    return sum(cpu_split(pid))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def status_loop(host: str, port: int, stop: Any, fetches: Any) -> None:
    """A client that fetches /admin/status.json over and over (its own process)."""
    while not stop.value:
        # The whole document is read but not parsed: the figure is the server's cost.
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(b"GET /admin/status.json HTTP/1.0\r\n\r\n")
                first = sock.recv(1 << 20)
                while sock.recv(1 << 20):
                    pass
        except OSError:
            continue
        # Counted: the whole documents served (a refusal, 429, is not one).
        if first.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
            with fetches.get_lock():
                fetches.value += 1


def checkout_env(checkout: str | Path = REPO) -> dict[str, str]:
    """The environment for a daemon that runs the code of C{checkout} (this one)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH")]))
    return env


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process, last started first; kill one that takes over 30 s."""
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def workers_of(parent: int, n: int, seconds: float = 30) -> list[int]:
    """The PIDs of C{--workers}' N children (none for one worker), once all serve."""
    if n <= 1:
        return []
    deadline = time.monotonic() + seconds
    path = Path(f"/proc/{parent}/task/{parent}/children")
    while True:
        pids = [int(p) for p in path.read_text().split()]
        if len(pids) == n:
            return sorted(pids)
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(pids)} of {n} workers started")
        time.sleep(0.1)


def each_worker_status(host: str, port: int, n: int) -> list[dict[str, Any]]:
    """status.json of each of N workers sharing the port (each new connection lands on
    one of them, as the kernel's hash of its address decides), ordered by node."""
    found: dict[str, dict[str, Any]] = {}
    for _ in range(50 * n):
        status = server_status(host, port)
        found[status.get("node", "")] = status
        if len(found) == n:
            break
    return [found[node] for node in sorted(found)]


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def server_status(host: str, port: int) -> dict[str, Any]:
    """The daemon's /admin/status.json (empty if it cannot be read)."""
    try:
        with socket.create_connection((host, port), timeout=10) as sock:
            # Without the connections (the whole document goes to one address at
            # most twice a second).
            sock.sendall(b"GET /admin/status.json?limit=0 HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(1 << 20):
                data += chunk
        parsed: dict[str, Any] = json.loads(data.partition(b"\r\n\r\n")[2])
        return parsed
    except (OSError, ValueError):
        return {}


def start_stream(host: str, port: int, stream_key: str) -> None:
    """Make sure the stream exists before the clients connect: a reader starts from
    the newest entry, and one that waits for the stream looks again only every
    second, which would lose the first hits. One kiosk message (no client here
    watches a kiosk) is appended, unfenced."""
    keys, argv = append_call(stream_key, [(KIOSK_CHANNEL_PREFIX + b"bench", b"{}")],
                             maxlen=DEFAULT_MAXLEN, epoch_token=secrets.token_hex(8))
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(resp(b"EVAL", APPEND_SCRIPT.encode(), b"%d" % len(keys),
                          *(k.encode() for k in keys),
                          *(a if isinstance(a, bytes) else str(a).encode() for a in argv)))
        reply = sock.recv(4096)
    if not reply.startswith(b"*2"):
        raise SystemExit(f"appending to {stream_key} failed: {reply!r:.200}")


def wait_reading(host: str, port: int, workers: int, seconds: float = 30) -> None:
    """Wait until the daemon (each of its workers) reads the stream."""
    deadline = time.monotonic() + seconds
    while True:
        statuses = (each_worker_status(host, port, workers) if workers > 1
                    else [server_status(host, port)])
        streams = [st.get("stream") or {} for st in statuses]
        if len(streams) == workers and all(
                s.get("state") == "up" and s.get("position") for s in streams):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the daemon does not read the stream: {streams!r:.300}")
        time.sleep(0.1)


def stream_reads(host: str, port: int) -> tuple[int, int] | None:
    """(XREAD replies, entries handed on) of the daemon's stream reader since start."""
    stream = server_status(host, port).get("stream") or {}
    reads, entries = stream.get("reads"), stream.get("entries_read")
    return (reads, entries) if isinstance(reads, int) and isinstance(entries, int) else None


def wait_port(host: str, port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {host}:{port}")


class Publisher:
    """PUBLISHes hits at a steady rate over one pipelined Redis connection; with
    C{stream_key} it appends the same messages to that Redis Stream instead (the
    append script, unfenced, one call per tick), as a bridge or a feeder would."""

    def __init__(self, host: str, port: int, rng: random.Random,
                 stream_key: str | None = None) -> None:
        self.sock = socket.create_connection((host, port))
        self.rng = rng
        self.ids, self.cumulative = zipf_ids()
        self.seq = 0
        self.log: list[tuple[int, str, float]] = []
        self.totals: Counter[str] = Counter()
        self.pad = "x" * 180
        self.stream_key = stream_key
        self.epoch_token = secrets.token_hex(8)
        # What the last recv ended with: an error reply split over two reads is seen.
        self._tail = b""
        if stream_key is not None:
            self.sock.sendall(resp(b"SCRIPT", b"LOAD", APPEND_SCRIPT.encode()))
            loaded = self.sock.recv(4096)
            if not loaded.startswith(b"$40"):
                raise SystemExit(f"Redis refused the append script: {loaded!r:.200}")
        self.sock.setblocking(False)

    def messages(self) -> list[tuple[bytes, bytes]]:
        """One hit: its score update and its detail (carrying its sequence number and
        publish time), as (channel, payload)."""
        emoji_id = draw(self.rng, self.ids, self.cumulative)
        now = time.time()
        detail = (f'{{"seq":{self.seq},"t":{now:.6f},"id":"{emoji_id}","text":"{self.pad}",'
                  f'"screen_name":"bench","name":"Bench"}}')
        self.log.append((self.seq, emoji_id, now))
        self.totals[emoji_id] += 1
        self.seq += 1
        return [(SCORE_CHANNEL, emoji_id.encode()),
                (DETAIL_CHANNEL_PREFIX + emoji_id.encode(), detail.encode())]

    def send(self, out: bytes) -> None:
        """C{out} sent whole; the replies so far read and dropped (an error one stops
        the run: a refused append would otherwise show as loss)."""
        self.sock.setblocking(True)
        self.sock.sendall(out)
        self.sock.setblocking(False)
        try:
            while data := self.sock.recv(65536):
                seen = self._tail + data
                if seen.startswith(b"-") or b"\n-" in seen:
                    raise SystemExit(f"Redis answered an error: {seen!r:.200}")
                self._tail = seen[-1:]
        except BlockingIOError:
            pass

    def hit(self) -> None:
        """One hit PUBLISHed: its two messages."""
        self.send(b"".join(resp(b"PUBLISH", channel, payload)
                           for channel, payload in self.messages()))

    def append(self, due: int) -> None:
        """C{due} hits appended to the stream, in calls of L{APPEND_BATCH} messages."""
        assert self.stream_key is not None
        messages = [m for _ in range(due) for m in self.messages()]
        out = []
        for start in range(0, len(messages), APPEND_BATCH):
            keys, argv = append_call(self.stream_key, messages[start:start + APPEND_BATCH],
                                     maxlen=DEFAULT_MAXLEN, epoch_token=self.epoch_token)
            out.append(resp(b"EVALSHA", sha1(APPEND_SCRIPT).encode(), b"%d" % len(keys),
                            *(k.encode() for k in keys),
                            *(a if isinstance(a, bytes) else str(a).encode() for a in argv)))
        self.send(b"".join(out))

    def run(self, rate: float, seconds: float) -> None:
        start = time.monotonic()
        done = 0
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate) - done
            if due and self.stream_key is not None:
                self.append(due)
            else:
                for _ in range(due):
                    self.hit()
            done += due
            time.sleep(0.001)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    procs: list[subprocess.Popen[bytes]] = []
    # The Redis child's working directory: nothing it writes lands in the caller's.
    redis_dir = tempfile.mkdtemp(prefix="emojistream-bench-redis-")
    try:
        if args.url:
            url = urlsplit(args.url)
            host, port = url.hostname or "127.0.0.1", url.port or 80
            redis = urlsplit(args.redis)
            redis_host, redis_port = redis.hostname or "127.0.0.1", redis.port or 6379
            server_pid = args.server_pid
            redis_pid = args.redis_pid
        else:
            redis_host, redis_port = "127.0.0.1", free_port()
            procs.append(subprocess.Popen(
                redis_server_args(find_redis_server(), redis_port, redis_dir),
                stdout=subprocess.DEVNULL))
            redis_pid = procs[-1].pid
            wait_port(redis_host, redis_port)
            host, port = "127.0.0.1", free_port()
            twistd = str(Path(sys.executable).parent / "twistd")
            procs.append(subprocess.Popen(
                [twistd, "-n", "--pidfile=", "emojistream", "--listen",
                 f"tcp:{port}:interface=127.0.0.1:backlog=4096", "--redis",
                 f"redis://{redis_host}:{redis_port}", "--max-streams",
                 str(min(args.clients + 100, default_max_streams())),
                 *(["--workers", str(args.workers)] if args.workers > 1 else []),
                 *(["--source", "streams", "--stream-key", args.stream_key]
                   if args.source == "streams" else []),
                 *args.server_args],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=checkout_env(args.server_checkout or REPO)))
            wait_port(host, port)
            server_pid = procs[-1].pid
        worker_pids = workers_of(server_pid, args.workers) if server_pid else []
        if args.source == "streams":
            start_stream(redis_host, redis_port, args.stream_key)
            wait_reading(host, port, args.workers)
        time.sleep(0.5)
        rss_idle = rss_mb(server_pid) if server_pid else None
        if worker_pids:
            rss_idle = sum(rss_mb(pid) for pid in worker_pids)

        mix = dict(zip(KINDS, args.mix, strict=True))
        ids, cumulative = zipf_ids()
        plan: list[tuple[str, str, bool]] = []
        for kind in KINDS:
            n = round(args.clients * mix[kind] / sum(args.mix))
            for i in range(n):
                emoji_id = draw(rng, ids, cumulative) if kind == "details" else ""
                plan.append((kind, emoji_id, i < args.sample))
        shared: dict[str, Any] = {"stop": mp.Value("b", 0), "measuring": mp.Value("b", 0),
                  "connected": mp.Value("i", 0), "delivered": mp.Array("q", 3),
                  "seq_range": mp.Array("q", [0, -1])}
        results: Any = mp.Queue()
        sources = tuple(f"127.0.0.{i}" for i in range(1, args.source_ips + 1))
        workers = [mp.Process(target=client_main,
                              args=(host, port, plan[i::args.client_procs], shared, results,
                                    args.client_nice, sources))
                   for i in range(args.client_procs)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 60
        while shared["connected"].value < len(plan):
            if time.monotonic() > deadline:
                raise SystemExit(f"only {shared['connected'].value} of {len(plan)} connected")
            time.sleep(0.05)

        publisher = Publisher(redis_host, redis_port, rng,
                              args.stream_key if args.source == "streams" else None)
        publisher.run(args.rate, args.warmup)
        # The stream reader's XREADs and entries, from status (outside the CPU window).
        reads0 = stream_reads(host, port) if args.source == "streams" and args.workers == 1 \
            else None
        cpu0 = cpu_split(server_pid) if server_pid else None
        redis_cpu0 = cpu_seconds(redis_pid) if redis_pid else None
        worker_cpu0 = [cpu_seconds(pid) for pid in worker_pids]
        watched0 = {name: cpu_seconds(pid) for name, pid in args.watch}
        client_cpu0 = sum(cpu_seconds(w.pid) for w in workers if w.pid)
        steal0 = steal_seconds()
        delivered0 = list(shared["delivered"])
        seq0 = publisher.seq
        profiler = None
        if args.py_spy and server_pid:
            profiler = subprocess.Popen(
                [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                 "record", "--pid", str(server_pid), "--duration",
                 str(int(args.window)), "--rate", "250", "--format", "raw", "--nonblocking",
                 "--output", args.py_spy], stdout=subprocess.DEVNULL)
        poller = None
        if args.status_loop:
            stop_polling, fetches = mp.Value("b", 0), mp.Value("q", 0)
            poller = mp.Process(target=status_loop, args=(host, port, stop_polling, fetches))
            poller.start()
        shared["measuring"].value = 1
        t0 = time.monotonic()
        publisher.run(args.rate, args.window)
        window = time.monotonic() - t0
        status_fetches = None
        if poller is not None:
            status_fetches = fetches.value
            stop_polling.value = 1
            poller.join(30)
        window_end = time.time()
        shared["measuring"].value = 2 if args.after else 0
        seq1 = publisher.seq - 1
        delivered1 = list(shared["delivered"])
        cpu1 = cpu_split(server_pid) if server_pid else None
        redis_cpu1 = cpu_seconds(redis_pid) if redis_pid else None
        worker_cpu1 = [cpu_seconds(pid) for pid in worker_pids]
        watched1 = {name: cpu_seconds(pid) for name, pid in args.watch}
        watched_rss = {name: rss_mb(pid) for name, pid in args.watch}
        worker_rss = [rss_mb(pid) for pid in worker_pids]
        client_cpu1 = sum(cpu_seconds(w.pid) for w in workers if w.pid)
        steal1 = steal_seconds()
        reads1 = stream_reads(host, port) if reads0 is not None else None
        rss_end = rss_mb(server_pid) if server_pid else None
        if worker_pids:
            rss_end = sum(worker_rss)
        if args.after:
            # The recovery phase: back to the normal rate, latency by publish time.
            publisher.run(args.after_rate, args.after)
            shared["measuring"].value = 0
        if profiler is not None:
            profiler.wait(60)
        # Let the backlog drain (a burst can leave seconds of it): wait until nothing
        # has been delivered for --settle seconds, at most --drain-max.
        quiet_since, last = time.monotonic(), sum(shared["delivered"])
        drain_end = time.monotonic() + args.drain_max
        while time.monotonic() - quiet_since < args.settle and time.monotonic() < drain_end:
            time.sleep(0.1)
            now_delivered = sum(shared["delivered"])
            if now_delivered != last:
                quiet_since, last = time.monotonic(), now_delivered
        statuses = (each_worker_status(host, port, args.workers) if args.workers > 1
                    else [server_status(host, port)])
        status = {"totals": {"connections.dropped": sum(
            s.get("totals", {}).get("connections.dropped", 0) for s in statuses)}}
        shared["seq_range"][0], shared["seq_range"][1] = seq0, seq1
        shared["stop"].value = 1
        reports: list[dict[str, Any]] = []
        latencies: list[float] = []
        after: list[tuple[float, float]] = []
        for _ in workers:
            report, lat, lat_after = results.get(timeout=120)
            reports += report
            latencies += lat
            after += lat_after
        for w in workers:
            w.join(30)
    finally:
        stop_all(procs)
        shutil.rmtree(redis_dir, ignore_errors=True)

    window_ids = Counter(emoji_id for seq, emoji_id, _ in publisher.log if seq0 <= seq <= seq1)
    per_kind = {k: (delivered1[i] - delivered0[i]) / window for i, k in enumerate(KINDS)}
    total_rate = sum(per_kind.values())
    detail_subs = [r for r in reports if r["kind"] == "details"]
    lost = sum(max(0, window_ids[r["id"]] - r["in_window"]) for r in detail_subs)
    raw_subs = [r for r in reports if r["kind"] == "raw"]
    raw_lost = sum(max(0, publisher.seq - r["messages"]) for r in raw_subs)
    # /raw latency: the Nth message of a raw stream is hit N, published at a known time.
    published = [at for _, _, at in publisher.log]
    raw_latencies = [received - published[first + i]
                     for r in raw_subs for first, n, received in r["raw_reads"] or ()
                     for i in range(n) if first + i < len(published)]
    eps_samples = [r for r in reports if r["kind"] == "eps" and r["eps_totals"] is not None]
    eps_exact = all(Counter(r["eps_totals"]) == publisher.totals for r in eps_samples)
    n_eps = sum(1 for r in reports if r["kind"] == "eps")
    server_split = ((cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
                    if cpu0 is not None and cpu1 is not None else None)
    worker_cpu = [b - a for a, b in zip(worker_cpu0, worker_cpu1, strict=True)]
    server_cpu = sum(server_split) if server_split is not None else None
    if worker_pids:
        # The parent's own CPU, and each worker's (not yet counted: not waited for).
        server_cpu = (server_cpu or 0) + sum(worker_cpu)
        server_split = None
    deliveries = total_rate * window
    redis_cpu = (redis_cpu1 - redis_cpu0
                 if redis_cpu0 is not None and redis_cpu1 is not None else None)
    window_hits = seq1 - seq0 + 1
    client_cpu = client_cpu1 - client_cpu0
    return {
        "workload": {"clients": len(plan), "mix": mix, "rate_hz": args.rate,
                     "warmup_s": args.warmup, "window_s": round(window, 3),
                     "client_processes": args.client_procs, "server_args": args.server_args},
        "connected": len(reports),
        "delivered_per_s": {k: round(v, 1) for k, v in per_kind.items()},
        "delivered_per_s_total": round(total_rate, 1),
        "server_cpu_s": server_cpu,
        "server_us_per_message": (round(server_cpu / deliveries * 1e6, 3)
                                  if server_cpu is not None and deliveries else None),
        "server_us_per_message_user_system": (
            [round(t / deliveries * 1e6, 3) for t in server_split]
            if server_split is not None and deliveries else None),
        "client_us_per_message": (round(client_cpu / deliveries * 1e6, 3)
                                  if deliveries else None),
        "source": args.source,
        "redis_cpu_s": round(redis_cpu, 3) if redis_cpu is not None else None,
        "redis_us_per_hit": (round(redis_cpu / window_hits * 1e6, 2)
                             if redis_cpu is not None and window_hits > 0 else None),
        "stream_reads_per_s": (round((reads1[0] - reads0[0]) / window, 1)
                               if reads0 is not None and reads1 is not None else None),
        "stream_entries_per_read": (
            round((reads1[1] - reads0[1]) / (reads1[0] - reads0[0]), 2)
            if reads0 is not None and reads1 is not None and reads1[0] > reads0[0] else None),
        "steal_cpu_percent": round((steal1 - steal0) / window * 100, 1),
        "server_rss_mb": {"idle": rss_idle, "end": rss_end},
        "rss_kb_per_connection": (round((rss_end - rss_idle) * 1024 / len(plan), 2)
                                  if rss_idle is not None and rss_end is not None and plan
                                  else None),
        "detail_latency_ms": {
            name: (round(v * 1000, 2) if (v := percentile(latencies, p)) is not None else None)
            for name, p in (("p50", 50), ("p99", 99), ("max", 100))},
        "raw_latency_ms": {
            name: (round(v * 1000, 2) if (v := percentile(raw_latencies, p)) is not None
                   else None)
            for name, p in (("p50", 50), ("p99", 99), ("max", 100))},
        "raw_latency_samples": len(raw_latencies),
        "eps_hz_per_client": round(per_kind["eps"] / n_eps, 2) if n_eps else None,
        "eps_sums_exact": eps_exact, "eps_clients_checked": len(eps_samples),
        "loss": {"details": lost, "raw": raw_lost},
        "duplicates": sum(r["dups"] for r in detail_subs),
        "reordered": sum(r["reorders"] for r in detail_subs),
        "after_window": recovery(after, window_end, args.after) if args.after else None,
        "hits_published": publisher.seq,
        "server_dropped_connections": status.get("totals", {}).get("connections.dropped"),
        "watched": {
            name: {"cpu_s": round(watched1[name] - watched0[name], 2),
                   "us_per_message": round((watched1[name] - watched0[name]) / deliveries * 1e6,
                                           3) if deliveries else None,
                   "rss_mb": round(watched_rss[name], 1)}
            for name, _ in args.watch},
        "status_fetches_per_s": (round(status_fetches / window, 1)
                                 if status_fetches is not None else None),
        "keepalive_max_gap_s": round(max((r["max_gap"] for r in detail_subs), default=0), 2),
        "workers": [
            {"node": st.get("node"), "streams": sum(st.get("pools", {}).values()),
             "cpu_s": round(cpu, 2), "cpu_share": round(cpu / server_cpu, 3)
             if server_cpu else None, "rss_mb": round(rss, 1),
             "delivered_total": st.get("totals", {}).get("messages.delivered")}
            for st, cpu, rss in zip(statuses, worker_cpu, worker_rss, strict=False)
        ] if worker_pids else None,
    }


def recovery(after: list[tuple[float, float]], end: float, seconds: float) -> dict[str, Any]:
    """Detail latency after the window, by when each message was published: the p99
    of each half second, and of everything published from 2 s after the window on."""
    buckets: dict[int, list[float]] = {}
    late = []
    for published, latency in after:
        buckets.setdefault(int((published - end) * 2), []).append(latency)
        if published - end >= 2:
            late.append(latency)

    def p99_ms(values: list[float]) -> float | None:
        v = percentile(values, 99)
        return round(v * 1000, 2) if v is not None else None

    return {
        "seconds": seconds,
        "p99_ms_per_half_second": [p99_ms(buckets.get(i, [])) for i in range(int(seconds * 2))],
        "p99_ms_from_2s": p99_ms(late),
    }


def table(result: dict[str, Any]) -> str:
    rows = [
        ("clients connected", f"{result['connected']} / {result['workload']['clients']}"),
        ("hits/s published", result["workload"]["rate_hz"]),
        ("delivered/s eps, raw, details", ", ".join(
            str(result["delivered_per_s"][k]) for k in KINDS)),
        ("delivered/s total", result["delivered_per_s_total"]),
        ("server CPU µs per message", result["server_us_per_message"]),
        ("  of which user, system", ", ".join(
            str(t) for t in result["server_us_per_message_user_system"] or ("-", "-"))),
        ("client CPU µs per message", result["client_us_per_message"]),
        ("source", result["source"]),
        ("Redis CPU µs per hit published", result["redis_us_per_hit"]),
        ("CPU stolen by the host %", result["steal_cpu_percent"]),
        ("server RSS MB idle → end", f"{result['server_rss_mb']['idle']} → "
                                     f"{result['server_rss_mb']['end']}"),
        ("RSS KB per connection", result["rss_kb_per_connection"]),
        ("detail latency ms p50/p99/max", " / ".join(
            str(result["detail_latency_ms"][k]) for k in ("p50", "p99", "max"))),
        ("raw latency ms p50/p99/max", " / ".join(
            str(result["raw_latency_ms"][k]) for k in ("p50", "p99", "max"))
         + f" ({result['raw_latency_samples']} messages)"),
        ("eps Hz per client", result["eps_hz_per_client"]),
        ("eps sums exact", f"{result['eps_sums_exact']} ({result['eps_clients_checked']} checked)"),
        ("lost details, raw", f"{result['loss']['details']}, {result['loss']['raw']}"),
        ("duplicates, reordered", f"{result['duplicates']}, {result['reordered']}"),
        ("connections the server dropped", result["server_dropped_connections"]),
        ("longest silence on a detail stream s", result["keepalive_max_gap_s"]),
    ]
    if result.get("stream_reads_per_s") is not None:
        rows.append(("stream reads/s, entries per read", f"{result['stream_reads_per_s']}, "
                                                         f"{result['stream_entries_per_read']}"))
    if result.get("status_fetches_per_s") is not None:
        rows.append(("status.json fetches/s (--status-loop)", result["status_fetches_per_s"]))
    for name, figures in result.get("watched", {}).items():
        rows.append((f"  {name}", f"CPU {figures['cpu_s']} s, {figures['us_per_message']} µs "
                                  f"per delivered message, RSS {figures['rss_mb']} MB"))
    for worker in result["workers"] or ():
        rows.append((f"  worker {worker['node']}",
                     f"{worker['streams']} streams, CPU {worker['cpu_s']} s "
                     f"({worker['cpu_share']:.0%} of the server's), RSS {worker['rss_mb']} MB, "
                     f"{worker['delivered_total']} delivered since start"))
    if (after := result["after_window"]) is not None:
        rows += [
            ("detail p99 ms per 0.5 s after", " ".join(
                str(v) for v in after["p99_ms_per_half_second"])),
            ("detail p99 ms from 2 s after", after["p99_ms_from_2s"]),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--mix", default="30,10,60",
                        help="percent of clients on eps,raw,details (default 30,10,60)")
    parser.add_argument("--rate", type=float, default=400, help="hits per second")
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--window", type=float, default=20, help="measured seconds")
    parser.add_argument("--after", type=float, default=0,
                        help="seconds to go on publishing at --after-rate once the window "
                             "ends, measuring how detail latency recovers (a burst's tail)")
    parser.add_argument("--after-rate", type=float, default=400)
    parser.add_argument("--settle", type=float, default=2,
                        help="seconds without deliveries that mean the backlog has drained")
    parser.add_argument("--drain-max", type=float, default=120,
                        help="longest wait for the backlog to drain before counting loss")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--server-checkout", metavar="DIR",
                        help="run the daemon from another checkout's code (e.g. a git "
                             "worktree of an older commit), to compare it with this one")
    parser.add_argument("--status-loop", action="store_true",
                        help="over the window, one more client fetches /admin/status.json "
                             "in a loop")
    parser.add_argument("--watch", action="append", default=[], metavar="NAME=PID",
                        help="also report this process's CPU over the window (repeatable)")
    parser.add_argument("--workers", type=int, default=1,
                        help="run the daemon with --workers N and report each worker")
    parser.add_argument("--source-ips", type=int, default=1,
                        help="spread the clients over 127.0.0.1..N (one address reaches "
                             "one port from ~28,000 ephemeral ports at most)")
    parser.add_argument("--client-nice", type=int, default=0,
                        help="run the client processes this much nicer than the server")
    parser.add_argument("--sample", type=int, default=5,
                        help="eps clients per kind and process whose JSON is fully checked")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--url", help="a running daemon to target instead of starting one")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379",
                        help="with --url: the Redis that daemon subscribes to")
    parser.add_argument("--server-pid", type=int, help="with --url: its PID, for CPU and RSS")
    parser.add_argument("--redis-pid", type=int,
                        help="with --url: the redis-server's PID, for its CPU per hit")
    parser.add_argument("--source", choices=("pubsub", "streams"), default="pubsub",
                        help="pubsub: the daemon subscribes and the hits are PUBLISHed "
                             "(default); streams: the daemon runs with --source streams "
                             "and the hits are appended to --stream-key (the same "
                             "messages, the same timing)")
    parser.add_argument("--stream-key", default=DEFAULT_STREAM_KEY,
                        help=f"with --source streams: the stream (default {DEFAULT_STREAM_KEY})")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="extra twistd emojistream options (last on the line)")
    parser.add_argument("--py-spy", metavar="FILE",
                        help="record a py-spy profile of the server over the window "
                             "(raw collapsed stacks; needs py-spy installed)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the results as JSON to PATH (default: print only)")
    parser.add_argument("--send-floor", action="store_true",
                        help="instead of the daemon, measure what a bare Python send loop "
                             "pays per message over --clients loopback connections")
    parser.add_argument("--floor-rate", type=float, default=70000,
                        help="with --send-floor: messages per second (default 70,000, "
                             "about workload 1's deliveries)")
    parser.add_argument("--quick", action="store_true",
                        help="a 15-second smoke run: 200 clients, 100 hits/s")
    args = parser.parse_args(argv)
    args.mix = [float(x) for x in args.mix.split(",")]
    try:
        args.watch = [(name, int(pid)) for name, _, pid in
                      (w.partition("=") for w in args.watch)]
    except ValueError:
        parser.error("--watch takes NAME=PID")
    if len(args.mix) != 3:
        parser.error("--mix takes three numbers: eps,raw,details")
    if args.quick:
        args.clients, args.rate, args.warmup, args.window, args.settle = 200, 100, 3, 8, 1
    return args


# -- the floor: what one process pays per TCP send here, doing nothing else -----------


def floor_reader(port: int, n: int, stop: Any) -> None:
    """Hold C{n} connections and read whatever arrives, like the benchmark's clients."""
    raise_fd_limit(n + 256)
    poller = select.epoll()
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
        socks.append(sock)
    by_fd = {sock.fileno(): sock for sock in socks}
    buffer = bytearray(1 << 18)
    while not stop.value:
        for fd, _ in poller.poll(0.05):
            with contextlib.suppress(BlockingIOError):
                by_fd[fd].recv_into(buffer)


def send_floor(clients: int, rate: float, seconds: float, nodelay: bool,
               procs: int) -> dict[str, float]:
    """Send a 100-byte message at a time, round robin over C{clients} loopback
    connections at C{rate} messages/s, from a bare Python loop (no reactor, no HTTP);
    the server CPU per send is the least any server on this machine can pay."""
    raise_fd_limit(clients + 256)
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = listener.getsockname()[1]
    stop = mp.Value("b", 0)
    readers = [mp.Process(target=floor_reader, args=(port, clients // procs, stop))
               for _ in range(procs)]
    for r in readers:
        r.start()
    conns = [listener.accept()[0] for _ in range((clients // procs) * procs)]
    for conn in conns:
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
    sends = [conn.send for conn in conns]
    message = b"data:" + b"x" * 93 + b"\n\n"
    start, before, done = time.monotonic(), os.times(), 0
    while (elapsed := time.monotonic() - start) < seconds:
        for i in range(done, int(elapsed * rate)):
            # Not contextlib.suppress: this loop is what is measured, kept bare.
            try:  # noqa: SIM105
                sends[i % len(sends)](message)
            except BlockingIOError:
                pass
        done = max(done, int(elapsed * rate))
        time.sleep(0.0025)
    after = os.times()
    stop.value = 1
    for r in readers:
        r.join(30)
    for conn in conns:
        conn.close()
    listener.close()
    return {"sends": done, "user_us": round((after.user - before.user) / done * 1e6, 3),
            "system_us": round((after.system - before.system) / done * 1e6, 3)}


def floor_main(args: argparse.Namespace) -> int:
    rate = args.floor_rate
    print(f"{args.clients} connections, {rate:g} sends/s, {args.window:g} s, "
          f"{args.client_procs} reader processes")
    results = {}
    for nodelay in (True, False):
        r = send_floor(args.clients, rate, args.window, nodelay, args.client_procs)
        name = "TCP_NODELAY on (as twisted.web sets it)" if nodelay else "TCP_NODELAY off"
        results[name] = r
        print(f"{name:<42} µs per send: user {r['user_us']}, system {r['system_us']}, "
              f"total {round(r['user_us'] + r['system_us'], 3)}")
    write_json(args.json, results)
    return 0


def write_json(path: str | None, result: Any) -> None:
    """Write C{result} to C{path} when the user gave one; nothing otherwise."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten to {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.send_floor:
        return floor_main(args)
    result = run(args)
    print(table(result))
    write_json(args.json, result)
    clean = (result["loss"]["details"] == 0 and result["loss"]["raw"] == 0
             and result["duplicates"] == 0 and result["eps_sums_exact"]
             and not result["server_dropped_connections"])
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
