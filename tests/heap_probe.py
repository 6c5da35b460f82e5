"""How much freed heap a process keeps after a ``batch_get``: ``heap_after_batch`` runs this file as a
script in a process of its own (the thresholds ``heap.keep_freed`` sets are the whole process's), which
puts 16 values of 1 MiB, gets them in one batch, drops them, and prints as JSON the bytes of free heap
glibc keeps (``mallinfo2().fordblks``) and ``heap.kept()``, after the batch and at open.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
HAS_MALLINFO2 = hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc 2.33+


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


def heap_after_batch(how: str, where: str, **env: str) -> dict[str, int]:
    """The probe's answer for a store opened embedded in ``where`` (``how="embedded"``) or a node's
    ``where`` URL (``how="remote"``), with ``env`` added to the child's environment."""
    from conftest import child_env

    out = subprocess.run(
        [sys.executable, __file__, how, where], env={**child_env(), **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def main(how: str, where: str) -> None:
    import mooncakefs
    from mooncakefs import heap

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    store = mooncakefs.open(where, dram="64MiB") if how == "embedded" else mooncakefs.connect(where, timeout=10)
    at_open = heap.kept()
    keys = [f"heap-probe/{i}" for i in range(16)]
    for i, key in enumerate(keys):
        store.put(key, bytes([i]) * (1 << 20))
    values = store.batch_get(keys)
    assert [(len(v), v[:1], v[-1:]) for v in values] == [(1 << 20, bytes([i]), bytes([i])) for i in range(16)]
    del values
    print(json.dumps({"free": libc.mallinfo2().fordblks, "kept": heap.kept(), "at_open": at_open}))
    store.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
