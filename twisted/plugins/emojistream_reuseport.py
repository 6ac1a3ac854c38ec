"""The C{reuseport:} server endpoint string (see L{emojistream.endpoints})."""

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _ReusePortParser:
    prefix = "reuseport"

    def parseStreamServer(self, reactor: Any, *args: str, **kwargs: str) -> Any:
        from emojistream.endpoints import parse_reuseport

        return parse_reuseport(reactor, *args, **kwargs)


reuseport = _ReusePortParser()
