"""Mooncake's Python packages on mooncakefs: code that uses only the ``mooncake.*`` names, against real
node processes (and a real etcd for the cluster form), as LMCache, SGLang and vLLM call them.

Each test names the callers it stands for in docs/mooncake-compat.md.  Return codes are Mooncake's
(``mooncake-store/include/types.h``): 0 ok, -600 bad arguments, -704 not found.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import child_env, wait_until
from node_helpers import EtcdCluster, NodeProcess

import mooncakefs
import mooncakefs.compat

mooncakefs.compat.install()  # before the imports below, as a program using the drop-in does

from mooncake.engine import TransferEngine, TransferOpcode  # noqa: E402
from mooncake.store import MooncakeDistributedStore, ReplicateConfig, SoftPinAction  # noqa: E402

INVALID_PARAMS, OBJECT_NOT_FOUND = -600, -704


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = NodeProcess(tmp_path_factory.mktemp("mc"), name="mc", dram="256MiB").start()
    yield n
    n.kill()


def setup_store(address: str, buffer: int = 128 << 20) -> MooncakeDistributedStore:
    """Set up as LMCache's and SGLang's backends do: the seven positional arguments."""
    store = MooncakeDistributedStore()
    rc = store.setup("localhost", "P2PHANDSHAKE", 512 << 20, buffer, "tcp", "", address)
    assert rc == 0, store.last_error
    return store


@pytest.fixture(params=["hostport", "unix"])
def store(node, request):
    host, port = node.tcp_address
    s = setup_store(f"{host}:{port}" if request.param == "hostport" else node.unix_url)
    yield s
    s.remove_all()
    s.close()


def run_as_mooncake(code: str, *options: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``mooncakefs as-mooncake [options] -- python -c CODE``: an unmodified program, in its own process."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mooncakefs.cli",
            "as-mooncake",
            *options,
            "--",
            sys.executable,
            "-c",
            textwrap.dedent(code),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )


def test_install_registers_the_four_names_and_is_idempotent():
    import mooncake
    import mooncake.engine
    import mooncake.p2p_store
    import mooncake.store

    assert mooncakefs.compat.is_drop_in(mooncake) and mooncakefs.compat.is_drop_in(mooncake.store)
    assert mooncake.store.MooncakeDistributedStore is MooncakeDistributedStore
    assert mooncake.engine.TransferEngine is mooncakefs.transfer.TransferEngine  # exposed unchanged
    assert mooncake.engine.TransferOpcode.Read == TransferOpcode.READ == mooncake.engine.Read
    assert mooncakefs.compat.is_drop_in(mooncake.p2p_store) and "mooncake.p2p_store" in sys.modules
    mooncakefs.compat.install()  # a second call changes nothing
    assert sys.modules["mooncake"] is mooncake


def test_install_refuses_when_the_real_mooncake_is_imported(tmp_path):
    other = tmp_path / "mooncake"  # a package named mooncake that is not the drop-in
    other.mkdir()
    (other / "__init__.py").write_text("REAL = True\n")
    code = f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import mooncake
        import mooncakefs.compat
        try:
            mooncakefs.compat.install()
        except ImportError as exc:
            print("REFUSED", exc)
        assert mooncake.REAL and sys.modules["mooncake"] is mooncake
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, env=child_env()
    )
    assert out.returncode == 0, out.stderr
    assert "REFUSED" in out.stdout and "already imported" in out.stdout and str(other) in out.stdout


def test_put_get_and_the_lookups_keep_mooncakes_meanings(store):
    """LMCache (is_exist, put_parts), SGLang HiCache warmup (put, is_exist, get), SGLang clear (remove_all)."""
    assert store.put("k", b"hello") == 0
    assert store.put("k", b"HELLO!") == 0  # write-once: a second put succeeds and changes nothing
    assert store.get("k") == b"hello"
    assert store.get_size("k") == 5 and store.get_size("absent") == OBJECT_NOT_FOUND
    assert store.get("absent") == b""  # a miss is b"", as in Mooncake
    assert store.is_exist("k") == 1 and store.is_exist("absent") == 0
    assert store.batch_is_exist(["k", "absent", "k"]) == [1, 0, 1] and store.batch_is_exist([]) == []
    assert store.put("", b"x") == INVALID_PARAMS and store.put("empty", b"") == INVALID_PARAMS
    assert store.upsert("k", b"replaced") == 0 and store.get("k") == b"replaced"
    assert store.put_parts("parts", b"head:", bytearray(b"body"), memoryview(b"!")) == 0
    assert store.get("parts") == b"head:body!"
    assert store.put_batch(["b1", "b2"], [b"one", b"two"]) == 0
    assert store.get_batch(["b1", "absent", "b2"]) == [b"one", b"", b"two"]
    handles = store.batch_get_buffer(["b1", "absent"])
    assert bytes(handles[0]) == b"one" and handles[0].size() == 3 and handles[0].ptr() and handles[1] is None
    assert store.remove("b1") == 0 and store.remove("b1") == OBJECT_NOT_FOUND
    assert store.batch_remove(["b2", "absent"]) == [0, OBJECT_NOT_FOUND]
    for i in range(3):
        assert store.put(f"layer/{i}", b"x") == 0
    assert store.remove_by_regex(r"^layer/[01]$") == 2 and store.is_exist("layer/2") == 1
    assert store.remove_by_regex("(") == INVALID_PARAMS
    assert store.remove_all() == 3  # k, parts, layer/2
    assert store.health_check() == 0 and store.get_hostname().startswith("localhost:")


def test_one_key_where_a_list_is_due_is_a_type_error_as_in_mooncake(store):
    """batch_remove("abc") removed the keys "a", "b" and "c"; get_batch("abc") and put_batch("ab", ...)
    read and wrote them.  Mooncake's binding refuses a str there (TypeError), as these do now."""
    for key in "abc":
        assert store.put(key, key.encode()) == 0
    calls = {
        "batch_remove": lambda: store.batch_remove("abc"),
        "get_batch": lambda: store.get_batch("abc"),
        "batch_get_buffer": lambda: store.batch_get_buffer("abc"),
        "batch_is_exist": lambda: store.batch_is_exist(b"abc"),
        "put_batch": lambda: store.put_batch("ab", [b"x", b"y"]),
        "upsert_batch": lambda: store.upsert_batch("ab", [b"x", b"y"]),
        "batch_put_from": lambda: store.batch_put_from("a", [1], [1]),
        "batch_upsert_from": lambda: store.batch_upsert_from("a", [1], [1]),
        "batch_get_into": lambda: store.batch_get_into("a", [1], [1]),
        "batch_put_from_multi_buffers": lambda: store.batch_put_from_multi_buffers("a", [[1]], [[1]]),
        "batch_get_into_multi_buffers": lambda: store.batch_get_into_multi_buffers("a", [[1]], [[1]]),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"{name}\\(\\): keys must be a list of str"):
            call()
    assert store.get_batch(["a", "b", "c"]) == [b"a", b"b", b"c"]


def test_registered_buffers_put_from_get_into_and_refusals(store):
    """LMCache (register_buffer, put_from, batch_get_into, unregister_buffer), SGLang HiCache
    (register_buffer, batch_put_from, batch_get_into, *_multi_buffers)."""
    src = np.arange(1 << 20, dtype=np.uint32).view(np.uint8)
    dst = np.full(1 << 20, 0xEE, dtype=np.uint8)
    sp, dp = src.ctypes.data, dst.ctypes.data
    assert store.put_from("unregistered", sp, 4096) == INVALID_PARAMS  # raw pointers only once registered
    assert store.register_buffer(sp, src.nbytes) == 0 and store.register_buffer(dp, dst.nbytes) == 0
    assert store.register_buffer(sp + 64, 64) == INVALID_PARAMS  # overlaps
    assert store.put_from("z", sp, 4096) == 0
    assert store.get_into("z", dp, 4096) == 4096 and np.array_equal(dst[:4096], src[:4096])
    assert store.get_into("z", dp + 8192, 100) == INVALID_PARAMS  # too small: nothing written
    assert (dst[8192:8292] == 0xEE).all()
    assert store.get_into("z", dp + dst.nbytes - 100, 4096) == INVALID_PARAMS  # runs past the buffer
    assert store.get_into("absent", dp, 4096) == OBJECT_NOT_FOUND
    keys = [f"page/{i}" for i in range(8)]
    assert store.batch_put_from(keys, [sp + i * 4096 for i in range(8)], [4096] * 8) == [0] * 8
    assert store.batch_put_from(["x", "y"], [sp], [8, 8]) == [INVALID_PARAMS] * 2  # lengths differ
    got = store.batch_get_into([*keys, "absent"], [dp + 65536 + i * 4096 for i in range(9)], [4096] * 9)
    assert got == [4096] * 8 + [OBJECT_NOT_FOUND]
    assert np.array_equal(dst[65536 : 65536 + 8 * 4096], src[: 8 * 4096])
    # One object gathered from two ranges, scattered back into two others.
    assert store.batch_put_from_multi_buffers(["mb"], [[sp, sp + 8192]], [[100, 200]]) == [0]
    assert store.batch_get_into_multi_buffers(["mb"], [[dp, dp + 500]], [[100, 200]]) == [300]
    assert np.array_equal(dst[:100], src[:100]) and np.array_equal(dst[500:700], src[8192:8392])
    results = store.get_into_ranges([dp], [["z"]], [[[0, 10]]], [[[4, 4090]]], [[[4, 10]]])
    assert results[0][0][0] == 4 and results[0][0][1] < 0  # the second range runs past the object
    assert store.unregister_buffer(sp) == 0 and store.unregister_buffer(sp) == INVALID_PARAMS
    assert store.put_from("after", sp, 16) == INVALID_PARAMS


def test_a_range_that_is_not_this_processs_memory_is_refused_and_registration_still_works(store):
    """register_buffer(ptr, 2**63) raised OverflowError (Mooncake returns a code) after recording the
    pointer but not its range: from then on every register_buffer and put_from raised IndexError.  An
    address with nothing mapped there (or read-only memory) was taken, and put_from (get_into) crashed
    the process with SIGSEGV."""
    assert store.register_buffer(4096, 1 << 63) == INVALID_PARAMS
    assert store.register_buffer((1 << 64) - 8, 16) == INVALID_PARAMS
    assert "address space" in str(store.last_error)
    assert store.register_buffer(4096, 4096) == INVALID_PARAMS  # the zero page's neighbour: never mapped
    read_only = mmap.mmap(-1, 4096, prot=mmap.PROT_READ)
    assert store.register_buffer(np.frombuffer(read_only, np.uint8).ctypes.data, 4096) == INVALID_PARAMS
    assert "not readable and writable memory" in str(store.last_error)
    buf = np.arange(4096, dtype=np.uint8)
    assert store.register_buffer(buf.ctypes.data, buf.nbytes) == 0
    assert store.put_from("after-refusals", buf.ctypes.data, 4096) == 0 and store.get("after-refusals") == bytes(buf)
    assert store.unregister_buffer(buf.ctypes.data) == 0


def test_a_registered_buffer_unmapped_since_is_refused_not_a_crash(node):
    """A buffer registered, then freed (unmapped) without unregister_buffer: put_from, get_into and their
    batches read or wrote it through the view made at registration, and the process died of SIGSEGV.
    Run in a process of its own, so that a crash is this test's failure alone."""
    host, port = node.tcp_address
    done = run_as_mooncake(
        f"""
        import mmap, sys
        from mooncake.store import MooncakeDistributedStore
        from mooncakefs import _engine

        store = MooncakeDistributedStore()
        assert store.setup("localhost", "P2PHANDSHAKE", 512 << 20, 16 << 20, "tcp", "", "{host}:{port}") == 0
        region = mmap.mmap(-1, 1 << 20)
        ptr = _engine.address(region)
        assert store.register_buffer(ptr, 1 << 20) == 0 and store.put_from("kept", ptr, 4096) == 0
        region.close()  # unmapped, still registered
        codes = [
            store.put_from("gone", ptr, 4096),
            store.get_into("kept", ptr + 8192, 4096),
            *store.batch_put_from(["gone"], [ptr], [4096]),
            *store.batch_get_into(["kept"], [ptr], [4096]),
        ]
        print(codes, store.last_error)
        assert all(code < 0 for code in codes), codes
        assert "no longer mapped" in str(store.last_error)
        assert store.is_exist("gone") == 0 and store.get("kept") == bytes(4096)
        assert store.unregister_buffer(ptr) == 0
        store.close()
        """
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])


def test_a_store_left_open_at_exit_says_nothing(node):
    """A program that never closed its store, held by another module (as LMCache and SGLang keep their
    connectors), printed "Exception ignored in __del__" at exit: the store was collected after the
    drop-in's module was torn down."""
    host, port = node.tcp_address
    done = run_as_mooncake(
        f"""
        from mooncake.store import MooncakeDistributedStore

        store = MooncakeDistributedStore()
        assert store.setup("localhost", "P2PHANDSHAKE", 512 << 20, 16 << 20, "tcp", "", "{host}:{port}") == 0
        assert store.put("left-open", b"v") == 0
        from mooncakefs import _engine as library  # a module torn down after the drop-in's at exit

        library.connector = lambda: store  # kept by a module: collected after the drop-in's was torn down
        """
    )
    assert done.returncode == 0 and done.stderr == "", (done.returncode, done.stderr[-2000:])


def test_setup_config_dict_with_human_readable_sizes_and_clear_refusals(node):
    s = MooncakeDistributedStore()
    config = {
        "local_hostname": "localhost",
        "metadata_server": "http://127.0.0.1:8080/metadata",
        "global_segment_size": "16MB",
        "local_buffer_size": "16 MB",
        "protocol": "tcp",
        "master_server_addr": node.unix_url,
    }
    assert s.setup(config) == 0 and s.local_buffer_size == 16 << 20
    assert s.put("dict", b"v") == 0 and s.get("dict") == b"v" and s.remove("dict") == 0
    assert s.setup(config) == INVALID_PARAMS  # set up already
    s.close()
    assert s.get("dict") == b"" and s.put("dict", b"v") == INVALID_PARAMS  # closed: refused, never a crash
    assert MooncakeDistributedStore().setup({**config, "global_segment_size": "50%"}) != 0
    missing = MooncakeDistributedStore()
    assert missing.setup({"metadata_server": "P2PHANDSHAKE"}) == INVALID_PARAMS
    assert "local_hostname" in str(missing.last_error)
    with pytest.raises(TypeError):
        MooncakeDistributedStore().setup("localhost", "P2PHANDSHAKE", 1 << 20)
    nowhere = MooncakeDistributedStore()
    assert nowhere.setup("localhost", "P2PHANDSHAKE", 0, 1 << 20, "tcp", "", "not-an-address") == INVALID_PARAMS
    tenant = MooncakeDistributedStore()
    assert (
        tenant.setup("localhost", "P2PHANDSHAKE", 0, 1 << 20, "tcp", "", node.unix_url, tenant_id="other")
        == INVALID_PARAMS
    )
    serving_only = setup_store(node.unix_url, buffer=0)  # Mooncake's pure server: copying puts refused
    assert serving_only.put("nobuf", b"v") == INVALID_PARAMS and serving_only.is_exist("nobuf") == 0
    serving_only.close()


def test_replicate_config_fields_and_pins(store):
    config = ReplicateConfig()
    assert (config.replica_num, config.soft_pin_action, config.soft_pin_ttl_ms) == (1, SoftPinAction.PRESERVE, None)
    assert "replica_num: 1" in str(config) and "soft_pin_action: PRESERVE" in str(config)
    with pytest.raises(TypeError):
        config.soft_pin_ttl_ms = -1
    with pytest.raises(AttributeError):
        config.no_such_field = 1  # type: ignore[attr-defined]
    config.soft_pin_ttl_ms = 1000
    assert store.put("soft", b"v", config) == INVALID_PARAMS  # a ttl without ENABLE, as in Mooncake
    config.soft_pin_action = SoftPinAction.ENABLE
    assert store.put("soft", b"v", config) == 0
    hard = ReplicateConfig()
    hard.with_hard_pin = True
    hard.replica_num = 3  # best effort: one node holds one copy
    assert store.put("hard", b"v", config=hard) == 0
    with mooncakefs.connect(store.endpoint) as direct:
        assert direct.stat("hard").pinned and direct.stat("soft").pinned


def test_as_mooncake_runs_an_unmodified_program_against_a_node(node):
    """A second process, its code unchanged (a master address that names nothing), sees the drop-in
    and writes through ``--endpoint``; this process reads what it wrote."""
    code = """
        import mooncake, numpy as np
        from mooncake.store import MooncakeDistributedStore
        assert getattr(mooncake, "__mooncakefs__", False), mooncake.__file__
        s = MooncakeDistributedStore()
        assert s.setup("localhost", "P2PHANDSHAKE", 3200 << 20, 512 << 20, "tcp", "", "127.0.0.1:50051") == 0
        buf = np.full(65536, 7, dtype=np.uint8)
        assert s.register_buffer(buf.ctypes.data, buf.nbytes) == 0
        assert s.put_from("from-child", buf.ctypes.data, buf.nbytes) == 0
        print("ok", s.endpoint)
    """
    out = run_as_mooncake(code, "--endpoint", node.unix_url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", node.unix_url]
    reader = setup_store(node.unix_url)
    assert reader.get("from-child") == b"\x07" * 65536
    assert reader.remove("from-child") == 0
    reader.close()
    failed = subprocess.run(
        [sys.executable, "-m", "mooncakefs.cli", "as-mooncake", "--", "/nonexistent/prog"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert failed.returncode != 0 and "cannot run '/nonexistent/prog'" in failed.stderr


def test_transfer_engine_between_two_processes():
    """vLLM's connector and SGLang's disaggregation: initialize(P2PHANDSHAKE), get_rpc_port,
    register/batch_register_memory, transfer_sync_write/read, batch_transfer_sync_write."""
    target_code = """
        import json, sys
        from mooncake.engine import TransferEngine
        engine = TransferEngine()
        assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        addr = engine.allocate_managed_buffer(1 << 20)
        print(json.dumps({"port": engine.get_rpc_port(), "addr": addr}), flush=True)
        sys.stdin.read()
    """
    target = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mooncakefs.cli",
            "as-mooncake",
            "--",
            sys.executable,
            "-c",
            textwrap.dedent(target_code),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        peer = json.loads(target.stdout.readline())
        session = f"127.0.0.1:{peer['port']}"
        engine = TransferEngine()
        assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        src = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8)
        back = np.zeros(1 << 20, dtype=np.uint8)
        assert engine.batch_register_memory([src.ctypes.data, back.ctypes.data], [src.nbytes, back.nbytes]) == 0
        # Mooncake's own initiator test finds the target's buffer this way: the peer's first registered
        # buffer, from its MAP reply; this engine's own is its first in registration order
        assert engine.get_first_buffer_address(session) == peer["addr"]
        assert engine.get_first_buffer_address(engine.get_engine().session_id) == src.ctypes.data
        assert engine.get_first_buffer_address("127.0.0.1:1") == 0 and engine.last_error is not None
        assert engine.transfer_sync_write(session, src.ctypes.data, peer["addr"], 4096) == 0
        offsets = [8192 * i for i in range(1, 9)]
        assert (
            engine.batch_transfer_sync_write(
                session, [src.ctypes.data + o for o in offsets], [peer["addr"] + o for o in offsets], [4096] * 8
            )
            == 0
        )
        assert engine.transfer_sync_read(session, back.ctypes.data, peer["addr"], 1 << 20) == 0
        for o in [0, *offsets]:
            assert np.array_equal(back[o : o + 4096], src[o : o + 4096])
        assert engine.transfer_sync_write(session, src.ctypes.data, peer["addr"] + (1 << 20), 16) < 0  # not theirs
        assert engine.unregister_memory(src.ctypes.data) == 0
        engine.close()
    finally:
        target.stdin.close()
        target.wait(timeout=30)


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed (tools/install-deps.sh)")
def test_cluster_form_replica_num_survives_a_node_killed(tmp_path):
    """``master_server_addr="etcd://host:port/cluster"``: replica_num=2 puts on two nodes; one is
    killed and every value is still read (Mooncake's test_replication_failure_tolerance, over etcd)."""
    etcd = EtcdCluster().start()
    extra = ("--etcd", etcd.url, "--cluster", "mc", "--lease-ttl", "3")
    nodes = [NodeProcess(tmp_path, name=f"mc{i}", dram="32MiB", extra=extra).start() for i in range(2)]
    try:
        url = f"etcd://{etcd.url.replace('http://', '')}/mc"

        def two_nodes() -> bool:
            with mooncakefs.connect(url) as probe:
                return len(probe.map.nodes) == 2

        assert wait_until(two_nodes, timeout=20, interval=0.2)
        s = MooncakeDistributedStore()
        assert s.setup("localhost", "P2PHANDSHAKE", 64 << 20, 16 << 20, "tcp", "", url) == 0, s.last_error
        config = ReplicateConfig()
        config.replica_num = 2
        values = {f"rep/{i}": bytes([i]) * 1000 for i in range(20)}
        assert s.put_batch(list(values), list(values.values()), config) == 0
        assert s.put("rep/single", b"s" * 10, config) == 0
        nodes[0].kill()
        assert s.get_batch(list(values)) == list(values.values())
        assert s.get("rep/single") == b"s" * 10
        s.close()
    finally:
        for n in nodes:
            if n.alive:
                n.kill()
        etcd.close()


def test_closed_calls_return_codes_and_health_check_sees_a_dead_node(tmp_path):
    n = NodeProcess(tmp_path, name="gone", dram="32MiB").start()
    s = setup_store(n.tcp_url)
    assert s.health_check() == 0
    n.kill()
    assert wait_until(lambda: s.health_check() == 2, timeout=15)
    assert s.get("any") == b"" and s.put("any", b"v") < 0 and s.is_exist("any") == -1
    s.close()
    assert s.health_check() == 1 and s.get_into("any", 1, 1) == INVALID_PARAMS
    buf = (ctypes.c_char * 16)()
    assert s.register_buffer(ctypes.addressof(buf), 16) == INVALID_PARAMS  # not set up


def test_sglang_hicache_setup_forms_host_allocator_and_group_ids(node):
    """SGLang HiCache: setup with the shared transfer engine as 8th argument and its keyword arguments,
    setup_dummy (standalone storage), MooncakeHostMemAllocator memory registered, group_ids on the config."""
    from mooncake.store import MooncakeHostMemAllocator

    s = MooncakeDistributedStore()
    rc = s.setup(
        "localhost",
        "P2PHANDSHAKE",
        1 << 30,
        16 << 20,
        "tcp",
        "",
        node.tcp_address[0] + ":" + str(node.tcp_address[1]),
        None,
        enable_ssd_offload=True,
        ssd_offload_path="/unused",
        enable_client_http_server=True,
        client_http_port=9300,
    )
    assert rc == 0, s.last_error
    allocator = MooncakeHostMemAllocator()
    ptr = allocator.alloc(1 << 20)
    page = (ctypes.c_ubyte * (1 << 20)).from_address(ptr)
    ctypes.memset(page, 0x5A, 1 << 20)
    assert s.register_buffer(ptr, 1 << 20) == 0
    config = ReplicateConfig()
    assert hasattr(ReplicateConfig(), "group_ids")
    config.group_ids = ["sglang-hicache:a", "sglang-hicache:a"]
    assert s.batch_put_from(["hc_0_k", "hc_0_v"], [ptr, ptr + 4096], [4096, 4096], config) == [0, 0]
    assert s.batch_is_exist(["hc_0_k", "hc_0_v", "hc_1_k"]) == [1, 1, 0]
    dummy = MooncakeDistributedStore()
    assert dummy.setup_dummy(1 << 30, 16 << 20, node.unix_url) == 0
    assert dummy.get("hc_0_v") == b"\x5a" * 4096
    assert dummy.remove_all() >= 2
    dummy.close()
    s.close()
    del page
    assert allocator.free(ptr) == 0 and allocator.free(ptr) == INVALID_PARAMS
