"""Shared fixtures and helpers for the mooncakefs test suite.

Every store a test opens goes through ``store_factory`` (or the ``store`` fixture built on it): its data
directory lives under ``tmp_path`` and it is closed at teardown even when the test failed half-way.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from layers import LAYERS, ORDER, layer_of

MiB = 1 << 20
PURE_ENGINE = os.environ.get("MOONCAKEFS_ENGINE") == "python"  # the suite's run on the pure-Python twins
KiB = 1 << 10

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    for layer in LAYERS:
        config.addinivalue_line("markers", f"{layer}: tests at the {layer} layer (tests/layers.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its file's layer and run the layers bottom-up (stable within a layer, so
    module-scoped fixtures still see their tests together)."""
    for item in items:
        item.add_marker(layer_of(item.path.stem))
    items.sort(key=lambda item: ORDER[layer_of(item.path.stem)])


def rand_bytes(n: int, seed: object = 0) -> bytes:
    """``n`` pseudo-random bytes, the same for the same seed (an int, str, bytes, or a tuple of those)."""
    if not isinstance(seed, (int, str, bytes)):
        seed = repr(seed)
    return random.Random(seed).randbytes(n)


def as_bytes_key(key: str | bytes) -> bytes:
    """Normalise a key (str or bytes) to its UTF-8 bytes, for comparing keys() output with what was put."""
    return key.encode() if isinstance(key, str) else bytes(key)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value.

    Used where the engine is allowed to do work in the background (demotion, promotion): the tests check
    the final state, never how long it took.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def tier_of(store, key) -> str:
    return store.stat(key).tier


def child_env() -> dict[str, str]:
    """The environment for a child interpreter: it must import the very mooncakefs this process imported."""
    import mooncakefs

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    package_parent = str(Path(mooncakefs.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def run_python(code: str, *args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the suite's own python), returning the completed process."""
    env = child_env()
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def spawn_python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter with pipes on stdin/stdout/stderr (text mode, line buffered)."""
    env = child_env()
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        env=env,
        **kwargs,
    )


def kill_process(proc: subprocess.Popen) -> None:
    """SIGKILL a child we started (by its own pid) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(Exception):
        proc.communicate(timeout=30)


@pytest.fixture
def mooncakefs():
    """The package under test (imported lazily so that collection works while it is being written)."""
    import mooncakefs as module

    return module


@pytest.fixture
def loop_devices(tmp_path_factory):
    """A ``LoopDevices``: ``attach(size)`` makes a loop device over a sparse file; all are detached at
    teardown, even when the test failed.  Skips the test where loop devices cannot be made."""
    from blockdev_helpers import LoopDevices

    loops = LoopDevices(tmp_path_factory.mktemp("loop"))
    try:
        loops.attach(1 << 20)
    except (OSError, subprocess.SubprocessError) as exc:
        loops.detach_all()
        pytest.skip(f"cannot make a loop device here (needs root and /dev/loop-control): {exc}")
    loops.detach_all()
    yield loops
    errors = loops.detach_all()
    assert not errors, f"loop devices left attached: {errors}"


@pytest.fixture
def ssd_backend() -> str:
    """Where ``store_factory`` puts an SSD tier given as a size: "files" in the data dir.  A test module
    that overrides this fixture with params ["files", "blockdev"] runs its tests over both backends
    (each store then gets a loop device of its own, sized to hold ``ssd`` bytes of values)."""
    return "files"


@pytest.fixture
def store_factory(tmp_path, ssd_backend, request):
    """``make(path=None, **options)``: open a store under tmp_path (a fresh dir per call unless ``path``).

    Defaults: dram="32MiB", ssd=None. Every store opened here is closed at teardown.
    """
    import mooncakefs

    opened = []
    counter = iter(range(1_000_000))
    loops = request.getfixturevalue("loop_devices") if ssd_backend == "blockdev" else None
    devices: dict[Path, str] = {}  # data dir -> its loop device: a reopened store finds its values again

    def make(path=None, **options):
        if path is None:
            path = tmp_path / f"store-{next(counter)}"
        options.setdefault("dram", "32MiB")
        options.setdefault("ssd", None)
        if loops is not None and options["ssd"] and "/" not in str(options["ssd"]):
            from blockdev_helpers import device_size_for

            from mooncakefs.units import parse_size

            if path not in devices:
                segment = parse_size(options.get("segment_size", "64MiB"))
                devices[path] = loops.attach(device_size_for(parse_size(options["ssd"]), segment))
            options["ssd"] = devices[path]
        store = mooncakefs.open(path, **options)
        opened.append(store)
        return store

    yield make

    for store in reversed(opened):
        with contextlib.suppress(Exception):
            store.close()


@pytest.fixture
def store(store_factory):
    """A DRAM-only store big enough that the API tests never evict anything."""
    return store_factory(dram="32MiB", ssd=None)


@pytest.fixture
def ssd_store(store_factory):
    """A store with both tiers, big enough that nothing is evicted unless a test fills it on purpose."""
    return store_factory(dram="32MiB", ssd="64MiB", segment_size="4MiB")


@pytest.fixture(autouse=True)
def _isolated_default_data_dir(tmp_path, monkeypatch):
    """No test may touch the user's default data dir: point MOONCAKEFS_DATA at a tmp dir for all of them."""
    monkeypatch.setenv("MOONCAKEFS_DATA", str(tmp_path / "default-data-dir"))


# ------------------------------------------------------------------------------------ FUSE mount fixtures
# Used by tests/test_fuse_*.py; the machinery (FuseMount, Watchdog, ...) is in tests/fuse_helpers.py.


@pytest.fixture
def fuse_watchdog(request):
    """A per-test watchdog: a test that overruns its limit gets its mount daemons SIGKILLed (blocked
    syscalls then fail with ENOTCONN) and an error at teardown, instead of hanging the suite."""
    import fuse_helpers

    fuse_helpers.require_fuse()
    limit = fuse_helpers.SLOW_TEST_TIMEOUT if request.node.get_closest_marker("slow") else fuse_helpers.TEST_TIMEOUT
    dog = fuse_helpers.Watchdog(limit, request.node.nodeid)
    yield dog
    dog.cancel()
    if dog.fired:
        pytest.fail(f"watchdog: {request.node.nodeid} ran over {limit:.0f} s; the mount hung and was killed")


@pytest.fixture
def mount_factory(tmp_path, fuse_watchdog):
    """``make(data="data", mnt="mnt", dram="64MiB", ssd="256MiB", chunk_size=None, extra=(), env=None,
    start=True)``: a ``FuseMount`` under tmp_path (relative paths are taken under tmp_path), started unless
    ``start=False``.  Every mount made here is unmounted (or its daemon killed) at teardown."""
    import fuse_helpers

    made: list = []

    def make(data="data", mnt="mnt", *, start=True, **options):
        data_path = None if data is None else (tmp_path / data if not os.path.isabs(data) else Path(data))
        mnt_path = tmp_path / mnt if not os.path.isabs(mnt) else Path(mnt)
        m = fuse_watchdog.watch(fuse_helpers.FuseMount(data_path, mnt_path, **options))
        made.append(m)
        if start:
            m.start()
        return m

    yield make

    for m in reversed(made):
        m.stop()
        # shown by pytest (captured stderr) only when the test fails
        sys.stderr.write(f"\n{m.describe()}\n")


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory):
    """One mount (64 MiB DRAM, 256 MiB SSD, 64 KiB chunks) shared by a test module; tests use ``fuse_dir``."""
    import fuse_helpers

    fuse_helpers.require_fuse()
    base = tmp_path_factory.mktemp("shared-mount")
    m = fuse_helpers.FuseMount(base / "data", base / "mnt", dram="64MiB", ssd="256MiB", chunk_size="64KiB")
    m.start()
    yield m
    m.stop()


_fuse_dir_counter = iter(range(1_000_000))


@pytest.fixture
def fuse_dir(request, shared_mount, fuse_watchdog):
    """A fresh, empty directory on the module's shared mount (remounted first if an earlier test killed it)."""
    import fuse_helpers

    if not shared_mount.alive or not os.path.ismount(shared_mount.mnt):
        shared_mount.stop()
        shared_mount.start()
    fuse_watchdog.watch(shared_mount)
    shared_mount.lines.append(f"=== {request.node.nodeid}\n")  # so its log shows which test did what
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[:100]
    path = shared_mount.mnt / f"t{next(_fuse_dir_counter)}-{name}"
    fuse_helpers.guarded(shared_mount, os.mkdir, path, timeout=30)
    yield path
    sys.stderr.write(f"\n{shared_mount.describe()}\n")  # shown by pytest only when the test fails
