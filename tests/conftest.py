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

MiB = 1 << 20
KiB = 1 << 10

ROOT = Path(__file__).resolve().parent.parent


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
def store_factory(tmp_path):
    """``make(path=None, **options)``: open a store under tmp_path (a fresh dir per call unless ``path``).

    Defaults: dram="32MiB", ssd=None. Every store opened here is closed at teardown.
    """
    import mooncakefs

    opened = []
    counter = iter(range(1_000_000))

    def make(path=None, **options):
        if path is None:
            path = tmp_path / f"store-{next(counter)}"
        options.setdefault("dram", "32MiB")
        options.setdefault("ssd", None)
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
