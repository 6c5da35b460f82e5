"""``mooncake.engine`` on mooncakefs: the public transfer engine, ``mooncakefs.transfer.compat``."""

from mooncakefs.transfer.compat import TransferEngine, TransferNotify, TransferOpcode

Read = TransferOpcode.Read  # the binding also exports the opcodes at module level
Write = TransferOpcode.Write

__mooncakefs__ = True
__all__ = ["Read", "TransferEngine", "TransferNotify", "TransferOpcode", "Write"]
