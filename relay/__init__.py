"""relay: a WebSocket message relay that keeps a message only until it is delivered or expires."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
