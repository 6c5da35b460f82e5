"""Mooncake's Python ``TransferEngine``: its method names, arguments and return codes over ``Engine``.

Calls return 0 (or an address, a port, a batch id) on success and a negative code on failure, as
Mooncake's binding does; the codes are Mooncake's (``mooncake-transfer-engine/include/error.h``), and
``last_error`` holds the exception behind the last failure, with its message.  Local buffers may be
pointers into registered memory (as in Mooncake) or any bytes-like object.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from mooncakefs.errors import (
    AddressNotRegistered,
    AddressOverlapped,
    AuthenticationError,
    CodeTable,
    InvalidArgument,
    MetadataUnavailable,
    MooncakeError,
    Unavailable,
    code_in,
)
from mooncakefs.transfer.core import READ, WRITE, Batch
from mooncakefs.transfer.engine import Engine
from mooncakefs.transfer.paths import DeviceNotFound, topology

log = logging.getLogger("mooncakefs.transfer")

ERR_INVALID_ARGUMENT = -1
ERR_TOO_MANY_REQUESTS = -2
ERR_ADDRESS_NOT_REGISTERED = -3
ERR_BATCH_BUSY = -4
ERR_DEVICE_NOT_FOUND = -6
ERR_ADDRESS_OVERLAPPED = -7
ERR_SOCKET = -102
ERR_REJECT_HANDSHAKE = -104
ERR_METADATA = -200
ERR_NOT_INITIALIZED = -201  # Mooncake's ERR_ENDPOINT: there is no engine to talk through
ERR_MEMORY = -302


class TransferOpcode(enum.IntEnum):
    """READ moves peer → local, WRITE local → peer (``Read`` / ``Write`` are Mooncake's binding's names)."""

    READ = 0
    WRITE = 1
    Read = 0
    Write = 1


class TransferNotify:
    """A notification riding on a transfer: the target engine gets (name, msg) in ``get_notifies`` once
    the transfer's bytes are in place."""

    def __init__(self, name: str = "", msg: str = "") -> None:
        self.name, self.msg = name, msg

    def __repr__(self) -> str:
        return f"TransferNotify(name={self.name!r}, msg={self.msg!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransferNotify) and (self.name, self.msg) == (other.name, other.msg)

    __hash__ = None  # type: ignore[assignment]  # mutable, as Mooncake's (name and msg are read-write)


#: Each exception's Mooncake transfer engine return code (``code_in``: first match wins).
CODES: CodeTable = (
    (AddressNotRegistered, ERR_ADDRESS_NOT_REGISTERED),
    (AddressOverlapped, ERR_ADDRESS_OVERLAPPED),
    (DeviceNotFound, ERR_DEVICE_NOT_FOUND),
    (AuthenticationError, ERR_REJECT_HANDSHAKE),
    (MetadataUnavailable, ERR_METADATA),  # etcd out of reach, or no such segment in it
    (InvalidArgument | TypeError | ValueError, ERR_INVALID_ARGUMENT),
    (Unavailable | OSError, ERR_SOCKET),
    (MemoryError, ERR_MEMORY),
)


def code_of(exc: BaseException) -> int:
    """The Mooncake return code for an exception (-1, a failed transfer, as Mooncake's binding says it,
    for any other)."""
    return code_in(CODES, exc, -1)


def _opname(opcode: Any) -> str:
    if opcode in (TransferOpcode.READ, "read"):
        return READ
    if opcode in (TransferOpcode.WRITE, "write"):
        return WRITE
    raise InvalidArgument(f"opcode must be TransferOpcode.READ or WRITE, not {opcode!r:.30}")


class TransferEngine:
    """Mooncake's ``mooncake.engine.TransferEngine``, on mooncakefs's engine.  ``get_engine()`` is the
    Pythonic ``Engine`` underneath."""

    TransferOpcode = TransferOpcode

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._batches: dict[int, tuple[Batch, float]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.last_error: BaseException | None = None

    @classmethod
    def wrapping(cls, engine: Engine) -> TransferEngine:
        """Mooncake's API over an ``Engine`` started with options ``initialize`` has no argument for
        (more addresses to serve on, a secret, the lease ttl)."""
        wrapper = cls()
        wrapper._engine = engine
        return wrapper

    # -- plumbing --------------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], Any], failed: int | None = None) -> Any:
        try:
            return fn()
        except (MooncakeError, OSError, ValueError, TypeError, MemoryError) as exc:
            self.last_error = exc
            log.debug("transfer engine call failed: %s", exc)
            return code_of(exc) if failed is None else failed

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise MooncakeError("the transfer engine is not initialized: call initialize() first")
        return self._engine

    # -- set-up ----------------------------------------------------------------------------------------

    def initialize(self, local_hostname: str, metadata_server: str, protocol: str, device_name: str = "") -> int:
        """Start the engine: serve on ``local_hostname`` (``host`` or ``host:port``); 0 or a negative code.

        ``"rdma"`` where no RDMA device (or verbs library) is usable falls back to tcp with one warning,
        as Mooncake does: SGLang's disaggregation asks for "rdma" whatever the host has, and must run.
        ``MC_FORCE_TCP`` (Mooncake's switch) makes any protocol tcp.  ``Engine(protocol="rdma")`` stays
        strict: the Pythonic API has "auto" for "rdma if you can".

        ``metadata_server``: ``P2PHANDSHAKE`` (peers are ``host:port``) or ``etcd://host:2379[/prefix]``
        (this engine's segment, named ``local_hostname``, is published there; peers are segment names)."""

        def start() -> int:
            if self._engine is not None:
                raise InvalidArgument("the transfer engine is initialized already")
            chosen = "tcp" if os.environ.get("MC_FORCE_TCP") and protocol in ("rdma", "auto") else protocol
            try:
                self._engine = Engine(local_hostname, metadata_server, chosen, device_name or "")
            except DeviceNotFound as exc:
                if chosen != "rdma":
                    raise
                log.warning(
                    "transfer engine: protocol 'rdma' asked for, but %s: falling back to tcp (as Mooncake does)",
                    str(exc).removeprefix("protocol 'rdma': "),
                )
                self._engine = Engine(local_hostname, metadata_server, "tcp", device_name or "")
            return 0

        return self._call(start)

    def initialize_ext(
        self, local_hostname: str, metadata_server: str, protocol: str, device_name: str, metadata_type: str
    ) -> int:
        return self.initialize(local_hostname, metadata_server, protocol, device_name)

    def get_engine(self) -> Engine:
        return self.engine

    def get_rpc_port(self) -> int:
        return self._call(lambda: self.engine.rpc_port)

    def get_local_topology(self, device_name: str | None = None) -> str:
        return topology(device_name or "")

    def close(self) -> int:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        return 0

    # -- memory ----------------------------------------------------------------------------------------

    def register_memory(self, buffer_addr: Any, capacity: int | None = None, location: str = "*") -> int:
        """Register a pointer and length, or any buffer (numpy array, bytearray)."""
        return self._call(lambda: self.engine.register(buffer_addr, capacity, location=location) and 0)

    def unregister_memory(self, buffer_addr: int) -> int:
        return self._call(lambda: self.engine.unregister(buffer_addr) or 0)

    def batch_register_memory(
        self, buffer_addresses: Sequence[Any], capacities: Sequence[int], location: str = "*"
    ) -> int:
        def run() -> int:
            if len(buffer_addresses) != len(capacities):
                raise InvalidArgument("batch_register_memory needs as many capacities as addresses")
            done = []
            try:
                for addr, cap in zip(buffer_addresses, capacities, strict=True):
                    done.append(self.engine.register(addr, cap, location=location))
            except BaseException:
                for addr in done:
                    self.engine.unregister(addr)
                raise
            return 0

        return self._call(run)

    def batch_unregister_memory(self, buffer_addresses: Sequence[int]) -> int:
        def run() -> int:
            failed: BaseException | None = None
            for addr in buffer_addresses:
                try:
                    self.engine.unregister(addr)
                except MooncakeError as exc:
                    failed = exc
            if failed is not None:
                raise failed
            return 0

        return self._call(run)

    def allocate_managed_buffer(self, length: int) -> int:
        """A registered buffer the engine owns; its address, or 0 on failure."""
        return self._call(lambda: self.engine.allocate(length), failed=0)

    def free_managed_buffer(self, buffer_addr: int, length: int) -> int:
        return self._call(lambda: self.engine.free(buffer_addr) or 0)

    def get_first_buffer_address(self, segment_name: str) -> int:
        """The first buffer ``segment_name`` (a peer's ``host:port``, or this engine's own) registered
        and still holds; 0 if it has none or cannot be reached (``last_error`` says why)."""
        return self._call(lambda: self.engine.first_buffer(segment_name), failed=0)

    def write_bytes_to_buffer(self, dest_address: int, src_ptr: bytes, length: int) -> int:
        def run() -> int:
            self.engine.view(dest_address, length, write=True)[:] = memoryview(src_ptr)[:length]
            return 0

        return self._call(run)

    def read_bytes_from_buffer(self, source_address: int, length: int) -> bytes:
        result = self._call(lambda: bytes(self.engine.view(source_address, length)))
        return result if isinstance(result, bytes) else b""

    # -- transfers -------------------------------------------------------------------------------------

    def transfer_sync_write(
        self, target_hostname: str, buffer: Any, peer_buffer_address: int, length: int, transport_hint: str = ""
    ) -> int:
        return self.transfer_sync(target_hostname, buffer, peer_buffer_address, length, TransferOpcode.WRITE)

    def transfer_sync_read(
        self, target_hostname: str, buffer: Any, peer_buffer_address: int, length: int, transport_hint: str = ""
    ) -> int:
        return self.transfer_sync(target_hostname, buffer, peer_buffer_address, length, TransferOpcode.READ)

    def transfer_sync(
        self,
        target_hostname: str,
        buffer: Any,
        peer_buffer_address: int,
        length: int,
        opcode: Any,
        notify: TransferNotify | None = None,
        transport_hint: str = "",
    ) -> int:
        return self.batch_transfer_sync(target_hostname, [buffer], [peer_buffer_address], [length], opcode, notify)

    def batch_transfer_sync_write(
        self,
        target_hostname: str,
        buffers: Sequence[Any],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        transport_hint: str = "",
    ) -> int:
        return self.batch_transfer_sync(target_hostname, buffers, peer_buffer_addresses, lengths, TransferOpcode.WRITE)

    def batch_transfer_sync_read(
        self,
        target_hostname: str,
        buffers: Sequence[Any],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        transport_hint: str = "",
    ) -> int:
        return self.batch_transfer_sync(target_hostname, buffers, peer_buffer_addresses, lengths, TransferOpcode.READ)

    def batch_transfer_sync(
        self,
        target_hostname: str,
        buffers: Sequence[Any],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        opcode: Any,
        notify: TransferNotify | None = None,
        transport_hint: str = "",
    ) -> int:
        def run() -> int:
            message = None
            if notify is not None:
                if not isinstance(notify, TransferNotify):
                    raise InvalidArgument(f"notify must be a TransferNotify, not {type(notify).__name__}")
                message = (notify.name, notify.msg)
            self.engine.transfer(
                target_hostname, _opname(opcode), buffers, peer_buffer_addresses, lengths, notify=message
            )
            return 0

        return self._call(run)

    def batch_transfer_async_write(
        self,
        target_hostname: str,
        buffers: Sequence[Any],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        transport_hint: str = "",
    ) -> int:
        return self.batch_transfer_async(target_hostname, buffers, peer_buffer_addresses, lengths, TransferOpcode.WRITE)

    def batch_transfer_async_read(
        self,
        target_hostname: str,
        buffers: Sequence[Any],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        transport_hint: str = "",
    ) -> int:
        return self.batch_transfer_async(target_hostname, buffers, peer_buffer_addresses, lengths, TransferOpcode.READ)

    def batch_transfer_async(
        self,
        target_hostname: str,
        buffers: Sequence[Any],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        opcode: Any,
        transport_hint: str = "",
    ) -> int:
        """Start a batch; its id (for ``get_batch_transfer_status``), or 0 if it could not start."""

        def run() -> int:
            batch = self.engine.submit(target_hostname, _opname(opcode), buffers, peer_buffer_addresses, lengths)
            deadline = time.monotonic() + self.engine.timeout_for(batch)
            with self._lock:
                batch_id = next(self._ids)
                self._batches[batch_id] = (batch, deadline)
            return batch_id

        return self._call(run, failed=0)

    def transfer_submit_write(
        self, target_hostname: str, buffer: Any, peer_buffer_address: int, length: int, transport_hint: str = ""
    ) -> int:
        return self.batch_transfer_async(
            target_hostname, [buffer], [peer_buffer_address], [length], TransferOpcode.WRITE
        )

    def transfer_check_status(self, batch_id: int) -> int:
        """1 done (the id is freed), 0 in progress, -1 failed (freed), -2 past its deadline."""
        with self._lock:
            item = self._batches.get(batch_id)
        if item is None:
            self.last_error = InvalidArgument(f"no batch {batch_id!r:.30} (never started, or already reported)")
            return -1
        batch, deadline = item
        if not batch.done():
            return -2 if time.monotonic() > deadline else 0
        with self._lock:
            self._batches.pop(batch_id, None)
        if batch.error is not None:
            self.last_error = batch.error
            return -1
        return 1

    def get_batch_transfer_status(self, batch_ids: Sequence[int]) -> int:
        """Wait for every batch: 0 if all completed, -1 if any failed or ran past its deadline."""
        if isinstance(batch_ids, int):
            batch_ids = [batch_ids]
        result = 0
        for batch_id in batch_ids:
            with self._lock:
                item = self._batches.pop(batch_id, None)
            if item is None:
                self.last_error = InvalidArgument(f"no batch {batch_id!r:.30} (never started, or already reported)")
                result = -1
                continue
            batch, deadline = item
            try:
                batch.wait(max(0.0, deadline - time.monotonic()))
            except MooncakeError as exc:
                self.last_error = exc
                result = -1
        return result

    # -- notifications and probes ----------------------------------------------------------------------

    def get_notifies(self) -> list[TransferNotify]:
        """The notifications peers sent with their transfers since the last call, oldest first; [] on
        an engine not initialized."""
        result = self._call(lambda: [TransferNotify(name, msg) for name, msg in self.engine.notifies()])
        return result if isinstance(result, list) else []

    def send_probe(self, peer_server_name: str) -> int:
        return self._call(lambda: self.engine.probe(peer_server_name) or 0)
