# cython: language_level=3, boundscheck=False, wraparound=False
"""The rdma hot path: build a chain of RDMA READ/WRITE work requests (``ibv_send_wr`` + ``ibv_sge``) and post
it with one ``ibv_post_send``, and poll a completion queue, both with the GIL released.  ``build_chain``
fills the same C arrays without posting and reads them back, so the chains are tested without a device.  What to post (slices, chains, which ones are signalled) is
planned in plain Python (``rdma.plan``) where it is unit-tested without a device.  The protection domain
comes from pyverbs (``rdma.VerbsDevice.pd_pointer``); the completion queues and RC queue pairs are made
here on it (pyverbs does not hand out a queue pair's pointer), and connected with the numbers a peer
publishes (``connect_rc_qp``).  None of it has run on a device here: the calls are checked by the compiler
against verbs.h, the chains by ``build_chain``, and the device tests (tests/test_rdma_device.py) run where
/sys/class/infiniband has a device."""

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.errno cimport errno as c_errno
from libc.string cimport memcpy, memset

from mooncakefs.transfer._verbs cimport (
    IBV_ACCESS_LOCAL_WRITE,
    IBV_ACCESS_REMOTE_READ,
    IBV_ACCESS_REMOTE_WRITE,
    IBV_QP_ACCESS_FLAGS,
    IBV_QP_AV,
    IBV_QP_DEST_QPN,
    IBV_QP_MAX_DEST_RD_ATOMIC,
    IBV_QP_MAX_QP_RD_ATOMIC,
    IBV_QP_MIN_RNR_TIMER,
    IBV_QP_PATH_MTU,
    IBV_QP_PKEY_INDEX,
    IBV_QP_PORT,
    IBV_QP_RETRY_CNT,
    IBV_QP_RNR_RETRY,
    IBV_QP_RQ_PSN,
    IBV_QP_SQ_PSN,
    IBV_QP_STATE,
    IBV_QP_TIMEOUT,
    IBV_QPS_INIT,
    IBV_QPS_RTR,
    IBV_QPS_RTS,
    IBV_QPT_RC,
    IBV_SEND_SIGNALED,
    IBV_WC_BAD_RESP_ERR,
    IBV_WC_FATAL_ERR,
    IBV_WC_GENERAL_ERR,
    IBV_WC_LOC_ACCESS_ERR,
    IBV_WC_LOC_LEN_ERR,
    IBV_WC_LOC_PROT_ERR,
    IBV_WC_LOC_QP_OP_ERR,
    IBV_WC_REM_ABORT_ERR,
    IBV_WC_REM_ACCESS_ERR,
    IBV_WC_REM_INV_REQ_ERR,
    IBV_WC_REM_OP_ERR,
    IBV_WC_RESP_TIMEOUT_ERR,
    IBV_WC_RETRY_EXC_ERR,
    IBV_WC_RNR_RETRY_EXC_ERR,
    IBV_WC_SUCCESS,
    IBV_WC_WR_FLUSH_ERR,
    IBV_WR_RDMA_READ,
    IBV_WR_RDMA_WRITE,
    ibv_cq,
    ibv_create_cq,
    ibv_create_qp,
    ibv_destroy_cq,
    ibv_destroy_qp,
    ibv_modify_qp,
    ibv_mtu,
    ibv_pd,
    ibv_poll_cq,
    ibv_post_send,
    ibv_qp,
    ibv_qp_attr,
    ibv_qp_init_attr,
    ibv_send_wr,
    ibv_sge,
    ibv_wc,
    ibv_wc_status,
    ibv_wc_status_str,
)

import errno
import os
import time


WC_STATUS = {
    "IBV_WC_SUCCESS": IBV_WC_SUCCESS,
    "IBV_WC_LOC_LEN_ERR": IBV_WC_LOC_LEN_ERR,
    "IBV_WC_LOC_QP_OP_ERR": IBV_WC_LOC_QP_OP_ERR,
    "IBV_WC_LOC_PROT_ERR": IBV_WC_LOC_PROT_ERR,
    "IBV_WC_WR_FLUSH_ERR": IBV_WC_WR_FLUSH_ERR,
    "IBV_WC_BAD_RESP_ERR": IBV_WC_BAD_RESP_ERR,
    "IBV_WC_LOC_ACCESS_ERR": IBV_WC_LOC_ACCESS_ERR,
    "IBV_WC_REM_INV_REQ_ERR": IBV_WC_REM_INV_REQ_ERR,
    "IBV_WC_REM_ACCESS_ERR": IBV_WC_REM_ACCESS_ERR,
    "IBV_WC_REM_OP_ERR": IBV_WC_REM_OP_ERR,
    "IBV_WC_RETRY_EXC_ERR": IBV_WC_RETRY_EXC_ERR,
    "IBV_WC_RNR_RETRY_EXC_ERR": IBV_WC_RNR_RETRY_EXC_ERR,
    "IBV_WC_REM_ABORT_ERR": IBV_WC_REM_ABORT_ERR,
    "IBV_WC_FATAL_ERR": IBV_WC_FATAL_ERR,
    "IBV_WC_RESP_TIMEOUT_ERR": IBV_WC_RESP_TIMEOUT_ERR,
    "IBV_WC_GENERAL_ERR": IBV_WC_GENERAL_ERR,
}  # verbs.h's completion statuses by name: rdma.py sorts them into path failures and refusals
OPCODES = {"IBV_WR_RDMA_WRITE": IBV_WR_RDMA_WRITE, "IBV_WR_RDMA_READ": IBV_WR_RDMA_READ}
SEND_SIGNALED = IBV_SEND_SIGNALED


def status_text(int status) -> str:
    """libibverbs' words for a completion status (``ibv_wc_status_str``; needs no device)."""
    return ibv_wc_status_str(<ibv_wc_status>status).decode()


cdef int _fill_chain(list wrs, bint write, ibv_send_wr *chain, ibv_sge *sges) except -1:
    """Fill ``chain`` and ``sges`` (room for ``len(wrs)`` each) from the planned work requests, linked in
    order: one scatter-gather entry each, RDMA WRITE or READ, IBV_SEND_SIGNALED where the plan says."""
    cdef Py_ssize_t n = len(wrs), i
    memset(chain, 0, n * sizeof(ibv_send_wr))
    memset(sges, 0, n * sizeof(ibv_sge))
    for i in range(n):
        wr_id, laddr, lkey, raddr, rkey, length, signalled = wrs[i]
        if not 0 < length <= 0xFFFFFFFF:
            raise ValueError(f"work request {wr_id}: a length of {length} does not fit one ibv_sge")
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
    return 0


cdef class _Chain:
    """The C arrays of one chain, freed with the object."""
    cdef ibv_send_wr *wrs
    cdef ibv_sge *sges
    cdef Py_ssize_t n

    def __cinit__(self, Py_ssize_t n):
        self.n = n
        self.wrs = <ibv_send_wr *>malloc(max(n, 1) * sizeof(ibv_send_wr))
        self.sges = <ibv_sge *>malloc(max(n, 1) * sizeof(ibv_sge))
        if self.wrs == NULL or self.sges == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.wrs)
        free(self.sges)


def build_chain(bint write, list wrs) -> list:
    """The test hook: fill the ``ibv_send_wr``/``ibv_sge`` arrays for ``wrs`` exactly as ``post_chain``
    does, post nothing, and read every field back from the C structs (``next`` and ``sg_list`` as indexes
    into the arrays, -1 for NULL), so the chain a device would get can be checked without one."""
    cdef Py_ssize_t n = len(wrs), i
    cdef _Chain c = _Chain(n)
    if n == 0:
        return []
    _fill_chain(wrs, write, c.wrs, c.sges)
    out = []
    for i in range(n):
        sge = c.wrs[i].sg_list
        out.append({
            "wr_id": c.wrs[i].wr_id,
            "opcode": <int>c.wrs[i].opcode,
            "send_flags": c.wrs[i].send_flags,
            "num_sge": c.wrs[i].num_sge,
            "sg_list": (sge - c.sges) if sge != NULL else -1,
            "addr": sge.addr,
            "length": sge.length,
            "lkey": sge.lkey,
            "remote_addr": c.wrs[i].wr.rdma.remote_addr,
            "rkey": c.wrs[i].wr.rdma.rkey,
            "next": (c.wrs[i].next - c.wrs) if c.wrs[i].next != NULL else -1,
        })
    return out


def post_chain(size_t qp, bint write, list wrs) -> int:
    """Post ``wrs`` — tuples (wr_id, local addr, lkey, remote addr, rkey, length, signalled) — as one chain
    on queue pair ``qp``, with one ``ibv_post_send`` and the GIL released.  Returns how many were posted;
    OSError if the provider refused the chain (none from the bad one on went out)."""
    cdef Py_ssize_t n = len(wrs)
    if n == 0:
        return 0
    if qp == 0:
        raise ValueError("no queue pair")
    cdef _Chain c = _Chain(n)
    cdef ibv_send_wr *bad = NULL
    cdef int rc
    _fill_chain(wrs, write, c.wrs, c.sges)
    with nogil:
        rc = ibv_post_send(<ibv_qp *>qp, c.wrs, &bad)
    if rc:
        posted = (bad - c.wrs) if bad != NULL else 0
        raise OSError(rc, f"ibv_post_send refused work request {posted} of {n}: {os.strerror(rc)}")
    return n


def poll(size_t cq, int max_entries, double timeout) -> list:
    """Completions from ``cq``: [(wr_id, status, vendor error, bytes)], waiting up to ``timeout`` seconds
    for the first (busy-polling with the GIL released, a batch of spins at a time); [] if none came."""
    if cq == 0:
        raise ValueError("no completion queue")
    if max_entries < 1:
        raise ValueError("poll at least one completion")
    cdef ibv_wc *wc = <ibv_wc *>malloc(max_entries * sizeof(ibv_wc))
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
        return [(wc[i].wr_id, <int>wc[i].status, wc[i].vendor_err, wc[i].byte_len) for i in range(got)]
    finally:
        free(wc)


# -- set-up: completion queues and RC queue pairs on pyverbs' protection domain ----------------------------


def create_cq(size_t pd, int entries) -> int:
    """A completion queue of ``entries`` on the device of protection domain ``pd``; its pointer."""
    if pd == 0 or entries < 1:
        raise ValueError("a completion queue needs a protection domain and at least one entry")
    cdef ibv_cq *cq
    with nogil:
        cq = ibv_create_cq((<ibv_pd *>pd).context, entries, NULL, NULL, 0)
    if cq == NULL:
        err = errno_value()
        raise OSError(err, f"ibv_create_cq({entries}) failed: {os.strerror(err)}")
    return <size_t>cq


def destroy_cq(size_t cq) -> None:
    if cq and ibv_destroy_cq(<ibv_cq *>cq):
        raise OSError(errno_value(), "ibv_destroy_cq failed: a queue pair still uses it")


def create_rc_qp(size_t pd, size_t cq, int max_send_wr) -> tuple:
    """A reliable-connected queue pair on ``pd`` whose sends complete on ``cq``: (pointer, qp number)."""
    if pd == 0 or cq == 0 or max_send_wr < 1:
        raise ValueError("a queue pair needs a protection domain, a completion queue and room for work")
    cdef ibv_qp_init_attr init
    memset(&init, 0, sizeof(init))
    init.send_cq = <ibv_cq *>cq
    init.recv_cq = <ibv_cq *>cq
    init.cap.max_send_wr = max_send_wr
    init.cap.max_recv_wr = 1
    init.cap.max_send_sge = 1
    init.cap.max_recv_sge = 1
    init.qp_type = IBV_QPT_RC
    init.sq_sig_all = 0  # selective signalling: rdma.plan marks the work requests that complete
    cdef ibv_qp *qp
    with nogil:
        qp = ibv_create_qp(<ibv_pd *>pd, &init)
    if qp == NULL:
        err = errno_value()
        raise OSError(err, f"ibv_create_qp failed: {os.strerror(err)}")
    return <size_t>qp, qp.qp_num


def destroy_qp(size_t qp) -> None:
    if qp and ibv_destroy_qp(<ibv_qp *>qp):
        raise OSError(errno_value(), "ibv_destroy_qp failed")


def connect_rc_qp(size_t qp, int port, int gid_index, int mtu, int remote_qpn, int remote_lid,
                  bytes remote_gid, int psn=0, int remote_psn=0, int rd_atomic=16, int dest_rd_atomic=16) -> None:
    """Take a new RC queue pair through INIT, RTR and RTS towards the peer's queue pair ``remote_qpn``
    (its port's LID, and its 16-byte GID: all zeros on InfiniBand without a global route).  ``rd_atomic``
    and ``dest_rd_atomic``: the RDMA READs it may have outstanding as initiator and serve as responder,
    within the device's max_qp_init_rd_atom and max_qp_rd_atom (above them ibv_modify_qp fails)."""
    if qp == 0:
        raise ValueError("no queue pair")
    if not 1 <= rd_atomic <= 255 or not 1 <= dest_rd_atomic <= 255:
        raise ValueError(f"rd_atomic and dest_rd_atomic are 1 to 255, got {rd_atomic}, {dest_rd_atomic}")
    if len(remote_gid) != 16:
        raise ValueError(f"a GID is 16 bytes, got {len(remote_gid)}")
    if not 1 <= mtu <= 5 or not 0 < port < 256 or not 0 <= gid_index < 256:
        raise ValueError(f"mtu (1-5), port and gid index out of range: {mtu}, {port}, {gid_index}")
    cdef ibv_qp_attr attr
    cdef const unsigned char *gid = remote_gid
    memset(&attr, 0, sizeof(attr))
    attr.qp_state = IBV_QPS_INIT
    attr.port_num = port
    attr.pkey_index = 0
    attr.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE
    _modify(qp, &attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS, "INIT")
    memset(&attr, 0, sizeof(attr))
    attr.qp_state = IBV_QPS_RTR
    attr.path_mtu = <ibv_mtu>mtu
    attr.dest_qp_num = remote_qpn
    attr.rq_psn = remote_psn
    attr.max_dest_rd_atomic = dest_rd_atomic
    attr.min_rnr_timer = 12
    attr.ah_attr.dlid = remote_lid
    attr.ah_attr.port_num = port
    if remote_gid != bytes(16):
        attr.ah_attr.is_global = 1
        memcpy(attr.ah_attr.grh.dgid.raw, gid, 16)
        attr.ah_attr.grh.sgid_index = gid_index
        attr.ah_attr.grh.hop_limit = 64
    _modify(qp, &attr, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN
            | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER, "RTR")
    memset(&attr, 0, sizeof(attr))
    attr.qp_state = IBV_QPS_RTS
    attr.timeout = 14
    attr.retry_cnt = 7
    attr.rnr_retry = 7
    attr.sq_psn = psn
    attr.max_rd_atomic = rd_atomic
    _modify(qp, &attr, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN
            | IBV_QP_MAX_QP_RD_ATOMIC, "RTS")


cdef void _modify(size_t qp, ibv_qp_attr *attr, int mask, str state) except *:
    cdef int rc
    with nogil:
        rc = ibv_modify_qp(<ibv_qp *>qp, attr, mask)
    if rc:
        raise OSError(rc, f"ibv_modify_qp to {state} failed: {os.strerror(rc)}")


cdef int errno_value():
    return c_errno or errno.EIO
