"""Thread safety: byte-exact results under concurrent puts/gets, atomic overwrites, views under overwrite."""

from __future__ import annotations

import contextlib
import random
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import MiB, rand_bytes, run_python

import mooncakefs

THREADS = 8
PER_THREAD = 100


def run_threads(n: int, target, *args) -> list:
    """Run ``target(index, *args)`` in ``n`` threads started together; re-raise the first failure."""
    barrier = threading.Barrier(n)

    def wrapped(i):
        barrier.wait()
        return target(i, *args)

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(wrapped, i) for i in range(n)]
        return [f.result() for f in futures]


# ------------------------------------------------------------------------ 8 threads x 100 x 1 MiB


class Values:
    """1 MiB values rebuilt from their key: a 16-byte header (thread, index) + per-thread noise."""

    def __init__(self, threads: int):
        self.bases = [rand_bytes(MiB, ("base", t)) for t in range(threads)]

    @staticmethod
    def key(t: int, i: int) -> str:
        return f"t{t}/v{i}"

    def value(self, t: int, i: int) -> bytes:
        return struct.pack("<QQ", t, i) + self.bases[t][16:]


def _hammer(t: int, store, values: Values, committed: list) -> int:
    rng = random.Random(t)
    buf = bytearray(MiB)
    checked = 0
    for i in range(PER_THREAD):
        key, value = Values.key(t, i), values.value(t, i)
        store.put(key, value)
        got = store.get(key)
        assert got == value, f"{key}: read back wrong bytes right after put"
        committed.append((t, i))
        # read someone else's (or our own) earlier value through get_into
        ot, oi = committed[rng.randrange(len(committed))]
        n = store.get_into(Values.key(ot, oi), buf)
        assert n == MiB
        assert buf == values.value(ot, oi), f"{Values.key(ot, oi)}: wrong bytes read by thread {t}"
        checked += 1
    return checked


def _check_all(store, values: Values) -> None:
    for t in range(THREADS):
        for i in range(PER_THREAD):
            assert store.get(Values.key(t, i)) == values.value(t, i), Values.key(t, i)
    assert len(store) == THREADS * PER_THREAD


def test_8_threads_x_100_x_1mib(store_factory):
    store = store_factory(dram="1GiB", ssd=None)
    values = Values(THREADS)
    committed: list = []
    assert sum(run_threads(THREADS, _hammer, store, values, committed)) == THREADS * PER_THREAD
    _check_all(store, values)
    assert store.stats()["dram"]["evictions"] == 0


@pytest.mark.slow
def test_8_threads_x_100_x_1mib_with_eviction_to_ssd(store_factory):
    store = store_factory(dram="128MiB", ssd="1GiB", segment_size="16MiB")
    values = Values(THREADS)
    committed: list = []
    run_threads(THREADS, _hammer, store, values, committed)
    _check_all(store, values)
    stats = store.stats()
    assert stats["dram"]["evictions"] > 0
    assert stats["dram"]["used"] <= stats["dram"]["capacity"]


# ------------------------------------------------------------------------------ atomic overwrites


def uniform_value(b: int) -> bytes:
    """Self-describing: byte b repeated (b + 1) * 4 KiB times, so any mix of two values shows."""
    return bytes([b]) * ((b + 1) * 4096)


def check_uniform(data, where: str) -> None:
    data = bytes(data)
    assert data, f"{where}: empty read"
    b = data[0]
    assert len(data) == (b + 1) * 4096, f"{where}: length {len(data)} does not match fill byte {b}"
    assert data.count(data[:1]) == len(data), f"{where}: mixed bytes (torn write)"


@pytest.mark.parametrize(
    "options",
    [dict(dram="64MiB", ssd=None), dict(dram="4MiB", ssd="64MiB", segment_size="4MiB")],
    ids=["dram-only", "small-dram-with-ssd"],
)
def test_concurrent_overwrites_are_atomic(store_factory, options):
    store = store_factory(**options)
    keys = [f"hot{i}" for i in range(4)]
    for k in keys:
        store.put(k, uniform_value(0))
    writers_done = threading.Event()
    reads = [0]

    def writer(w: int) -> None:
        rng = random.Random(w)
        for _ in range(150):
            store.put(rng.choice(keys), uniform_value(rng.randrange(256)))

    def reader(r: int) -> None:
        rng = random.Random(100 + r)
        buf = bytearray(256 * 4096)
        while True:
            key = rng.choice(keys)
            mode = r % 3
            if mode == 0:
                check_uniform(store.get(key), f"get {key}")
            elif mode == 1:
                n = store.get_into(key, buf)
                check_uniform(memoryview(buf)[:n], f"get_into {key}")
            else:
                with store.view(key) as mv:
                    first = bytes(mv)
                    check_uniform(first, f"view {key}")
                    check_uniform(mv, f"view {key} re-read")
                    assert bytes(mv) == first, "a view changed while it was held"
            reads[0] += 1
            if writers_done.is_set():
                return

    with ThreadPoolExecutor(max_workers=8) as pool:
        wfuts = [pool.submit(writer, i) for i in range(4)]
        rfuts = [pool.submit(reader, i) for i in range(4)]
        try:
            for f in wfuts:
                f.result()
        finally:
            writers_done.set()
        for f in rfuts:
            f.result()
    assert reads[0] > 0
    for k in keys:
        check_uniform(store.get(k), f"final {k}")


def test_views_held_while_another_thread_overwrites(store_factory):
    store = store_factory(dram="16MiB", ssd=None)
    original = rand_bytes(MiB, "original")
    store.put("k", original)
    view_open = threading.Event()
    writes_done = threading.Event()
    errors: list = []

    def holder():
        try:
            with store.view("k") as mv:
                view_open.set()
                while not writes_done.is_set():
                    assert bytes(mv[:4096]) == original[:4096]
                assert bytes(mv) == original
        except BaseException as exc:
            errors.append(exc)
            view_open.set()

    t = threading.Thread(target=holder)
    t.start()
    assert view_open.wait(30)
    try:
        for i in range(30):
            store.put("k", rand_bytes(MiB, i))  # reuses the freed space: the view must not see it
            store.remove("k")
            store.put(f"other{i}", rand_bytes(MiB, ("o", i)))
            store.remove(f"other{i}")
    finally:
        writes_done.set()
        t.join(60)
    assert not errors, errors[0]


def test_many_threads_viewing_and_overwriting(store_factory):
    store = store_factory(dram="32MiB", ssd=None)
    keys = [f"k{i}" for i in range(8)]
    for k in keys:
        store.put(k, uniform_value(1))

    def work(t: int) -> None:
        rng = random.Random(t)
        for _ in range(200):
            key = rng.choice(keys)
            if rng.random() < 0.4:
                store.put(key, uniform_value(rng.randrange(64)))
            else:
                with store.view(key) as mv:
                    before = bytes(mv)
                    check_uniform(before, key)
                    store.put(rng.choice(keys), uniform_value(rng.randrange(64)))
                    assert bytes(mv) == before

    run_threads(8, work)


# ---------------------------------------------------------------------------- mixed operations


def _value_of(key: str, version: int) -> bytes:
    header = f"{key}|{version}|".encode()
    return header + rand_bytes(random.Random(header).randint(0, 50_000), header)


def _check_versioned(key: str, data: bytes) -> None:
    k, version, _ = data.split(b"|", 2)
    assert k.decode() == key, f"{key} holds {k!r}'s value"
    assert data == _value_of(key, int(version)), f"{key}: bytes of version {int(version)} are wrong"


def test_concurrent_mixed_operations(store_factory):
    store = store_factory(dram="64MiB", ssd=None)
    keys = [f"m{i}" for i in range(16)]

    def work(t: int) -> None:
        rng = random.Random(t)
        buf = bytearray(60_000)
        for step in range(300):
            key = rng.choice(keys)
            op = rng.random()
            if op < 0.3:
                store.put(key, _value_of(key, t * 1000 + step))
            elif op < 0.4:
                store.remove(key)
            elif op < 0.5:
                assert isinstance(store.exists(key), bool)
            elif op < 0.6:
                try:
                    n = store.get_into(key, buf)
                except mooncakefs.KeyNotFound:
                    continue
                _check_versioned(key, bytes(buf[:n]))
            elif op < 0.7:
                batch = rng.sample(keys, 4)
                store.batch_put({k: _value_of(k, t * 1000 + step) for k in batch})
            elif op < 0.8:
                batch = rng.sample(keys, 4)
                for k, v in zip(batch, store.batch_get(batch), strict=True):
                    if v is not None:
                        _check_versioned(k, v)
            elif op < 0.85:
                list(store.keys("m"))
                len(store)
                store.stats()
            else:
                with contextlib.suppress(mooncakefs.KeyNotFound):
                    _check_versioned(key, store.get(key))

    run_threads(8, work)
    present = [k for k in keys if store.exists(k)]
    assert len(store) == len(present) == len(list(store.keys()))
    for k in present:
        _check_versioned(k, store.get(k))


def test_concurrent_if_absent_has_one_winner(store_factory):
    store = store_factory(dram="32MiB", ssd=None)
    keys = [f"race{i}" for i in range(50)]

    def work(t: int) -> list:
        won = []
        for k in keys:
            try:
                store.put(k, f"{k} by {t}".encode(), if_absent=True)
            except mooncakefs.KeyExists:
                continue
            won.append(k)
        return won

    results = run_threads(8, work)
    winners: dict[str, int] = {}
    for t, won in enumerate(results):
        for k in won:
            assert k not in winners, f"{k} was put with if_absent=True by both {winners[k]} and {t}"
            winners[k] = t
    assert set(winners) == set(keys)
    for k, t in winners.items():
        assert store.get(k) == f"{k} by {t}".encode()


def test_concurrent_remove_has_one_winner(store_factory):
    store = store_factory(dram="32MiB", ssd=None)
    keys = [f"rm{i}" for i in range(200)]
    for k in keys:
        store.put(k, b"x")

    def work(t: int) -> int:
        return sum(1 for k in keys if store.remove(k))

    assert sum(run_threads(8, work)) == len(keys)
    assert len(store) == 0


# ------------------------------------------------------------------- small values, the C paths

SMALL = 4096


def small_value(k: int, gen: int) -> bytes:
    """4 KiB that say whose they are: key index and generation, then one byte repeated that both decide."""
    return struct.pack("<II", k, gen) + bytes([(k * 31 + gen) & 0xFF]) * (SMALL - 8)


def check_small(data: bytes | memoryview, k: int, where: str) -> None:
    assert len(data) == SMALL, f"{where}: {len(data)} bytes"
    owner, gen = struct.unpack_from("<II", data)
    assert owner == k, f"{where}: the value of key {owner}"
    fill = bytes([(k * 31 + gen) & 0xFF])
    assert data[8:] == fill * (SMALL - 8), f"{where}: mixed bytes (torn or crossed write)"


def test_threads_hammering_the_same_small_keys(store_factory):
    """8 threads put, get, get_into, remove and batch the same 4 KiB keys, in a store small enough to evict:
    the single-key calls take the store's lock inside one C call, the others in Python, and both must be
    the one lock.  Every read is a whole value of its own key; at the end the index and the pool agree."""
    store = store_factory(dram="1MiB", ssd=None)
    n_keys = 320  # 1.25 MiB of values: eviction runs all along
    keys = [f"small/{k}" for k in range(n_keys)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # thread switches between nearly every bytecode of the Python paths

    def work(t: int) -> int:
        rng = random.Random(t)
        buf, bufs = bytearray(SMALL), [bytearray(SMALL) for _ in range(4)]
        reads = 0
        for step in range(1500):
            k = rng.randrange(16) if rng.random() < 0.7 else rng.randrange(n_keys)  # mostly the hot ones
            key, op = keys[k], rng.randrange(8)
            try:
                if op == 0:
                    store.put(key, small_value(k, step))
                elif op == 1:  # the general put path, on the same keys (and an expiring value now and then)
                    store.put(key, small_value(k, step), ttl=0.01 if step % 50 == 0 else None, tag=1)
                elif op == 2:
                    check_small(store.get(key), k, f"get {key}")
                    reads += 1
                elif op == 3:
                    assert store.get_into(key, buf) == SMALL
                    check_small(buf, k, f"get_into {key}")
                    reads += 1
                elif op == 4:
                    store.remove(key)
                elif op == 5:
                    ks = [rng.randrange(n_keys) for _ in range(4)]
                    store.batch_put([(keys[j], small_value(j, step)) for j in ks])
                elif op == 6:
                    ks = [rng.randrange(16) for _ in range(4)]
                    for j, r, b in zip(ks, store.batch_get_into([keys[j] for j in ks], bufs), bufs, strict=True):
                        if isinstance(r, int):
                            check_small(b, j, f"batch_get_into {keys[j]}")
                            reads += 1
                        else:
                            assert isinstance(r, mooncakefs.KeyNotFound), r
                else:
                    with store.view(key) as mv:
                        check_small(mv, k, f"view {key}")
                        reads += 1
            except mooncakefs.KeyNotFound:
                pass
        return reads

    try:
        assert sum(run_threads(8, work)) > 0
    finally:
        sys.setswitchinterval(switch)
    time.sleep(0.05)  # every value put with ttl=0.01 has expired: the reads below drop them all
    present = 0
    for k, key in enumerate(keys):
        try:
            check_small(store.get(key), k, f"final get {key}")
            present += 1
        except mooncakefs.KeyNotFound:
            pass
    stats = store.stats()["dram"]
    assert len(store) == present == stats["objects"]
    assert stats["used"] == present * SMALL  # no block leaked or shared
    assert stats["evictions"] > 0


@pytest.mark.parametrize("call", ["put", "get", "get_into", "batch_put", "batch_get_into"])
def test_small_calls_wait_for_the_store_lock(store_factory, call):
    """The single-key calls take the store's lock inside C: it must be the lock every other path takes.
    While the test holds it, a call from another thread waits (however long it is given), then ends."""
    store = store_factory(dram="1MiB", ssd=None)
    store.put("k", small_value(1, 0))
    calls = {
        "put": lambda: store.put("k", small_value(1, 1)),
        "get": lambda: store.get("k"),
        "get_into": lambda: store.get_into("k", bytearray(SMALL)),
        "batch_put": lambda: store.batch_put([("k", small_value(1, 2))]),
        "batch_get_into": lambda: store.batch_get_into(["k"], [bytearray(SMALL)]),
    }
    done = threading.Event()

    def run() -> None:
        calls[call]()
        done.set()

    thread = threading.Thread(target=run)
    with store._lock:
        thread.start()
        assert not done.wait(0.3), f"{call} ran while another thread held the store's lock"
    assert done.wait(60), f"{call} never ended once the lock was free"
    thread.join()
    check_small(store.get("k"), 1, "after")


def _locks() -> list:
    """The store's lock (``_engine.StoreLock``: PlainPath takes it in C) and threading.Lock, which it
    must behave as (and which is its pure-Python twin)."""
    from mooncakefs import _engine

    return [_engine.StoreLock, threading.Lock]


@pytest.mark.parametrize("make_lock", _locks(), ids=lambda make: make.__name__)
def test_store_lock_answers_as_a_threading_lock(make_lock):
    """acquire (blocking, non-blocking, with a timeout), release, locked, the context manager, the
    argument errors, and a Condition on it, as threading.Lock answers them."""
    lock = make_lock()
    assert not lock.locked()
    assert lock.acquire() is True
    assert lock.locked()
    assert lock.acquire(False) is False
    assert lock.acquire(blocking=False) is False
    assert lock.acquire(timeout=0.01) is False  # held by this thread: not reentrant
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        lock.release()
    with lock as entered:
        assert entered is True
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(ValueError, match="can't specify a timeout for a non-blocking call"):
        lock.acquire(False, 1)
    with pytest.raises(ValueError, match="timeout value must be"):  # threading.Lock says "positive" on 3.11
        lock.acquire(timeout=-2)
    with pytest.raises(OverflowError):
        lock.acquire(timeout=threading.TIMEOUT_MAX * 2)
    assert not lock.locked()
    condition, woken = threading.Condition(lock), []

    def waiter() -> None:
        with condition:
            woken.append(condition.wait_for(lambda: bool(woken) or None, timeout=60))

    thread = threading.Thread(target=waiter)
    thread.start()
    with condition:
        woken.append("go")
        condition.notify_all()
    thread.join(60)
    assert woken == ["go", True]
    assert not lock.locked()


@pytest.mark.parametrize("make_lock", _locks(), ids=lambda make: make.__name__)
def test_store_lock_lets_one_thread_in_at_a_time(make_lock):
    """Threads that yield the GIL while they hold it (as the store's general paths do, copying or
    writing to SSD) never overlap, and any thread may give it back (threading.Lock allows that)."""
    lock, inside, overlaps, total = make_lock(), [0], [0], [0]

    def work(i: int) -> None:
        for _ in range(300):
            with lock:
                inside[0] += 1
                if inside[0] != 1:
                    overlaps[0] += 1
                time.sleep(0)  # let another thread run while the lock is held
                total[0] += 1
                inside[0] -= 1

    run_threads(THREADS, work)
    assert (overlaps[0], total[0]) == (0, THREADS * 300)
    lock.acquire()
    other = threading.Thread(target=lock.release)
    other.start()
    other.join(60)
    assert not lock.locked()


def test_store_lock_wait_runs_signal_handlers():
    """A thread waiting for the store's lock still runs signal handlers: Ctrl-C stops a wait as it stops
    one for a threading.Lock (the semaphore wait is interrupted, the handler runs, its exception rises)."""
    import signal

    from mooncakefs import _engine

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers run in the main thread only")
    lock = _engine.StoreLock()
    lock.acquire()
    releaser = threading.Timer(60, lock.release)  # a hang guard only: the alarm comes long before
    releaser.start()

    def on_alarm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("alarm")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt, match="alarm"):
            lock.acquire()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        releaser.cancel()
    assert lock.locked()  # still the first holder's
    lock.release()


LISTS_RESIZED = r"""
import sys, threading, time
import mooncakefs

store = mooncakefs.open(sys.argv[1], dram="8MiB", ssd=None)
keys = [f"k{i}" for i in range(8)]
for key in keys:
    store.put(key, b"v" * 64)
for i in range(20000):
    store.put(f"x{i}", b"x")
buffers = [bytearray(64) for _ in keys]
items = [(key, b"w" * 64) for key in keys]
out = {}
calls = {
    "batch_get_into": lambda: store.batch_get_into(keys, buffers),
    "batch_put": lambda: store.batch_put(items),
}
with store._lock:
    thread = threading.Thread(target=lambda: out.update(r=calls[sys.argv[2]]()))
    thread.start()
    time.sleep(0.3)  # most likely waiting for the lock by now; either way the answer below holds
    keys.extend(f"x{i}" for i in range(20000))  # grown: read on past the end of the results
    buffers.extend(bytearray(64) for _ in range(20000))
    items.clear()  # shrunk: read on through freed memory
thread.join()
results = out["r"]
assert len(results) in (0, 8, 20008), len(results)
print("ok", len(results))
"""


@pytest.mark.parametrize("call", ["batch_get_into", "batch_put"])
def test_a_batch_whose_lists_grow_while_it_waits_for_the_lock(tmp_path, call):
    """The C batch loops index the lists unchecked: they must work on their own copies, since another
    thread may resize the caller's lists while the call waits for the store's lock with the GIL
    released (before, a grown key list wrote past the end of the results, a shrunk item list was read
    from freed memory: a crash or a corrupt heap)."""
    proc = run_python(LISTS_RESIZED, str(tmp_path / "store"), call, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), (proc.returncode, proc.stderr[-2000:])


# ------------------------------------------------------------------------------ close under load

CLOSE_UNDER_LOAD = r"""
import random, sys, threading
import mooncakefs

store = mooncakefs.open(sys.argv[1], dram="32MiB", ssd="64MiB", segment_size="4MiB")
for i in range(32):
    store.put(f"k{i}", bytes([i]) * 500_000)
started = threading.Barrier(9)
bad = []

def work(t):
    rng = random.Random(t)
    started.wait()
    buf = bytearray(500_000)
    try:
        while True:
            i = rng.randrange(32)
            op = rng.randrange(4)
            try:
                if op == 0:
                    store.put(f"k{i}", bytes([i]) * 500_000)
                elif op == 1:
                    v = store.get(f"k{i}")
                    if v != bytes([i]) * 500_000:
                        bad.append(f"get k{i} wrong bytes")
                elif op == 2:
                    store.get_into(f"k{i}", buf)
                else:
                    with store.view(f"k{i}") as mv:
                        if mv[0] != i:
                            bad.append(f"view k{i} wrong bytes")
            except mooncakefs.KeyNotFound:
                pass
    except mooncakefs.StoreClosed:
        return
    except BaseException as exc:
        bad.append(repr(exc))

threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
for t in threads:
    t.start()
started.wait()
import time
time.sleep(0.3)
store.close()
for t in threads:
    t.join(60)
print("ALIVE" if not any(t.is_alive() for t in threads) else "HUNG", flush=True)
print("BAD", bad[:5], flush=True)
"""


def test_close_while_threads_are_working(tmp_path):
    """Closing under load: each op succeeds or raises StoreClosed; no crash, no hang (in a subprocess)."""
    proc = run_python(CLOSE_UNDER_LOAD, str(tmp_path / "db"), timeout=120)
    assert proc.returncode == 0, f"child died (rc {proc.returncode}): {proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "ALIVE", "threads still running after close()"
    assert lines[1] == "BAD []", lines[1]


def test_keys_iteration_while_other_threads_modify(store_factory):
    store = store_factory(dram="32MiB", ssd=None)
    for i in range(500):
        store.put(f"it{i}", b"x")
    stop = threading.Event()

    def mutate(t: int) -> None:
        rng = random.Random(t)
        while not stop.is_set():
            i = rng.randrange(1000)
            if rng.random() < 0.5:
                store.put(f"it{i}", b"y")
            else:
                store.remove(f"it{i}")

    with ThreadPoolExecutor(max_workers=3) as pool:
        futs = [pool.submit(mutate, t) for t in range(2)]
        try:
            for _ in range(20):
                seen = []
                for key in store.keys("it"):
                    seen.append(key)
                    store.exists(key)
                assert len(seen) == len(set(seen)), "keys() yielded a key twice"
                assert all(isinstance(k, (str, bytes)) for k in seen)
        finally:
            stop.set()
        for f in futs:
            f.result()


def test_ssd_reads_during_segment_reclamation(store_factory):
    """Readers of SSD values while another thread churns the SSD tier (segments emptied and deleted)."""
    store = store_factory(dram="2MiB", ssd="16MiB", segment_size="2MiB", promote_after=1000)
    stable = {f"stable{i}": rand_bytes(300_000, ("s", i)) for i in range(6)}
    for k, v in stable.items():
        store.put(k, v, durable=True)
    done = threading.Event()

    def churn() -> None:
        try:
            live = []
            for i in range(80):
                key = f"churn{i}"
                store.put(key, rand_bytes(MiB, key), durable=True)
                live.append(key)
                if len(live) > 4:
                    store.remove(live.pop(0))
        finally:
            done.set()

    def read(r: int) -> int:
        rng = random.Random(r)
        buf = bytearray(300_000)
        n_reads = 0
        while not done.is_set() or n_reads == 0:
            key = rng.choice(list(stable))
            try:
                if r % 3 == 0:
                    assert store.get(key) == stable[key], key
                elif r % 3 == 1:
                    assert store.get_into(key, buf) == 300_000
                    assert buf == stable[key], key
                else:
                    with store.view(key) as mv:
                        assert bytes(mv) == stable[key], key
            except mooncakefs.KeyNotFound:
                pass  # a full SSD tier may evict; what is read must never be wrong
            n_reads += 1
        return n_reads

    with ThreadPoolExecutor(max_workers=4) as pool:
        churner = pool.submit(churn)
        readers = [pool.submit(read, r) for r in range(3)]
        churner.result()
        assert all(f.result() > 0 for f in readers)
