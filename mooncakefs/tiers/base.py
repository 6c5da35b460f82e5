"""What a storage tier is to the store: the ``Tier`` protocol, the order of the tiers, and what a tier
may ask of the store that places values in it (``Placement``).

A value's record is one ``_engine.Entry`` in the store's index; each tier keeps its own location fields
in it (VRAM: ``vram``, DRAM: ``dram``/``dram_off``, SSD: ``seg``/``seg_off``) and its own
eviction order over the entries it holds.  The store decides where a value goes and moves it between tiers (``Store`` in
store.py); a tier keeps bytes, its space accounting, and which of its values should leave first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from mooncakefs._engine import Entry

TIER_ORDER = ("vram", "dram", "ssd")  # fastest first: values are placed, promoted and demoted in this order


class Tier(Protocol):
    """One level of the store: a pool with a capacity, and an eviction order over what it holds.

    ``allocate`` finds room for an entry's value (evicting by the tier's own policy if it must) and
    returns False when none can be made: the store then tries the next tier, or raises OutOfSpace.
    ``write`` fills that room (and records where, in the entry); ``free`` gives its room back.  A read
    is leased, so that the copy itself runs without the store's lock: ``lease`` (lock held) holds what
    the read needs, ``read_value`` copies the value out (lock not needed), ``end_lease`` (lock held)
    lets go.  It is the one way a tier's values are read.  ``victims`` lists the values that may leave,
    first to go first.  Tiers are not thread-safe: the store serialises calls under its lock."""

    name: str

    @property
    def capacity(self) -> int: ...

    @property
    def used(self) -> int: ...

    def allocate(self, raw: bytes, entry: Entry) -> bool: ...

    def write(self, raw: bytes, entry: Entry, data: Any) -> None: ...

    def lease(self, entry: Entry) -> Any:
        """Hold the entry's place until ``end_lease``, even if it is freed meanwhile (lock held)."""
        ...

    def read_value(self, entry: Entry, dst: Any, lease: Any) -> Any:
        """Copy the value into writable ``dst`` (returns its length) or, with ``dst`` None, into new
        bytes (returned)."""
        ...

    def end_lease(self, lease: Any) -> None: ...

    def free(self, raw: bytes, entry: Entry) -> None: ...

    def victims(self) -> Iterator[tuple[bytes, Entry]]: ...

    def close(self) -> None: ...


class Placement(Protocol):
    """What a tier asks of the store when one of its values must leave: the store owns the index, the
    shared index (node mode) and the tiers below."""

    def demote(self, raw: bytes, entry: Entry, earned: bool) -> bool:
        """Give ``entry`` a copy in a tier below, if it has none and may have one (``earned``: it was
        read since put, or must be kept); False once the tiers below are full."""
        ...

    def demote_vram(self, raw: bytes, entry: Entry) -> bool:
        """A VRAM value with no copy below leaves the GPU: give it one in DRAM (or SSD); False when no
        tier below can take it (it is then dropped)."""
        ...

    def drop(self, raw: bytes, entry: Entry) -> None:
        """Its last copy leaves: take the entry out of the store."""
        ...

    def lost(self, raw: bytes, entry: Entry) -> None:
        """A tier below evicted its only copy (it holds no block above): it leaves the store."""
        ...

    def withdraw(self, raw: bytes) -> None:
        """It leaves DRAM: readers of the shared index must stop finding it there."""
        ...

    def read_since(self, raw: bytes, entry: Entry) -> bool:
        """Whether readers of the shared index read it since eviction last looked (a second chance)."""
        ...
