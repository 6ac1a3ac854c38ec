# twistd -ny emojistream.tac: the same service tree as `twistd -n emojistream`,
# configured from the environment variables alone (see README.md).
import os
import sys

from twisted.application.service import Application
from twisted.internet import reactor

from emojistream.config import ConfigError, resolve
from emojistream.lifecycle import ExitOnStartupError, prepare_process
from emojistream.service import Emojistream

try:
    settings = resolve(os.environ, {})
except ConfigError as e:
    sys.exit(f"emojistream.tac: {e}")

prepare_process(reactor, settings.max_streams)
application = Application("emojistream")
root = ExitOnStartupError()
root.setServiceParent(application)
Emojistream(settings, reactor).service.setServiceParent(root)
