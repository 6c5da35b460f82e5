"""Which layer of the system each test file exercises, from the bottom up.

A layer is the highest real part a file's tests start: ``unit`` runs pure functions; ``engine`` an
embedded store in this process; ``node`` and ``transfer`` real node or engine processes; ``fuse`` a
kernel FUSE mount; ``cluster`` a real etcd with nodes; ``netns`` separate hosts in network namespaces;
``faults`` kills, corruption and hostile peers.  Each layer is a pytest marker (``pytest -m unit``),
the suite runs the layers in this order so the cheap ones fail first, and a test file missing from the
table is a collection error: a new file has to say where it stands.
"""

from __future__ import annotations

LAYERS: dict[str, tuple[str, ...]] = {
    "unit": ("test_units", "test_engine_reference", "test_internal_keys", "test_placement", "test_transfer_paths",
             "test_policy_sim", "test_kvstore_api", "test_rdma", "test_p2p_choice", "test_wire", "test_logs",
             "test_shm"),
    "engine": ("test_api", "test_tiers", "test_ssd_direct", "test_policy", "test_stateful", "test_concurrency",
               "test_versions", "test_bench_harness", "test_tier_contract", "test_gpu_buffers", "test_vram",
               "test_vram_standin", "test_plain_path", "test_heap"),
    "node": ("test_node", "test_checksums", "test_permissions", "test_shared_index", "test_cli",
             "test_error_codes", "test_mooncake_compat"),
    "transfer": ("test_transfer", "test_transfer_engine", "test_rdma_device"),
    "fuse": ("test_fuse_kv", "test_fuse_lifecycle", "test_fuse_node", "test_fuse_posix", "test_fuse_scale",
             "test_fuse_small_files", "test_fuse_stateful", "test_copy", "test_fuse_group_commit"),
    "cluster": ("test_cluster", "test_cluster_store", "test_etcd_client", "test_etcd_watch", "test_fuse_cluster",
                "test_p2p", "test_mooncake_p2p_store", "test_transfer_metadata"),
    "netns": ("test_cluster_netns", "test_p2p_netns", "test_transfer_netns"),
    "faults": ("test_crash", "test_hostile", "test_errors", "test_index_rebuild", "test_ssd_blockdev"),
}  # fmt: skip

LAYER_OF: dict[str, str] = {module: layer for layer, modules in LAYERS.items() for module in modules}
ORDER: dict[str, int] = {layer: rank for rank, layer in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    """The layer of test module ``module`` (its file name without ``.py``)."""
    try:
        return LAYER_OF[module]
    except KeyError:
        raise LookupError(f"tests/{module}.py has no layer: add it to LAYERS in tests/layers.py") from None
