"""Keeping the heap a batch frees (``mooncakefs.heap``): the thresholds it picks, and, in a process of
its own, that glibc keeps a dropped batch's memory for the next one rather than handing it back."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import MiB, child_env
from heap_probe import HAS_MALLINFO2, heap_after_batch

from mooncakefs.heap import KEEP_MIN, TRIM_FLOOR, trim_threshold_for

has_mallinfo2 = pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc 2.33+ (mallinfo2) to see the heap")


def test_a_batch_below_the_floor_is_left_to_glibc():
    assert trim_threshold_for(KEEP_MIN - 1, 0, 1 << 30) == 0
    assert trim_threshold_for(0, 0, 1 << 30) == 0


def test_a_batch_keeps_twice_its_size_and_never_less_than_glibcs_own_ceiling():
    assert trim_threshold_for(KEEP_MIN, 0, 1 << 30) == TRIM_FLOOR
    assert trim_threshold_for(256 * MiB, 0, 1 << 30) == 512 * MiB


def test_the_threshold_stops_at_the_most_kept_and_only_goes_up():
    assert trim_threshold_for(4096 * MiB, 0, 1 << 30) == 1 << 30
    assert trim_threshold_for(4096 * MiB, 1 << 30, 1 << 30) == 0  # already there
    assert trim_threshold_for(16 * MiB, 512 * MiB, 1 << 30) == 0  # a smaller batch lowers nothing
    assert trim_threshold_for(300 * MiB, 512 * MiB, 1 << 30) == 600 * MiB


def test_most_kept_zero_turns_it_off():
    assert trim_threshold_for(256 * MiB, 0, 0) == 0


@has_mallinfo2
def test_a_dropped_batch_stays_in_the_heap_for_the_next(tmp_path):
    kept = heap_after_batch("embedded", str(tmp_path / "kv"))
    assert kept["at_open"] == kept["kept"] == TRIM_FLOOR  # a store keeps values of up to 32 MiB from its open
    assert kept["free"] >= 16 * MiB  # the 16 values' memory, free but not given back


@has_mallinfo2
def test_without_it_glibc_hands_a_dropped_batch_back(tmp_path):
    """What the module is for: with it off, the same batch's memory goes back to the kernel."""
    gone = heap_after_batch("embedded", str(tmp_path / "kv"), MOONCAKEFS_HEAP_KEEP="0")
    assert gone["kept"] == gone["at_open"] == 0
    assert gone["free"] < 8 * MiB


def test_a_bad_most_kept_is_refused_at_import():
    out = subprocess.run(
        [sys.executable, "-c", "import mooncakefs"],
        env={**child_env(), "MOONCAKEFS_HEAP_KEEP": "lots"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "MOONCAKEFS_HEAP_KEEP='lots'" in out.stderr
