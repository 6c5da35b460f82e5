"""Holds the ``mooncake`` package that ``mooncakefs as-mooncake`` puts first on PYTHONPATH."""
