"""A drop-in for Mooncake's Python packages, so its users switch to mooncakefs with one import.

``install()`` registers ``mooncake``, ``mooncake.store``, ``mooncake.engine`` and ``mooncake.p2p_store``
in this process; ``mooncakefs as-mooncake -- CMD...`` runs an unmodified program with the same names
(the ``shim/`` directory goes first on its PYTHONPATH, so every Python process it starts sees them
too).  Both load the same files, ``shim/mooncake/*.py``, thin re-exports of ``mooncakefs.compat.store``,
``mooncakefs.transfer.compat`` and ``mooncakefs.compat.p2p_store``.  docs/mooncake-compat.md says what
maps to what, and what differs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SHIM_DIR = Path(__file__).resolve().parent / "shim"
# MOONCAKEFS_MOONCAKE_ENDPOINT, when set, replaces every setup()'s master_server_addr: it points an
# unmodified program (whose config names a Mooncake master) at a mooncakefs node or cluster.
ENDPOINT_ENV = "MOONCAKEFS_MOONCAKE_ENDPOINT"


def is_mapped(addr: int, size: int, write: bool) -> bool:
    """Whether [addr, addr+size) is mapped in this process, readable (and writable for ``write``):
    checked before a raw address from the caller is turned into a view, so a wrong one is refused
    instead of crashing the process."""
    end, at = addr + size, addr
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split(None, 2)[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if hi <= at:
                continue
            if lo > at or perms[0] != "r" or (write and perms[1] != "w"):
                return False
            at = hi
            if at >= end:
                return True
    return False


def is_drop_in(module: object) -> bool:
    """Whether a module object is this drop-in (and not the real Mooncake)."""
    return bool(getattr(module, "__mooncakefs__", False))


def install() -> None:
    """Register ``mooncake``, ``mooncake.store``, ``mooncake.engine`` and ``mooncake.p2p_store`` for this
    process.  Refuses
    (ImportError) when the real ``mooncake`` is imported already: two implementations of one name in
    one process would split objects between them."""
    current = sys.modules.get("mooncake")
    if current is not None:
        if is_drop_in(current):
            return
        raise ImportError(
            f"mooncakefs.compat.install(): the real 'mooncake' package is already imported "
            f"(from {getattr(current, '__file__', None) or '?'}); call install() before anything "
            "imports mooncake, or run the program with `mooncakefs as-mooncake -- ...`"
        )
    stray = sorted(name for name in sys.modules if name.startswith("mooncake."))
    if stray:
        raise ImportError(f"mooncakefs.compat.install(): {', '.join(stray)} already imported from elsewhere")
    package = SHIM_DIR / "mooncake"
    spec = importlib.util.spec_from_file_location(
        "mooncake", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mooncake"] = module
    try:
        spec.loader.exec_module(module)
        importlib.import_module("mooncake.store")
        importlib.import_module("mooncake.engine")
        importlib.import_module("mooncake.p2p_store")
    except BaseException:
        for name in [n for n in sys.modules if n == "mooncake" or n.startswith("mooncake.")]:
            del sys.modules[name]
        raise


def child_environment(endpoint: str | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment under which a program sees the drop-in: the shim directory first on PYTHONPATH,
    then the directory mooncakefs itself is imported from, then what was there."""
    env = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parents[2])
    paths = [str(SHIM_DIR), root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if endpoint:
        env[ENDPOINT_ENV] = endpoint
    return env


__all__ = ["ENDPOINT_ENV", "SHIM_DIR", "child_environment", "install", "is_drop_in", "is_mapped"]
