"""The ``rdma`` transport: libibverbs, with pyverbs for set-up and Cython for the hot path.

Placeholder until the verbs code lands: says whether RDMA can be used here, and why not.
"""

from __future__ import annotations


def unavailable_reason() -> str:
    return "the rdma transport is not built yet"


def available() -> bool:
    return False
