"""statefuld: the sidecar daemon that routes each user of a stateful service to its pod."""

__version__ = "0.1.0"
