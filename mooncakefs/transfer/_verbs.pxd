# Declarations of the libibverbs calls and structs the rdma transport uses (infiniband/verbs.h, Debian
# libibverbs-dev).  Devices, context, protection domain and memory regions come from pyverbs (rdma.py);
# pyverbs hands out the protection domain's pointer but not a queue pair's, so completion queues and RC
# queue pairs are created here on that protection domain, with posting and polling.  Only the fields used
# are declared: Cython takes the layout from the header.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<infiniband/verbs.h>" nogil:
    struct ibv_context:
        pass
    struct ibv_pd:
        ibv_context *context
    struct ibv_qp:
        uint32_t qp_num
    struct ibv_cq:
        pass

    enum ibv_qp_type:
        IBV_QPT_RC
    enum ibv_qp_state:
        IBV_QPS_INIT
        IBV_QPS_RTR
        IBV_QPS_RTS
    enum ibv_mtu:
        pass
    enum ibv_access_flags:
        IBV_ACCESS_LOCAL_WRITE
        IBV_ACCESS_REMOTE_WRITE
        IBV_ACCESS_REMOTE_READ
    enum ibv_qp_attr_mask:
        IBV_QP_STATE
        IBV_QP_ACCESS_FLAGS
        IBV_QP_PKEY_INDEX
        IBV_QP_PORT
        IBV_QP_AV
        IBV_QP_PATH_MTU
        IBV_QP_TIMEOUT
        IBV_QP_RETRY_CNT
        IBV_QP_RNR_RETRY
        IBV_QP_RQ_PSN
        IBV_QP_MAX_QP_RD_ATOMIC
        IBV_QP_MIN_RNR_TIMER
        IBV_QP_SQ_PSN
        IBV_QP_MAX_DEST_RD_ATOMIC
        IBV_QP_DEST_QPN

    struct ibv_qp_cap:
        uint32_t max_send_wr
        uint32_t max_recv_wr
        uint32_t max_send_sge
        uint32_t max_recv_sge
        uint32_t max_inline_data
    struct ibv_qp_init_attr:
        ibv_cq *send_cq
        ibv_cq *recv_cq
        ibv_qp_cap cap
        ibv_qp_type qp_type
        int sq_sig_all

    union ibv_gid:
        uint8_t raw[16]
    struct ibv_global_route:
        ibv_gid dgid
        uint8_t sgid_index
        uint8_t hop_limit
    struct ibv_ah_attr:
        ibv_global_route grh
        uint16_t dlid
        uint8_t is_global
        uint8_t port_num
    struct ibv_qp_attr:
        ibv_qp_state qp_state
        ibv_mtu path_mtu
        uint32_t rq_psn
        uint32_t sq_psn
        uint32_t dest_qp_num
        unsigned int qp_access_flags
        ibv_ah_attr ah_attr
        uint16_t pkey_index
        uint8_t max_rd_atomic
        uint8_t max_dest_rd_atomic
        uint8_t min_rnr_timer
        uint8_t port_num
        uint8_t timeout
        uint8_t retry_cnt
        uint8_t rnr_retry

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
        IBV_WC_LOC_LEN_ERR
        IBV_WC_LOC_QP_OP_ERR
        IBV_WC_LOC_PROT_ERR
        IBV_WC_WR_FLUSH_ERR
        IBV_WC_BAD_RESP_ERR
        IBV_WC_LOC_ACCESS_ERR
        IBV_WC_REM_INV_REQ_ERR
        IBV_WC_REM_ACCESS_ERR
        IBV_WC_REM_OP_ERR
        IBV_WC_RETRY_EXC_ERR
        IBV_WC_RNR_RETRY_EXC_ERR
        IBV_WC_REM_ABORT_ERR
        IBV_WC_FATAL_ERR
        IBV_WC_RESP_TIMEOUT_ERR
        IBV_WC_GENERAL_ERR

    struct ibv_wc:
        uint64_t wr_id
        ibv_wc_status status
        uint32_t byte_len
        uint32_t vendor_err

    ibv_cq *ibv_create_cq(ibv_context *context, int cqe, void *cq_context, void *channel, int comp_vector)
    int ibv_destroy_cq(ibv_cq *cq)
    ibv_qp *ibv_create_qp(ibv_pd *pd, ibv_qp_init_attr *qp_init_attr)
    int ibv_modify_qp(ibv_qp *qp, ibv_qp_attr *attr, int attr_mask)
    int ibv_destroy_qp(ibv_qp *qp)
    int ibv_post_send(ibv_qp *qp, ibv_send_wr *wr, ibv_send_wr **bad_wr)
    int ibv_poll_cq(ibv_cq *cq, int num_entries, ibv_wc *wc)
    const char *ibv_wc_status_str(ibv_wc_status status)
