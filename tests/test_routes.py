"""The routing table, route by route and method by method, through the real resource
tree: each listener's Root and QuietSite, on iosim's in-memory connections (no port,
no Redis, no process). The status, Allow and CORS answers every path gives are the
HTTP contract (every response CORS; HEAD with GET; 405 with Allow)."""

from __future__ import annotations

import pytest

from emojistream.web import GET, POST, Root, Route
from memory import MemoryClient, MemoryDaemon

TOKEN = "s3cret-token-0123456789"
BEARER = f"Authorization: Bearer {TOKEN}\r\n"
#: Every method a test tries on every path, the unknown one included.
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "BREW")
PREFLIGHT = ("Origin: http://elsewhere.test\r\nAccess-Control-Request-Method: GET\r\n"
             "Access-Control-Request-Headers: last-event-id\r\n")

#: Each route: the methods it takes (its Allow header) and the status GET or POST gets
#: in a daemon that is not subscribed to Redis.
STREAMS = {
    "/subscribe/eps": ("GET, HEAD", 200),
    "/subscribe/raw": ("GET, HEAD", 200),
    "/subscribe/details": ("GET, HEAD", 200),
    "/subscribe/details/2665": ("GET, HEAD", 200),
    "/subscribe/kiosk_interaction": ("GET, HEAD", 200),
    "/subscribe/cleanup/scores": ("POST", 200),
    "/subscribe/cleanup/details/2665": ("POST", 200),
    "/": ("GET, HEAD", 200),
    "/api/rankings": ("GET, HEAD", 503),
}
HEALTH = {
    "/health/live": ("GET, HEAD", 200),
    "/health/ready": ("GET, HEAD", 503),
}
ADMIN = {
    "/admin/": ("GET, HEAD", 200),
    "/admin/status.json": ("GET, HEAD", 200),
    "/admin/cluster.json": ("GET, HEAD", 503),
    "/metrics": ("GET, HEAD", 200),
}
#: Everything on: the demo page, the kiosk stream, the cluster view.
ALL_ON = {"ENABLE_KIOSK_INTERACTION_STREAM": "yes", "DEMO_PAGE": "yes", "ADMIN_REPORT": "yes"}
UNKNOWN = ("/nope", "/subscribe", "/subscribe/eps/", "/subscribe/cleanup", "/admin/x",
           "/health", "/metrics/", "/subscribe/cleanup/details")


def ask(d: MemoryDaemon, method: str, path: str, headers: str = "", site: int = 0
        ) -> MemoryClient:
    client = d.connect(site=site)
    client.get(path, method=method, headers=headers)
    return client


def status(client: MemoryClient) -> int:
    return int(client.head[0].split()[1])


def rule_path(rule: str) -> str:
    return rule.replace("<path:emoji_id>", "2665")


def served(d: MemoryDaemon, site: int) -> set[str]:
    root = d.app.sites[site].resource
    assert isinstance(root, Root)
    return {rule_path(rule) for rule in root.rules}


@pytest.mark.parametrize("table", [STREAMS, HEALTH, ADMIN], ids=["streams", "health", "admin"])
def test_every_route_answers_its_methods_and_405_with_allow_to_the_rest(table):
    d = MemoryDaemon({**ALL_ON, "ADMIN_TOKEN": TOKEN})
    assert served(d, 0) == set(STREAMS) | set(HEALTH) | set(ADMIN)
    for path, (allow, code) in table.items():
        for method in METHODS:
            client = ask(d, method, path, BEARER)
            found = client.head[1]
            assert found["access-control-allow-origin"] == "*", (method, path)
            if method in allow.split(", "):
                assert status(client) == code, (method, path, client.received)
                continue
            assert status(client) == 405, (method, path, client.received)
            assert found["allow"] == allow, (method, path)
            assert found["content-length"] == "23" and found["content-type"] == (
                "text/plain; charset=utf-8")
            assert client.body == (b"" if method == "HEAD" else b"405 Method Not Allowed\n")


def test_unknown_paths_are_404_to_every_method_preflights_included():
    d = MemoryDaemon(ALL_ON)
    for path in UNKNOWN:
        for method in (*METHODS, "OPTIONS"):
            client = ask(d, method, path, PREFLIGHT)
            assert status(client) == 404, (method, path)
            found = client.head[1]
            assert found["access-control-allow-origin"] == "*"
            assert "allow" not in found and "access-control-allow-methods" not in found
            if method != "HEAD":
                assert client.body == b"404 Not Found\n", (method, path)


def test_every_route_answers_a_preflight_and_nothing_else_does():
    d = MemoryDaemon({**ALL_ON, "ADMIN_TOKEN": TOKEN})
    for path in (*STREAMS, *HEALTH, *ADMIN):
        client = ask(d, "OPTIONS", path, PREFLIGHT)  # no token: a preflight carries none
        assert client.head[0] == "HTTP/1.1 204 No Content", path
        found = client.head[1]
        assert found["access-control-allow-origin"] == "*"
        assert found["access-control-allow-methods"] == "GET, HEAD, POST, OPTIONS"
        assert found["access-control-allow-headers"] == "last-event-id"
        assert found["access-control-max-age"] == "86400"
        assert found["content-length"] == "0" and client.body == b""


@pytest.mark.parametrize(("env", "path", "why"), [
    ({"ENABLE_RAW_STREAM": "no"}, "/subscribe/raw", ": the raw stream is disabled here"),
    ({}, "/subscribe/kiosk_interaction", ""),
    ({}, "/", ""),
    ({}, "/api/rankings", ""),
    ({}, "/admin/cluster.json", ": the cluster view comes with --admin-report"),
])
def test_a_route_its_settings_leave_off_is_404_to_every_method_but_the_preflight(
        env, path, why):
    d = MemoryDaemon(env)
    for method in METHODS:
        client = ask(d, method, path)
        assert status(client) == 404, (method, path)
        assert "allow" not in client.head[1]
        if method != "HEAD":
            assert client.body == f"404 Not Found{why}\n".encode()
    assert status(ask(d, "OPTIONS", path, PREFLIGHT)) == 204


def test_the_admin_routes_live_on_the_admin_listener_alone_when_it_is_given():
    d = MemoryDaemon({**ALL_ON, "ADMIN_LISTEN": "tcp:0"})
    assert served(d, 0) == set(STREAMS) | set(HEALTH)
    assert served(d, 1) == set(ADMIN)
    for method in (*METHODS, "OPTIONS"):
        for path in (*ADMIN, "/admin"):
            assert status(ask(d, method, path, PREFLIGHT, site=0)) == 404, (method, path)
        for path in (*STREAMS, *HEALTH):
            assert status(ask(d, method, path, PREFLIGHT, site=1)) == 404, (method, path)
    assert status(ask(d, "GET", "/admin/status.json", site=1)) == 200
    assert status(ask(d, "GET", "/health/live", site=0)) == 200


def test_the_token_guards_the_admin_data_not_the_page_nor_the_preflight():
    d = MemoryDaemon({"ADMIN_TOKEN": TOKEN})
    for path in ("/admin/status.json", "/metrics", "/admin/cluster.json"):
        refused = ask(d, "GET", path)
        assert status(refused) == 401, path
        assert refused.head[1]["www-authenticate"] == 'Bearer realm="emojistream admin"'
        assert status(ask(d, "OPTIONS", path, PREFLIGHT)) == 204
    assert status(ask(d, "GET", "/admin/status.json", BEARER)) == 200
    assert status(ask(d, "GET", "/metrics", BEARER)) == 200
    # Left off (no --admin-report): so only to those who hold the token.
    assert status(ask(d, "POST", "/admin/cluster.json")) == 401
    assert status(ask(d, "POST", "/admin/cluster.json", BEARER)) == 404
    assert status(ask(d, "GET", "/admin/")) == 200
    assert status(ask(d, "GET", "/health/live")) == 200


def test_admin_redirects_to_the_page_with_its_length():
    d = MemoryDaemon()
    client = ask(d, "GET", "/admin")
    assert status(client) == 308
    assert client.head[1]["location"] == "/admin/"
    assert client.head[1]["content-length"] == str(len(client.body))


def test_every_short_answer_carries_its_length_whatever_answers_it():
    """Health, routing errors and route errors are framed alike (the health checks
    and 404s answered before the router once had a length, the rest were chunked)."""
    d = MemoryDaemon()
    for method, path in (("GET", "/health/live"), ("POST", "/health/live"),
                         ("GET", "/nope"), ("POST", "/subscribe/eps"),
                         ("GET", "/subscribe/details/a.b"), ("GET", "/health/ready")):
        client = ask(d, method, path)
        found = client.head[1]
        assert "transfer-encoding" not in found, (method, path)
        assert int(found["content-length"]) == len(client.body), (method, path)


def test_a_route_added_to_the_table_is_served_like_every_other():
    """Adding a route is one entry: the router gives it the preflight, 405 with Allow
    and HEAD-with-GET of every route, on whichever listener's table holds it."""
    from twisted.internet.address import IPv4Address
    from twisted.test import iosim
    from twisted.web.server import Site

    seen: list[str] = []

    def handler(request, emoji_id: str) -> bytes:
        seen.append(emoji_id)
        return b"done"

    site = Site(Root([Route("/extra/<path:emoji_id>", POST, handler)]))

    def ask_root(method: str, path: str) -> MemoryClient:
        client = MemoryClient()
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        server = site.buildProtocol(address)
        client.pump = iosim.connect(
            server, iosim.FakeTransport(server, isServer=True, peerAddress=address),
            client, iosim.FakeTransport(client, isServer=False), greet=False)
        client.get(path, method=method)
        return client

    done = ask_root("POST", "/extra/2665")
    assert status(done) == 200 and done.body == b"done" and seen == ["2665"]
    assert done.head[1]["access-control-allow-origin"] == "*"
    refused = ask_root("GET", "/extra/2665")
    assert status(refused) == 405 and refused.head[1]["allow"] == "POST"
    assert status(ask_root("OPTIONS", "/extra/2665")) == 204
    assert status(ask_root("POST", "/extras")) == 404
    assert seen == ["2665"]
    with pytest.raises(ValueError, match="routed twice"):
        Root([Route("/x", GET, handler), Route("/x", POST, handler)])
