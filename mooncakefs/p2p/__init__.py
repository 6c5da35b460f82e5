"""Peer-to-peer distribution: readers serve what they fetched.

``Swarm`` does it under a plain ``cp`` from a cluster mount; ``P2PStore`` is Mooncake's P2P Store API
(register / unregister / list / get_replica / delete_replica, put / get) on the same nodes."""

from mooncakefs.p2p.store import P2PStore, PayloadInfo
from mooncakefs.p2p.swarm import Swarm

__all__ = ["P2PStore", "PayloadInfo", "Swarm"]
