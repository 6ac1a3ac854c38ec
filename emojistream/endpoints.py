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
