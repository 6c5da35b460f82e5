"""The ``mooncakefs`` command as a user runs it: a real CLI process against real nodes, mounts and etcd.

``status`` reports on a node (``--node``), a mount (``--mount``) or a cluster (``--etcd``), and its
``--json`` is JSON whatever happens.  Progress bars (the demo's replay, a node's repair pass) are drawn
on a terminal only: with stderr on a pty they appear, with stderr in a pipe or log file they do not.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import child_env, wait_until
from node_helpers import EtcdCluster, NodeProcess, free_port

import mooncakefs

needs_etcd = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd is not installed (tools/install-deps.sh installs etcd-server)"
)

BAR = "[#"  # how click draws the filled part of a bar


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``mooncakefs ARGS`` in a fresh interpreter, stdout and stderr captured (so neither is a tty)."""
    return subprocess.run(
        [sys.executable, "-m", "mooncakefs.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or child_env(),
        stdin=subprocess.DEVNULL,
    )


def json_of(out: subprocess.CompletedProcess) -> dict:
    """stdout parsed as one JSON document (failing with what was printed if it is not)."""
    try:
        return json.loads(out.stdout)
    except ValueError:
        pytest.fail(f"not JSON (rc {out.returncode}):\nstdout: {out.stdout!r}\nstderr: {out.stderr!r}")


class Pty:
    """A pseudo-terminal whose far end a child gets as stderr; what it writes is collected here."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)  # a full pty would block the child
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO once every holder of the slave end is gone
                return
            if not data:
                return
            self.chunks.append(data)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def child_started(self) -> None:
        """Close our copy of the slave end: the child holds its own."""
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def close(self) -> None:
        self.child_started()
        self._reader.join(timeout=10)
        os.close(self.master)


# -- status --node ----------------------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path):
    n = NodeProcess(tmp_path, dram="16MiB", ssd="32MiB").start()
    yield n
    n.kill()


def test_status_of_a_node_over_unix_and_tcp(node):
    with mooncakefs.connect(node.unix_url) as client:
        for i in range(7):
            client.put(f"k{i}", b"v" * 1000)
        instance = client.ping()
    for url in (node.unix_url, node.tcp_url):
        out = cli("status", "--node", url, "--json")
        assert out.returncode == 0, out.stderr
        report = json_of(out)
        assert report["node"] == url and report["instance"] == instance
        assert report["stats"]["objects"] == 7
        assert report["stats"]["dram"]["capacity"] == 16 << 20 and report["stats"]["ssd"]["capacity"] == 32 << 20

    out = cli("status", "--node", node.unix_url)
    assert out.returncode == 0, out.stderr
    heading, row = out.stdout.splitlines()[:2]
    assert heading.split() == ["NODE", "DRAM", "used/size", "SSD", "used/size", "OBJECTS"]
    assert row.split()[0] == node.unix_url and row.split()[-1] == "7" and "/16MiB" in row and "/32MiB" in row
    assert any(line.split()[:2] == ["dram", "16MiB"] for line in out.stdout.splitlines())  # the tier counters


def test_status_json_is_json_on_every_error(tmp_path):
    gone = tmp_path / "gone.sock"
    cases = {
        "unreachable node": ("--node", f"unix://{gone}"),
        "refused port": ("--node", f"tcp://127.0.0.1:{free_port()}"),
        "not a node URL": ("--node", "http://127.0.0.1:7480"),
        "a cluster URL as --node": ("--node", "etcd://127.0.0.1:2379/prod"),
        "two things at once": ("--node", f"unix://{gone}", "--mount", str(tmp_path)),
        "not a mount": ("--mount", str(tmp_path)),
        "no such dir": ("--mount", str(tmp_path / "nope")),
        "no etcd": ("--etcd", f"http://127.0.0.1:{free_port()}", "--cluster", "c"),
        "bad option value": ("--timeout", "soon"),
        "unknown option": ("--frobnicate",),
    }
    for case, args in cases.items():
        out = cli("status", *args, "--json")
        assert out.returncode != 0, f"{case}: exit status 0 for an error ({out.stdout!r})"
        report = json_of(out)
        assert list(report) == ["error"] and report["error"], f"{case}: {report}"
    assert "cannot reach the node" in json_of(cli("status", "--node", f"unix://{gone}", "--json"))["error"]
    assert "--etcd and --cluster" in json_of(cli("status", "--node", "etcd://h:1/c", "--json"))["error"]

    out = cli("status", "--node", f"unix://{gone}")  # without --json: a message for a person, on stderr
    assert out.returncode != 0 and out.stdout == "" and "cannot reach the node" in out.stderr


def test_status_without_a_cluster_names_the_node_and_mount_forms():
    """`mooncakefs status` on a host with a node but no etcd used to end at etcd's refusal."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 2379)) == 0:
            pytest.skip("an etcd listens on the default 127.0.0.1:2379 here")
    out = cli("status")
    assert out.returncode == mooncakefs.errors.exit_code_of(mooncakefs.Unavailable(""))
    assert "cannot read the cluster from etcd" in out.stderr
    assert "mooncakefs status --node unix://" in out.stderr and "--mount DIR" in out.stderr


# -- status --mount ---------------------------------------------------------------------------------------


def test_status_of_a_mount(mount_factory, tmp_path):
    m = mount_factory(dram="64MiB", ssd="128MiB", chunk_size="64KiB")
    (m.mnt / "d").mkdir()
    (m.mnt / "d" / "f").write_bytes(os.urandom(200_000))  # 4 chunks of 64 KiB
    out = cli("status", "--mount", str(m.mnt), "--json")
    assert out.returncode == 0, out.stderr
    report = json_of(out)
    assert report["mount"] == str(m.mnt)
    assert report["stats"]["fs"]["inodes"] == 3 and report["stats"]["fs"]["chunks"] == 4  # /, d, f
    assert report["stats"]["dram"]["capacity"] == 64 << 20

    out = cli("status", "--mount", str(m.mnt))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[0] == str(m.mnt)
    assert "3 inodes, 4 chunks of 64KiB" in out.stdout

    out = cli("status", "--mount", str(m.mnt / "d"), "--json")  # a directory inside it is not the mount
    assert out.returncode != 0 and "not the root of a mooncakefs mount" in json_of(out)["error"]

    m.kill9()  # the daemon is gone, the mount left behind answers ENOTCONN
    out = cli("status", "--mount", str(m.mnt), "--json")
    assert out.returncode != 0 and "is dead" in json_of(out)["error"]


# -- status --etcd, and a node's repair progress ----------------------------------------------------------


@pytest.fixture
def etcd():
    cluster = EtcdCluster().start()
    yield cluster
    cluster.close()


class TerminalNode(NodeProcess):
    """A node daemon whose stderr is a terminal (a pty), as when an operator starts it by hand."""

    terminal: Pty | None = None

    def launch(self) -> subprocess.Popen:
        self.terminal = Pty()
        env = child_env()
        env.pop("MOONCAKEFS_SECRET", None)
        self.proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.terminal.slave, env=env
        )
        self.terminal.child_started()
        return self.proc

    def log(self) -> str:
        return self.terminal.text[-8000:] if self.terminal else "(not started)"


def summaries(log: str) -> list[dict]:
    """The repair-pass summary lines of a node's JSON log."""
    out = []
    for line in log.splitlines():  # on a terminal, a bar's "\r" also ends a line
        try:
            record = json.loads(line[line.find("{") :])
        except ValueError:
            continue  # not a log line (a bar), or one cut by the tail of the log
        if isinstance(record, dict) and str(record.get("msg", "")).startswith("repair pass"):
            out.append(record)
    return out


@needs_etcd
def test_repair_shows_a_bar_on_a_terminal_and_logs_a_summary_otherwise(etcd, tmp_path):
    cluster = "cli"
    extra = ("--etcd", etcd.url, "--cluster", cluster, "--lease-ttl", "3")
    on_tty = TerminalNode(tmp_path, name="a", dram="32MiB", extra=extra)
    logged = NodeProcess(tmp_path, name="b", dram="32MiB", extra=extra)
    joiner = NodeProcess(tmp_path, name="c", dram="32MiB", extra=extra)
    nodes = [on_tty, logged, joiner]

    def mapped() -> list[str]:
        out = cli("status", "--etcd", etcd.url, "--cluster", cluster, "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        return json_of(out)["mapped"]

    try:
        on_tty.start()
        logged.start()
        assert wait_until(lambda: len(mapped()) == 2, timeout=60, interval=0.3), "a and b never both in the map"
        with mooncakefs.connect(f"etcd://{etcd.url.replace('http://', '')}/{cluster}") as store:
            for i in range(300):
                store.put(f"k{i}", b"x" * 2000, replicas=2)  # on both a and b
        joiner.start()  # a new map: a and b each push to c its share of what they hold
        assert wait_until(lambda: len(mapped()) == 3, timeout=60, interval=0.3), "c never joined the map"

        assert wait_until(
            lambda: "repair (epoch" in on_tty.terminal.text and BAR in on_tty.terminal.text, timeout=60, interval=0.2
        ), f"no repair bar on a's terminal:\n{on_tty.log()}"
        b_log = logged.log_path.read_text
        assert wait_until(lambda: any(s["checked"] for s in summaries(b_log())), timeout=60, interval=0.2), (
            f"b logged no summary of a repair pass that checked keys:\n{logged.log()}"
        )
        assert "repair (epoch" not in b_log() and "\r" not in b_log(), "a progress bar went into b's log file"
        pushed = lambda: sum(s["pushed"] for s in summaries(b_log()) + summaries(on_tty.terminal.text))  # noqa: E731
        assert wait_until(lambda: pushed() > 0, timeout=60, interval=0.2), "no pass summary counts a push to c"
        stats = json_of(cli("status", "--etcd", etcd.url, "--cluster", cluster, "--json"))  # the etcd form as ever
        assert len(stats["nodes"]) == 3 and sum(n["controller"] for n in stats["nodes"]) == 1
    finally:
        for n in nodes:
            n.kill()
        if on_tty.terminal:
            on_tty.terminal.close()


# -- demo -------------------------------------------------------------------------------------------------

DEMO = ("demo", "--requests", "300", "--dram", "16MiB", "--ssd", "0", "--block-size", "4KiB")


def test_demo_runs_and_draws_its_bar_only_on_a_terminal(tmp_path):
    env = child_env()
    out = cli(*DEMO, "--data", str(tmp_path / "piped"), env=env)
    assert out.returncode == 0, out.stderr
    assert "block lookups" in out.stdout and "hit rate" in out.stdout
    assert out.stderr == "", f"the demo wrote to a piped stderr: {out.stderr!r}"

    terminal = Pty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mooncakefs.cli", *DEMO, "--data", str(tmp_path / "tty")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal.slave,
            env=env,
            text=True,
        )
        terminal.child_started()
        stdout, _ = proc.communicate(timeout=120)
    finally:
        terminal.close()
    assert proc.returncode == 0, terminal.text
    assert "block lookups" in stdout
    assert "requests" in terminal.text and BAR in terminal.text and "300/300" in terminal.text


def test_replay_draws_its_bar_only_on_a_terminal(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"hash_ids": [i % 9, 100 + i % 4]}) + "\n" for i in range(200)))
    args = ("replay", str(trace), "--capacity", "0.5", "--dram-share", "1", "--block-size", "4KiB")
    out = cli(*args)
    assert out.returncode == 0, out.stderr
    assert "Belady" in out.stdout and out.stderr == "", f"replay wrote to a piped stderr: {out.stderr!r}"

    terminal = Pty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mooncakefs.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal.slave,
            env=child_env(),
            text=True,
        )
        terminal.child_started()
        stdout, _ = proc.communicate(timeout=120)
    finally:
        terminal.close()
    assert proc.returncode == 0, terminal.text
    assert "Belady" in stdout
    assert "requests" in terminal.text and BAR in terminal.text and "200/200" in terminal.text


def test_demo_needs_nothing_beyond_the_core_dependencies():
    """`pip install .` must be enough for `mooncakefs demo`: what it imports is a core dependency."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    core = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in pyproject["project"]["dependencies"]}
    assert "numpy" in core


NODE = ("node", "--data", "{tmp}/d", "--socket", "{tmp}/n.sock", "--dram", "8MiB", "--no-prefault")
QUIET = ("--listen", "none", "--metrics", "none")


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        # tracebacks before: ValueError out of the DRAM tier, KeyError out of getgrnam, OverflowError out of
        # bind() and settimeout(), ValueError out of the node's timeouts (NaN passes click's FloatRange),
        # FileNotFoundError out of symlink_to and, after the whole replay, out of writing --json
        ((*NODE, *QUIET, "--dram", "0"), 64, "dram must be at least 64 bytes"),
        ((*NODE, "--listen", "none", "--metrics", "127.0.0.1:70000"), 2, "port 70000 is not a TCP port"),
        ((*NODE, *QUIET, "--socket-group", "no-such-group-here"), 2, "no group 'no-such-group-here'"),
        ((*NODE, *QUIET, "--io-timeout", "nan"), 2, "'nan' is not a number of seconds"),
        (("status", "--node", "unix:///nowhere.sock", "--timeout", "1e308"), 2, "1e+308 is not in the range"),
        (("replay", "--requests", "3", "--json", "{tmp}/no-dir/out.json"), 2, "cannot write into {tmp}/no-dir"),
        (("install-mount-helper", "--prefix", "{tmp}/no-dir"), 1, "cannot link {tmp}/no-dir/mount.mooncakefs"),
        # accepted before, and wrong later: a node on port 34463 (99999 mod 65536), a socket nobody could
        # reach, 0-byte blocks replayed as hits, a program whose every setup() returned -600, and a
        # filesystem whose chunk size of 0 (kept for good) made every write EIO
        ((*NODE, "--metrics", "none", "--listen", "127.0.0.1:99999"), 2, "port 99999 is not a TCP port"),
        ((*NODE, *QUIET, "--socket-mode", "01777"), 2, "expected octal permission bits"),
        (("demo", "--requests", "3", "--block-size", "0"), 2, "a block is at least 1 byte"),
        (("as-mooncake", "--endpoint", "no-port-here", "--", "true"), 2, "Invalid value for --endpoint"),
        # (a mount point that is not there: were the chunk size let through, nothing would be mounted)
        (("mount", "{tmp}/fs", "{tmp}/no-mnt", "--chunk-size", "0", "--ssd", "0"), 64, "chunk size must be from 4KiB"),
    ],
)
def test_bad_input_is_one_clear_line_and_its_exit_status(tmp_path, args, status, message):
    out = cli(*(a.format(tmp=tmp_path) for a in args), timeout=60)
    assert out.returncode == status, out.stderr
    assert message.format(tmp=tmp_path) in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "n.sock").exists() and not (tmp_path / "fs").exists()


def test_a_node_whose_port_is_taken_says_so_and_never_claims_to_listen(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli(
            "node",
            "--data",
            str(tmp_path / "d"),
            "--socket",
            str(tmp_path / "n.sock"),
            "--dram",
            "8MiB",
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics",
            "none",
            "--no-prefault",
        )
    assert out.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "in use" in out.stderr, out.stderr
    assert "listening" not in out.stderr, out.stderr
    assert not (tmp_path / "n.sock").exists(), "the refused node left its socket behind"
