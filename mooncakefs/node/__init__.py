"""The node daemon: one per host, serving its tier pools to local and remote clients."""

from mooncakefs.node.server import Node

__all__ = ["Node"]
