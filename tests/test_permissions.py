"""What a store writes is private to its user whatever the umask: dirs 0700, files 0600.

The index holds every key, size and checksum, so another local user must not read it.  Each test runs
its store in a child with ``umask 0`` (the umask is process-wide: this process keeps its own).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env

import mooncakefs

CHILD = r"""
import json, os, sys
from pathlib import Path
import mooncakefs

os.umask(0)
data, ssd_dir = Path(sys.argv[1]), Path(sys.argv[2])

def modes(*roots):
    found = {}
    for root in roots:
        found[str(root)] = os.stat(root).st_mode & 0o777
        for top, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(top, name)
                found[path] = os.lstat(path).st_mode & 0o777
    return found

report = {}
with mooncakefs.open(data, dram="8MiB", ssd="32MiB", ssd_dir=ssd_dir, segment_size="256KiB") as store:
    for i in range(100):
        store.put(f"k{i}", bytes([i]) * 5000, durable=True)
    for i in range(0, 100, 3):
        store.remove(f"k{i}")
    report["open"] = modes(data, ssd_dir)  # -wal and -shm exist while the store is open
report["closed"] = modes(data, ssd_dir)
if len(sys.argv) > 3:
    from mooncakefs.fuse.namespace import Namespace

    meta = Path(sys.argv[3])
    ns = Namespace(meta / "fs.sqlite", chunk_size=1 << 20)
    ns.db.execute("CREATE TABLE IF NOT EXISTS probe (x)")  # a write: -wal and -shm appear
    report["namespace"] = modes(meta)
    ns.close()
print(json.dumps(report))
"""


def run_child(*paths: Path) -> dict[str, dict[str, int]]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, paths)],
        check=True,
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    ).stdout
    return json.loads(out)


def assert_private(found: dict[str, int]) -> None:
    loose = {path: oct(mode) for path, mode in found.items() if mode != (0o700 if os.path.isdir(path) else 0o600)}
    assert not loose, f"not private (dirs 0700, files 0600): {loose}"


def test_data_dir_ssd_dir_index_segments_and_namespace_are_private_under_umask_0(tmp_path):
    report = run_child(tmp_path / "data", tmp_path / "nvme" / "mc", tmp_path / "meta")
    names = {Path(p).name for p in report["open"]}
    assert {"LOCK", "index.sqlite", "index.sqlite-wal", "index.sqlite-shm"} <= names, names
    assert any(n.endswith(".dat") for n in names) and any(n.endswith(".keys") for n in names), names
    for state in ("open", "closed"):
        assert_private(report[state])
    assert {"fs.sqlite", "fs.sqlite-wal", "fs.sqlite-shm"} <= {Path(p).name for p in report["namespace"]}
    assert_private(report["namespace"])


def test_looser_dirs_and_files_of_ours_are_tightened_on_open(tmp_path):
    data, ssd_dir = tmp_path / "data", tmp_path / "ssd"
    run_child(data, ssd_dir)
    loosened = [data, ssd_dir, *data.iterdir(), *ssd_dir.iterdir()]
    for path in loosened:
        os.chmod(path, 0o777 if path.is_dir() else 0o666)
    report = run_child(data, ssd_dir)
    assert_private(report["open"])
    assert_private(report["closed"])


def test_the_background_mounts_log_is_private_under_umask_0(tmp_path):
    log = tmp_path / "data" / "mount.log"
    code = (
        "import os, sys, logging; from pathlib import Path; os.umask(0); "
        "from mooncakefs.cli import _configure_logging; "
        "_configure_logging(False, Path(sys.argv[1])); logging.getLogger('t').info('hello')"
    )
    subprocess.run([sys.executable, "-c", code, str(log)], check=True, env=child_env(), timeout=60)
    assert "hello" in log.read_text()
    assert_private({str(log.parent): os.stat(log.parent).st_mode & 0o777, str(log): os.stat(log).st_mode & 0o777})


def test_a_cluster_nodes_id_file_is_private_under_umask_0(tmp_path):
    """The node-id file sits in the data dir beside the index; the rule is the same for every file."""
    data = tmp_path / "data"
    code = (
        "import os, sys; from pathlib import Path; os.umask(0); "
        "from mooncakefs.datadir import private_dir; from mooncakefs.cluster.membership import node_id; "
        "data = private_dir(Path(sys.argv[1])); print(node_id(data)); print(node_id(data))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(data)], check=True, capture_output=True, text=True, env=child_env(), timeout=60
    ).stdout.split()
    assert len(out) == 2 and out[0] == out[1], out  # kept: a restarted node is the same member
    path = data / "node-id"
    assert_private({str(path): os.stat(path).st_mode & 0o777})
    os.chmod(path, 0o644)  # as nodes before this rule wrote it
    again = subprocess.run(
        [sys.executable, "-c", code, str(data)], check=True, capture_output=True, text=True, env=child_env(), timeout=60
    ).stdout.split()
    assert again == out
    assert_private({str(path): os.stat(path).st_mode & 0o777})


def test_a_looser_directory_that_is_not_a_stores_is_refused_and_left_as_it_is(tmp_path):
    """`--data "$UNSET"` from a project dir (or --data /home, /tmp, / as root) made that directory 0700,
    locking every other user out of it."""
    project = tmp_path / "project"
    project.mkdir(mode=0o755)
    (project / "main.py").write_text("print('mine')\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    for path, why in ((project, "holds files that are not mooncakefs's (main.py)"), (shared, "every user shares")):
        with pytest.raises(mooncakefs.InvalidArgument, match=re.escape(why)):
            mooncakefs.open(path, dram="4MiB")
    assert os.stat(project).st_mode & 0o7777 == 0o755 and os.listdir(project) == ["main.py"]
    assert os.stat(shared).st_mode & 0o7777 == 0o1777 and os.listdir(shared) == []
    cwd = os.getcwd()
    os.chdir(project)
    try:
        with pytest.raises(mooncakefs.InvalidArgument, match=str(project)):
            mooncakefs.open("", dram="4MiB")  # an empty path is the current directory
    finally:
        os.chdir(cwd)
    fresh_filesystem = tmp_path / "nvme"  # its root, as an SSD dir: lost+found is no reason to refuse
    (fresh_filesystem / "lost+found").mkdir(parents=True)
    fresh_filesystem.chmod(0o755)
    with mooncakefs.open(tmp_path / "data", dram="4MiB", ssd="4MiB", ssd_dir=fresh_filesystem, segment_size="1MiB"):
        pass
    assert os.stat(fresh_filesystem).st_mode & 0o777 == 0o700
