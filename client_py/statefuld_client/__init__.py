"""Client for the statefuld sidecar."""

from statefuld_client._paths import default_socket_path

__all__ = ["default_socket_path"]
