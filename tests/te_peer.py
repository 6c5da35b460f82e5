"""A transfer engine peer in its own process, for the tests: registers memory, serves it, answers on stdin.

argv: host [protocol] [secret] [--metadata P2PHANDSHAKE|etcd://...] [--also host[:port] ...].  Prints one
JSON line: {"port", "session" (what peers name it by), "addr" (a numpy buffer of SIZE bytes filled with
PATTERN), "managed" (a managed buffer of SIZE bytes, zeros), "pid", "protocol" (the one it chose)}.
Then, per stdin line: "crc" prints the CRC-32C of both buffers; "register N" registers N more bytes
(0xAB) and prints {"addr"}; "unregister ADDR" prints {"rc"}; "notifies" prints the notifications
received, as [[name, msg], ...]; "close" closes the engine (the process and its buffer stay) and prints
{"rc"}; "bufcrc" prints the CRC-32C of the registered buffer alone (also after "close"); "quit" (or EOF)
exits.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from mooncakefs import _engine
from mooncakefs.transfer import Engine, TransferEngine

SIZE = 32 << 20


def pattern(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("protocol", nargs="?", default="tcp")
    parser.add_argument("secret", nargs="?")
    parser.add_argument("--metadata", default="P2PHANDSHAKE")
    parser.add_argument("--also", action="append", default=[])
    args = parser.parse_args()
    if args.secret:
        os.environ["MOONCAKEFS_SECRET"] = args.secret
    engine = TransferEngine()
    if args.also:  # more addresses to serve on: an option of the Pythonic engine only
        engine = TransferEngine.wrapping(Engine(args.host, args.metadata, args.protocol, addresses=args.also))
        rc = 0
    else:
        rc = engine.initialize(args.host, args.metadata, args.protocol, "")
    if rc != 0:
        print(json.dumps({"error": rc, "why": str(engine.last_error)}), flush=True)
        return
    buf = pattern(SIZE)
    assert engine.register_memory(buf.ctypes.data, buf.nbytes) == 0
    managed = engine.allocate_managed_buffer(SIZE)
    assert managed
    more: list[np.ndarray] = []
    info = {
        "port": engine.get_rpc_port(),
        "session": engine.get_engine().session_id,
        "addr": buf.ctypes.data,
        "managed": managed,
        "pid": os.getpid(),
        "protocol": engine.get_engine().protocol,
    }
    print(json.dumps(info), flush=True)
    for line in iter(input_line, None):
        command, _, arg = line.strip().partition(" ")
        if command == "crc":
            m = engine.read_bytes_from_buffer(managed, SIZE)
            print(json.dumps({"buf": _engine.crc32c(buf), "managed": _engine.crc32c(m)}), flush=True)
        elif command == "register":
            more.append(np.full(int(arg), 0xAB, dtype=np.uint8))
            assert engine.register_memory(more[-1].ctypes.data, more[-1].nbytes) == 0
            print(json.dumps({"addr": more[-1].ctypes.data}), flush=True)
        elif command == "unregister":
            print(json.dumps({"rc": engine.unregister_memory(int(arg))}), flush=True)
        elif command == "notifies":
            print(json.dumps([[n.name, n.msg] for n in engine.get_notifies()]), flush=True)
        elif command == "close":  # the engine closes; the process and its buffer stay
            print(json.dumps({"rc": engine.close()}), flush=True)
        elif command == "bufcrc":
            print(json.dumps({"buf": _engine.crc32c(buf)}), flush=True)
        elif command == "quit":
            break
    engine.close()


def input_line() -> str | None:
    try:
        return input()
    except EOFError:
        return None


if __name__ == "__main__":
    main()
