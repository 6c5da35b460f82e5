"""Sets of chunk numbers as sorted, disjoint ``[start, end)`` pairs.

The form in which a file's chunks are recorded in etcd (the cluster namespace's inodes) and in which a
peer says which chunks it holds (the P2P swarm's records): short for the common case of runs of
consecutive chunks, and plain JSON lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def to_ranges(indexes: Iterable[int]) -> list[list[int]]:
    """The ranges covering exactly ``indexes`` (in any order, repeats allowed)."""
    out: list[list[int]] = []
    for idx in sorted(set(indexes)):
        if out and out[-1][1] == idx:
            out[-1][1] = idx + 1
        else:
            out.append([idx, idx + 1])
    return out


def in_ranges(ranges: list[list[int]], idx: int) -> bool:
    """Whether chunk ``idx`` is in ``ranges``."""
    return any(start <= idx < end for start, end in ranges)


def indexes_in(ranges: list[list[int]]) -> Iterator[int]:
    """Every chunk number in ``ranges``, in order."""
    for start, end in ranges:
        yield from range(start, end)
