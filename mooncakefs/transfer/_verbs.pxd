# Declarations of the libibverbs calls and structs the rdma hot path uses (infiniband/verbs.h, Debian
# libibverbs-dev).  Set-up (devices, context, protection domain, memory regions, queue pairs) is done with
# pyverbs in rdma.py; only posting work requests and polling completions are here.
from libc.stdint cimport uint32_t, uint64_t


cdef extern from "<infiniband/verbs.h>" nogil:
    struct ibv_qp:
        uint32_t qp_num
    struct ibv_cq:
        pass

    struct ibv_sge:
        uint64_t addr
        uint32_t length
        uint32_t lkey

    enum ibv_wr_opcode:
        IBV_WR_RDMA_WRITE
        IBV_WR_RDMA_READ

    enum ibv_send_flags:
        IBV_SEND_SIGNALED

    # the union member holding an RDMA work request's remote address (C: wr.wr.rdma)
    struct _mc_rdma_wr:
        uint64_t remote_addr
        uint32_t rkey

    struct _mc_wr_union:
        _mc_rdma_wr rdma

    struct ibv_send_wr:
        uint64_t wr_id
        ibv_send_wr *next
        ibv_sge *sg_list
        int num_sge
        ibv_wr_opcode opcode
        unsigned int send_flags
        _mc_wr_union wr

    enum ibv_wc_status:
        IBV_WC_SUCCESS

    struct ibv_wc:
        uint64_t wr_id
        ibv_wc_status status
        uint32_t byte_len
        uint32_t vendor_err

    int ibv_post_send(ibv_qp *qp, ibv_send_wr *wr, ibv_send_wr **bad_wr)
    int ibv_poll_cq(ibv_cq *cq, int num_entries, ibv_wc *wc)
    const char *ibv_wc_status_str(ibv_wc_status status)
