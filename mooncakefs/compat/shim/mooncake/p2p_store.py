"""``mooncake.p2p_store`` on mooncakefs: Mooncake's P2P Store API, see ``mooncakefs.compat.p2p_store``."""

from mooncakefs.compat.p2p_store import (
    MAX_SHARD_SIZE,
    P2PStore,
    PayloadExists,
    PayloadInfo,
    PayloadNotFound,
    PayloadNotOpened,
    PayloadOpened,
)

__mooncakefs__ = True
__all__ = [
    "MAX_SHARD_SIZE",
    "P2PStore",
    "PayloadExists",
    "PayloadInfo",
    "PayloadNotFound",
    "PayloadNotOpened",
    "PayloadOpened",
]
