"""Python memory per open stream, by allocation site (tracemalloc).

Runs the daemon in this process (Redis unreachable: memory per stream does not
depend on it), opens N streams from a child process, and prints the traced bytes
per connection and the top allocation sites. The evidence behind the memory
changes in docs/PERFORMANCE.md:

    PYTHONPATH=<checkout> python benchmarks/memory_per_connection.py [N] [path]
"""

from __future__ import annotations

import gc
import subprocess
import sys
import tracemalloc

from twisted.internet import reactor

from emojistream.config import resolve
from emojistream.demo import free_port
from emojistream.service import Emojistream

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
PATH = sys.argv[2] if len(sys.argv) > 2 else "/subscribe/eps"
PORT = free_port()

CLIENT = """
import socket, sys, time
port, n, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
held = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET " + path.encode() + b" HTTP/1.1\\r\\nHost: x\\r\\n"
              b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120\\r\\n"
              b"Accept: text/event-stream\\r\\n\\r\\n")
    held.append(s)
time.sleep(600)
"""


def main() -> None:
    app = Emojistream(resolve({"REDIS_URL": "redis://127.0.0.1:1"}, {
        "listen": f"tcp:{PORT}:interface=127.0.0.1:backlog=4096",
        "max-streams": str(N + 100)}), reactor)
    app.service.startService()
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(PORT), str(N), PATH])

    def check() -> None:
        if len(app.hub) < N:
            reactor.callLater(0.2, check)
            return
        gc.collect()
        stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
        print(f"{N} streams on {PATH}: "
              f"{sum(s.size_diff for s in stats) / N:.0f} bytes of Python objects each")
        for s in stats[:20]:
            frame = s.traceback[0]
            print(f"{s.size_diff / N:8.1f} B {s.count_diff / N:5.2f} blocks  "
                  f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}")
        client.kill()
        reactor.stop()

    reactor.callLater(0.5, check)
    reactor.run()


if __name__ == "__main__":
    main()
