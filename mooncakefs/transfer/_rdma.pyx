# cython: language_level=3, boundscheck=False, wraparound=False
"""The rdma hot path: post a chain of RDMA READ/WRITE work requests with one ``ibv_post_send``, and poll a
completion queue, both with the GIL released.  What to post (slices, chains, which ones are signalled) is
planned in plain Python (``rdma.plan``) where it is unit-tested without a device; the queue pairs and
completion queues come from pyverbs (``rdma.py``), passed here as raw pointers."""

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from mooncakefs.transfer._verbs cimport (
    IBV_SEND_SIGNALED,
    IBV_WC_SUCCESS,
    IBV_WR_RDMA_READ,
    IBV_WR_RDMA_WRITE,
    ibv_cq,
    ibv_poll_cq,
    ibv_post_send,
    ibv_qp,
    ibv_send_wr,
    ibv_sge,
    ibv_wc,
    ibv_wc_status_str,
)

import os
import time


def post_chain(size_t qp, bint write, list wrs) -> int:
    """Post ``wrs`` — tuples (wr_id, local addr, lkey, remote addr, rkey, length, signalled) — as one chain
    on queue pair ``qp``.  Returns how many were posted; OSError if the provider refused the chain (then
    none after the bad one went out, which the caller learns from the completions it gets)."""
    cdef Py_ssize_t n = len(wrs), i
    if n == 0:
        return 0
    if qp == 0:
        raise ValueError("no queue pair")
    cdef ibv_send_wr *chain = <ibv_send_wr *>malloc(n * sizeof(ibv_send_wr))
    cdef ibv_sge *sges = <ibv_sge *>malloc(n * sizeof(ibv_sge))
    cdef ibv_send_wr *bad = NULL
    cdef int rc
    if chain == NULL or sges == NULL:
        free(chain)
        free(sges)
        raise MemoryError()
    try:
        memset(chain, 0, n * sizeof(ibv_send_wr))
        for i in range(n):
            wr_id, laddr, lkey, raddr, rkey, length, signalled = wrs[i]
            sges[i].addr = <uint64_t>laddr
            sges[i].length = <uint32_t>length
            sges[i].lkey = <uint32_t>lkey
            chain[i].wr_id = <uint64_t>wr_id
            chain[i].sg_list = &sges[i]
            chain[i].num_sge = 1
            chain[i].opcode = IBV_WR_RDMA_WRITE if write else IBV_WR_RDMA_READ
            chain[i].send_flags = IBV_SEND_SIGNALED if signalled else 0
            chain[i].wr.rdma.remote_addr = <uint64_t>raddr
            chain[i].wr.rdma.rkey = <uint32_t>rkey
            chain[i].next = &chain[i + 1] if i + 1 < n else NULL
        with nogil:
            rc = ibv_post_send(<ibv_qp *>qp, chain, &bad)
        if rc:
            posted = (bad - chain) if bad != NULL else 0
            raise OSError(rc, f"ibv_post_send refused work request {posted} of {n}: {os.strerror(rc)}")
        return n
    finally:
        free(chain)
        free(sges)


def poll(size_t cq, int max_entries, double timeout) -> list:
    """Completions from ``cq``: [(wr_id, ok, status text, bytes)], waiting up to ``timeout`` seconds for the
    first (busy-polling with the GIL released); [] if none came."""
    if cq == 0:
        raise ValueError("no completion queue")
    cdef ibv_wc *wc = <ibv_wc *>malloc(max(max_entries, 1) * sizeof(ibv_wc))
    cdef int got = 0
    cdef double deadline = time.monotonic() + timeout
    cdef int spins
    if wc == NULL:
        raise MemoryError()
    try:
        while True:
            with nogil:
                spins = 0
                while spins < 100000:
                    got = ibv_poll_cq(<ibv_cq *>cq, max_entries, wc)
                    if got != 0:
                        break
                    spins += 1
            if got < 0:
                raise OSError(-got, "ibv_poll_cq failed")
            if got > 0 or time.monotonic() >= deadline:
                break
        return [(wc[i].wr_id, wc[i].status == IBV_WC_SUCCESS,
                 ibv_wc_status_str(wc[i].status).decode(), wc[i].byte_len) for i in range(got)]
    finally:
        free(wc)
