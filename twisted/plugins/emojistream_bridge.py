from twisted.application.service import ServiceMaker

emojistream_bridge = ServiceMaker(
    "emojistream-bridge",
    "emojistream.bridgetap",
    "Append emojitracker's Redis pub/sub messages to a Redis Stream (the shared history)",
    "emojistream-bridge",
)
