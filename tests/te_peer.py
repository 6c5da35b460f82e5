"""A transfer engine peer in its own process, for the tests: registers memory, serves it, answers on stdin.

argv: host [protocol] [secret]. Prints one JSON line: {"port", "addr" (a numpy buffer of SIZE bytes filled
with PATTERN), "managed" (a managed buffer of SIZE bytes, zeros), "pid"}.  Then, per stdin line:
"crc" prints the CRC-32C of both buffers; "quit" (or EOF) exits.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from mooncakefs import _engine
from mooncakefs.transfer import TransferEngine

SIZE = 32 << 20


def pattern(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def main() -> None:
    host = sys.argv[1]
    protocol = sys.argv[2] if len(sys.argv) > 2 else "tcp"
    if len(sys.argv) > 3:
        os.environ["MOONCAKEFS_SECRET"] = sys.argv[3]
    engine = TransferEngine()
    rc = engine.initialize(host, "P2PHANDSHAKE", protocol, "")
    if rc != 0:
        print(json.dumps({"error": rc, "why": str(engine.last_error)}), flush=True)
        return
    buf = pattern(SIZE)
    assert engine.register_memory(buf.ctypes.data, buf.nbytes) == 0
    managed = engine.allocate_managed_buffer(SIZE)
    assert managed
    print(
        json.dumps({"port": engine.get_rpc_port(), "addr": buf.ctypes.data, "managed": managed, "pid": os.getpid()}),
        flush=True,
    )
    for line in sys.stdin:
        if line.strip() == "crc":
            m = engine.read_bytes_from_buffer(managed, SIZE)
            print(json.dumps({"buf": _engine.crc32c(buf), "managed": _engine.crc32c(m)}), flush=True)
        elif line.strip() == "quit":
            break
    engine.close()


if __name__ == "__main__":
    main()
