from twisted.application.service import ServiceMaker

emojistream = ServiceMaker(
    "emojistream",
    "emojistream.tap",
    "Realtime SSE fan-out of emojitracker's Redis streams",
    "emojistream",
)
