"""The ``rdma`` transport: libibverbs, planned here, posted and polled in Cython (``_rdma.pyx``).

What exists: ``plan`` cuts a batch into work requests (slices of at most ``slice_size``, spread round-robin
over queue pairs, chained ``max_chain`` to a post, every ``signal_every``-th and the last of each chain
signalled), and says which transfer bytes each signalled completion vouches for (a queue pair completes
in order, so one signalled completion covers the unsignalled ones before it).  ``_rdma.post_chain``
posts such a chain with one ``ibv_post_send``; ``_rdma.poll`` polls a completion queue with the GIL
released.  Both build against Debian's libibverbs-dev and are exercised here without a device.

What does not exist yet: the set-up with pyverbs (context, protection domain, memory regions, RC queue
pairs) and the exchange of queue-pair numbers and rkeys through the engine's handshake.  Until then
``available()`` is False and ``protocol="auto"`` uses tcp, saying why; ``protocol="rdma"`` is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

SLICE = 64 << 10  # Mooncake's MC_SLICE_SIZE: large transfers are cut so every queue pair and NIC gets a share
MAX_CHAIN = 32  # work requests per ibv_post_send
SIGNAL_EVERY = 16  # one signalled work request per this many (and the last of every chain)


@dataclass(frozen=True, slots=True)
class Request:
    """One transfer as the rdma transport sees it: local (address, lkey), remote (address, rkey), length."""

    laddr: int
    lkey: int
    raddr: int
    rkey: int
    length: int


@dataclass(slots=True)
class Plan:
    """Per queue pair, its chains of work requests ``(wr_id, laddr, lkey, raddr, rkey, length, signalled)``;
    ``covers[wr_id]``: the (request index, bytes) a signalled completion vouches for."""

    chains: list[list[list[tuple[int, int, int, int, int, int, bool]]]]
    covers: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def work_requests(self) -> int:
        return sum(len(c) for qp in self.chains for c in qp)


def plan(
    requests: Sequence[Request],
    qps: int,
    *,
    slice_size: int = SLICE,
    max_chain: int = MAX_CHAIN,
    signal_every: int = SIGNAL_EVERY,
    first_id: int = 1,
) -> Plan:
    """Work requests for a batch.  Slices go round-robin over ``qps`` queue pairs, so one large transfer
    is split across every queue pair (and the NICs behind them)."""
    if qps < 1 or slice_size < 1 or max_chain < 1 or signal_every < 1:
        raise ValueError("qps, slice_size, max_chain and signal_every must be positive")
    per_qp: list[list[tuple[int, int, int, int, int, int]]] = [[] for _ in range(qps)]
    slices: dict[int, tuple[int, int]] = {}
    wr_id, turn = first_id, 0
    for index, r in enumerate(requests):
        if r.length < 0:
            raise ValueError(f"request {index} has a negative length")
        for off in range(0, r.length, slice_size):
            n = min(slice_size, r.length - off)
            per_qp[turn % qps].append((wr_id, r.laddr + off, r.lkey, r.raddr + off, r.rkey, n))
            slices[wr_id] = (index, n)
            wr_id += 1
            turn += 1
    out = Plan([[] for _ in range(qps)])
    for q, wrs in enumerate(per_qp):
        pending: list[tuple[int, int]] = []
        for start in range(0, len(wrs), max_chain):
            chain = []
            part = wrs[start : start + max_chain]
            for i, wr in enumerate(part):
                pending.append(slices[wr[0]])
                signalled = i == len(part) - 1 or (start + i + 1) % signal_every == 0
                chain.append((*wr, signalled))
                if signalled:
                    out.covers[wr[0]] = pending
                    pending = []
            out.chains[q].append(chain)
    return out


def unavailable_reason() -> str:
    return (
        "mooncakefs's rdma transport has its posting and polling built but not yet its set-up "
        "(pyverbs queue pairs, the rkey exchange)"
    )


def available() -> bool:
    return False
