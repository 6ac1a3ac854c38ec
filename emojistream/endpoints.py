"""A server endpoint for several processes on one port: C{reuseport:PORT[:options]}.

Each process opens its own listening socket with C{SO_REUSEPORT}, and the kernel
spreads new connections evenly over them; a process that dies takes only its own
socket (and the connections queued on it) with it. Twisted's TCP endpoints do not
set C{SO_REUSEPORT}; this binds the socket itself and hands it to the reactor.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from zope.interface import implementer


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """Listens on C{interface}:C{port} with C{SO_REUSEPORT} (and C{SO_REUSEADDR})."""

    def __init__(self, reactor: Any, port: int, interface: str = "", backlog: int = 1024
                 ) -> None:
        self._reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            port = self._reactor.adoptStreamPort(sock.fileno(), family, factory)
        except Exception:
            return fail()
        finally:
            # The reactor holds its own copy of the descriptor.
            sock.close()
        return succeed(port)


def parse_reuseport(reactor: Any, port: str, interface: str = "", backlog: str = "1024",
                    **unknown: str) -> ReusePortEndpoint:
    """C{reuseport:PORT[:interface=ADDRESS][:backlog=N]} as an endpoint."""
    if unknown:
        raise ValueError(f"unknown reuseport: option(s) {', '.join(sorted(unknown))}")
    number = int(port)
    if not 0 < number <= 65535:
        raise ValueError(f"port {number} is not between 1 and 65535 (several processes "
                         "share a port only when it is named)")
    return ReusePortEndpoint(reactor, number, interface, int(backlog))


#: Pending connections a listening socket queues unless its description says. Twisted's
#: default of 50 turns a reconnection wave of thousands of EventSources into a minute
#: of dropped SYNs.
LISTEN_BACKLOG = 1024
#: Endpoint types whose description takes C{backlog=}.
_WITH_BACKLOG = ("tcp", "tcp6", "ssl", "unix", "reuseport")


def _split_unescaped(text: str, separator: str, limit: int = -1) -> list[str]:
    """C{text} split on C{separator} where no backslash escapes it (escapes kept)."""
    parts, current, escaped = [], "", False
    for ch in text:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            current += ch
            escaped = True
        elif ch == separator and limit != 0:
            parts.append(current)
            current = ""
            limit -= 1
        else:
            current += ch
    parts.append(current)
    return parts


def _unescape(text: str) -> str:
    out, escaped = "", False
    for ch in text:
        if escaped or ch != "\\":
            out += ch
            escaped = False
        else:
            escaped = True
    return out


def _escape(text: str) -> str:
    return "".join("\\" + ch if ch in ":=\\" else ch for ch in text)


def split_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """An endpoint description's type, positional and keyword arguments, as Twisted's
    string grammar reads them (C{:} between arguments, C{key=value}, C{\\} escapes):
    the words, for rewriting a description (L{join_endpoint}). What a description
    listens on, defaults filled in, is L{listen_address}'s (Twisted's own reading)."""
    prefix, *rest = _split_unescaped(description.strip(), ":")
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in rest:
        key, *value = _split_unescaped(part, "=", 1)
        if value:
            kwargs[_unescape(key)] = _unescape(value[0])
        else:
            args.append(_unescape(key))
    return prefix.lower(), args, kwargs


def join_endpoint(prefix: str, args: list[str], kwargs: dict[str, str]) -> str:
    """The description L{split_endpoint} reads back as these arguments."""
    parts = [prefix, *map(_escape, args), *(f"{_escape(k)}={_escape(v)}"
                                            for k, v in kwargs.items())]
    return ":".join(parts)


def with_backlog(description: str) -> str:
    """C{description} with the deep L{LISTEN_BACKLOG} where it names no backlog itself
    (systemd's sockets have theirs from the socket unit)."""
    prefix, _args, kwargs = split_endpoint(description)
    if prefix not in _WITH_BACKLOG or "backlog" in kwargs:
        return description
    return f"{description.strip()}:backlog={LISTEN_BACKLOG}"


def _port_argument(args: list[str], kwargs: dict[str, str]) -> tuple[int, bool] | None:
    """The port number of a C{tcp:}-like description, and whether it is positional."""
    text = args[0] if args else kwargs.get("port")
    if text is None or not text.strip().isdigit():
        return None
    return int(text), bool(args)


def shared_port(description: str) -> str:
    """The C{reuseport:} endpoint that workers share for a C{tcp:} or C{reuseport:}
    C{--listen}, keeping its interface and backlog. Raises ValueError if it cannot be
    shared."""
    prefix, args, kwargs = split_endpoint(description)
    found = _port_argument(args, kwargs) if prefix in ("tcp", "reuseport") else None
    if found is None:
        raise ValueError(f"{description!r} cannot be shared; give a tcp: or reuseport: "
                         "--listen")
    if found[0] == 0:
        raise ValueError("the workers share one port; name it (not 0)")
    shared = {"backlog": kwargs.get("backlog", str(LISTEN_BACKLOG))}
    if kwargs.get("interface"):
        shared["interface"] = kwargs["interface"]
    return join_endpoint("reuseport", [str(found[0])], shared)


def numbered(description: str, number: int) -> str:
    """Worker C{number}'s own endpoint for C{description}: the port plus C{number - 1}
    (port 0 stays 0), or a UNIX socket path with C{.number} appended. Raises
    ValueError for descriptions that cannot be numbered (a systemd socket)."""
    prefix, args, kwargs = split_endpoint(description)
    if prefix in ("tcp", "tcp6", "ssl", "reuseport"):
        found = _port_argument(args, kwargs)
        if found is not None:
            port, positional = found
            value = str(port + number - 1) if port else "0"
            if port + number - 1 > 65535:
                raise ValueError(f"{description!r}: worker {number}'s port would be "
                                 f"{port + number - 1}, past 65535")
            if positional:
                args[0] = value
            else:
                kwargs["port"] = value
            return join_endpoint(prefix, args, kwargs)
    if prefix == "unix":
        if args:
            args[0] = f"{args[0]}.{number}"
            return join_endpoint(prefix, args, kwargs)
        if "address" in kwargs:
            kwargs["address"] = f"{kwargs['address']}.{number}"
            return join_endpoint(prefix, args, kwargs)
    raise ValueError(f"{description!r} cannot give each worker its own endpoint; use "
                     "tcp:PORT (worker i listens on PORT + i - 1) or unix:PATH (PATH.i)")


def listen_address(description: str) -> tuple[int, str, int] | None:
    """The port, interface and backlog a C{tcp:}, C{tcp6:}, C{ssl:} or C{reuseport:}
    endpoint listens on (None for other kinds). Raises what Twisted's parser raises.

    The endpoint is built against a L{MemoryReactor} and asked to listen there, which
    only records the call: Twisted's own reading of the string, no socket, no global
    reactor, and none of the endpoints' private attributes.
    """
    from twisted.internet.endpoints import (
        SSL4ServerEndpoint,
        TCP4ServerEndpoint,
        TCP6ServerEndpoint,
        serverFromString,
    )
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactor

    recorder = MemoryReactor()
    endpoint = serverFromString(recorder, description)
    if isinstance(endpoint, ReusePortEndpoint):
        return endpoint.port, endpoint.interface, endpoint.backlog
    if not isinstance(endpoint, TCP4ServerEndpoint | TCP6ServerEndpoint | SSL4ServerEndpoint):
        return None
    endpoint.listen(Factory())
    # (port, factory, backlog, interface); listenSSL's also has its context factory.
    (call,) = recorder.tcpServers + recorder.sslServers
    return int(call[0]), str(call[-1]), int(call[-2])


def check_unshared(description: str) -> None:
    """Raise OSError if another process listens on a C{reuseport:} description's port:
    bound without C{SO_REUSEPORT}, a probe fails then, where the workers' own sockets
    would silently join the other's group and split its traffic."""
    where = listen_address(description)
    if where is None:
        raise ValueError(f"{description!r} names no port")
    port, interface, _backlog = where
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((interface, port))
