"""One writer and four readers on separate hosts (network namespaces, links shaped with tc), each with a
node and a cluster mount: readers copy one file out at once with plain ``cp``, byte-exact at every reader,
while the writer's host sends a fraction of what N readers pulling from the replicas would cost; a reader
that joins late takes the file from the others; a reader's node killed mid-copy costs the others time,
not data.  Bytes are asserted, never times (tests/netns_hosts.py has the set-up).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
from conftest import MiB, rand_bytes, wait_until
from fuse_helpers import require_fuse
from netns_hosts import Testbed, netns_unavailable

pytestmark = [pytest.mark.slow]

READERS = 4
FILE = 32 * MiB + 4097


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    require_fuse()
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    testbed = Testbed(tmp_path_factory.mktemp("p2p-netns"), 1 + READERS, rate="400mbit")
    try:
        yield testbed.start()
    finally:
        for mount in testbed.mounts:
            sys.stderr.write(f"\n{mount.describe()[-3000:]}\n")
        testbed.close()


@pytest.fixture(autouse=True)
def fresh_files(bed):
    """Each test's files are removed after it: the hosts' pools hold the files written (sticky chunks,
    two replicas each) and the copies readers kept, so leftovers of earlier tests would fill them."""
    yield
    for path in bed.mounts[0].mnt.iterdir():
        with contextlib.suppress(OSError):  # a host an earlier test killed may hold a replica: best effort
            path.unlink()


def write(bed: Testbed, name: str, payload: bytes, tmp_path) -> None:
    src = tmp_path / f"{name}.src"
    src.write_bytes(payload)
    subprocess.run(["cp", str(src), str(bed.mounts[0].mnt / name)], check=True, timeout=300)


def copy_all(bed: Testbed, name: str, readers: list[int], tmp_path) -> dict[int, bytes]:
    procs = {k: bed.copy_out(k, name, tmp_path / f"{name}.{k}") for k in readers}
    for k, proc in procs.items():
        assert proc.wait(timeout=300) == 0, f"cp on host {k} failed"
    return {k: (tmp_path / f"{name}.{k}").read_bytes() for k in readers}


def test_a_reader_that_joins_late_takes_the_file_from_the_others(bed, tmp_path):
    payload = rand_bytes(FILE, "late")
    write(bed, "late", payload, tmp_path)
    assert all(v == payload for v in copy_all(bed, "late", [1, 2, 3], tmp_path).values())
    source = bed.sent(0)
    assert copy_all(bed, "late", [4], tmp_path)[4] == payload
    assert bed.sent(0) - source < 0.05 * FILE, "the late reader pulled from the writer's host"


def test_four_readers_at_once_get_every_byte_and_spare_the_source(bed, tmp_path):
    payload = rand_bytes(FILE, "four")
    write(bed, "four", payload, tmp_path)
    source = bed.sent(0)
    received = {k: bed.sent(k) for k in range(1, READERS + 1)}
    copies = copy_all(bed, "four", list(range(1, READERS + 1)), tmp_path)
    for k, data in copies.items():
        assert data == payload, f"reader {k} got different bytes"
    sent = bed.sent(0) - source
    # Replicas sit on every node (readers too), so the writer's host holds ~40% of the chunks: four readers
    # pulling from the replicas would make it send ~1.6x the file; seeds make it ~0.4x.
    assert sent <= 1.0 * FILE, f"the writer's host sent {sent / FILE:.2f}x the file"
    total = sum(bed.sent(k) - received[k] for k in received)
    assert total <= READERS * 1.1 * FILE, f"readers sent {total / FILE:.2f}x the file"


def test_a_holder_that_crawls_is_asked_around_not_waited_for(bed, tmp_path):
    """A reader's node holds the whole file, then sends its answers at a crawl (its packets still flow,
    so no request to it fails or times out: 4 MiB takes ~9 minutes).  The readers that ask it for a chunk
    must not wait for it: once the chunk is overdue they ask a second holder and take the first answer
    (before, a read waited for the crawling one to finish: far past the hang guard)."""
    alive = [k for k in range(1, READERS + 1) if bed.nodes[k].alive]
    crawling, readers = alive[0], alive[1:]
    payload = rand_bytes(FILE, "crawl")
    write(bed, "crawl", payload, tmp_path)
    assert copy_all(bed, "crawl", [crawling], tmp_path)[crawling] == payload  # it holds every chunk now
    bed.crawl_serving(crawling, "64kbit")
    try:
        copies = copy_all(bed, "crawl", readers, tmp_path)
        for k, data in copies.items():
            assert data == payload, f"reader {k} got different bytes"
        asked = [k for k in readers if "asking a second holder" in bed.mounts[k].output]
        assert asked, "no reader asked the crawling holder for anything: the test proved nothing"
    finally:
        bed.restore_serving(crawling)


def test_a_holder_killed_mid_copy_costs_time_not_data(bed, tmp_path):
    payload = rand_bytes(FILE, "kill")
    write(bed, "kill", payload, tmp_path)
    procs = {k: bed.copy_out(k, "kill", tmp_path / f"kill.{k}") for k in range(1, READERS + 1)}
    # once the readers are under way, kill reader 1's node: the chunks it held or seeded must come from others
    assert wait_until(
        lambda: (tmp_path / "kill.2").exists() and (tmp_path / "kill.2").stat().st_size >= 4 * MiB,
        timeout=120,
        interval=0.01,
    )
    bed.nodes[1].kill()
    for k, proc in procs.items():
        assert proc.wait(timeout=300) == 0 or k == 1, f"cp on host {k} failed"
    for k in range(2, READERS + 1):
        assert (tmp_path / f"kill.{k}").read_bytes() == payload, f"reader {k} got different bytes"


def in_map(bed: Testbed, k: int) -> bool:
    """Whether host ``k``'s node is in the cluster's placement map."""
    import mooncakefs

    try:
        with mooncakefs.connect(bed.url, secret=bed.secret, timeout=5) as probe:
            return any(r.get("host") == f"h{k}" for r in probe.map.nodes.values())
    except mooncakefs.MooncakeError:
        return False


def test_a_holder_cut_off_by_a_partition_costs_time_not_data_and_comes_back_harmless(bed, tmp_path):
    """A reader's link goes down mid-copy (its packets are dropped, nothing is refused: the others find
    out by their timeouts), then comes back: the other readers finish byte-exact from the other holders or
    the replicas; its own copy ends one way or the other; and once it is back in the cluster, a new
    version of the file is read byte-exact everywhere, on it too (its copies of the old version are never
    taken for it).  (Host 2 is cut, and a host whose node an earlier test killed does not read.)"""
    cut, watched = 2, 3
    readers = [k for k in range(1, READERS + 1) if bed.nodes[k].alive]
    payload = rand_bytes(FILE, "partition")
    write(bed, "part", payload, tmp_path)
    procs = {k: bed.copy_out(k, "part", tmp_path / f"part.{k}") for k in readers}
    progress = tmp_path / f"part.{watched}"
    try:
        assert wait_until(
            lambda: progress.exists() and progress.stat().st_size >= 4 * MiB,
            timeout=120,
            interval=0.01,
        )
        bed.cut(cut)
        for k in readers:
            if k != cut:
                assert procs[k].wait(timeout=300) == 0, f"cp on host {k} failed while host {cut} was cut off"
                assert (tmp_path / f"part.{k}").read_bytes() == payload, f"reader {k} got different bytes"
    finally:
        bed.restore(cut)
    # back: its own copy ends (done, or failed while it was cut off; never different bytes)
    if procs[cut].wait(timeout=300) == 0:
        assert (tmp_path / f"part.{cut}").read_bytes() == payload
    assert wait_until(lambda: in_map(bed, cut), timeout=180, interval=0.5), f"host {cut} did not rejoin"

    newer = rand_bytes(FILE, "partition, version 2")
    write(bed, "part", newer, tmp_path)
    copies = copy_all(bed, "part", readers, tmp_path)
    for k, data in copies.items():
        assert data == newer, f"reader {k} got different bytes after the partition healed"
