"""The benchmarks' shared harness (tools/bench/_common.py): every benchmark's numbers rest on its op runners,
checks, medians and metrics parser, so they are tested once here rather than trusted in each benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))

from _common import (
    KVWorkload,
    format_size,
    format_table,
    glibc_copy_note,
    in_turn,
    measure,
    median,
    message_slots,
    parse_metrics,
    parse_size,
    peer,
    prefaulted,
    stream_copy_reference,
    stream_reference,
)

import mooncakefs

OPS = ("put", "get", "get_into", "view", "batch_put", "batch_get", "batch_get_into")


@pytest.mark.parametrize("op", OPS)
def test_every_op_runs_and_checks_against_an_embedded_store(tmp_path: Path, op: str) -> None:
    src, dst = prefaulted(64 * 4096), prefaulted(8 * 4096)
    w = KVWorkload.carve("t", 4096, 64, 8, src, dst)
    with mooncakefs.open(tmp_path / "s", dram="16MiB", ssd=0) as store:
        for key, value in zip(w.keys, w.values, strict=True):
            store.put(key, value)
        run, period, per_call = w.runner(store, op, strict=True)
        assert (period, per_call) == ((8, 8) if op.startswith("batch") else (64, 1))
        assert measure(run, period=period, reps=2, rep_seconds=0.001)[0] > 0
        w.check(store, op)


def test_check_catches_a_wrong_value(tmp_path: Path) -> None:
    w = KVWorkload.carve("t", 4096, 2, 1, prefaulted(2 * 4096), prefaulted(4096))
    with mooncakefs.open(tmp_path / "s", dram="16MiB", ssd=0) as store:
        store.put(w.keys[0], w.values[1])
        with pytest.raises(AssertionError, match="wrong result"):
            w.check(store, "get")


def test_median_skips_what_was_not_measured() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None]) is None


@pytest.mark.parametrize("text", ["4096", "4KiB", "4k", "64KB", "1MiB", "1.5M", "2G", " 16 MiB "])
def test_parse_size_reads_binary_units_and_what_format_size_writes(text: str) -> None:
    expected = {"4096": 4096, "4KiB": 4096, "4k": 4096, "64KB": 65536, "1MiB": 1 << 20, "1.5M": 3 << 19}
    expected |= {"2G": 2 << 30, " 16 MiB ": 16 << 20}
    n = parse_size(text)
    assert n == expected[text]
    assert parse_size(format_size(n)) == n


def test_parse_metrics_reads_names_labels_and_values() -> None:
    text = '# HELP x y\ngrpc_server_handled_total{grpc_method="Range",grpc_service="etcdserverpb.KV"} 12\nup 1\n'
    samples = parse_metrics(text)
    assert [(s.name, s.labels, s.value) for s in samples] == [
        ("grpc_server_handled_total", {"grpc_method": "Range", "grpc_service": "etcdserverpb.KV"}, 12.0),
        ("up", {}, 1.0),
    ]


def test_format_table_aligns_numbers_right() -> None:
    assert format_table(["op", "n"], [["get", "1"], ["put", "100"]], [False, True]).splitlines()[2] == "get    1"


def test_the_streaming_copy_reference_copies_each_batch_and_counts_its_bytes() -> None:
    """copy nt / memcpy nt: ``per_call`` blocks a call, every block landing in the destination beside it;
    one op is worth one call's bytes."""
    src, dst = prefaulted(4 * 8192), prefaulted(4 * 8192)
    src[:] = np.arange(src.size, dtype=np.uint64).astype(np.uint8)
    blocks = [slice(i * 8192, (i + 1) * 8192) for i in range(4)]
    ref = stream_copy_reference("nt", [src[b] for b in blocks], [dst[b] for b in blocks], per_call=2)
    assert (ref.period, ref.scale) == (2, 2 * 8192 / 1e9)
    ref.run(1, 2)  # the second call, then the first again (the list is walked twice over)
    assert np.array_equal(dst, src)


def test_in_turn_runs_each_reference_once_in_order_and_the_note_names_both_thresholds() -> None:
    seen: list[str] = []
    in_turn(lambda: seen.append("copy"), lambda: seen.append("copy nt"))()
    assert seen == ["copy", "copy nt"]
    note = glibc_copy_note()
    assert "glibc memcpy (numpy copy) from" in note and "mooncakefs copy_at from 4MiB" in note


def test_message_slots_rotate_through_distinct_memory() -> None:
    """A reference moving a store's values goes through as much memory as they fill, one slot per value,
    none overlapping; with no spread it reuses one buffer."""
    slots = message_slots(4096, 5 * 4096 + 100)
    assert [len(s) for s in slots] == [4096] * 5
    for i, slot in enumerate(slots):
        slot[:] = bytes([i + 1]) * 4096
    assert [bytes(s[:1]) for s in slots] == [bytes([i + 1]) for i in range(5)]
    assert len(message_slots(4096, 0)) == 1 and len(message_slots(4096, 4096)) == 1


@pytest.mark.parametrize(("mode", "inbound", "requested"), [("sink", False, False), ("serve", True, True)])
def test_a_spread_reference_runs_against_its_peer_process(
    tmp_path: Path, mode: str, inbound: bool, requested: bool
) -> None:
    """The peer process takes the spread too: a put reference's sink and a get reference's server rotate
    through it, and the reference still measures."""
    with peer(mode, "tcp", 64 << 10, tmp_path, spread=4 << 20) as conn:
        ref = stream_reference("r", conn, 64 << 10, inbound=inbound, requested=requested, spread=4 << 20)
        ref.run(0, 70)  # past the 64 slots: the rotation wraps
        assert ref.rep(0.01) > 0


def test_vram_bench_writes_its_json_under_bench_results_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README says every benchmark writes JSON under bench-results/; vram_bench wrote none without --json.
    The GPU check is stubbed out so this runs the same with or without a GPU."""
    import vram_bench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vram_bench, "gpu_unavailable", lambda device: "no CUDA device: stubbed by the test")
    assert vram_bench.main([]) == 0
    written = tmp_path / "bench-results" / "vram_bench.json"
    assert "stubbed by the test" in written.read_text()
