"""Bad settings and what the one line that refuses each names: shared by the fast
in-process checks (test_config_errors.py) and the real-twistd sample (test_twistd.py)."""

from __future__ import annotations

BAD_ENDPOINTS = [
    "tcp:abc", "tcp:99999", "unix:/nonexistent/dir/s", "ssl:8443:privateKey=/nonexistent.pem",
    "systemd:domain=INET:index=0", "bogus:1",
]
BAD_VALUES = [  # environment variable, value
    ("REDIS_URL", "http://nope"), ("SSE_KEEPALIVE_SEC", "often"),
    ("ENABLE_RAW_STREAM", "perhaps"), ("ADMIN_REPORT", ""), ("PORT", "eighty"),
    ("PORT", "99999"), ("MAX_STREAMS", "-3"), ("GRAPHITE_URL", "ftp://x"),
    ("SSE_WRITE_POLICY", "fastest"),
]
#: Values past a setting's bounds (issue 17): option, environment variable, value, and
#: what the one line says. All start without them (--workers 1000 forked a thousand).
OUT_OF_BOUNDS = [
    ("--workers", "WORKERS", "1000", "at most 64"),
    ("--keepalive", "SSE_KEEPALIVE_SEC", "1e-7", "at least 0.05 s"),
    ("--request-timeout", "REQUEST_TIMEOUT_SEC", "1e-9", "at least 1 s"),
    ("--graphite-interval", "GRAPHITE_INTERVAL_SEC", "0.00001", "at least 0.05 s"),
    ("--score-forceclose-sec", "SSE_SCORE_FORCECLOSE_SEC", "0.001", "at least 1 s"),
    ("--replay-sec", "SSE_REPLAY_SEC", "0.001", "at least 1 s"),
    ("--node", "NODE_NAME", "web.1\nforged", "not a node name"),
    ("--admin-token", "ADMIN_TOKEN", "", "empty"),
]

#: Command lines (after C{emojistream}) refused, and what the line names.
BAD_OPTIONS: list[tuple[list[str], str]] = [
    *[([option, value], f"{option}: ") for option, _, value, _ in OUT_OF_BOUNDS],
    (["--demo-rate", "1e9"], "--demo-rate: "),
    (["--redis", "http://nope"], "--redis"),
    (["--keepalive", "often"], "--keepalive"),
    (["--workers", "2", "--listen", "tcp:0"], "--workers"),
    (["--workers", "2", "--listen", "unix:/tmp/emojistream-test.sock"], "--workers"),
    (["--workers", "2", "--demo"], "--workers"),
    (["--listen", "reuseport:0"], "--listen"),
    (["--write-policy", "fastest"], "--write-policy: "),
    (["--write-policy", "direct", "--batch-writes"], "--batch-writes contradicts"),
    *[(["--listen", endpoint], "--listen") for endpoint in BAD_ENDPOINTS],
    *[(["--admin-listen", endpoint], "--admin-listen") for endpoint in BAD_ENDPOINTS],
]

#: Environment variables refused (as the plugin and the .tac read them), by value.
BAD_ENVIRONMENT: list[tuple[str, str]] = [
    *BAD_VALUES,
    *[(name, value) for _, name, value, _ in OUT_OF_BOUNDS],
    *[("ADMIN_LISTEN", endpoint) for endpoint in BAD_ENDPOINTS],
]


def full_options(args: list[str]) -> list[str]:
    """C{args} with what makes the error the only one: a usable --listen beside
    --admin-listen, and beside --workers a port other than 0 would be (if the bound
    on --workers were missing, this fails at once instead of starting a thousand)."""
    if "--admin-listen" in args:
        return [*args, "--listen", "tcp:0:interface=127.0.0.1"]
    if "--workers" in args and "--listen" not in args:
        return [*args, "--listen", "tcp:0:interface=127.0.0.1"]
    return args


def full_environment(name: str, value: str) -> dict[str, str]:
    """C{name}=C{value} and what makes it the only error (a port beside
    ADMIN_LISTEN and WORKERS)."""
    env = {name: value}
    if name in ("ADMIN_LISTEN", "WORKERS"):
        env["PORT"] = "0"
    return env


def why(name: str, value: str) -> str:
    """What the line says of an out-of-bounds value, given by option or environment
    variable ('' for the others)."""
    return next((why for option, env, bad, why in OUT_OF_BOUNDS
                 if name in (option, env) and value == bad), "")
