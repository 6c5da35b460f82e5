"""mooncakefs's drop-in for Mooncake's Python packages (``mooncake.store``, ``mooncake.engine``,
``mooncake.p2p_store``).

Loaded by ``mooncakefs.compat.install()`` or through ``mooncakefs as-mooncake``; see
docs/mooncake-compat.md.
"""

__mooncakefs__ = True
__all__: list[str] = []
