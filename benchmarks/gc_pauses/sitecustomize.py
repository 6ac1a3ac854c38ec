"""Logs every generation-1 and -2 garbage collection in a twistd process, with its
duration, to /tmp/gc-<pid>.log. Put this directory on PYTHONPATH of a benchmark run
(the daemon inherits it):

    PYTHONPATH=.:benchmarks/gc_pauses python benchmarks/bench.py

Each line: seconds since the process started, generation, duration, objects collected.
"""

import gc
import os
import sys
import time

if "twistd" in sys.argv[0]:
    _born = time.perf_counter()
    _started = [0.0]
    _log = open(f"/tmp/gc-{os.getpid()}.log", "w")  # noqa: SIM115 (open for the process)

    def _record(phase: str, info: dict) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
        elif info["generation"] >= 1:
            took = (time.perf_counter() - _started[0]) * 1000
            _log.write(f"{_started[0] - _born:.1f}s {info['generation']} {took:.2f}ms "
                       f"{info['collected']}\n")
            _log.flush()

    gc.callbacks.append(_record)
