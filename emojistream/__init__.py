"""emojistream: realtime Server-Sent Events fan-out of emojitracker's Redis streams."""

__version__ = "0.1.0"
