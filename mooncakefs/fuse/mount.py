"""Running a mount: open the store, serve requests until unmounted or signalled, flush, close.

``serve`` runs in the foreground; ``serve_in_background`` starts the same thing in a detached child
and returns once the mount answers (what ``--background`` and ``mount -t mooncakefs`` use).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyfuse3
import trio

import mooncakefs
from mooncakefs.datadir import default_path
from mooncakefs.errors import InvalidArgument, MooncakeError
from mooncakefs.fuse.filesystem import MooncakeFS
from mooncakefs.fuse.namespace import Namespace
from mooncakefs.fuse.tuning import is_stale_mount, mount_device, tune_mount
from mooncakefs.units import format_size, parse_ssd

log = logging.getLogger("mooncakefs.fuse")
DEFAULT_REPLICAS = 2  # copies of each file chunk in a cluster
CHUNK_SIZES = (4 << 10, 1 << 30)  # a chunk is a page at least, and a buffer of it is kept per open file
READY = "mounted"  # the word the foreground daemon prints once the mount answers


def prepare_mountpoint(mountpoint: Path) -> str:
    """The absolute mountpoint, after clearing the stale mount a killed daemon left behind."""
    path = str(mountpoint.absolute())
    if is_stale_mount(path):
        log.warning("%s is a stale mount (its daemon died): unmounting it", path)
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, check=False)
        if is_stale_mount(path):
            subprocess.run(["umount", "-l", path], capture_output=True, check=False)
    elif mount_device(path) is not None and os.path.ismount(path):
        raise MooncakeError(f"{path} is already a mount point")
    if not os.path.exists(path):
        raise MooncakeError(f"mount point {path} does not exist: create it first (mkdir -p {path})")
    if not os.path.isdir(path):
        raise MooncakeError(f"mount point {path} is not a directory")
    return path


def keep_freed_memory() -> None:
    """Have glibc serve large buffers from the heap and keep them after free (the daemon owns its
    process, so it may).  pyfuse3 allocates a fresh bytes object per write request; by default each is
    an mmap/munmap pair, and on these VMs every fresh page costs a host fault (~0.5 GB/s)."""
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)


def serve(
    mountpoint: Path,
    *,
    data: Path | None,
    dram: int,
    ssd: str,
    chunk_size: int,
    ssd_format: bool = False,
    debug: bool = False,
    allow_other: bool = False,
    announce: Callable[[str], None] = print,
    node: str | None = None,
    cluster: str | None = None,
    replicas: int = DEFAULT_REPLICAS,
) -> None:
    """Mount the store at ``mountpoint`` and serve it until it is unmounted or SIGINT/SIGTERM arrives.

    With ``node`` (a node URL) the file data lives in that node's pool, shared with its other clients,
    and only the namespace (``<data>/fs.sqlite``) is kept here.  With ``cluster`` (etcd://host:port/NAME)
    the file data lives on the cluster's nodes, each chunk on ``replicas`` of them, and the namespace in
    its etcd, where every mount of the cluster (on any host) shares it.  ``ssd_format`` lets ``ssd``, a
    block device, be formatted even if it holds something, erasing it (a node's ``--format-ssd``)."""
    low, high = CHUNK_SIZES
    if not low <= chunk_size <= high:  # a new filesystem keeps it: chunks of 0 bytes made every write EIO
        raise InvalidArgument(
            f"chunk size must be from {format_size(low)} to {format_size(high)}, got {format_size(chunk_size)}"
        )
    path = prepare_mountpoint(mountpoint)
    ssd_size, ssd_dir = parse_ssd(ssd)
    keep_freed_memory()
    if cluster is not None:
        _serve(
            path, *_open_cluster(cluster, chunk_size, replicas), debug=debug, allow_other=allow_other, announce=announce
        )
        return
    store: Any
    if node is not None:
        store = mooncakefs.connect(node, prefault_pool=True)  # every file's data moves through its pool
        meta_dir = Path(data or default_path())
        meta_dir.mkdir(parents=True, exist_ok=True)
        fresh = not store.stats().get("ssd")  # the node keeps file data only as long as it has an SSD tier
    else:
        store = mooncakefs.open(data, dram=dram, ssd=ssd_size, ssd_dir=ssd_dir, ssd_format=ssd_format, prefault=True)
        meta_dir, fresh = store.path, not store.stats().get("ssd")  # ssd_size is None for all of a device
    try:
        # Without an SSD tier no file data outlives the process, so neither may the namespace.
        namespace = Namespace(meta_dir / "fs.sqlite", chunk_size=chunk_size, fresh=fresh)
    except BaseException:
        store.close()
        raise
    _serve(path, store, namespace, debug=debug, allow_other=allow_other, announce=announce)


def _open_cluster(url: str, chunk_size: int, replicas: int) -> tuple[Any, Any]:
    """The cluster's store (chunks put on ``replicas`` nodes) and its namespace in etcd."""
    from mooncakefs.cluster.client import ClusterStore
    from mooncakefs.fuse.etcd_namespace import EtcdNamespace

    try:
        # prefault_pool: this host's node's pool is where the mount keeps and reads chunks (mooncakefs.p2p)
        store = ClusterStore(url, replicas=replicas, prefault_pool=True)
    except ValueError as exc:
        raise MooncakeError(str(exc)) from None
    try:
        nodes = len(store.map.nodes)
        if replicas > min(nodes, store.map.width):
            log.warning(
                "replicas=%d but cluster %r has %d node(s) (and places at most %d copies): file chunks get %d",
                replicas,
                store.cluster,
                nodes,
                store.map.width,
                min(nodes, store.map.width),
            )
            store.replicas = max(min(nodes, store.map.width), 1)
        namespace = EtcdNamespace(store.etcd_url, store.cluster, chunk_size=chunk_size)
    except BaseException:
        store.close()
        raise
    return store, namespace


def _serve(
    path: str, store: Any, namespace: Any, *, debug: bool, allow_other: bool, announce: Callable[[str], None]
) -> None:
    """Serve ``namespace`` over ``store`` at ``path``; closes both."""
    try:
        fs = MooncakeFS(store, namespace)
        if getattr(namespace, "shared", False):
            from mooncakefs.p2p.swarm import Swarm

            fs.swarm = Swarm.for_mount(store, namespace)
        if leaked := fs.collect_leaked_chunks():
            log.info("removed %d file chunks stored just before the last mount crashed, never recorded", leaked)
        if orphans := fs.collect_orphans():
            log.info("deleted %d files that were unlinked while open when their last mount ended", orphans)
        fsname = str(store.path).replace(",", "\\,")  # (mount options are comma-separated)
        options = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=mooncakefs", "noatime"}
        if debug:
            options.add("debug")
        if allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(fs, path, options)
        except RuntimeError as exc:  # libfuse says only "fuse_session_mount failed"; fusermount3 said why
            raise MooncakeError(f"cannot mount at {path}: {exc} (the line above says why)") from None
        signalled = False
        try:
            threading.Thread(target=_when_answering, args=(path, store.path, announce), daemon=True).start()
            signalled = trio.run(_serve_until_unmounted, fs)
        finally:
            fs.shutdown()
            pyfuse3.close(unmount=signalled)
    finally:
        namespace.close()
        store.close()


def _when_answering(path: str, data: Path, announce: Callable[[str], None]) -> None:
    """Wait (off the serving thread) until the kernel has done its INIT exchange, then tune and tell."""
    try:
        os.statvfs(path)
    except OSError as exc:
        log.error("the new mount at %s does not answer: %s", path, exc)
        return
    applied = tune_mount(path)
    log.info("tuned %s: %s", path, applied or "nothing (not root?)")
    announce(f"{READY} {data} at {path}")


async def _serve_until_unmounted(fs: MooncakeFS) -> bool:
    """Serve requests; returns True if a signal (rather than an unmount) ended it."""
    signalled = False

    async def watch_signals() -> None:
        nonlocal signalled
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("%s: unmounting", signal.Signals(signum).name)
                signalled = True
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        async with trio.open_nursery() as stores:  # background chunk stores: they finish before we exit
            fs.start_serving(stores)
            try:
                await pyfuse3.main()
            finally:
                fs.stop_serving()
        nursery.cancel_scope.cancel()
    return signalled


def serve_in_background(args: Sequence[str], log_file: Path) -> int:
    """Run ``mooncakefs mount ARGS`` (foreground) as a detached child logging to ``log_file``; return 0
    once it reports the mount ready, or 1 with its output if it exits first."""
    child = subprocess.Popen(
        [sys.executable, "-m", "mooncakefs.cli", "mount", *args, "--log-file", str(log_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert child.stdout is not None
    output = []
    for line in child.stdout:
        output.append(line)
        if line.startswith(READY):
            print(line, end="", flush=True)
            return 0
    child.wait()
    sys.stderr.write("".join(output))
    return child.returncode or 1


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """``mount.mooncakefs SOURCE MOUNTPOINT [-o opts]``: what ``mount -t mooncakefs`` (and fstab) run.

    SOURCE: a data dir, or a cluster (etcd://host:port/NAME: the namespace in its etcd, shared by every
    mount of the cluster), or a node (unix://PATH, tcp://HOST:PORT).  Options: dram=SIZE,
    ssd=SIZE|PATH:SIZE, chunk_size=SIZE, replicas=N (a cluster's copies of each chunk), allow_other,
    debug; the generic mount options (rw, defaults, noauto, user, _netdev, ...) are accepted and ignored."""
    import argparse

    parser = argparse.ArgumentParser(prog="mount.mooncakefs", description=mount_helper.__doc__)
    parser.add_argument("data")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", default="")
    for flag in ("-s", "-f", "-n", "-v"):  # mount(8) may pass these: sloppy, fake, no-mtab, verbose
        parser.add_argument(flag, action="store_true")
    parser.add_argument("-t", dest="type", default="mooncakefs")
    ns = parser.parse_args(argv)
    is_url = "://" in ns.data
    args = [ns.data] if is_url else ["--data", ns.data]
    for option in filter(None, ns.options.split(",")):
        name, _, value = option.partition("=")
        if name in ("dram", "ssd", "chunk_size", "replicas") and value:
            args += [f"--{name.replace('_', '-')}", value]
        elif name in ("allow_other", "debug"):
            args.append(f"--{name.replace('_', '-')}")
    if ns.f:
        return 0
    return serve_in_background([*args, ns.mountpoint], (default_path() if is_url else Path(ns.data)) / "mount.log")
