"""Three nodes on one machine, the way several hosts share Redis: a Redis primary and
a replica, three daemons (one subscribed to the primary, two to the replica, all
reporting to the primary), nginx in front with the shipped config. Then the fan-out
benchmark runs through nginx and every node's and Redis's CPU is reported.

    python benchmarks/cluster.py [options of benchmarks/bench.py, e.g. --clients 1500]

Needs Debian's nginx. Prints the benchmark table and the admin_stream_status hash's
nodes; with --json PATH also writes them there.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench (beside this script) puts the checkout on sys.path for emojistream.
from bench import (
    REPO,
    checkout_env,
    parse_args,
    resp,
    run,
    stop_all,
    table,
    wait_port,
    write_json,
)

from emojistream.demo import find_redis_server, free_port, redis_server_args


def redis_command(port: int, *args: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(resp(*args))
        time.sleep(0.2)
        return conn.recv(1 << 20)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="emojistream-cluster-"))
    procs: list[subprocess.Popen[bytes]] = []
    env = checkout_env()
    try:
        primary, replica = free_port(), free_port()
        server = find_redis_server()
        # Each Redis works in its own directory: the primary writes an RDB there for
        # the replica's full sync, the replica the one it receives.
        (tmp / "primary").mkdir()
        (tmp / "replica").mkdir()
        procs.append(subprocess.Popen(redis_server_args(server, primary, str(tmp / "primary")),
                                      stdout=subprocess.DEVNULL))
        wait_port("127.0.0.1", primary)
        procs.append(subprocess.Popen(
            [*redis_server_args(server, replica, str(tmp / "replica")),
             "--replicaof", "127.0.0.1", str(primary)],
            stdout=subprocess.DEVNULL))
        wait_port("127.0.0.1", replica)
        while b"master_link_status:up" not in redis_command(replica, b"INFO", b"replication"):
            time.sleep(0.1)
        twistd = str(Path(sys.executable).parent / "twistd")
        nodes = []
        for name, port_redis in (("a", primary), ("b", replica), ("c", replica)):
            port = free_port()
            procs.append(subprocess.Popen(
                [twistd, "-n", "--pidfile=", "emojistream", "--listen",
                 f"tcp:{port}:interface=127.0.0.1:backlog=4096",
                 "--redis", f"redis://127.0.0.1:{port_redis}",
                 "--admin-redis", f"redis://127.0.0.1:{primary}", "--admin-report",
                 "--trust-proxy", "--node", f"cluster-{name}"],
                stdout=(tmp / f"node-{name}.log").open("wb"), stderr=subprocess.STDOUT,
                env=env))
            nodes.append((name, port, procs[-1].pid))
        for _, port, _ in nodes:
            wait_port("127.0.0.1", port)
        front = free_port()
        site = (REPO / "deploy/nginx/emojistream.conf").read_text()
        upstreams = "".join(f"    server 127.0.0.1:{port};\n" for _, port, _ in nodes)
        site = re.sub(r"(    server 127\.0\.0\.1:800\d;\n)+", upstreams, site)
        site = site.replace("listen 80;", f"listen 127.0.0.1:{front};")
        (tmp / "site.conf").write_text(site)
        user = "user root;" if os.geteuid() == 0 else ""
        (tmp / "nginx.conf").write_text(f"""{user}
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    include {tmp}/site.conf;
}}
""")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        procs.append(subprocess.Popen([nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
                                       "-g", "daemon off;"]))
        wait_port("127.0.0.1", front)
        time.sleep(1)  # the nodes subscribe
        # nginx's worker does the proxying, not its master.
        master = procs[-1].pid
        nginx_worker = int(Path(f"/proc/{master}/task/{master}/children").read_text().split()[0])
        watch = [f"node-{name}={pid}" for name, _, pid in nodes]
        watch += [f"redis-primary={procs[0].pid}", f"redis-replica={procs[1].pid}",
                  f"nginx-worker={nginx_worker}"]
        argv = [*sys.argv[1:], "--url", f"http://127.0.0.1:{front}",
                "--redis", f"redis://127.0.0.1:{primary}"]
        for w in watch:
            argv += ["--watch", w]
        args = parse_args(argv)
        result = run(args)
        time.sleep(6)  # one admin report interval
        hash_reply = redis_command(primary, b"HKEYS", b"admin_stream_status")
        result["admin_stream_status_nodes"] = sorted(
            n.decode() for n in re.findall(rb"twisted-[\w.-]+", hash_reply))
        print(table(result))
        for name in result["admin_stream_status_nodes"]:
            print(f"admin_stream_status: {name}")
        write_json(args.json, result)
        ok = (result["loss"] == {"details": 0, "raw": 0} and result["duplicates"] == 0
              and result["eps_sums_exact"] and len(result["admin_stream_status_nodes"]) == 3)
        return 0 if ok else 1
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
