# twistd -ny emojistream.tac: the same service tree as `twistd -n emojistream`,
# configured from the environment variables alone (see README.md).
import os

from twisted.application.service import Application
from twisted.internet import reactor
from twisted.logger import ILogObserver

from emojistream.config import ConfigError, config_exit, resolve
from emojistream.logs import json_stdout
from emojistream.service import daemon

try:
    settings = resolve(os.environ, {})
except ConfigError as e:
    raise config_exit("emojistream.tac", e) from None
if settings.workers > 1:
    # The worker tree is built by the plugin's options; a .tac is one process.
    raise config_exit("emojistream.tac", ConfigError(
        f"WORKERS: the .tac runs one process, not {settings.workers}; run "
        "`twistd -n emojistream` for workers")) from None

application = Application("emojistream")
if settings.log_format == "json":
    # twistd logs through the application's observer when it has one.
    application.setComponent(ILogObserver, json_stdout())
daemon(settings, reactor).setServiceParent(application)
