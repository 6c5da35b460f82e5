"""The ``mooncakefs`` command."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

import mooncakefs
from mooncakefs.api import MAX_SECONDS
from mooncakefs.errors import MooncakeError, exit_code_of
from mooncakefs.progress import on_terminal, progress
from mooncakefs.units import format_size, parse_size, parse_ssd, parse_vram

REPLAY_WATERMARK = 0.9
DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "synthetic_trace.jsonl"


class Failed(click.ClickException):
    """A command failed for a reason mooncakefs expects (a node or etcd away, a locked data dir, bad
    input): "Error: <message>" on one line, no traceback, and the exit status of the errors table
    (``mooncakefs.errors.ERRORS``) so scripts can tell "retry later" from "fix the input"."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exit_code = exit_code_of(exc)


class _Main(click.Group):
    """The command group: a ``MooncakeError`` that a command lets escape still ends as ``Failed``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MooncakeError as exc:
            raise Failed(exc) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(mooncakefs.__version__, prog_name="mooncakefs")
def main() -> None:
    """mooncakefs: tiered DRAM + SSD KVCache storage with a zero-copy Python API.

    Start with `mooncakefs demo`, or in Python: `mooncakefs.open("./kv", dram="2GiB", ssd="20GiB")`.
    """


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value, what=param.name or "size")
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from None


class Seconds(click.FloatRange):
    """A number of seconds above ``min`` (or at least it, with ``min_open=False``), finite and below
    ``api.MAX_SECONDS``, the bound every timeout of the API has: click's FloatRange lets NaN through (it
    compares false with every bound), and a socket timeout beyond what the kernel's clock counts is an
    OverflowError."""

    name = "seconds"

    def __init__(self, min: float = 0.0, min_open: bool = True) -> None:
        super().__init__(min=min, max=MAX_SECONDS, min_open=min_open, max_open=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


def _block_size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """A KV block's size: at least one byte (0-byte blocks replay as hits that move nothing)."""
    size = _size(ctx, param, value)
    if size < 1:
        raise click.BadParameter("a block is at least 1 byte, like 64KiB")
    return size


DATA_DIR_HELP = "Data dir (default: $MOONCAKEFS_DATA, else $XDG_DATA_HOME/mooncakefs, else ~/.local/share/mooncakefs)."


def _data_option(help_text: str = DATA_DIR_HELP) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The --data option of every command that opens a data dir (``help_text``: where it defaults to)."""
    return click.option("--data", type=click.Path(file_okay=False, path_type=Path), help=help_text)


def _dram_option(default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The --dram option of every command that opens a store."""
    return click.option("--dram", default=default, show_default=True, callback=_size, help="DRAM pool size.")


#: The --cluster option of every command that finds a cluster in etcd.
_cluster_option = click.option("--cluster", default="default", show_default=True, help="Cluster name in etcd.")


def _synthetic_requests(limit: int, seed: int = 7) -> Iterator[list[int]]:
    """Requests shaped like Mooncake's traces: conversations whose turns extend a shared prefix, a
    few system prompts shared by many, popularity skewed toward recent conversations."""
    rng = random.Random(seed)
    next_block = 0
    conversations: list[list[int]] = []
    system_prompts = [list(range(i * 8, i * 8 + 8)) for i in range(4)]
    next_block = 32
    for _ in range(limit):
        if conversations and rng.random() < 0.6:
            chain = conversations[min(int(rng.expovariate(0.1)), len(conversations) - 1)]
        else:
            chain = list(rng.choice(system_prompts))
            conversations.insert(0, chain)
        grow = rng.randint(1, 12)
        chain.extend(range(next_block, next_block + grow))
        next_block += grow
        yield list(chain)


@main.command()
@_data_option("Data dir to use (default: a temporary dir, deleted afterwards).")
@_dram_option("256MiB")
@click.option("--ssd", default="1GiB", show_default=True, callback=_size, help="SSD tier size (0: none).")
@click.option(
    "--block-size",
    default="64KiB",
    show_default=True,
    callback=_block_size,
    help="Bytes per KV block (one block is 512 tokens of KV cache).",
)
@click.option(
    "--trace",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A Mooncake-format JSONL trace (one request a line, with hash_ids). "
    "Default: the shared trace if present, else a synthetic workload.",
)
@click.option("--requests", "limit", default=4000, show_default=True, help="Requests to replay.")
def demo(data: Path | None, dram: int, ssd: int, block_size: int, trace: Path | None, limit: int) -> None:
    """Replay a prefix-caching workload against an embedded store.

    Each request is a chain of KV-block keys.  Like an inference engine's connector, the demo asks
    `match_prefix` how much of the chain is cached, loads those blocks with `batch_get_into`, checks
    what it loaded, and stores the blocks it had to "compute" with `batch_put` (`mooncakefs replay`
    does the same, sized to the trace, and scores it against LRU and Belady)."""
    from mooncakefs import replay as rp

    if trace is None and DEFAULT_TRACE.exists():
        trace = DEFAULT_TRACE
    try:
        requests = rp.load_trace(trace, limit) if trace else list(_synthetic_requests(limit))
    except rp.TraceError as exc:
        raise click.ClickException(str(exc)) from None
    tmp = None if data else tempfile.mkdtemp(prefix="mooncakefs-demo-")
    source = f"trace {trace}" if trace else "synthetic workload"
    click.echo(
        f"replaying {len(requests)} requests ({source}), {format_size(block_size)} blocks, "
        f"dram {format_size(dram)}, ssd {format_size(ssd) if ssd else 'none'}"
    )
    try:
        with mooncakefs.open(data or tmp, dram=dram, ssd=ssd or None) as store:
            with progress(len(requests), "requests") as advance:
                hit, elapsed, wrong = rp.replay_store(store, requests, block_size, advance=advance)
            stats = store.stats()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if wrong:
        raise click.ClickException(f"{wrong} blocks came back with the wrong bytes")
    looked_up = sum(map(len, requests))
    click.echo(
        f"\n{looked_up} block lookups, {hit} served from the cache "
        f"({100 * hit / max(looked_up, 1):.1f}% hit rate), {len(requests) / elapsed:.0f} requests/s, "
        f"{hit * block_size / elapsed / 1e9:.2f} GB/s loaded"
    )
    _echo_tiers(stats)


def _fraction(name: str, value: float) -> float:
    if not 0 < value <= 1:
        raise click.BadParameter(f"must be a fraction above 0 and at most 1 (e.g. 0.05), got {value}", param_hint=name)
    return value


@main.command()
@click.argument("trace", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--node",
    "node_url",
    default=None,
    help="Replay through a node (unix:///…/node.sock or tcp://host:port) instead of an embedded "
    "store; the node's --dram and --ssd are its own, so --capacity then sizes only LRU and "
    "Belady.",
)
@click.option(
    "--capacity",
    default=0.05,
    show_default=True,
    type=float,
    help="Store capacity as a fraction of the trace's unique blocks (0.05: 5%).",
)
@click.option(
    "--dram-share",
    default=0.33,
    show_default=True,
    type=float,
    help="Fraction of the capacity in DRAM, the rest on SSD (1: DRAM alone).",
)
@click.option("--block-size", default="64KiB", show_default=True, callback=_block_size, help="Bytes per KV block.")
@_data_option("Data dir of the embedded store (default: a temporary dir, deleted afterwards).")
@click.option("--requests", "limit", default=None, type=click.IntRange(min=1), help="Replay only the first N requests.")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the results as JSON here."
)
def replay(
    trace: Path | None,
    node_url: str | None,
    capacity: float,
    dram_share: float,
    block_size: int,
    data: Path | None,
    limit: int | None,
    json_path: Path | None,
) -> None:
    """Replay a KV-cache trace (Mooncake JSON lines with hash_ids) and compare hits with LRU and Belady.

    TRACE defaults to the shared synthetic trace.  Each request asks match_prefix how much of its
    block chain is cached, loads that with batch_get_into and stores the rest with batch_put; its hits
    are the leading blocks it loaded.  LRU and Belady (the offline optimum) are computed on the same
    requests with the same capacity in blocks."""
    from mooncakefs import replay as rp

    capacity = _fraction("--capacity", capacity)
    dram_share = _fraction("--dram-share", dram_share)
    if json_path is not None and not os.access(json_path.parent, os.W_OK):  # known now, not after the replay
        raise click.BadParameter(f"cannot write into {json_path.parent}", param_hint="--json")
    if trace is None:
        if not DEFAULT_TRACE.exists():
            raise click.UsageError(f"no TRACE given, and the default trace {DEFAULT_TRACE} is not there")
        trace = DEFAULT_TRACE
    try:
        requests = rp.load_trace(trace, limit)
    except rp.TraceError as exc:
        raise click.ClickException(str(exc)) from None
    unique = len({b for chain in requests for b in chain})
    blocks = int(capacity * unique)
    if blocks < 1:
        raise click.BadParameter(
            f"{capacity} of the trace's {unique} unique blocks is less than one block", param_hint="--capacity"
        )
    dram_blocks = max(1, round(blocks * dram_share))
    ssd_blocks = blocks - dram_blocks
    refs = sum(map(len, requests))
    if node_url:
        where = f"node {node_url}"
    else:
        where = f"embedded: dram {dram_blocks} blocks ({format_size(dram_blocks * block_size)}), ssd " + (
            f"{ssd_blocks} blocks ({format_size(ssd_blocks * block_size)})" if ssd_blocks else "none"
        )
    click.echo(
        f"replaying {trace}: {len(requests)} requests, {refs} block refs, {unique} unique blocks; "
        f"capacity {capacity:g} = {blocks} blocks of {format_size(block_size)}; {where}"
    )
    tmp = None
    try:
        if node_url:
            store = mooncakefs.connect(node_url)
            prefix = f"replay-{os.getpid()}-{time.time_ns()}/"
        else:
            tmp = None if data else tempfile.mkdtemp(prefix="mooncakefs-replay-")
            # The tiers hold exactly the capacity in live values, as LRU and Belady do: both watermarks
            # at REPLAY_WATERMARK of pools that much larger (+128 bytes: the DRAM pool rounds down to 64).
            # The SSD files' room above it is for garbage (over-provisioning, as flash caches do), so a
            # full tier evicts rather than compacts.
            w = REPLAY_WATERMARK
            store = mooncakefs.open(
                data or tmp,
                dram=math.ceil(dram_blocks * block_size / w) + 128,
                ssd=math.ceil(ssd_blocks * block_size / w) + 128 if ssd_blocks else None,
                high_watermark=w,
                low_watermark=w,
                segment_size=16 * block_size,
                promote_after=1,
                prefault=True,
            )
            store.wait_prefault()
            prefix = "blk/"
        with store, progress(len(requests), "requests") as advance:
            hits, seconds, wrong = rp.replay_store(store, requests, block_size, key_prefix=prefix, advance=advance)
            stats = store.stats()
            if node_url:
                store.remove_prefix(prefix)
    except mooncakefs.MooncakeError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result = rp.ReplayResult(
        len(requests),
        refs,
        unique,
        blocks,
        hits,
        rp.lru_hits(requests, blocks),
        rp.belady_hits(requests, blocks),
        seconds,
        wrong,
        rp.copy_ceiling(requests, hits, blocks, block_size),
    )
    out = result.as_json()
    out.update(
        trace=str(trace),
        capacity=capacity,
        dram_share=dram_share,
        block_size=block_size,
        dram_blocks=dram_blocks,
        ssd_blocks=ssd_blocks,
        store="node" if node_url else "embedded",
        stats=stats,
    )
    gap = out["gap_closed"]
    _echo_table(
        [
            ("", "hit ratio"),
            ("mooncakefs", f"{out['hit_ratio']:.3f}"),
            ("LRU", f"{out['lru_hit_ratio']:.3f}"),
            ("Belady", f"{out['belady_hit_ratio']:.3f}"),
        ]
    )
    click.echo(
        f"gap LRU->Belady closed: {'n/a' if gap is None else f'{gap:.0%}'}; "
        f"{out['block_refs_per_s']:,.0f} block refs/s ({seconds:.2f} s); the same copies alone "
        f"(numpy): {out['copy_ceiling_block_refs_per_s']:,.0f} block refs/s"
    )
    if json_path:
        try:
            json_path.write_text(json.dumps(out, indent=2) + "\n")
        except OSError as exc:
            raise click.ClickException(f"cannot write the results to {json_path}: {exc.strerror or exc}") from None
    if wrong:
        raise click.ClickException(f"{wrong} blocks came back with the wrong bytes")


@main.command()
@click.argument("source", metavar="[SOURCE]")
@click.argument("mountpoint", required=False, metavar="MOUNTPOINT", type=click.Path(file_okay=False, path_type=Path))
@_data_option()
@_dram_option("1GiB")
@click.option(
    "--ssd",
    default="16GiB",
    show_default=True,
    help="SSD tier: SIZE in the data dir, PATH:SIZE elsewhere, or a raw block device (/dev/nvme1n1[:SIZE], "
    "formatted with --format-ssd if it holds anything).  0 for none: then the "
    "filesystem lives in memory only and starts empty at every mount.",
)
@click.option(
    "--format-ssd",
    is_flag=True,
    help="As the node's: let --ssd /dev/... format a device that holds a filesystem, a partition table "
    "or another store, erasing it (an empty one is formatted anyway).  Give it once, not at every mount.",
)
@click.option(
    "--chunk-size",
    default="4MiB",
    show_default=True,
    callback=_size,
    help="Bytes per chunk object of file data, 4KiB to 1GiB (fixed when the filesystem is created).",
)
@click.option("--background", is_flag=True, help="Return once mounted; the daemon logs to <data>/mount.log.")
@click.option("--allow-other", is_flag=True, help="Let users other than the mounter use the mount.")
@click.option("--debug", is_flag=True, help="Log every FUSE request.")
@click.option(
    "--node",
    default=None,
    help="Keep file data in a node's pool (unix:///…/node.sock or tcp://host:port) instead of a pool "
    "of the mount's own; --dram and --ssd are then the node's business, and --data holds only "
    "the namespace.",
)
@click.option(
    "--replicas",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="With a cluster SOURCE: copies of each file chunk, on different nodes.",
)
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), hidden=True)
def mount(
    source: str,
    mountpoint: Path | None,
    data: Path | None,
    dram: int,
    ssd: str,
    format_ssd: bool,
    chunk_size: int,
    background: bool,
    allow_other: bool,
    debug: bool,
    node: str | None,
    replicas: int,
    log_file: Path | None,
) -> None:
    """Mount the store as a filesystem at MOUNTPOINT.

    SOURCE is a data dir (as --data), a node (unix://PATH or tcp://HOST:PORT, as --node), or a cluster:
    etcd://HOST:PORT/NAME (several etcd members: etcd://H1:P1,H2:P2/NAME).  A cluster keeps file data on
    its nodes (--replicas copies of each chunk) and the namespace in its etcd, so that the mounts of one
    cluster on any number of hosts see one tree: a file written and closed on one host is seen whole by
    an open on another (close-to-open consistency), and of two hosts creating one name at once exactly
    one succeeds.

    Runs until the filesystem is unmounted (umount MOUNTPOINT, fusermount3 -u MOUNTPOINT) or the daemon
    gets SIGINT/SIGTERM; either way, everything written and closed is flushed to the SSD tier first.
    The KV API's objects appear read-only under MOUNTPOINT/.kv/, live statistics in
    MOUNTPOINT/.mooncakefs/stats.json.  A mount left behind by a killed daemon is cleared first."""
    from mooncakefs.datadir import default_path
    from mooncakefs.fuse import mount as fuse_mount

    cluster = None
    if mountpoint is None:  # one argument: the mountpoint
        if "://" in source:
            raise click.UsageError(f"missing the MOUNTPOINT to mount {source} at")
        mountpoint = Path(source)
    elif source.startswith("etcd://"):
        from mooncakefs.cluster.client import parse_cluster_url

        try:
            parse_cluster_url(source)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="SOURCE") from None
        cluster = source
    elif source.startswith(("unix://", "tcp://")):
        if node:
            raise click.UsageError("give the node as SOURCE or as --node, not both")
        node = source
    else:
        if data:
            raise click.UsageError("give the data dir as SOURCE or as --data, not both")
        data = Path(source)
    try:
        parse_ssd(ssd)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--ssd") from None
    if format_ssd and (node or cluster):
        raise click.UsageError("--format-ssd is for a mount's own SSD tier: a node's or a cluster's is theirs")
    if background:
        args = [
            *([cluster] if cluster else []),
            str(mountpoint),
            "--dram",
            str(dram),
            "--ssd",
            ssd,
            "--chunk-size",
            str(chunk_size),
            "--replicas",
            str(replicas),
        ]
        args += ["--data", str(data)] if data else []
        args += ["--format-ssd"] if format_ssd else []
        args += ["--allow-other"] if allow_other else []
        args += ["--debug"] if debug else []
        args += ["--node", node] if node else []
        raise SystemExit(fuse_mount.serve_in_background(args, (data or default_path()) / "mount.log"))
    _configure_logging(debug, log_file)

    def announce(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()
        if log_file:  # the parent stops reading now: send what follows to the log
            fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)

    try:
        fuse_mount.serve(
            mountpoint,
            data=data,
            dram=dram,
            ssd=ssd,
            ssd_format=format_ssd,
            chunk_size=chunk_size,
            debug=debug,
            allow_other=allow_other,
            announce=announce,
            node=node,
            cluster=cluster,
            replicas=replicas,
        )
    except mooncakefs.MooncakeError as exc:
        raise Failed(exc) from None


MIN_SECRET_BYTES = 16


def _read_secret(secret_file: Path | None) -> bytes:
    """The cluster secret from --secret-file or $MOONCAKEFS_SECRET, stripped; b"" for none.  A short
    one is refused: it is all that keeps other hosts out."""
    raw = secret_file.read_bytes() if secret_file else os.environ.get("MOONCAKEFS_SECRET", "").encode()
    secret = raw.strip()
    if raw and len(secret) < MIN_SECRET_BYTES:
        where = f"--secret-file {secret_file}" if secret_file else "MOONCAKEFS_SECRET"
        raise click.BadParameter(
            f"the cluster secret in {where} is {len(secret)} bytes after stripping "
            f"whitespace; use at least {MIN_SECRET_BYTES} random bytes "
            "(e.g. `head -c 32 /dev/urandom | base64`)",
            param_hint="secret",
        )
    return secret


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def _address(text: str, what: str) -> tuple[str, int] | None:
    """HOST:PORT (IPv6 as [::1]:PORT), or None for "none"/"off"."""
    if text.lower() in ("none", "off", ""):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT or 'none', got {text!r}", param_hint=what)
    if int(port) > 65535:  # bind() would take it modulo 65536 (99999: 34463), or raise OverflowError
        raise click.BadParameter(f"port {port} is not a TCP port (0 to 65535; 0: any free one)", param_hint=what)
    return host.strip("[]") or "127.0.0.1", int(port)


def _socket_mode(text: str) -> int:
    """--socket-mode: permission bits in octal, 0000 to 0777."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise click.BadParameter(
            f"expected octal permission bits like 0600 or 0660, got {text!r}", param_hint="--socket-mode"
        )
    return mode


def _socket_group(name: str | None) -> int | None:
    """--socket-group: a group name or number, as its gid (None: leave the socket's group as it is)."""
    if name is None or name.isdigit():
        return None if name is None else int(name)
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise click.BadParameter(f"no group {name!r} on this host", param_hint="--socket-group") from None


@main.command()
@_data_option()
@_dram_option("1GiB")
@click.option(
    "--ssd",
    default="0",
    show_default=True,
    help="SSD tier: SIZE in the data dir, PATH:SIZE in a directory elsewhere, or a raw block device "
    "(/dev/nvme1n1, all of it, or /dev/nvme1n1:SIZE: no filesystem, O_DIRECT; see docs/nvme-of.md); 0 for none.",
)
@click.option(
    "--vram",
    default="0",
    show_default=True,
    help="VRAM tier: DEVICE:SIZE (GPU number and pool size, e.g. 0:16GiB), SIZE for GPU 0, 0 for none.  "
    "Needs pip install 'mooncakefs[cuda]' and an NVIDIA GPU.",
)
@click.option(
    "--gpu-verify",
    type=click.Choice(["first", "always", "never"]),
    default="first",
    show_default=True,
    help="Which SSD -> GPU reads through cuFile are checked against the value's CRC-32C (a copy back to the "
    "host): the first of each value since the node started, every one, or none.",
)
@click.option(
    "--format-ssd",
    is_flag=True,
    help="Let --ssd /dev/... format a device that holds a filesystem, a partition table or another "
    "store, erasing it (without this such a device is refused; an empty one is formatted anyway).",
)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket for clients on this host [default: $MOONCAKEFS_SOCKET, "
    "/run/mooncakefs/node.sock as root, else $XDG_RUNTIME_DIR/mooncakefs/node.sock].",
)
@click.option(
    "--socket-mode",
    default="0600",
    show_default=True,
    help="Permissions of the Unix socket (0660 with --socket-group to share it with a group).",
)
@click.option("--socket-group", default=None, help="Group owning the Unix socket.")
@click.option(
    "--listen",
    default="127.0.0.1:7480",
    show_default=True,
    help="TCP address for clients on other hosts, or 'none'.  Listening beyond loopback "
    "without --secret-file is refused.",
)
@click.option(
    "--secret-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the cluster secret TCP clients must prove they know [default: $MOONCAKEFS_SECRET].",
)
@click.option(
    "--metrics",
    default="127.0.0.1:7481",
    show_default=True,
    help="Address of the Prometheus /metrics endpoint, or 'none'.  Beyond loopback only with "
    "--metrics-public (metrics name no keys, but show usage and traffic).",
)
@click.option("--metrics-public", is_flag=True, help="Allow --metrics on an address other hosts can reach.")
@click.option(
    "--idle-timeout",
    default=600.0,
    show_default=True,
    type=Seconds(),
    help="Seconds a client connection may sit idle before the node closes it (clients reconnect).",
)
@click.option(
    "--io-timeout",
    default=30.0,
    show_default=True,
    type=Seconds(),
    help="Seconds the node waits on a client that stopped sending a request's bytes or taking its "
    "reply, or left a put unfinished; its connection or reserved room is then reclaimed.",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option(
    "--prefault/--no-prefault",
    default=True,
    show_default=True,
    help="Back the whole DRAM pool with memory at start (in the background).",
)
@click.option(
    "--etcd",
    "etcd_url",
    default=None,
    help="Join a cluster: register this node in etcd (http://host:2379) under a lease.",
)
@_cluster_option
@click.option(
    "--lease-ttl",
    default=10,
    show_default=True,
    type=click.IntRange(2, 300),
    help="Seconds after which a dead node leaves the cluster (and a node cut off from etcd "
    "stops taking writes after 2/3 of it).",
)
def node(
    data: Path | None,
    dram: int,
    ssd: str,
    vram: str,
    gpu_verify: str,
    format_ssd: bool,
    socket_path: Path | None,
    socket_mode: str,
    socket_group: str | None,
    listen: str,
    secret_file: Path | None,
    metrics: str,
    metrics_public: bool,
    idle_timeout: float,
    io_timeout: float,
    log_format: str,
    prefault: bool,
    etcd_url: str | None,
    cluster: str,
    lease_ttl: int,
) -> None:
    """Run the node daemon: own this host's DRAM and SSD pools and serve them to every process.

    Clients on this host connect with mooncakefs.connect("unix://SOCKET") and move data by memcpy
    through the shared pool; others with mooncakefs.connect("tcp://HOST:PORT").  Stops cleanly on
    SIGTERM or SIGINT: puts acknowledged as durable are on disk, unfinished ones are discarded."""
    import logging
    import signal

    from mooncakefs.logs import log_to
    from mooncakefs.node import Node
    from mooncakefs.node.metrics import serve_metrics
    from mooncakefs.serving import Timeouts
    from mooncakefs.sockets import default_socket

    log_to(logging.StreamHandler(), json_lines=log_format == "json")
    try:
        ssd_size, ssd_dir = parse_ssd(ssd)
        gpu = parse_vram(vram)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from None
    mode, group = _socket_mode(socket_mode), _socket_group(socket_group)
    tcp = _address(listen, "--listen")
    metrics_at = _address(metrics, "--metrics")
    secret = _read_secret(secret_file)
    if tcp and not _loopback(tcp[0]) and not secret:
        raise click.UsageError(
            f"--listen {listen} reaches beyond this host: give the node a --secret-file "
            "(or MOONCAKEFS_SECRET) so only cluster members get in"
        )
    if metrics_at and not _loopback(metrics_at[0]) and not metrics_public:
        raise click.UsageError(
            f"--metrics {metrics} reaches beyond this host: add --metrics-public to mean it "
            "(anyone who can reach it reads usage and traffic counters)"
        )
    try:
        store = mooncakefs.open(
            data,
            dram=dram,
            ssd=ssd_size,
            ssd_dir=ssd_dir,
            ssd_format=format_ssd,
            prefault=prefault,
            vram=gpu[1] if gpu else None,
            device=gpu[0] if gpu else 0,
            gpu_verify=gpu_verify,
        )
    except mooncakefs.MooncakeError as exc:
        raise Failed(exc) from None
    default_path, chosen = default_socket()
    server = Node(
        store,
        unix_path=socket_path or default_path,
        tcp=tcp,
        secret=secret or None,
        socket_mode=mode,
        socket_group=group,
        socket_chosen=chosen or socket_path is not None,
        timeouts=Timeouts(handshake=min(10.0, io_timeout), idle=idle_timeout, io=io_timeout),
    )
    try:
        server.start()
        if metrics_at:
            host, port = serve_metrics(server, *metrics_at)
            logging.getLogger("mooncakefs.node").info("metrics", extra={"http": f"{host}:{port}"})
    except (OSError, mooncakefs.MooncakeError) as exc:
        server.stop()
        raise Failed(exc) from None
    agent = None
    if etcd_url:
        from mooncakefs.cluster.agent import NodeAgent
        from mooncakefs.cluster.membership import host_id, node_id

        stats = store.stats()
        record = {
            "host": host_id(),
            "pid": os.getpid(),
            "started": time.time(),
            "ttl": lease_ttl,
            "unix": str(server.unix_path),
            "tcp": f"{server.tcp[0]}:{server.tcp[1]}" if server.tcp else None,
            "dram": stats["dram"]["capacity"],
            "ssd": stats.get("ssd", {}).get("capacity", 0),
            "vram": stats.get("vram", {}).get("capacity", 0),
        }
        try:
            agent = NodeAgent(
                store, etcd_url, cluster, node_id(store.path), record, ttl=lease_ttl, secret=secret or None
            )
            server.cluster = agent
            agent.start()
        except (ValueError, mooncakefs.MooncakeError) as exc:
            server.stop()
            raise Failed(exc) from None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.stop).start())
    click.echo(
        f"mooncakefs node ready: unix://{server.unix_path}"
        + (f" tcp://{server.tcp[0]}:{server.tcp[1]}" if server.tcp else ""),
        err=True,
    )
    server.wait()
    if agent is not None:
        agent.stop()  # leave the cluster first: nobody should route to a node that is going
    server.stop()


class _JsonErrorsCommand(click.Command):
    """A command whose ``--json`` covers errors in its own arguments too (a bad --timeout, say)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        as_json = "--json" in args  # read first: parsing consumes the list
        try:
            return super().parse_args(ctx, args)
        except click.ClickException as exc:  # not --help: that is click.exceptions.Exit
            if not as_json:
                raise
            click.echo(json.dumps({"error": exc.format_message()}))
            ctx.exit(exc.exit_code)


@main.command(cls=_JsonErrorsCommand)
@click.option(
    "--etcd",
    "etcd_url",
    default="http://127.0.0.1:2379",
    show_default=True,
    help="etcd endpoint of the cluster to report on.",
)
@_cluster_option
@click.option(
    "--node",
    "node_url",
    default=None,
    help="Report on one node instead: unix:///…/node.sock or tcp://HOST:PORT "
    "(a TCP node's secret from $MOONCAKEFS_SECRET).",
)
@click.option(
    "--mount",
    "mount_path",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Report on a mount on this host instead (reads MOUNT/.mooncakefs/stats.json).",
)
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=Seconds(),
    help="Seconds to wait for the --node or --mount to answer.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print JSON instead of a table; on an error, {"error": "..."} and a non-zero exit status.',
)
@click.pass_context
def status(
    ctx: click.Context,
    etcd_url: str,
    cluster: str,
    node_url: str | None,
    mount_path: Path | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Report on a cluster (the default), one node (--node) or a local mount (--mount).

    A cluster's nodes come from etcd: endpoints, tier capacities, live usage (asked of each node over
    TCP; "-" when it cannot be reached), the placement groups each node is in, and which is controller.
    A node or a mount shows its usage and per-tier counters."""
    try:
        data, render = _status_report(ctx, etcd_url, cluster, node_url, mount_path, timeout)
    except Exception as exc:
        if not as_json:
            raise
        # A script asked for JSON: give it JSON whatever went wrong, and say so in the exit status.
        message = exc.format_message() if isinstance(exc, click.ClickException) else f"{type(exc).__name__}: {exc}"
        click.echo(json.dumps({"error": message}))
        ctx.exit(exc.exit_code if isinstance(exc, click.ClickException) else exit_code_of(exc))
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        render()


def _status_report(
    ctx: click.Context, etcd_url: str, cluster: str, node_url: str | None, mount_path: Path | None, timeout: float
) -> tuple[dict, Callable[[], None]]:
    """The report ``status`` asked for: its JSON form, and a function that prints it as tables."""
    from click.core import ParameterSource

    etcd_given = any(ctx.get_parameter_source(p) is ParameterSource.COMMANDLINE for p in ("etcd_url", "cluster"))
    if sum((etcd_given, node_url is not None, mount_path is not None)) > 1:
        raise click.UsageError("report on one thing: a cluster (--etcd/--cluster), a --node or a --mount")
    if node_url is not None:
        return _node_report(node_url, timeout)
    if mount_path is not None:
        return _mount_report(mount_path, timeout)
    try:
        return _cluster_report(etcd_url, cluster)
    except Failed as exc:
        if not etcd_given and exc.exit_code == exit_code_of(mooncakefs.Unavailable("")):  # no etcd here at all
            from mooncakefs.sockets import default_socket

            exc.message += (
                f"\n(no cluster here? `mooncakefs status --node unix://{default_socket()[0]}` reports on "
                "this host's node, `--mount DIR` on a mount)"
            )
        raise


def _cluster_report(etcd_url: str, cluster: str) -> tuple[dict, Callable[[], None]]:
    from mooncakefs.cluster.membership import list_nodes, uptime
    from mooncakefs.cluster.placement import PlacementMap

    try:
        records, controller, placement = list_nodes(etcd_url, cluster)
    except (ValueError, mooncakefs.MooncakeError) as exc:
        raise Failed(exc) from None
    pmap = PlacementMap.from_json(placement) if placement else None
    for r in records:
        r["stats"] = _node_stats(r.get("tcp"))
        r["groups"] = pmap.groups_of(r["id"]) if pmap else 0
        r["controller"] = r["id"] == controller
    data = {
        "nodes": records,
        "controller": controller,
        "epoch": pmap.epoch if pmap else None,
        "groups": pmap.groups if pmap else None,
        "mapped": sorted(pmap.nodes) if pmap else [],
    }

    def render() -> None:
        rows = [("NODE", "HOST", "TCP", "DRAM used/size", "SSD used/size", "OBJECTS", "GROUPS", "UP")]
        for r in records:
            st = r["stats"] or {}
            health = "" if r["stats"] is not None else " (unreachable)"
            rows.append(
                (
                    r["id"] + (" *" if r["controller"] else ""),
                    r.get("host", "?"),
                    (r.get("tcp") or "-") + health,
                    _usage(r.get("dram"), st.get("dram", {}).get("used")),
                    _usage(r.get("ssd"), st.get("ssd", {}).get("used")),
                    str(st.get("objects", "-")),
                    str(r["groups"]),
                    f"{uptime(r):.0f}s",
                )
            )
        _echo_table(rows)
        click.echo(
            f"{len(records)} node{'s' if len(records) != 1 else ''} in cluster {cluster!r}"
            + (
                f"; placement epoch {pmap.epoch}, {pmap.groups} groups of up to {pmap.width} nodes; * = controller"
                if pmap
                else "; no placement map yet"
            )
        )
        if pmap and pmap.members() != {r["id"] for r in records}:
            click.echo("the placement map is catching up with membership (the controller rewrites it within a second)")

    return data, render


def _node_report(url: str, timeout: float) -> tuple[dict, Callable[[], None]]:
    if not url.startswith(("unix://", "tcp://")):
        raise click.BadParameter(
            f"expected unix:///path/to/node.sock or tcp://HOST:PORT, got {url!r}"
            + ("; for a cluster use --etcd and --cluster" if url.startswith("etcd://") else ""),
            param_hint="--node",
        )
    try:
        with mooncakefs.connect(url, timeout=timeout) as client:
            stats, instance = client.stats(), client.ping()
    except (ValueError, mooncakefs.MooncakeError) as exc:
        raise Failed(exc) from None
    data = {"node": url, "instance": instance, "stats": stats}

    def render() -> None:
        _echo_table([("NODE", "DRAM used/size", "SSD used/size", "OBJECTS"), (url, *_tier_usage(stats))])
        click.echo()
        _echo_tiers(stats)

    return data, render


def _mount_report(mount: Path, timeout: float) -> tuple[dict, Callable[[], None]]:
    """Read the statistics a mount serves as a file (its daemon writes them afresh at each open)."""
    stats_file = mount / ".mooncakefs" / "stats.json"
    outcome: dict[str, Any] = {}

    def read() -> None:
        try:
            outcome["text"] = stats_file.read_bytes()
        except OSError as exc:
            outcome["error"] = exc

    reader = threading.Thread(target=read, name="mooncakefs-status-read", daemon=True)
    reader.start()
    reader.join(timeout)  # a hung daemon must not hang `status` too
    if reader.is_alive():
        raise click.ClickException(f"the mount at {mount} did not answer within {timeout:g} s (its daemon is hung?)")
    error = outcome.get("error")
    if isinstance(error, FileNotFoundError):
        why = "no such directory" if not mount.is_dir() else f"no {stats_file} in it"
        raise click.ClickException(f"{mount} is not the root of a mooncakefs mount: {why}")
    if isinstance(error, OSError):
        if error.errno == errno.ENOTCONN:
            raise click.ClickException(
                f"the mount at {mount} is dead (its daemon is gone): unmount it with "
                f"`umount {mount}` or `fusermount3 -u {mount}`"
            )
        raise click.ClickException(f"cannot read {stats_file}: {error.strerror or error}")
    try:
        stats = json.loads(outcome["text"])
        fs = stats["fs"]
    except (ValueError, KeyError, TypeError):
        raise click.ClickException(f"{stats_file} does not hold mooncakefs statistics") from None
    data = {"mount": str(mount), "stats": stats}

    def render() -> None:
        nodes = stats.get("nodes")  # a cluster mount: its store is the cluster's nodes
        rows = [("MOUNT" if nodes is None else "NODE", "DRAM used/size", "SSD used/size", "OBJECTS")]
        if nodes is None:
            rows.append((str(mount), *_tier_usage(stats)))
        else:
            rows += [(ident, *_tier_usage(st)) for ident, st in sorted(nodes.items())]
        _echo_table(rows)
        click.echo(
            f"{fs['inodes']} inodes, {fs['chunks']} chunks of {format_size(fs['chunk_size'])}, "
            f"{fs['open_files']} open files; mounted {fs['uptime_s']:.0f}s"
            + (f"; cluster placement epoch {stats.get('epoch')}" if nodes is not None else "")
        )
        if nodes is None:
            click.echo()
            _echo_tiers(stats)

    return data, render


@main.command("watch", cls=_JsonErrorsCommand)
@click.argument("path")
@click.option(
    "--etcd", "etcd_url", default="http://127.0.0.1:2379", show_default=True, help="etcd endpoint of the cluster."
)
@_cluster_option
@click.option(
    "--interval",
    default=1.0,
    show_default=True,
    type=Seconds(min=0.05, min_open=False),
    help="Seconds between redraws, at most (a redraw comes when a reader's record changes).",
)
@click.option("--once", is_flag=True, help="Print the state once and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the state once as JSON and exit.")
def watch(path: str, etcd_url: str, cluster: str, interval: float, once: bool, as_json: bool) -> None:
    """Watch a file (or every file under a directory) being copied out of a cluster mount: which hosts
    hold how much of it, and who served whom.

    PATH: a path on a mount of the cluster on this host, or a path inside the cluster's filesystem
    (/models/step-9000); one that exists on this host is taken as a local path, so for the cluster's
    root name a mount's root.  Redrawn live until Ctrl-C; --once or --json: once.  The readers' records
    come from etcd (followed with a watch: nothing is read again while nothing changes), the nodes' bytes
    sent from the nodes (asked over TCP; "-" when one cannot be reached)."""
    from mooncakefs.cluster.etcd import Mirror
    from mooncakefs.cluster.membership import connect_etcd
    from mooncakefs.p2p.report import Distribution, namespace_path

    try:
        inside = namespace_path(path)
        client = connect_etcd(etcd_url)
    except (ValueError, MooncakeError) as exc:
        _fail(exc, as_json)
    with contextlib.closing(client):
        dist = Distribution(client, cluster)
        try:
            view = _DistributionView(dist, inside, etcd_url, cluster)
            if as_json or once:
                records = {kv.key: kv for kv in client.get_prefix(dist.records_prefix)}
                data = view.data(records)
                click.echo(json.dumps(data, indent=2) if as_json else _render_distribution(data))
                return
        except MooncakeError as exc:
            _fail(exc, as_json)
        changed = threading.Event()
        mirror = Mirror(client, dist.records_prefix, on_change=changed.set)
        live = on_terminal(sys.stdout)
        try:
            while True:
                changed.clear()
                text = _render_distribution(view.data(mirror.snapshot()))
                click.echo(("\x1b[H\x1b[2J" if live else "") + text + ("" if live else "\n"))
                time.sleep(interval)
                changed.wait(max(0.0, 10 * interval - interval))  # redraw on a change, or now and then
        except KeyboardInterrupt:
            pass
        finally:
            mirror.close()


def _fail(exc: BaseException, as_json: bool) -> NoReturn:
    """End a command on an expected error: "Error: ..." (or {"error": ...} for --json), its exit status."""
    if as_json:
        click.echo(json.dumps({"error": str(exc)}))
        sys.exit(exit_code_of(exc))
    raise Failed(exc) from None


class _DistributionView:
    """The files being watched (looked up again now and then: a copy may add files) and the nodes'
    counters, around ``Distribution.report``."""

    FILES_EVERY_S = 10.0

    def __init__(self, dist: Any, path: str, etcd_url: str, cluster: str) -> None:
        self.dist, self.path, self.etcd_url, self.cluster = dist, path, etcd_url, cluster
        self.chunk_size = dist.chunk_size()
        self.files = dist.files(path)
        self.files_at = time.monotonic()

    def data(self, records: dict) -> dict[str, Any]:
        from mooncakefs.cluster.membership import list_nodes

        if time.monotonic() - self.files_at > self.FILES_EVERY_S:
            with contextlib.suppress(MooncakeError):
                self.files, self.files_at = self.dist.files(self.path), time.monotonic()
        reports = [r.to_json() for r in self.dist.report(self.files, records, self.chunk_size)]
        involved = {r["node"] for f in reports for r in f["readers"]}
        involved |= {n for f in reports for n in f["served"] if n not in ("replicas", "others")}
        try:
            members = {r["id"]: r for r in list_nodes(self.etcd_url, self.cluster)[0]}
        except MooncakeError:
            members = {}
        nodes = {}
        for ident in sorted(involved):
            stats = _node_stats(members.get(ident, {}).get("tcp"))
            nodes[ident] = None if stats is None else stats.get("traffic")
        hosts = {ident: members[ident].get("host") for ident in sorted(involved) if ident in members}
        return {"path": self.path, "cluster": self.cluster, "files": reports, "nodes": nodes, "hosts": hosts}


def _render_distribution(data: dict[str, Any]) -> str:
    """The text form of ``mooncakefs watch``: a block per file, then the nodes' bytes sent."""
    hosts = data.get("hosts", {})

    def name(ident: str) -> str:
        return f"{ident} ({hosts[ident]})" if hosts.get(ident) else ident

    lines = []
    for f in data["files"]:
        readers = [r for r in f["readers"] if r["current"]]
        done = sum(1 for r in readers if not r["reading"])
        lines.append(
            f"{f['path']}: {format_size(f['size'])} in {f['chunks']} chunks of {format_size(f['chunk_size'])}; "
            f"{len(readers)} reader{'s' if len(readers) != 1 else ''}, {done} done"
        )
        if not readers:
            continue
        rows = [("  NODE (HOST)", "HOLDS", "STATE", "TOOK FROM")]
        for r in readers:
            share = f"{r['chunks']}/{f['chunks']}" + (f" {100 * r['chunks'] // f['chunks']}%" if f["chunks"] else "")
            took = ", ".join(f"{k} {format_size(v)}" for k, v in sorted(r["took_from"].items())) or "-"
            rows.append((f"  {name(r['node'])}", share, "reading" if r["reading"] else "done", took))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        served = ", ".join(f"{k} {format_size(v)}" for k, v in sorted(f["served"].items()))
        lines.append(f"  served: {served or 'nothing yet'}")
    if not data["files"]:
        lines.append(f"{data['path']}: no files")
    if data["nodes"]:
        sent = ", ".join(
            f"{name(ident)} {'-' if t is None else format_size(t['sent'])}"
            for ident, t in sorted(data["nodes"].items())
        )
        lines.append(f"bytes sent by each node since it started: {sent}")
    return "\n".join(lines)


def _usage(size: int | None, used: int | None) -> str:
    """ "used/size" of a tier, "-" for a tier that is not there."""
    if not size:
        return "-"
    return f"{'?' if used is None else format_size(used)}/{format_size(size)}"


def _tier_usage(stats: dict) -> tuple[str, str, str]:
    """The usage columns (DRAM, SSD, objects) of one store's stats()."""
    dram, ssd = stats.get("dram", {}), stats.get("ssd", {})
    return (
        _usage(dram.get("capacity"), dram.get("used")),
        _usage(ssd.get("capacity"), ssd.get("used")),
        str(stats.get("objects", "-")),
    )


def _echo_table(rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns, the first row the heading."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _echo_tiers(stats: dict) -> None:
    """Per tier: capacity, usage and the hit/miss/eviction/promotion counters of a store's stats()."""
    click.echo(
        f"{'tier':<6}{'capacity':>10}{'used':>10}{'objects':>9}{'hits':>9}{'misses':>9}"
        f"{'evictions':>11}{'promotions':>12}"
    )
    for tier in ("vram", "dram", "ssd"):
        if tier in stats:
            t = stats[tier]
            click.echo(
                f"{tier:<6}{format_size(t['capacity']):>10}{format_size(t['used']):>10}{t['objects']:>9}"
                f"{t['hits']:>9}{t['misses']:>9}{t['evictions']:>11}{t['promotions']:>12}"
            )
    if "vram" in stats:
        click.echo(f"vram: GPU {stats['vram']['device']} ({stats['vram']['name']})")
    gds = stats.get("ssd", {}).get("gpudirect")
    if gds:
        checks = f"CRC check: {gds.get('verify')} ({gds.get('checked')} reads checked)"
        click.echo(f"ssd -> vram: {gds['mode']} ({gds['why']}); {checks}")


def _node_stats(tcp: str | None) -> dict | None:
    if not tcp:
        return None
    try:
        with mooncakefs.connect(f"tcp://{tcp}", timeout=2) as client:
            return client.stats()
    except mooncakefs.MooncakeError:
        return None


def _configure_logging(debug: bool, log_file: Path | None) -> None:
    import logging

    if log_file:
        from mooncakefs.datadir import private_dir, private_file

        private_dir(log_file.parent)
        os.close(private_file(log_file, os.O_WRONLY | os.O_APPEND))  # 0600: the log names files and keys
    from mooncakefs.logs import log_to

    log_to(logging.FileHandler(log_file) if log_file else logging.StreamHandler(), debug=debug)


@main.command()
@_data_option()
@click.option(
    "--ssd-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the segments are, if the store was opened with ssd_dir= or a node with --ssd PATH:SIZE "
    "(default: DATA/ssd); a block device (--ssd /dev/...) is given here too.",
)
@click.option(
    "--rebuild",
    is_flag=True,
    help="Move the index aside and rebuild it from the segment journals, whatever the check finds.",
)
def fsck(data: Path | None, ssd_dir: Path | None, rebuild: bool) -> None:
    """Check a store's SSD tier while no process has it open: every index row's value against its
    CRC-32C, and the segment journals against the index.  Exits 1 if anything is wrong; --rebuild
    rebuilds the index from the journals and says what was recovered and what was lost."""
    import logging
    import time as _time

    from mooncakefs.datadir import DataDirLock, default_path
    from mooncakefs.errors import MooncakeError
    from mooncakefs.tiers.segments import is_block_device
    from mooncakefs.tiers.ssd import SsdTier, open_segments
    from mooncakefs.tiers.ssd import fsck as check_tier

    data = (data or default_path()).expanduser()
    if not data.is_dir():
        raise click.ClickException(f"{data} is not a data dir")
    segments, index = ssd_dir or data / "ssd", data / "index.sqlite"
    if not segments.is_dir() and not is_block_device(segments):
        raise click.ClickException(f"{data} has no SSD tier ({segments} does not exist): nothing to check")
    try:
        lock = DataDirLock(data)
    except MooncakeError as exc:
        raise Failed(exc) from None
    try:
        try:  # a device is opened exclusively: a node using it makes this fail, as its data dir lock would
            store = open_segments(segments, None, 1 << 26, writable=False)
        except MooncakeError as exc:
            raise Failed(exc) from None
        try:
            report = check_tier(store, index)
        finally:
            store.close()
        for line in report.lines():
            click.echo(line)
        if not rebuild:
            if not report.ok:
                click.echo(
                    "problems found"
                    + (
                        ""
                        if report.index_error
                        else "; `mooncakefs fsck --rebuild` rebuilds the index from the journals"
                    )
                )
                raise SystemExit(1)
            click.echo("ok")
            return
        quiet = logging.getLogger("mooncakefs.ssd")
        quiet.disabled = True  # the message is printed below, once
        try:
            tier = SsdTier(
                segments,
                None if is_block_device(segments) else 1 << 62,
                segment_size=1 << 26,
                index_path=index,
                rebuild=report.index_error or "asked to be rebuilt (fsck --rebuild)",
            )
            try:
                tier.load(_time.time())
            finally:
                tier.close()
        finally:
            quiet.disabled = False
        assert tier.recovery is not None
        click.echo(tier.recovery.message(index, segments))
    finally:
        lock.release()


@main.command("as-mooncake", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--endpoint",
    metavar="URL",
    help="Point every MooncakeDistributedStore.setup() at this mooncakefs endpoint (host:port, "
    "tcp://, unix:// or etcd://host:port/cluster) whatever master address the program passes.",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def as_mooncake(endpoint: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND (after --) with mooncakefs answering for Mooncake's Python packages.

    `import mooncake.store` / `mooncake.engine` in COMMAND and in every Python process it starts get
    mooncakefs's drop-in (docs/mooncake-compat.md), ahead of any installed Mooncake:

        mooncakefs as-mooncake --endpoint unix:///run/mooncakefs/node.sock -- python -m sglang.launch_server ...
    """
    from mooncakefs.compat import child_environment
    from mooncakefs.compat.store import endpoint_of

    if endpoint:
        try:
            endpoint_of(endpoint)  # a typo shows here, not as -600 from each setup() of the program
        except MooncakeError:
            raise click.BadParameter(
                f"expected HOST:PORT, tcp://…, unix://… or etcd://HOST:PORT/CLUSTER, got {endpoint!r}",
                param_hint="--endpoint",
            ) from None
    env = child_environment(endpoint)
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        raise click.ClickException(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None


@main.command("cp")
@click.argument("sources", metavar="SOURCE...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("dest", metavar="DEST", type=click.Path(path_type=Path))
@click.option("-r", "-R", "--recursive", is_flag=True, help="Copy directories and everything below them.")
@click.option("-v", "--verbose", is_flag=True, help="When done, say how much was copied and how fast.")
def cp(sources: tuple[Path, ...], dest: Path, recursive: bool, verbose: bool) -> None:
    """Copy SOURCE... to DEST, into or out of a mount, with a progress bar on a terminal.

    As cp: when DEST is an existing directory each SOURCE lands inside it, otherwise the one SOURCE is
    copied as DEST.  Modes and modification times are kept, symlinks are copied as links, and data
    moves in 4 MiB blocks (one chunk of a mount per request).  Unattended (stderr not a terminal) it
    prints nothing unless -v."""
    from mooncakefs import copy

    try:
        items = copy.plan(sources, dest, recursive=recursive)
    except copy.CopyError as exc:
        raise click.ClickException(str(exc)) from None
    files = sum(item.kind == "file" for item in items)
    start = time.perf_counter()
    try:
        with progress(sum(item.size for item in items), f"copying {files} files") as advance:
            copied = copy.run(items, advance)
    except OSError as exc:
        raise click.ClickException(f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc)) from None
    if verbose:
        elapsed = max(time.perf_counter() - start, 1e-9)
        click.echo(
            f"copied {files} files, {format_size(copied)} in {elapsed:.1f} s ({format_size(int(copied / elapsed))}/s)",
            err=True,
        )


@main.command("install-mount-helper")
@click.option(
    "--prefix",
    default="/sbin",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where mount(8) looks for mount.<type> helpers.",
)
def install_mount_helper(prefix: Path) -> None:
    """Link PREFIX/mount.mooncakefs to this installation, so `mount -t mooncakefs DATA DIR -o dram=...`
    and /etc/fstab entries work."""
    helper = Path(sys.executable).parent / "mount.mooncakefs"  # not a shim: mount(8) runs it as root
    if not helper.exists():
        helper = Path(shutil.which("mount.mooncakefs") or helper)
    if not helper.exists():
        raise click.ClickException("mount.mooncakefs is not installed next to this Python; reinstall mooncakefs")
    link = prefix / "mount.mooncakefs"
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(helper)
    except OSError as exc:  # no such --prefix, not ours to write (run as root), a read-only /sbin
        raise click.ClickException(f"cannot link {link} -> {helper}: {exc.strerror or exc}") from None
    click.echo(f"{link} -> {helper}")


if __name__ == "__main__":
    main()
