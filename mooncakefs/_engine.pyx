# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Hot paths in Cython: buffer copies and CRC-32C with the GIL released, the DRAM pool allocator,
the pool arena and the compact index entry.

Each has a pure-Python twin in ``mooncakefs._reference`` that the tests run against this module.
"""

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_CheckSignals, PyErr_Clear, PyErr_ExceptionMatches
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.object cimport PyObject_Hash

cdef extern from "Python.h":
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    void *PyUnicode_DATA(object o)
from cpython.unicode cimport PyUnicode_AsUTF8String
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free as c_free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.types cimport clockid_t

cimport cython

import os
import threading

from mooncakefs.api import BATCH_ERRORS, PLAIN_PUT, objects_error, value_error
from mooncakefs.errors import MooncakeError
from mooncakefs.keys import INTERNAL_PREFIX, MAX_KEY_BYTES, InternalKey, key_digest
from mooncakefs.keys import encode_key as _encode_key_checked


cdef extern from *:
    """
    #define mc_store_i64(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
    """
    void mc_store_i64(int64_t *p, int64_t v) nogil


cdef extern from "<sys/mman.h>" nogil:
    int madvise(void *addr, size_t length, int advice)
    int mincore(void *addr, size_t length, unsigned char *vec)

cdef extern from "<unistd.h>" nogil:
    long sysconf(int name)
    int _SC_PAGESIZE


cdef extern from *:
    """
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    """
    const int MADV_POPULATE_WRITE


cdef extern from *:
    """
    #ifndef MADV_HUGEPAGE
    #define MADV_HUGEPAGE 14
    #endif
    """
    const int MADV_HUGEPAGE

# A value this large gets fresh pages from the kernel (glibc mmaps it: its threshold tops out at 32 MiB),
# and faulting them in 4 KiB at a time cost more than the copy itself: 26 ms against 6 ms with 2 MiB
# pages for 64 MiB on the dev VM.  Where transparent huge pages are "madvise", ask for them.
cdef Py_ssize_t HUGE_FILL_MIN = 4 << 20
cdef size_t HUGE_PAGE = 2 << 20

mc_crc32c_init()
# MOONCAKEFS_CRC32C=lanes or =table keeps crc32c off the faster paths, as on a CPU without their
# instructions: the tests check each path this CPU has, through the same dispatch.
_crc_limit = os.environ.get("MOONCAKEFS_CRC32C", "")
if _crc_limit and not mc_crc32c_limit(_crc_limit.encode()):
    raise ImportError(f"MOONCAKEFS_CRC32C={_crc_limit!r}: expected 'fold', 'lanes' or 'table'")

cdef extern from *:
    """
    /* Copies at least this large release the GIL (below it, the release costs more than it frees). */
    #define MC_GIL_FREE_BYTES 65536
    /* The allocator works in 64-byte units: values start on cache-line boundaries. */
    #define MC_UNIT 64
    #define MC_NONE 0xFFFFFFFFu
    #define MC_NUM_BINS 256
    enum { MC_FREE = 0, MC_USED = 1, MC_SPARE = 2 };
    """
    const size_t GIL_FREE_BYTES "MC_GIL_FREE_BYTES"
    const size_t UNIT "MC_UNIT"
    const uint32_t NONE "MC_NONE"
    const int NUM_BINS "MC_NUM_BINS"
    const uint8_t FREE "MC_FREE"
    const uint8_t USED "MC_USED"
    const uint8_t SPARE "MC_SPARE"

ALLOC_UNIT = UNIT


cdef bint _strided(object obj):
    """Whether ``obj`` exports a buffer, just not a C-contiguous one."""
    try:
        return not memoryview(obj).c_contiguous
    except (TypeError, ValueError):
        return False


# Buffers are taken with their format, to refuse Python objects (``_holds_objects``); a format comes
# only with a shape (a memoryview refuses PyBUF_FORMAT alone), and no strides: C-contiguous, as before.
cdef int AS_BYTES = PyBUF_ND | PyBUF_FORMAT


cdef bint _holds_objects(const char *fmt) noexcept:
    """Whether a buffer of struct format ``fmt`` holds Python objects (numpy's dtype object): its bytes
    are pointers, never a value's.  Field names (":name:") are skipped.  Twin: ``api.holds_objects``."""
    if fmt == NULL:
        return False
    cdef bint in_name = False
    while fmt[0]:
        if fmt[0] == b":":
            in_name = not in_name
        elif fmt[0] == b"O" and not in_name:
            return True
        fmt += 1
    return False


cdef inline int _refuse_objects(object obj, Py_buffer *view, str what) except -1:
    """Give back a buffer of Python objects and say why it is no value (``_get_read``, ``_get_write``)."""
    if _holds_objects(view.format):
        PyBuffer_Release(view)
        raise objects_error(what, obj)
    return 0


cdef inline int _get_read(object obj, Py_buffer *view, str what) except -1:
    try:
        PyObject_GetBuffer(obj, view, AS_BYTES)
    except BufferError as exc:
        raise TypeError(f"{what} must be a C-contiguous bytes-like object: {exc}") from None
    except ValueError as exc:  # numpy's word for a strided array; a closed mmap's too, which stays one
        if not _strided(obj):
            raise
        raise TypeError(f"{what} must be a C-contiguous bytes-like object: {exc}") from None
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object (bytes, bytearray, memoryview, numpy array), "
                        f"not {type(obj).__name__}") from None
    return _refuse_objects(obj, view, what)


cdef inline int _get_write(object obj, Py_buffer *view, str what) except -1:
    try:
        PyObject_GetBuffer(obj, view, AS_BYTES | PyBUF_WRITABLE)
    except (BufferError, ValueError) as exc:  # numpy says ValueError for read-only arrays
        raise TypeError(f"{what} must be a writable, C-contiguous buffer (bytearray, numpy array, "
                        f"writable memoryview): {exc}") from None
    except TypeError:
        raise TypeError(f"{what} must be a writable buffer (bytearray, numpy array, writable memoryview), "
                        f"not {type(obj).__name__}") from None
    return _refuse_objects(obj, view, what)


cdef extern from "_stream_copy.h" nogil:
    void mc_copy(void *dst, const void *src, size_t n)  # memcpy, but not REP MOVSB's slow case
    bint mc_stream_worth(size_t total)
    void mc_stream_copy(void *dst, const void *src, size_t n)
    int mc_stream_current()
    int mc_stream_force(int kind)
    size_t MC_STREAM_MIN


cdef inline void _memcpy(void *dst, const void *src, size_t n) noexcept:
    if n >= GIL_FREE_BYTES:
        with nogil:
            mc_copy(dst, src, n)
    else:
        mc_copy(dst, src, n)


cdef inline void _copy_to_pool(void *dst, const void *src, size_t n) noexcept:
    """A put's value into its block of the pool, with streaming stores from 4 KiB (``mc_stream_copy``;
    below, mc_copy): the block is rarely in the cache, and rarely read back at once, so the stores need
    not read each line first (4 KiB puts 1.1x keys per CPU-second on the dev VM, single and batched); a
    reader coming at once finds the value in memory rather than in the cache."""
    if n >= GIL_FREE_BYTES:
        with nogil:
            mc_stream_copy(dst, src, n)
    else:
        mc_stream_copy(dst, src, n)


cdef inline uint32_t _crc(uint32_t crc, const uint8_t *p, size_t n) noexcept:
    if n >= GIL_FREE_BYTES:
        with nogil:
            return mc_crc32c(crc, p, n)
    return mc_crc32c(crc, p, n)


def nbytes(obj) -> int:
    """Length in bytes of any C-contiguous buffer (TypeError otherwise)."""
    return _nbytes(obj)


cdef Py_ssize_t _nbytes(object obj) except -1:
    cdef Py_buffer view
    _get_read(obj, &view, "value")
    cdef Py_ssize_t n = view.len
    PyBuffer_Release(&view)
    return n


# A key is encoded on every call: in Python that cost as much as the index lookup it is for.
cdef Py_ssize_t MAX_KEY = MAX_KEY_BYTES
assert INTERNAL_PREFIX == b"\xc0\x80"  # _encode_key tests these two bytes


cpdef bytes encode_key(object key):
    """``keys.encode_key`` (the twin, and what tells a refused key why) in C for the keys nearly every call
    brings: a str that encodes to UTF-8, or bytes outside the internal namespace, 1 to MAX_KEY_BYTES long.
    Anything else (an InternalKey, a subclass, a bad key) goes to ``keys.encode_key``."""
    cdef bytes raw
    cdef const char *p
    if type(key) is str:
        try:
            raw = PyUnicode_AsUTF8String(key)
        except UnicodeEncodeError:
            return _encode_key_checked(key)
    elif type(key) is bytes:
        raw = <bytes>key
        p = PyBytes_AS_STRING(raw)
        if PyBytes_GET_SIZE(raw) >= 2 and <unsigned char>p[0] == 0xC0 and <unsigned char>p[1] == 0x80:
            return _encode_key_checked(key)
    else:
        return _encode_key_checked(key)
    if 0 < PyBytes_GET_SIZE(raw) <= MAX_KEY:
        return raw
    return _encode_key_checked(key)


def pages_mapped(size_t addr, size_t size) -> bool:
    """Whether every page of [addr, addr+size) is mapped in this process (``mincore`` fails with ENOMEM
    where one is not): a raw address registered earlier may have been unmapped since, and a copy from
    it would kill the process.  Permissions are not checked; one system call per 16 MiB."""
    cdef unsigned char vec[4096]
    cdef size_t page = <size_t>sysconf(_SC_PAGESIZE)
    cdef size_t at = addr - addr % page, end = addr + size, step = sizeof(vec) * page, n
    if size == 0 or end < addr:
        return size == 0
    while at < end:
        n = min(step, end - at)
        if mincore(<void *>at, n, vec) != 0:
            return False
        at += n
    return True


def address(obj) -> int:
    """Memory address of a buffer's first byte (to check alignment for O_DIRECT I/O)."""
    cdef Py_buffer view
    _get_read(obj, &view, "buffer")
    cdef size_t addr = <size_t>view.buf
    PyBuffer_Release(&view)
    return addr


def copy(dst, src) -> int:
    """Copy the bytes of ``src`` into the start of ``dst``; returns the number of bytes copied."""
    cdef Py_buffer s, d
    _get_read(src, &s, "source")
    try:
        _get_write(dst, &d, "destination")
        try:
            if d.len < s.len:
                raise ValueError(f"destination holds {d.len} bytes, source has {s.len}")
            _memcpy(d.buf, s.buf, s.len)
            return s.len
        finally:
            PyBuffer_Release(&d)
    finally:
        PyBuffer_Release(&s)


def copy_many(dsts, srcs) -> int:
    """Copy each of ``srcs`` into the start of the matching ``dsts``, every length checked before a byte
    moves, then every copy with the GIL released once: a same-host batch of many blocks is one call, not
    a release and a retake of the GIL per block.  Returns the bytes copied."""
    cdef Py_ssize_t count = len(srcs), i, held = 0
    if len(dsts) != count:
        raise ValueError(f"{len(dsts)} destinations for {count} sources")
    cdef Py_buffer *s = <Py_buffer *>malloc(max(count, 1) * sizeof(Py_buffer))
    cdef Py_buffer *d = <Py_buffer *>malloc(max(count, 1) * sizeof(Py_buffer))
    if s == NULL or d == NULL:
        c_free(s)
        c_free(d)
        raise MemoryError()
    cdef size_t total = 0
    try:
        for i in range(count):
            _get_read(srcs[i], &s[i], "source")
            try:
                _get_write(dsts[i], &d[i], "destination")
            except BaseException:
                PyBuffer_Release(&s[i])
                raise
            held = i + 1
            if d[i].len < s[i].len:
                raise ValueError(f"destination {i} holds {d[i].len} bytes, source has {s[i].len}")
            total += <size_t>s[i].len
        if total >= GIL_FREE_BYTES:
            with nogil:
                for i in range(count):
                    mc_copy(d[i].buf, s[i].buf, <size_t>s[i].len)
        else:
            for i in range(count):
                mc_copy(d[i].buf, s[i].buf, <size_t>s[i].len)
        return total
    finally:
        for i in range(held):
            PyBuffer_Release(&s[i])
            PyBuffer_Release(&d[i])
        c_free(s)
        c_free(d)


cdef extern from "Python.h":
    # PyObject_GetBuffer with its error left to the caller (``_take_buffer``): no exception handling
    int _get_buffer "PyObject_GetBuffer"(object obj, Py_buffer *view, int flags)
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    int PyBUF_WRITE


cdef bytes _new_bytes(Py_ssize_t n):
    """An uninitialised bytes object of ``n`` bytes, on huge pages where it is large enough to get fresh
    pages from the kernel: a caller holding many such values at once (batch_get) frees them together,
    glibc hands the memory back, and the next batch faults it in again."""
    out = PyBytes_FromStringAndSize(NULL, n)
    cdef size_t start, end
    if n >= HUGE_FILL_MIN:  # advice only: where THP is off or the call fails, small pages it is
        start = (<size_t>PyBytes_AS_STRING(out) + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        end = (<size_t>PyBytes_AS_STRING(out) + <size_t>n) & ~(HUGE_PAGE - 1)
        if end > start:
            madvise(<void *>start, end - start, MADV_HUGEPAGE)
    return out


def fill_bytes(Py_ssize_t n, fill) -> bytes:
    """A new bytes object of ``n`` bytes that ``fill(view)`` writes through a writable memoryview
    before anyone else can see it: a value received from a socket lands in its final object, with no
    bytearray to copy from."""
    out = _new_bytes(n)
    view = PyMemoryView_FromMemory(PyBytes_AS_STRING(out), n, PyBUF_WRITE)
    try:
        fill(view)
    finally:
        view.release()
    return out


cdef class _Filling:
    """A writable buffer over a new bytes object that it keeps alive: ``bytes_to_fill``'s view."""
    cdef bytes out

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, PyBytes_AS_STRING(self.out), PyBytes_GET_SIZE(self.out), 0, flags)


def bytes_to_fill(Py_ssize_t n):
    """A new, uninitialised bytes object of ``n`` bytes and a writable memoryview of it, for values that
    arrive later than ``fill_bytes`` can wait (a batch's, by the transfer engine): the caller fills the
    view and drops it before anyone else sees the bytes."""
    cdef _Filling filling = _Filling.__new__(_Filling)
    filling.out = _new_bytes(n)
    return filling.out, memoryview(filling)


cdef extern from "Python.h":
    int PyBUF_READ


def view_at(size_t addr, Py_ssize_t n, bint writable=False):
    """A memoryview of ``n`` bytes of this process's memory at ``addr``: how the transfer engine reaches
    memory registered by address.  The caller has checked that the range is registered; nothing here can."""
    if addr == 0 or n < 0:
        raise ValueError(f"no memory at address {addr:#x} (+{n})")
    return PyMemoryView_FromMemory(<char *>addr, n, PyBUF_WRITE if writable else PyBUF_READ)


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t process_vm_readv(int pid, const iovec *local_iov, unsigned long liovcnt,
                             const iovec *remote_iov, unsigned long riovcnt, unsigned long flags)
    ssize_t process_vm_writev(int pid, const iovec *local_iov, unsigned long liovcnt,
                              const iovec *remote_iov, unsigned long riovcnt, unsigned long flags)

cdef extern from "<errno.h>" nogil:
    int errno
    int EFAULT
    int EINTR
    int ETIMEDOUT


cdef enum:
    VM_IOV_MAX = 1024  # IOV_MAX: the most iovecs one process_vm_* call takes


def vm_copy(int pid, locals_, remotes, lengths, bint write) -> int:
    """Copy between ranges of this process and ranges of process ``pid`` (``process_vm_readv`` /
    ``writev``, one syscall per 1024 ranges, the GIL released): the same-host path to a peer's memory
    that cannot be shared.  ``locals_``, ``remotes`` and ``lengths`` are sequences of ints, already
    bounds-checked by the caller.  Returns the bytes moved; OSError (EPERM, ESRCH, EFAULT) otherwise."""
    cdef Py_ssize_t count = len(lengths), i, start = 0, k
    if len(locals_) != count or len(remotes) != count:
        raise ValueError("locals_, remotes and lengths must have the same length")
    cdef iovec *liov = <iovec *>malloc(max(count, 1) * sizeof(iovec))
    cdef iovec *riov = <iovec *>malloc(max(count, 1) * sizeof(iovec))
    if liov == NULL or riov == NULL:
        c_free(liov)
        c_free(riov)
        raise MemoryError()
    cdef size_t total = 0, done, want
    cdef ssize_t got
    cdef int err = 0
    try:
        for i in range(count):
            liov[i].iov_base = <void *><size_t>locals_[i]
            riov[i].iov_base = <void *><size_t>remotes[i]
            liov[i].iov_len = riov[i].iov_len = <size_t>lengths[i]
        with nogil:
            while start < count:
                k = min(count - start, <Py_ssize_t>VM_IOV_MAX)
                want = 0
                for i in range(start, start + k):
                    want += liov[i].iov_len
                if want == 0:
                    start += k
                    continue
                if write:
                    got = process_vm_writev(pid, liov + start, k, riov + start, k, 0)
                else:
                    got = process_vm_readv(pid, liov + start, k, riov + start, k, 0)
                if got < 0:
                    err = errno
                    break
                if got == 0:
                    err = EFAULT
                    break
                total += got
                done = <size_t>got
                # skip what moved: whole ranges, then the front of a range cut short
                while start < count and done >= liov[start].iov_len:
                    done -= liov[start].iov_len
                    start += 1
                if done:
                    liov[start].iov_base = <char *>liov[start].iov_base + done
                    riov[start].iov_base = <char *>riov[start].iov_base + done
                    liov[start].iov_len -= done
                    riov[start].iov_len -= done
    finally:
        c_free(liov)
        c_free(riov)
    if err:
        raise OSError(err, os.strerror(err))
    return total


def crc32c(data, uint32_t crc=0) -> int:
    """CRC-32C (Castagnoli) of ``data``, continuing from ``crc`` (hardware-accelerated where possible)."""
    cdef Py_buffer v
    _get_read(data, &v, "data")
    try:
        return _crc(crc, <const uint8_t *>v.buf, v.len)
    finally:
        PyBuffer_Release(&v)


def crc32c_path() -> str:
    """The path crc32c takes from 256 bytes on: "fold" (VPCLMULQDQ), "lanes" (the crc32 instruction) or
    "table" (slicing-by-8), picked from the CPU's features and MOONCAKEFS_CRC32C."""
    return mc_crc32c_path().decode()


def crc32c_portable(data, uint32_t crc=0) -> int:
    """The table-driven CRC-32C, whatever the CPU offers: lets tests check both C paths."""
    cdef Py_buffer v
    _get_read(data, &v, "data")
    try:
        return mc_crc32c_portable(crc, <const uint8_t *>v.buf, v.len)
    finally:
        PyBuffer_Release(&v)


# ---------------------------------------------------------------------------------------------------
# Offset allocator: a two-level segregated-fit allocator over 64-byte units with O(1) alloc and free.
# Free blocks sit in 256 bins spaced like a tiny float (3 mantissa bits: ~12.5% apart); a block is
# binned by its size rounded down and a request looks from its size rounded up, so any block found
# fits.  Blocks keep address-order neighbour links, so a freed block merges with free neighbours.
# All bookkeeping lives outside the pool (the pool is shared memory other processes may map).

cdef inline uint32_t _bin_down(uint32_t units) noexcept nogil:
    if units < 8:
        return units
    cdef int high = 31 - __builtin_clz(units)
    cdef int shift = high - 3
    return ((<uint32_t>(shift + 1)) << 3) | ((units >> shift) & 7)


cdef inline uint32_t _bin_up(uint32_t units) noexcept nogil:
    if units < 8:
        return units
    cdef int high = 31 - __builtin_clz(units)
    cdef int shift = high - 3
    cdef uint32_t b = ((<uint32_t>(shift + 1)) << 3) | ((units >> shift) & 7)
    if units & ((1u << shift) - 1):
        b += 1
    return b


cdef class OffsetAllocator:
    """Hands out byte ranges of a pool of ``capacity`` bytes; ``alloc`` returns a handle or -1."""

    def __cinit__(self, size_t capacity):
        if capacity // UNIT >= NONE:
            raise ValueError(f"pool of {capacity} bytes is too large for 32-bit units")
        self.capacity = (capacity // UNIT) * UNIT
        self.units = capacity // UNIT
        self.room = 64
        self.n_off = <uint32_t *>malloc(self.room * sizeof(uint32_t))
        self.n_size = <uint32_t *>malloc(self.room * sizeof(uint32_t))
        self.n_bin_prev = <uint32_t *>malloc(self.room * sizeof(uint32_t))
        self.n_bin_next = <uint32_t *>malloc(self.room * sizeof(uint32_t))
        self.n_addr_prev = <uint32_t *>malloc(self.room * sizeof(uint32_t))
        self.n_addr_next = <uint32_t *>malloc(self.room * sizeof(uint32_t))
        self.n_state = <uint8_t *>malloc(self.room * sizeof(uint8_t))
        if not (self.n_off and self.n_size and self.n_bin_prev and self.n_bin_next and self.n_addr_prev
                and self.n_addr_next and self.n_state):
            raise MemoryError()
        self.spare_head = NONE
        cdef int i
        for i in range(NUM_BINS):
            self.heads[i] = NONE
        for i in range(32):
            self.leaf_mask[i] = 0
        if self.units:
            n = self._new_node()
            self.n_off[n] = 0
            self.n_size[n] = self.units
            self.n_addr_prev[n] = NONE
            self.n_addr_next[n] = NONE
            self._insert_free(n)

    def __dealloc__(self):
        c_free(self.n_off); c_free(self.n_size); c_free(self.n_bin_prev); c_free(self.n_bin_next)
        c_free(self.n_addr_prev); c_free(self.n_addr_next); c_free(self.n_state)

    cdef uint32_t _new_node(self) except 0xFFFFFFFF:
        cdef uint32_t n
        if self.spare_head != NONE:  # retired nodes are chained through their (unused) bin links
            n = self.spare_head
            self.spare_head = self.n_bin_next[n]
            return n
        if self.count == self.room:
            room = self.room * 2
            self.n_off = <uint32_t *>_grow(self.n_off, room * sizeof(uint32_t))
            self.n_size = <uint32_t *>_grow(self.n_size, room * sizeof(uint32_t))
            self.n_bin_prev = <uint32_t *>_grow(self.n_bin_prev, room * sizeof(uint32_t))
            self.n_bin_next = <uint32_t *>_grow(self.n_bin_next, room * sizeof(uint32_t))
            self.n_addr_prev = <uint32_t *>_grow(self.n_addr_prev, room * sizeof(uint32_t))
            self.n_addr_next = <uint32_t *>_grow(self.n_addr_next, room * sizeof(uint32_t))
            self.n_state = <uint8_t *>_grow(self.n_state, room * sizeof(uint8_t))
            self.room = room
        n = self.count
        self.count += 1
        return n

    cdef void _insert_free(self, uint32_t n) noexcept nogil:
        cdef uint32_t b = _bin_down(self.n_size[n])
        cdef uint32_t head = self.heads[b]
        self.n_state[n] = FREE
        self.n_bin_prev[n] = NONE
        self.n_bin_next[n] = head
        if head != NONE:
            self.n_bin_prev[head] = n
        self.heads[b] = n
        self.top_mask |= 1u << (b >> 3)
        self.leaf_mask[b >> 3] |= <uint8_t>(1u << (b & 7))

    cdef void _remove_free(self, uint32_t n) noexcept nogil:
        cdef uint32_t b = _bin_down(self.n_size[n])
        cdef uint32_t prev = self.n_bin_prev[n], nxt = self.n_bin_next[n]
        if prev != NONE:
            self.n_bin_next[prev] = nxt
        else:
            self.heads[b] = nxt
        if nxt != NONE:
            self.n_bin_prev[nxt] = prev
        if self.heads[b] == NONE:
            self.leaf_mask[b >> 3] &= <uint8_t>~(1u << (b & 7))
            if self.leaf_mask[b >> 3] == 0:
                self.top_mask &= ~(1u << (b >> 3))

    cdef uint32_t _find_bin(self, uint32_t b) noexcept nogil:
        cdef uint32_t t = b >> 3
        cdef uint32_t leaf = self.leaf_mask[t] & ((0xFF << (b & 7)) & 0xFF)
        if leaf:
            return (t << 3) | <uint32_t>__builtin_ctz(leaf)
        cdef uint64_t above = (<uint64_t>self.top_mask) & ~((<uint64_t>2 << t) - 1)
        if above == 0:
            return NONE
        t = <uint32_t>__builtin_ctzll(above)
        return (t << 3) | <uint32_t>__builtin_ctz(self.leaf_mask[t])

    def alloc(self, size_t nbytes) -> int:
        """A handle for ``nbytes`` (at least one unit), or -1 when no free block is large enough.

        O(1) unless the pool is nearly full: then the one bin holding blocks within 12.5% of the request
        is scanned."""
        return self._alloc(nbytes)

    cdef long long _alloc(self, size_t nbytes) except -2:
        cdef size_t want = (nbytes + UNIT - 1) // UNIT
        if want == 0:
            want = 1
        if want > self.units:
            return -1
        cdef uint32_t units = <uint32_t>want
        cdef uint32_t b = _bin_up(units)
        cdef uint32_t n = NONE
        if b < NUM_BINS:
            b = self._find_bin(b)
            if b != NONE:
                n = self.heads[b]
        if n == NONE:
            # Every block in the bins searched fits; a block in the request's own rounded-down bin may
            # fit too (its size lies between two bin sizes).  Look there before giving up.
            n = self.heads[_bin_down(units)]
            while n != NONE and self.n_size[n] < units:
                n = self.n_bin_next[n]
            if n == NONE:
                return -1
        self._remove_free(n)
        cdef uint32_t rest, after
        if self.n_size[n] > units:
            rest = self._new_node()
            self.n_off[rest] = self.n_off[n] + units
            self.n_size[rest] = self.n_size[n] - units
            after = self.n_addr_next[n]
            self.n_addr_prev[rest] = n
            self.n_addr_next[rest] = after
            if after != NONE:
                self.n_addr_prev[after] = rest
            self.n_addr_next[n] = rest
            self.n_size[n] = units
            self._insert_free(rest)
        self.n_state[n] = USED
        self.used_units += units
        return n

    def reserve(self, size_t nbytes) -> tuple:
        """``alloc`` and ``offset`` in one call: (handle, byte offset), or (-1, -1)."""
        cdef long long handle = self.alloc(nbytes)
        if handle < 0:
            return (-1, -1)
        return (handle, <size_t>self.n_off[handle] * UNIT)

    def free(self, long long handle) -> None:
        """Return a block; it merges with free neighbours."""
        self._free(handle)

    cdef int _free(self, long long handle) except -1:
        if handle < 0 or handle >= self.count or self.n_state[handle] != USED:
            raise ValueError(f"handle {handle} is not allocated")
        cdef uint32_t n = <uint32_t>handle
        cdef uint32_t other
        self.used_units -= self.n_size[n]
        other = self.n_addr_prev[n]
        if other != NONE and self.n_state[other] == FREE:
            self._remove_free(other)
            self.n_off[n] = self.n_off[other]
            self.n_size[n] += self.n_size[other]
            self.n_addr_prev[n] = self.n_addr_prev[other]
            if self.n_addr_prev[other] != NONE:
                self.n_addr_next[self.n_addr_prev[other]] = n
            self._retire(other)
        other = self.n_addr_next[n]
        if other != NONE and self.n_state[other] == FREE:
            self._remove_free(other)
            self.n_size[n] += self.n_size[other]
            self.n_addr_next[n] = self.n_addr_next[other]
            if self.n_addr_next[other] != NONE:
                self.n_addr_prev[self.n_addr_next[other]] = n
            self._retire(other)
        self._insert_free(n)
        return 0

    cdef void _retire(self, uint32_t n) noexcept nogil:
        self.n_state[n] = SPARE
        self.n_bin_next[n] = self.spare_head
        self.spare_head = n

    def offset(self, long long handle) -> int:
        """Byte offset of an allocated block in the pool."""
        return <size_t>self.n_off[handle] * UNIT

    @property
    def used(self) -> int:
        """Bytes handed out (each request rounded up to 64 bytes)."""
        return self.used_units * UNIT


cdef void *_grow(void *p, size_t n) except NULL:
    cdef void *q = realloc(p, n)
    if q == NULL:
        raise MemoryError()
    return q


# ---------------------------------------------------------------------------------------------------

cdef class Arena:
    """A writable pool buffer (the DRAM tier's shared-memory map) pinned once so that every copy in
    and out is a bounds-checked memcpy without per-call buffer set-up."""

    def __cinit__(self, pool):
        _get_write(pool, &self.buf, "pool")
        self.held = True
        self.base = <uint8_t *>self.buf.buf
        self.size = self.buf.len

    def release(self) -> None:
        """Unpin the pool buffer so its owner (an mmap) can close."""
        if self.held:
            PyBuffer_Release(&self.buf)
            self.held = False
            self.base = NULL
            self.size = 0

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.buf)

    cdef int _check(self, size_t off, size_t n) except -1:
        if not self.held:
            raise ValueError("arena is released")
        if off > self.size or n > self.size - off:
            raise ValueError(f"range [{off}, {off + n}) is outside the {self.size}-byte pool")
        return 0

    def write(self, size_t off, src) -> int:
        """Copy buffer ``src`` into the pool at ``off``; returns its length.  STREAM_COPY_MIN bytes or more
        go with streaming stores (_stream_copy.h): a large put's block is read back later if at all, not
        at once, and a 4 MiB FUSE chunk's copy took half the time (glibc's memcpy first reads every
        destination line on these VMs)."""
        cdef Py_buffer s
        _get_read(src, &s, "value")
        try:
            self._check(off, s.len)
            if mc_stream_worth(s.len):
                with nogil:
                    mc_stream_copy(self.base + off, s.buf, s.len)
            else:
                _memcpy(self.base + off, s.buf, s.len)
            return s.len
        finally:
            PyBuffer_Release(&s)

    def read_into(self, size_t off, size_t n, dst) -> int:
        """Copy ``n`` pool bytes at ``off`` into the start of writable buffer ``dst``."""
        cdef Py_buffer d
        self._check(off, n)
        _get_write(dst, &d, "buffer")
        try:
            if <size_t>d.len < n:
                raise ValueError(f"buffer holds {d.len} bytes, {n} needed")
            _memcpy(d.buf, self.base + off, n)
            return n
        finally:
            PyBuffer_Release(&d)

    def read(self, size_t off, size_t n) -> bytes:
        """A new bytes object holding ``n`` pool bytes at ``off``."""
        self._check(off, n)
        out = _new_bytes(n)
        _memcpy(PyBytes_AS_STRING(out), self.base + off, n)
        return out

    def crc32c(self, size_t off, size_t n) -> int:
        """CRC-32C of ``n`` pool bytes at ``off``."""
        self._check(off, n)
        return _crc(0, self.base + off, n)

    def prefault(self, size_t step=64 << 20) -> bool:
        """Make the kernel back the whole pool with memory now, ``step`` bytes at a time with the GIL
        released (on these VMs first-touching memory runs at ~0.5 GB/s: better in a background thread
        than inside a put).  False if the kernel lacks MADV_POPULATE_WRITE (Linux < 5.14)."""
        cdef size_t off = 0, n
        cdef int rc = 0
        while off < self.size and self.held:
            n = min(step, self.size - off)
            with nogil:
                rc = madvise(self.base + off, n, MADV_POPULATE_WRITE)
            if rc != 0:
                return False
            off += n
        return True


# ---------------------------------------------------------------------------------------------------

VERSION_LIMIT = 1 << 126  # two 63-bit halves: each fits a signed 64-bit SQLite column
VERSION_LOW_MASK = (1 << 63) - 1


VALUE_SIZE_LIMIT = 1 << 48  # what an entry's size field holds (Store.begin_put's limit too)
cdef long long ANY_SIZE = VALUE_SIZE_LIMIT  # (in C)


cdef extern from *:
    """
    #define MC_SEG_UNIT 512
    """
    const long long SEG_UNIT "MC_SEG_UNIT"

SSD_ALIGN = SEG_UNIT  # every SSD record starts on it (tiers/ssd.py's ALIGN), so entries keep offsets in it


@cython.no_gc  # its only object field is bytes, and the queue links are borrowed: it is never in a cycle
@cython.final
cdef class Entry:
    """Where one object lives: a VRAM block, a DRAM block and/or an SSD segment record (-1 when absent), its size,
    CRC-32C (-1 until first computed), version and tag (set by its writer: the version below 2**126,
    the tag a 32-bit int), expiry (unix time, 0 for none), read leases, SSD hits, and whether it is
    pinned (never leaves DRAM) or sticky (may be demoted, never dropped), durable (put with durable=True:
    kept through SSD reclaim while the tier has room), and which DRAM eviction queue holds it (``queue``:
    0 none, 1 fresh, 2 main; see tiers/dram.py), with its links in that queue and its ``key``.

    A C struct with attribute access, not tracked by the garbage collector, 112 bytes: one exists per
    object in the store, so every field is as narrow as its values allow (the DRAM offset is kept in
    the allocator's 64-byte units, the flags share a word with the size)."""

    def __cinit__(self, long long size=0):
        if size:
            self.size = size
        self.dram = -1
        self.dram_unit = NONE
        self.seg = -1
        self.seg_unit = NONE
        self.vram = -1

    @property
    def size(self):
        return self.word.size

    @size.setter
    def size(self, long long value):
        if not 0 <= value < VALUE_SIZE_LIMIT:
            raise ValueError(f"an entry's size is from 0 to 2**48 bytes, got {value}")
        if self.word.queue:
            raise ValueError("the size of a queued entry cannot change (its queue counts its bytes)")
        self.word.size = value

    @property
    def dram_off(self):
        return -1 if self.dram_unit == NONE else <long long>self.dram_unit * UNIT

    @dram_off.setter
    def dram_off(self, long long value):
        if value == -1:
            self.dram_unit = NONE
        elif value < 0 or value % UNIT or value // UNIT >= NONE:
            raise ValueError(f"a DRAM offset is a multiple of {UNIT} below {UNIT} * 2**32 (or -1), got {value}")
        else:
            self.dram_unit = <uint32_t>(value // UNIT)

    @property
    def seg_off(self):
        return -1 if self.seg_unit == NONE else <long long>self.seg_unit * SEG_UNIT

    @seg_off.setter
    def seg_off(self, long long value):
        if value == -1:
            self.seg_unit = NONE
        elif value < 0 or value % SEG_UNIT or value // SEG_UNIT >= NONE:
            raise ValueError(f"an SSD offset is a multiple of {SEG_UNIT} below {SEG_UNIT} * 2**32 (or -1), got {value}")
        else:
            self.seg_unit = <uint32_t>(value // SEG_UNIT)

    @property
    def crc(self):
        return self.crc32 if self.word.has_crc else -1

    @crc.setter
    def crc(self, long long value):
        if value == -1:
            self.word.has_crc = False
        elif not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"a CRC-32C is a 32-bit int (or -1 for none), got {value}")
        else:
            self.crc32 = <uint32_t>value
            self.word.has_crc = True

    @property
    def pinned(self):
        return <bint>self.word.pinned

    @pinned.setter
    def pinned(self, bint value):
        self.word.pinned = value

    @property
    def sticky(self):
        return <bint>self.word.sticky

    @sticky.setter
    def sticky(self, bint value):
        self.word.sticky = value

    @property
    def dead(self):
        return <bint>self.word.dead

    @dead.setter
    def dead(self, bint value):
        self.word.dead = value

    @property
    def durable(self):
        return <bint>self.word.durable

    @durable.setter
    def durable(self, bint value):
        self.word.durable = value

    @property
    def queue(self):
        """Which ``EntryQueue`` holds it (its ``ident``), 0 for none: set by the queues alone."""
        return self.word.queue

    @property
    def version(self):
        return (<object>self.version_hi << 63) | self.version_lo

    @version.setter
    def version(self, value):
        if not 0 <= value < VERSION_LIMIT:
            raise ValueError(f"a version is an int from 0 to 2**126, got {value!r:.40}")
        self.version_hi, self.version_lo = value >> 63, value & VERSION_LOW_MASK


@cython.final
cdef class EntryQueue:
    """An eviction queue threaded through its entries (``Entry.prev``/``next``), oldest first: push at
    the back, removal and move to the back in O(1), and no memory of its own per entry (the OrderedDict
    it replaces cost ~90 bytes an object).  ``ident`` (1 to 3) is what ``Entry.queue`` says while an
    entry is in it, ``nbytes`` the sum of their sizes.  The queue holds a reference to each entry in it;
    an entry is in one queue at most.  Iterating yields keys, oldest first, as an OrderedDict's would,
    and raises RuntimeError if the entry it stands on leaves the queue meanwhile."""

    def __cinit__(self, unsigned int ident):
        if not 1 <= ident <= 3:
            raise ValueError(f"a queue's ident is 1, 2 or 3, got {ident}")
        self.ident = ident

    def __dealloc__(self):
        self.drop_all()

    cdef void drop_all(self) noexcept:
        cdef PyObject *at = self.head
        cdef Entry entry
        while at != NULL:
            entry = <Entry>at
            at = entry.next
            self.unlink(entry)

    cdef int push(self, bytes key, Entry entry) except -1:
        if entry.word.queue:
            raise ValueError(f"entry is already in queue {entry.word.queue}")
        entry.key = key
        Py_INCREF(entry)
        entry.prev = self.tail
        entry.next = NULL
        if self.tail != NULL:
            (<Entry>self.tail).next = <PyObject *>entry
        else:
            self.head = <PyObject *>entry
        self.tail = <PyObject *>entry
        entry.word.queue = self.ident
        self.count += 1
        self.nbytes += entry.word.size
        return 0

    cdef void unlink(self, Entry entry) noexcept:
        """Take out an entry it holds (the caller checked ``entry.word.queue``) and drop its reference."""
        if entry.prev != NULL:
            (<Entry>entry.prev).next = entry.next
        else:
            self.head = entry.next
        if entry.next != NULL:
            (<Entry>entry.next).prev = entry.prev
        else:
            self.tail = entry.prev
        entry.prev = entry.next = NULL
        entry.word.queue = 0
        self.count -= 1
        self.nbytes -= entry.word.size
        Py_DECREF(entry)

    cdef void to_back(self, Entry entry) noexcept:
        """Move an entry it holds to the back (the most recent end)."""
        if self.tail == <PyObject *>entry:
            return
        if entry.prev != NULL:
            (<Entry>entry.prev).next = entry.next
        else:
            self.head = entry.next
        (<Entry>entry.next).prev = entry.prev  # not the tail: it has a next
        entry.prev = self.tail
        entry.next = NULL
        (<Entry>self.tail).next = <PyObject *>entry
        self.tail = <PyObject *>entry

    cdef int check(self, Entry entry) except -1:
        if entry.word.queue != self.ident:
            raise ValueError(f"entry is in queue {entry.word.queue}, not in queue {self.ident}")
        return 0

    def append(self, bytes key, Entry entry) -> None:
        """Queue ``entry`` (of ``key``) at the back; ValueError if it is in a queue already."""
        self.push(key, entry)

    def remove(self, Entry entry) -> None:
        self.check(entry)
        self.unlink(entry)

    def move_to_back(self, Entry entry) -> None:
        self.check(entry)
        self.to_back(entry)

    def first(self):
        """The oldest entry, or None if the queue is empty."""
        return None if self.head == NULL else <Entry>self.head

    def items(self):
        """``(key, entry)`` pairs, oldest first."""
        cdef Entry entry
        cdef PyObject *at = self.head
        while at != NULL:
            entry = <Entry>at
            yield entry.key, entry
            if entry.word.queue != self.ident:
                raise RuntimeError("an eviction queue changed during iteration")
            at = entry.next

    def __iter__(self):
        for key, _ in self.items():
            yield key

    def __len__(self) -> int:
        return self.count

    def clear(self) -> None:
        self.drop_all()


# An ASCII str's hash is that of its characters as bytes, which are its UTF-8: the index hashes a key as
# its encoded bytes, so a str key's own hash (kept in the str once computed) finds it with no bytes made.
cdef bint STR_HASH_IS_UTF8_HASH = hash("mooncakefs/key") == hash(b"mooncakefs/key")
cdef Py_ssize_t INDEX_MIN_SLOTS = 8
cdef object _ABSENT = object()


@cython.final
cdef class KeyIndex:
    """The store's index: each key's encoded bytes -> its ``Entry``, a table of ``(hash, entry)`` slots
    probed in line, whose key is the entry's own ``key`` (set here).  It is a dict for the store's
    Python (bytes keys, Entry values; ``keys``, ``values`` and ``items`` are lists, taken at once); the
    store's C paths look a caller's key up as given (``lookup``): an ASCII str key, nearly every key,
    is hashed and compared as it is, with no bytes object made for it.  A 4 KiB batched read spent
    more beside its copy on the dict (a new bytes key, its siphash, the probe) than on anything else.
    The hash is Python's (siphash, seeded per process), so keys chosen to collide cannot be made."""

    def __cinit__(self):
        self.slots = <IndexSlot *>calloc(INDEX_MIN_SLOTS, sizeof(IndexSlot))
        if self.slots == NULL:
            raise MemoryError()
        self.mask = INDEX_MIN_SLOTS - 1

    def __dealloc__(self):
        self._drop_all()
        c_free(self.slots)

    cdef void _drop_all(self) noexcept:
        """Empty every slot, then let their entries go (an entry's release runs no Python code, but the
        table is consistent before any of it does)."""
        cdef Py_ssize_t i, n = self.mask + 1
        cdef IndexSlot *old = self.slots
        cdef IndexSlot *fresh = <IndexSlot *>calloc(INDEX_MIN_SLOTS, sizeof(IndexSlot))
        if fresh == NULL:  # keep the table; release its entries in place
            for i in range(n):
                if old[i].entry != NULL:
                    Py_DECREF(<object>old[i].entry)
                    old[i].entry = NULL
            self.used = 0
            return
        self.slots, self.mask, self.used = fresh, INDEX_MIN_SLOTS - 1, 0
        for i in range(n):
            if old[i].entry != NULL:
                Py_DECREF(<object>old[i].entry)
        c_free(old)

    cdef inline Py_ssize_t _find(self, const char *p, Py_ssize_t n, Py_hash_t h) noexcept:
        """The slot holding the key of ``n`` bytes at ``p`` whose hash is ``h``, or ``-1 - i`` where
        ``i`` is the empty slot that ends its probe."""
        cdef size_t i = <size_t>h & <size_t>self.mask
        cdef PyObject *key
        while True:
            if self.slots[i].entry == NULL:
                return -1 - <Py_ssize_t>i
            if self.slots[i].hash == h:
                key = <PyObject *>(<Entry>self.slots[i].entry).key
                if PyBytes_GET_SIZE(<object>key) == n and memcmp(PyBytes_AS_STRING(<object>key), p, n) == 0:
                    return i
            i = (i + 1) & <size_t>self.mask

    cdef inline Py_ssize_t _find_raw(self, bytes raw, Py_hash_t h) noexcept:
        return self._find(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), h)

    cpdef object lookup(self, key):
        """The entry under a caller's key (anything ``encode_key`` takes), or None; a refused key raises
        what ``encode_key`` says.  An ASCII str or a bytes key makes no object."""
        cdef Py_ssize_t n, i
        cdef bytes raw
        if type(key) is str and STR_HASH_IS_UTF8_HASH and PyUnicode_IS_COMPACT_ASCII(key):
            n = PyUnicode_GET_LENGTH(key)
            if 0 < n <= MAX_KEY:
                i = self._find(<const char *>PyUnicode_DATA(key), n, PyObject_Hash(key))
                return <object>self.slots[i].entry if i >= 0 else None
        raw = encode_key(key)
        i = self._find_raw(raw, PyObject_Hash(raw))
        return <object>self.slots[i].entry if i >= 0 else None

    cdef object swap(self, bytes raw, Entry entry, Py_hash_t h):
        """Put ``entry`` under ``raw`` (whose hash is ``h``: see ``key_hash``) and return the entry it
        replaced, or None."""
        cdef Py_ssize_t i = self._find_raw(raw, h)
        cdef PyObject *old
        entry.key = raw
        Py_INCREF(entry)
        if i >= 0:
            old = self.slots[i].entry
            self.slots[i].entry = <PyObject *>entry
            replaced = <object>old
            Py_DECREF(replaced)  # the slot's reference: ``replaced`` holds one of its own
            return replaced
        if (self.used + 1) * 10 > (self.mask + 1) * 7:
            try:
                self._grow()
            except BaseException:
                Py_DECREF(entry)
                raise
            i = self._find_raw(raw, h)
        i = -1 - i
        self.slots[i].hash = h
        self.slots[i].entry = <PyObject *>entry
        self.used += 1
        return None

    cdef int _grow(self) except -1:
        """Twice the slots, each entry placed again by its hash (no key is read)."""
        cdef Py_ssize_t i, n = self.mask + 1
        cdef size_t j, mask = <size_t>(2 * n - 1)
        cdef IndexSlot *old = self.slots
        cdef IndexSlot *fresh = <IndexSlot *>calloc(2 * n, sizeof(IndexSlot))
        if fresh == NULL:
            raise MemoryError()
        for i in range(n):
            if old[i].entry != NULL:
                j = <size_t>old[i].hash & mask
                while fresh[j].entry != NULL:
                    j = (j + 1) & mask
                fresh[j] = old[i]
        self.slots, self.mask = fresh, <Py_ssize_t>mask
        c_free(old)
        return 0

    cdef object _take(self, Py_ssize_t i):
        """Empty slot ``i``, shifting back the entries after it whose probe passed it, so that every
        probe still ends at an empty slot; returns its entry (the reference the slot held)."""
        cdef PyObject *gone = self.slots[i].entry
        cdef size_t hole = <size_t>i, at = <size_t>i, home, mask = <size_t>self.mask
        while True:
            at = (at + 1) & mask
            if self.slots[at].entry == NULL:
                break
            home = <size_t>self.slots[at].hash & mask
            if ((at - home) & mask) >= ((at - hole) & mask):  # its probe passed the hole: move it there
                self.slots[hole] = self.slots[at]
                hole = at
        self.slots[hole].entry = NULL
        self.used -= 1
        result = <object>gone
        Py_DECREF(result)  # the slot's reference: ``result`` holds one of its own
        return result

    cpdef object remove(self, bytes raw):
        """Take the entry under ``raw`` out, returning it; None if there is none."""
        cdef Py_ssize_t i = self._find_raw(raw, PyObject_Hash(raw))
        return self._take(i) if i >= 0 else None

    # -- the dict the store's Python sees --

    def __len__(self) -> int:
        return self.used

    cdef inline PyObject *_at(self, raw) except? NULL:
        """The entry under ``raw`` (borrowed), NULL if none: any key but bytes is in no slot."""
        cdef Py_ssize_t i
        if type(raw) is not bytes:
            return NULL
        i = self._find_raw(raw, PyObject_Hash(raw))
        return self.slots[i].entry if i >= 0 else NULL

    def __contains__(self, raw) -> bool:
        return self._at(raw) != NULL

    def get(self, raw, default=None):
        cdef PyObject *found = self._at(raw)
        return default if found == NULL else <object>found

    def __getitem__(self, raw):
        cdef PyObject *found = self._at(raw)
        if found == NULL:
            raise KeyError(raw)
        return <object>found

    def __setitem__(self, raw, entry) -> None:
        if type(raw) is not bytes:
            raise TypeError(f"the index's keys are encoded keys (bytes), got {type(raw).__name__}")
        if type(entry) is not Entry:
            raise TypeError(f"the index holds entries, got {type(entry).__name__}")
        self.swap(raw, entry, PyObject_Hash(raw))

    def __delitem__(self, raw) -> None:
        if type(raw) is not bytes or self.remove(raw) is None:
            raise KeyError(raw)

    def pop(self, raw, default=_ABSENT):
        found = self.remove(raw) if type(raw) is bytes else None
        if found is None:
            if default is _ABSENT:
                raise KeyError(raw)
            return default
        return found

    def clear(self) -> None:
        self._drop_all()

    def values(self) -> list:
        cdef Py_ssize_t i
        return [<object>self.slots[i].entry for i in range(self.mask + 1) if self.slots[i].entry != NULL]

    def items(self) -> list:
        return [(entry.key, entry) for entry in self.values()]

    def keys(self) -> list:
        return [entry.key for entry in self.values()]

    def __iter__(self):
        return iter(self.keys())

    def __repr__(self) -> str:
        return f"<KeyIndex: {self.used} keys>"


cdef inline Py_hash_t key_hash(object key, bytes raw) except -1:
    """The index's hash of ``raw``, the encoding of a caller's ``key``: the str's own, kept in it, where
    that is the same (see ``STR_HASH_IS_UTF8_HASH``)."""
    if type(key) is str and STR_HASH_IS_UTF8_HASH and PyUnicode_IS_COMPACT_ASCII(key):
        return PyObject_Hash(key)
    return PyObject_Hash(raw)


# ---------------------------------------------------------------------------------------------------

cdef extern from "_shared_index.h" nogil:
    ctypedef struct mc_idx_header:
        uint64_t magic
        uint64_t slots
        int64_t heartbeat
    ctypedef struct mc_idx_slot:
        uint32_t seq
        uint32_t hits
    const uint64_t MC_IDX_MAGIC
    const uint32_t MC_TOMB
    int64_t mc_now_ns()
    mc_idx_slot *mc_idx_find(void *base, uint64_t mask, uint64_t h1, uint64_t h2)
    int mc_idx_publish(void *base, uint64_t mask, uint64_t h1, uint64_t h2, uint32_t off, uint32_t size)
    int mc_idx_remove(void *base, uint64_t mask, uint64_t h1, uint64_t h2)
    int64_t mc_idx_read(void *base, uint64_t mask, const uint8_t *pool, uint64_t pool_size, uint64_t h1, uint64_t h2,
                        uint8_t *dst, uint64_t room)

INDEX_HEADER_BYTES = sizeof(mc_idx_header)
INDEX_SLOT_BYTES = sizeof(mc_idx_slot)
INDEX_MAX_VALUE = MC_TOMB - 1


cdef inline int _split(bytes digest, uint64_t *h1, uint64_t *h2) except -1:
    if len(digest) != 16:
        raise ValueError("a shared-index key digest is 16 bytes")
    memcpy(h1, PyBytes_AS_STRING(digest), 8)
    memcpy(h2, PyBytes_AS_STRING(digest) + 8, 8)
    return 0


cdef class SharedIndex:
    """The node's index of DRAM-resident values, in shared memory, read by clients with no round trip.

    The node (``create=True``) publishes and removes entries under its store lock; clients, given the
    pool too, copy values out lock-free (``read_into``), checking a seqlock per slot: any doubt is a
    miss (-1), and the caller asks the node.  Keys are 16-byte digests of the key bytes.  The layout
    and the protocol are in ``_shared_index.h``."""

    cdef Py_buffer table
    cdef Py_buffer pool
    cdef bint held_table, held_pool
    cdef mc_idx_header *head
    cdef readonly uint64_t slots

    def __cinit__(self, table, pool=None, *, bint create=False):
        _get_write(table, &self.table, "index table")
        self.held_table = True
        self.head = <mc_idx_header *>self.table.buf
        cdef size_t n = <size_t>self.table.len
        if n < sizeof(mc_idx_header) + sizeof(mc_idx_slot):
            raise ValueError("index table too small")
        if create:
            memset(self.table.buf, 0, n)
            self.head.slots = 1
            while self.head.slots * 2 * sizeof(mc_idx_slot) + sizeof(mc_idx_header) <= n:
                self.head.slots *= 2
            self.head.magic = MC_IDX_MAGIC
            self.head.heartbeat = mc_now_ns()
        elif (self.head.magic != MC_IDX_MAGIC or self.head.slots == 0 or self.head.slots & (self.head.slots - 1)
              or self.head.slots > (n - sizeof(mc_idx_header)) // sizeof(mc_idx_slot)):
            raise ValueError("not a mooncakefs shared index")
        self.slots = self.head.slots
        if pool is not None:
            _get_read(pool, &self.pool, "pool")
            self.held_pool = True

    def release(self) -> None:
        if self.held_pool:
            PyBuffer_Release(&self.pool)
            self.held_pool = False
        if self.held_table:
            PyBuffer_Release(&self.table)
            self.held_table = False
            self.head = NULL

    def __dealloc__(self):
        self.release()

    cdef inline int _check(self) except -1:
        if not self.held_table:
            raise ValueError("shared index released")
        return 0

    # -- the node's side --

    def publish(self, bytes digest, size_t offset, size_t size) -> bool:
        """Make the value at pool ``offset`` (a multiple of 64) of ``size`` bytes readable; False if it
        cannot be (no slot within the probe limit, too large, or too far into the pool)."""
        cdef uint64_t h1, h2
        self._check()
        _split(digest, &h1, &h2)
        if (h1 == 0 and h2 == 0) or size >= MC_TOMB or offset % 64 or offset // 64 >= MC_TOMB:
            self.remove(digest)
            return False
        if mc_idx_publish(self.head, self.slots - 1, h1, h2, <uint32_t>(offset // 64), <uint32_t>size):
            return True
        return False

    def remove(self, bytes digest) -> bool:
        cdef uint64_t h1, h2
        self._check()
        _split(digest, &h1, &h2)
        return mc_idx_remove(self.head, self.slots - 1, h1, h2) == 1

    def hits(self, bytes digest) -> int:
        """How many shared-memory reads the entry has had since it was published (approximate)."""
        cdef uint64_t h1, h2
        self._check()
        _split(digest, &h1, &h2)
        cdef mc_idx_slot *s = mc_idx_find(self.head, self.slots - 1, h1, h2)
        return 0 if s == NULL or s.seq & 1 else s.hits

    def beat(self) -> None:
        """Tell readers the node is alive (it must say so at least every two seconds)."""
        self._check()
        mc_store_i64(&self.head.heartbeat, mc_now_ns())

    def stop(self) -> None:
        """Tell readers the node is gone: from now on every read asks the node (and learns it is down)."""
        self._check()
        mc_store_i64(&self.head.heartbeat, 0)

    # -- the clients' side --

    def read_into(self, bytes digest, dst) -> int:
        """Copy the value into ``dst``: its size; -1 to ask the node; -2 - size if ``dst`` is too small."""
        cdef uint64_t h1, h2
        cdef Py_buffer d
        cdef int64_t n
        self._check()
        if not self.held_pool:
            raise ValueError("this index was opened without the pool")
        _split(digest, &h1, &h2)
        _get_write(dst, &d, "buffer")
        try:
            if d.len >= GIL_FREE_BYTES:
                with nogil:
                    n = mc_idx_read(self.head, self.slots - 1, <const uint8_t *>self.pool.buf, self.pool.len, h1, h2,
                                    <uint8_t *>d.buf, d.len)
            else:
                n = mc_idx_read(self.head, self.slots - 1, <const uint8_t *>self.pool.buf, self.pool.len, h1, h2,
                                <uint8_t *>d.buf, d.len)
            return n
        finally:
            PyBuffer_Release(&d)

    def read_batch(self, list keys, list dsts, list results) -> list:
        """``RemoteStore._batch_read``'s loop on the node's host: each key whose ``results[i]`` is None
        and whose value is here gets it there, copied into ``dsts[i]`` (a writable buffer: the byte
        count) or, where ``dsts[i]`` is None, as new bytes of at most 64 KiB; a key ``encode_key``
        refuses gets its error.  Returns the indexes of the keys left for the node to answer (not here,
        being changed, larger than their buffer or than 64 KiB)."""
        cdef list left = []
        cdef Py_ssize_t i
        if len(dsts) != len(keys) or len(results) != len(keys):
            raise ValueError("read_batch takes one buffer and one result slot per key")
        for i in range(len(keys)):
            if results[i] is not None:
                continue
            try:
                raw = encode_key(keys[i])
            except MooncakeError as exc:
                results[i] = exc
                continue
            dst, digest = dsts[i], key_digest(raw)
            if dst is None:
                got = self.read(digest)
                if got is None:
                    left.append(i)
                else:
                    results[i] = got
            elif (got := self.read_into(digest, dst)) >= 0:
                results[i] = got
            else:
                left.append(i)
        return left

    def read(self, bytes digest, size_t room=65536):
        """The value as new bytes if it is at most ``room`` bytes, else None (ask the node)."""
        buf = PyBytes_FromStringAndSize(NULL, room)
        n = self.read_into_bytes(digest, buf)
        if n < 0:
            return None
        return buf[:n] if n != room else buf

    cdef int64_t read_into_bytes(self, bytes digest, bytes buf) except? -3:
        cdef uint64_t h1, h2
        self._check()
        if not self.held_pool:
            raise ValueError("this index was opened without the pool")
        _split(digest, &h1, &h2)
        return mc_idx_read(self.head, self.slots - 1, <const uint8_t *>self.pool.buf, self.pool.len, h1, h2,
                           <uint8_t *>PyBytes_AS_STRING(buf), len(buf))


# ---------------------------------------------------------------------------------------------------
# The store's common calls on small values, each one C call under the store's lock: at 4 KiB the
# bookkeeping around a copy (index, queues, allocator, counters) cost several times the copy in Python.
# Twin: _reference.PlainPath.

cdef unsigned int FRESH_QUEUE = 1, MAIN_QUEUE = 2


cdef extern from "<semaphore.h>" nogil:
    ctypedef struct sem_t:
        pass
    int sem_init(sem_t *sem, int pshared, unsigned int value)
    int sem_destroy(sem_t *sem)
    int sem_wait(sem_t *sem)
    int sem_trywait(sem_t *sem)
    int sem_clockwait(sem_t *sem, clockid_t clock, const timespec *abs_timeout)  # glibc 2.30+
    int sem_post(sem_t *sem)


cdef double LOCK_TIMEOUT_MAX = threading.TIMEOUT_MAX


@cython.final
cdef class StoreLock:
    """The store's lock: ``threading.Lock``'s interface (``acquire`` with ``blocking`` and ``timeout``,
    ``release``, ``locked``, a context manager; ``threading.Condition`` takes it) on a POSIX semaphore,
    which ``PlainPath`` takes and gives back in C: a threading.Lock cost each small call ~130-180 ns a
    round trip on the dev VM (its ``acquire`` parses its arguments and reads the clock even when it
    need not wait), this ~10 ns.  Not reentrant; any thread may release it, as a threading.Lock.  A
    wait releases the GIL and runs signal handlers (KeyboardInterrupt) as it is interrupted.
    Twin: ``threading.Lock`` itself (``_reference.StoreLock``)."""

    cdef sem_t *sem
    cdef bint held  # taken: what release() checks (a semaphore given back twice would let two in)

    def __cinit__(self):
        self.sem = <sem_t *>malloc(sizeof(sem_t))
        if self.sem == NULL:
            raise MemoryError()
        if sem_init(self.sem, 0, 1) != 0:
            c_free(self.sem)
            self.sem = NULL
            raise OSError(errno, os.strerror(errno))

    def __dealloc__(self):
        if self.sem != NULL:
            sem_destroy(self.sem)
            c_free(self.sem)

    cdef inline bint _try(self) noexcept:
        """Take it if it is free, at once."""
        if sem_trywait(self.sem) == 0:
            self.held = True
            return True
        return False

    cdef inline int _take(self) except -1:
        """``acquire()`` in C: at once if free, else waiting with the GIL released."""
        if not self._try():
            self._wait(-1)
        return 0

    cdef inline void _give(self) noexcept:
        """``release()`` in C, by the holder."""
        self.held = False
        sem_post(self.sem)

    cdef bint _wait(self, double timeout) except -1:
        """Wait up to ``timeout`` seconds (negative: no limit) with the GIL released: True once taken,
        False at the timeout; whatever a signal handler raises meanwhile."""
        cdef int r = 0, err = 0
        cdef timespec deadline
        cdef long whole
        if timeout >= 0:
            clock_gettime(CLOCK_MONOTONIC, &deadline)  # not the wall clock, which may be stepped
            whole = <long>timeout
            deadline.tv_sec += whole
            deadline.tv_nsec += <long>((timeout - whole) * 1e9)
            if deadline.tv_nsec >= 1000000000:
                deadline.tv_sec += 1
                deadline.tv_nsec -= 1000000000
        while True:
            with nogil:
                r = sem_wait(self.sem) if timeout < 0 else sem_clockwait(self.sem, CLOCK_MONOTONIC, &deadline)
                err = errno if r else 0
            if r == 0:
                self.held = True
                return True
            if err == EINTR:  # a signal: its Python handler runs now, and may raise
                PyErr_CheckSignals()
            elif err == ETIMEDOUT:
                return False
            else:
                raise OSError(err, os.strerror(err))

    def acquire(self, bint blocking=True, double timeout=-1) -> bool:
        """As ``threading.Lock.acquire``."""
        if not blocking:
            if timeout != -1:
                raise ValueError("can't specify a timeout for a non-blocking call")
            return self._try()
        if timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
        if timeout > LOCK_TIMEOUT_MAX:
            raise OverflowError("timeout value is too large")
        return self._try() or self._wait(timeout)

    cdef int _release(self) except -1:
        if not self.held:
            raise RuntimeError("release unlocked lock")
        self._give()
        return 0

    def release(self) -> None:
        """As ``threading.Lock.release``: RuntimeError if it is not taken."""
        self._release()

    def locked(self) -> bool:
        return self.held

    def __enter__(self) -> bool:
        self._take()
        return True

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release()

    def __repr__(self) -> str:
        return f"<mooncakefs._engine.StoreLock {'locked' if self.held else 'unlocked'}>"


@cython.final
cdef class PlainPath:
    """The store's hot paths over its DRAM tier: plain puts into a store with no VRAM tier (``put``,
    ``batch_put``, ``put_run``) and reads of small DRAM-resident values (``get``, ``get_into``,
    ``batch_get_into``, ``read_batch``).

    Built by the store once its tiers are wired, from its ``DramTier`` (pool, allocator, queues, ghost
    list; its watermarks and fresh share are read then, and do not change after) and itself (the index,
    its lock, the heap of expiring values, and its general methods for anything unusual: a leased head,
    a fragmented pool, eviction that demotes to SSD, a replaced value with an SSD copy, a sticky value
    to write through).  Every call takes the store's lock itself (taking it in Python cost as much as
    the call), and checks that the store is open."""

    cdef object dram, store, ghost
    cdef StoreLock lock
    cdef KeyIndex index
    cdef dict counters
    cdef list expiring
    cdef EntryQueue fresh, main
    cdef OffsetAllocator allocator
    cdef Arena arena
    cdef long long high, low, fresh_max, ghost_factor, small_max, batch_max, batch_bytes
    cdef long long evicted  # values it has evicted, all calls together
    cdef long long hits  # reads _hit counted, not yet in the DRAM tier's counters (fold_counters)
    cdef bint closed, shared, has_ssd, has_vram

    def __cinit__(self, dram, store, lock, long long small_max, long long batch_max, long long batch_bytes):
        """``lock``: the store's lock (a ``StoreLock``: every other store path takes it too);
        ``small_max``: values below it are put and read here one at a time; ``batch_max``: values up to
        it are put and read here in batches, the lock taken again after each ``batch_bytes`` copied."""
        self.dram, self.store = dram, store
        self.lock = lock
        self.index, self.counters, self.expiring = store._index, dram.counters, store._expiring
        self.has_ssd, self.has_vram = store._ssd is not None, store._vram is not None
        self.fresh, self.main, self.ghost = dram.fresh, dram.main, dram.ghost
        self.allocator, self.arena = dram.allocator, dram.arena
        self.high, self.low, self.fresh_max, self.ghost_factor = dram.high, dram.low, dram.fresh_max, dram.ghost_factor
        self.small_max, self.batch_max, self.batch_bytes = small_max, batch_max, batch_bytes

    def close(self) -> None:
        """The store is closed (lock held): the calls that take the lock raise StoreClosed themselves
        (``_lock_open``); the others leave the work to the store's general path, which says so."""
        self.closed = True

    def fold_counters(self) -> None:
        """Add the hits ``get`` and ``get_into`` counted to the DRAM tier's counters (lock held):
        ``Store.stats`` calls it first.  A dict update on every read cost a 4 KiB get a twentieth."""
        if self.hits:
            self.counters["hits"] += self.hits
            self.hits = 0

    def index_shared(self) -> None:
        """The store now keeps a shared index in step (lock held): puts go to its general path."""
        self.shared = True

    cdef inline bint _plain_store(self) noexcept:
        """Whether plain puts may be stored here (lock held): an open store with no shared index to keep
        in step, no VRAM tier and nothing that may expire (otherwise ``Store._put_locked`` stores them)."""
        return not (self.closed or self.shared or self.has_vram or self.expiring)

    cdef inline int acquire(self) except -1:
        """Take the store's lock, in C."""
        return self.lock._take()

    cdef inline void release(self) noexcept:
        """Give the store's lock back, in C."""
        self.lock._give()

    cdef int _lock_open(self) except -1:
        """Take the store's lock; StoreClosed (the store's own words) if the store is closed."""
        self.acquire()
        if self.closed:
            self.release()
            self.store._check_open()
        return 0

    # -- writing --

    cdef int _make_room(self, long long size) except -1:
        """Evict queue heads down to the low watermark if ``size`` more bytes would pass the high one
        (no tier below: a victim leaves the store).  A leased head goes to the tier's general eviction."""
        cdef EntryQueue queue
        cdef Entry victim
        if <long long>(self.allocator.used_units * UNIT) + size <= self.high:
            return 0
        while <long long>(self.allocator.used_units * UNIT) + size > self.low:
            queue = self.fresh if (self.fresh.nbytes > self.fresh_max or not self.main.count) else self.main
            if not queue.count:
                break
            victim = <Entry>queue.head
            if victim.readers:  # leased: the tier's general path steps around it
                if not self.dram.evict_one():
                    break
                continue
            vraw = victim.key
            queue.unlink(victim)
            self.index.remove(vraw)
            victim.word.dead = True
            self.allocator._free(victim.dram)
            victim.dram = -1
            victim.dram_unit = NONE
            self.evicted += 1
            self.ghost[vraw] = None
            if len(self.ghost) > self.ghost_factor * len(self.index) + 64:
                self.ghost.popitem(last=False)
        return 0

    cdef int _put(self, bytes raw, key, Entry entry, value, const char *src, options) except -1:
        """One plain put of ``value``, whose ``entry.size`` bytes are at ``src`` (lock held): room,
        block, copy, publish, queue.  Returns 1 where it changed the SSD tier (the caller commits)."""
        cdef long long size = entry.word.size, handle = -1, offset = 0
        cdef int changed = 0
        cdef Entry old
        if entry.word.sticky and self.has_ssd:  # written through to SSD as it is put: the general path
            self.store._put_locked(raw, key, entry, value, options, self.batch_max + 1)
            return 0
        if not self.has_ssd:  # no tier below: evicted heads leave the store, inline
            self._make_room(size)
        if not self.has_ssd or <long long>(self.allocator.used_units * UNIT) + size <= self.high:
            handle = self.allocator._alloc(size)
        if handle >= 0:
            offset = <long long>self.allocator.n_off[handle] * UNIT
        else:  # a fragmented pool, a leased head, or eviction that demotes to SSD: the tier's general path
            handle, offset = self.dram.reserve(size)
            changed = self.has_ssd
            if handle < 0:  # raises the OutOfSpace a put would, or stores the value on SSD only
                self.store._put_locked(raw, key, entry, value, options, size + 1)
                return 0
        self.arena._check(offset, size)
        _copy_to_pool(self.arena.base + <size_t>offset, src, size)
        entry.dram = handle
        entry.dram_unit = <uint32_t>(offset // UNIT)
        old = self.index.swap(raw, entry, key_hash(key, raw))
        if old is not None:  # replaced: DramTier.unqueue and Store._discard, inline
            if old.word.queue == MAIN_QUEUE:
                self.main.unlink(old)
            elif old.word.queue == FRESH_QUEUE:
                self.fresh.unlink(old)
            if old.seg >= 0:  # an SSD copy: the store frees it
                self.store._discard(raw, old)
                changed = 1
            else:
                old.word.dead = True
                if old.dram >= 0 and not old.readers:
                    self.allocator._free(old.dram)
                    old.dram = -1
                    old.dram_unit = NONE
        if entry.word.sticky:  # no tier below to demote it to: never evicted (DramTier.evictable)
            pass
        elif old is not None:  # replaced: used again
            self.main.push(raw, entry)
        elif self.ghost and raw in self.ghost:
            del self.ghost[raw]
            self.main.push(raw, entry)
        else:
            self.fresh.push(raw, entry)
        return changed

    cdef inline void _count_evictions(self, long long before) except *:
        cdef long long evicted = self.evicted - before
        if evicted:
            self.counters["evictions"] += evicted

    def put(self, key, value, **options) -> None:
        """``Store.put`` as the store's instances answer it (``Store._init_state`` binds it): a put with no
        options of a value below ``small_max`` bytes into an open store with no VRAM tier, no shared
        index and nothing that may expire is done here; any other goes to ``Store.put`` (options) or
        ``Store._put_general``, which say what is wrong with the value.  A refused key raises what
        ``keys.encode_key`` says."""
        if options:
            type(self.store).put(self.store, key, value, **options)
        elif not self._put_small(key, value):
            self.store._put_general(key, value, PLAIN_PUT, None)

    cdef bint _put_small(self, key, value) except -1:
        """``put`` of a plain small value: True once done, False to leave it to the store's general path.
        The value's buffer is taken once, for its size and its copy."""
        cdef Py_buffer s
        cdef long long before
        cdef int changed = 0
        cdef Entry entry
        if type(key) is InternalKey:  # sticky (a file chunk): the general path writes it through
            return False
        if not _readable(value, &s):
            return False
        try:
            if s.len >= self.small_max:
                return False
            raw = encode_key(key)
            entry = _new_entry(s.len)
            self.acquire()
            try:
                if not self._plain_store():
                    return False
                before = self.evicted
                try:
                    changed = self._put(raw, key, entry, value, <const char *>s.buf, PLAIN_PUT)
                finally:
                    self._count_evictions(before)
                    if changed:
                        self.store._commit()
            finally:
                self.release()
        finally:
            PyBuffer_Release(&s)
        return True

    cdef int _put_item(self, tuple item, list results, options, const Py_buffer *held) except -1:
        """``_put`` of one run item ``(i, raw, key, Entry, value)``, from ``held`` (its value's buffer,
        taken by ``_prepare``) or else from a buffer taken here; an error of the item's own (one of
        BATCH_ERRORS) goes in ``results[i]``.  Returns what ``_put`` does."""
        cdef Entry entry = <Entry>item[3]
        cdef Py_buffer s
        if held != NULL:
            try:
                return self._put(item[1], item[2], entry, item[4], <const char *>held.buf, options)
            except BATCH_ERRORS as exc:
                results[<Py_ssize_t>item[0]] = exc
            return 0
        try:
            _get_read(item[4], &s, "value")
            try:
                if s.len != entry.word.size:
                    raise ValueError(f"value is {s.len} bytes, {entry.word.size} expected")
                return self._put(item[1], item[2], entry, item[4], <const char *>s.buf, options)
            finally:
                PyBuffer_Release(&s)
        except BATCH_ERRORS as exc:
            results[<Py_ssize_t>item[0]] = exc
        return 0

    def put_run(self, list run, list results, options, bint plain) -> None:
        """``Store._put_run``: see ``_put_run``."""
        self._put_run(run, results, options, plain, NULL)

    cdef int _put_run(self, list run, list results, options, bint plain, const Py_buffer *views) except -1:
        """Store a run of prepared items ``(i, raw, key, Entry, value)`` (from ``prepare_run``, or from
        ``Store._prepare_run`` for other options), the store's lock taken once per ``batch_bytes`` copied; an item that raises
        one of BATCH_ERRORS gets it in ``results[i]``.  ``plain``: no item is pinned, expiring,
        versioned, tagged, durable or conditional, so while the store allows it (``_plain_store``) the
        items are stored here, and otherwise one by one by the store's general path.  The run's new
        values are queued leaf first before the lock is let go the last time.  ``views``: NULL, or the
        buffers of the run's values (``_prepare``'s), item by item."""
        cdef Py_ssize_t n = len(run), at = 0
        cdef long long copied, before
        cdef int changed
        cdef tuple item
        while at < n:
            self._lock_open()
            try:
                copied = 0
                if plain and self._plain_store():
                    before, changed = self.evicted, 0
                    try:
                        while at < n and copied < self.batch_bytes:
                            item = <tuple>run[at]
                            at += 1
                            copied += (<Entry>item[3]).word.size
                            changed |= self._put_item(item, results, options, NULL if views == NULL else &views[at - 1])
                    finally:
                        self._count_evictions(before)
                        if changed:
                            self.store._commit()
                else:
                    while at < n and copied < self.batch_bytes:
                        item = <tuple>run[at]
                        at += 1
                        copied += (<Entry>item[3]).word.size
                        try:
                            self.store._put_locked(item[1], item[2], item[3], item[4], options, self.batch_max + 1)
                        except BATCH_ERRORS as exc:
                            results[<Py_ssize_t>item[0]] = exc
                if at == n and n > 1:  # leaf first, still locked
                    self._leaf_first(run)
            finally:
                self.release()
        return 0

    cdef Py_ssize_t _prepare(self, list pairs, Py_ssize_t at, list results, list run, Py_buffer *views) except -1:
        """For each (key, value) pair of ``pairs[at:]`` a slot in ``results`` and, for a value of up to
        ``batch_max`` bytes, an item ``(i, raw, key, Entry, value)`` in ``run`` (or the exception, one of
        BATCH_ERRORS, it raised in its slot).  Stops at a larger value, its slot added, and returns its
        index (``len(pairs)`` when done).  ``views``: NULL, or room for one buffer per pair, where the
        buffer of each value that joins the run is kept (``views[k]`` for ``run[k]``, the caller's to
        release) for ``_put_run`` to copy from: taking a numpy array's buffer costs more instructions
        than the rest of a 4 KiB put's preparing, and it was taken twice."""
        cdef Py_ssize_t n = len(pairs), size
        cdef Entry entry
        cdef Py_buffer *view
        while at < n:
            key, value = pairs[at]
            results.append(None)
            try:
                view = NULL if views == NULL else &views[len(run)]
                try:
                    if view == NULL:
                        size = _nbytes(value)
                    else:
                        _get_read(value, view, "value")
                        size = view.len
                except TypeError:
                    raise value_error(value) from None
                try:
                    if size > self.batch_max:
                        return at
                    raw = encode_key(key)
                    entry = _new_entry(size)
                    entry.word.sticky = type(key) is InternalKey
                    run.append((at, raw, key, entry, value))
                    view = NULL  # the run's now
                finally:
                    if view != NULL:
                        PyBuffer_Release(view)
            except BATCH_ERRORS as exc:
                results[at] = exc
            at += 1
        return at

    def prepare_run(self, list pairs, Py_ssize_t at, list results, list run) -> int:
        """``Store._batch_put``'s loop for plain options over pairs it has checked: see ``_prepare``."""
        return self._prepare(pairs, at, results, run, NULL)

    def batch_put(self, items, **options) -> list:
        """``Store.batch_put`` as the store's instances answer it (``Store._init_state`` binds it): a batch
        with no options in one call here, unless ``_batch_put_small`` leaves it to the store's general
        path (``Store._batch_put_general``); one with options goes to ``Store.batch_put``."""
        if options:
            return type(self.store).batch_put(self.store, items, **options)
        results = self._batch_put_small(items)
        return self.store._batch_put_general(items, PLAIN_PUT) if results is None else results

    cdef list _batch_put_small(self, items):
        """A batch with no options: the results, or None to leave the batch to the store's general path,
        which says what is wrong with it (``items`` not a dict or a list of (key, value) tuples) or
        takes what is not small (a value above ``batch_max`` bytes).  Nothing is stored before it
        decides."""
        cdef list pairs, results = [], run = []
        cdef Py_ssize_t i, n
        cdef Py_buffer *views
        if type(items) is list:
            pairs = list(<list>items)  # our own: the caller's list may change while the lock is awaited
            n = len(pairs)
            for i in range(n):
                if type(pairs[i]) is not tuple or len(<tuple>pairs[i]) != 2:
                    return None
        elif type(items) is dict:
            pairs = list((<dict>items).items())
            n = len(pairs)
        else:
            return None
        views = <Py_buffer *>malloc(max(n, 1) * sizeof(Py_buffer))
        if views == NULL:
            raise MemoryError()
        try:
            if self._prepare(pairs, 0, results, run, views) != n:
                return None
            self._put_run(run, results, PLAIN_PUT, True, views)
            return results
        finally:
            for i in range(len(run)):
                PyBuffer_Release(&views[i])
            c_free(views)

    cdef void _leaf_first(self, list run) noexcept:
        """Requeue a run's fresh values last item first: a chain's head the newest of the fresh queue,
        so that its tail goes first."""
        cdef Py_ssize_t i
        cdef Entry entry
        for i in range(len(run) - 1, -1, -1):
            entry = <Entry>(<tuple>run[i])[3]
            if entry.word.queue == FRESH_QUEUE:
                self.fresh.to_back(entry)

    # -- reading --

    cdef Entry _hit(self, key, long long limit):
        """The entry of a DRAM-resident value of at most ``limit`` bytes that cannot expire, counted as a
        hit and touched (the most recent of main); None where the store's general path must do the work.
        A refused key raises."""
        cdef object found = self.index.lookup(key)
        if found is None:
            return None
        cdef Entry entry = <Entry>found
        if entry.dram < 0 or <long long>entry.word.size > limit or entry.expires:
            return None
        self.hits += 1
        self._touch(entry)
        return entry

    cdef inline void _touch(self, Entry entry) except *:
        """DramTier.touch: a read makes a resident the most recent of main."""
        if entry.word.queue == MAIN_QUEUE:
            self.main.to_back(entry)
        elif entry.word.queue == FRESH_QUEUE:
            self.fresh.unlink(entry)
            self.main.push(entry.key, entry)

    cdef inline bytes _copy_out(self, Entry entry):
        cdef size_t size = entry.word.size
        self.arena._check(<size_t>entry.dram_unit * UNIT, size)
        out = PyBytes_FromStringAndSize(NULL, size)
        _memcpy(PyBytes_AS_STRING(out), self.arena.base + <size_t>entry.dram_unit * UNIT, size)
        return out

    def get(self, key) -> bytes:
        """``Store.get`` as the store's instances answer it (``Store._init_state`` binds it): a small
        DRAM-resident value is copied out here, anything else by ``Store._get_general``."""
        value = self._get_small(key)
        return self.store._get_general(key) if value is None else value

    cdef bytes _get_small(self, key):
        """``get`` of a small DRAM-resident value in an open store, the store's lock taken here: the value
        as new bytes, or None: ask the store's general path.  A refused key raises."""
        cdef Entry entry
        self.acquire()
        try:
            if self.closed:
                return None
            entry = self._hit(key, self.small_max - 1)
            return None if entry is None else self._copy_out(entry)
        finally:
            self.release()

    def get_into(self, key, buffer) -> int:
        """``Store.get_into`` of a small DRAM-resident value in an open store, the store's lock taken here:
        its size; -1 to ask the store's general path (which also says what is wrong with a buffer that is
        not writable); -2 - size if the buffer is too small (nothing written).  A refused key raises."""
        cdef Entry entry
        cdef Py_buffer d
        cdef long long size
        if not _writable(buffer, &d):
            return -1
        try:
            self.acquire()
            try:
                if self.closed:
                    return -1
                entry = self._hit(key, self.small_max - 1)
                if entry is None:
                    return -1
                size = entry.word.size
                if d.len < size:
                    return -2 - size
                self.arena._check(<size_t>entry.dram_unit * UNIT, size)
                mc_copy(d.buf, self.arena.base + <size_t>entry.dram_unit * UNIT, size)
                return size
            finally:
                self.release()
        finally:
            PyBuffer_Release(&d)

    def lease(self, key):
        """``ValueView``'s read of a DRAM-resident value that cannot expire, the store's lock taken here:
        its entry, leased (its block is neither evicted nor reused until ``unlease``), counted as a hit
        and touched; None to leave the read to the store's general path.  A refused key raises."""
        cdef Entry entry
        self.acquire()
        try:
            if self.closed:
                return None
            entry = self._hit(key, ANY_SIZE)
            if entry is not None:
                entry.readers += 1
            return entry
        finally:
            self.release()

    def unlease(self, Entry entry) -> None:
        """End a ``lease``, the store's lock taken here; the last reader of a value replaced or removed
        meanwhile frees it through ``Store._release_lease``."""
        self.acquire()
        try:
            if entry.readers > 1 or not entry.word.dead:
                entry.readers -= 1
            else:
                self.store._release_lease(entry)
        finally:
            self.release()

    cdef Py_ssize_t _read_many(self, list keys, list buffers, list results, Py_ssize_t i) except -1:
        """One lock's worth of ``read_batch`` (lock held): from key ``i`` on, until ``batch_bytes`` of
        values of at least ``small_max`` bytes are copied; returns where the next one starts."""
        cdef Py_ssize_t n = len(keys)
        cdef long long copied = 0, hits = 0, size, counted = -1
        cdef object found, count = None  # the int of the last byte count given (``counted``): one per size
        cdef Entry entry
        cdef Py_buffer d
        cdef bint into = buffers is not None, done
        try:
            while i < n:
                key = keys[i]
                i += 1
                try:
                    found = self.index.lookup(key)
                    if found is None:
                        continue
                    entry = <Entry>found
                    size = entry.word.size
                    if entry.dram < 0 or size > self.batch_max or entry.expires:
                        continue
                    if not into:
                        results[i - 1] = self._copy_out(entry)
                    else:
                        done = False
                        if _writable(buffers[i - 1], &d):
                            try:
                                if d.len >= size:
                                    self.arena._check(<size_t>entry.dram_unit * UNIT, size)
                                    _memcpy(d.buf, self.arena.base + <size_t>entry.dram_unit * UNIT, size)
                                    done = True
                            finally:
                                PyBuffer_Release(&d)
                        if done:
                            if size != counted:
                                count, counted = size, size
                            results[i - 1] = count
                        else:  # the store's own copy raises why not (a short or read-only buffer)
                            results[i - 1] = self.store._copy_into(key, entry, buffers[i - 1])
                    hits += 1
                    self._touch(entry)
                    if size >= self.small_max:  # small ones were always copied under the lock
                        copied += size
                        if copied >= self.batch_bytes:
                            break
                except BATCH_ERRORS as exc:
                    results[i - 1] = exc
        finally:
            if hits:
                self.counters["hits"] += hits
        return i

    def read_batch(self, list keys, list buffers) -> list:
        """``Store.batch_get``'s loop: see ``_read_batch``."""
        return self._read_batch(keys, buffers)

    cdef list _read_batch(self, list keys, list buffers):
        """The loop of ``Store.batch_get`` and ``batch_get_into``: copy the DRAM-resident values of up to
        ``batch_max`` bytes among ``keys`` into ``buffers`` (None: into new bytes), the store's lock
        taken once per ``batch_bytes`` copied.  Returns one slot per key: the byte count or the bytes,
        or the exception (one of BATCH_ERRORS) the key raised, or None where the store's single-key path
        must do the work (misses, SSD, large or expiring values, GPU buffers)."""
        cdef Py_ssize_t n = len(keys), start = 0
        cdef list results = [None] * n
        while start < n:
            self._lock_open()
            try:
                start = self._read_many(keys, buffers, results, start)
            finally:
                self.release()
        return results

    def batch_get_into(self, keys, buffers):
        """``Store.batch_get_into`` in one call: one result per key, the byte count or the exception for
        that key; the keys ``read_batch`` leaves go to the store's ``get_into`` one by one.  None leaves
        the call to the store, which says what is wrong with its arguments (``keys`` and ``buffers`` not
        two lists of the same length)."""
        if type(keys) is not list or type(buffers) is not list or len(<list>keys) != len(<list>buffers):
            return None
        # Copies: the loops index them unchecked, and another thread may resize the caller's lists while
        # the lock is awaited (the GIL released).
        keys, buffers = list(<list>keys), list(<list>buffers)
        cdef list results = self._read_batch(<list>keys, <list>buffers)
        cdef Py_ssize_t i
        for i in range(len(results)):
            if results[i] is None:
                results[i] = self.store._each(self.store.get_into, keys[i], buffers[i])
        return results


cdef inline Entry _new_entry(Py_ssize_t size):
    """A fresh entry of ``size`` bytes (below the 2**48 limit: a buffer's length), its fields set here
    rather than through ``Entry.__init__``'s checks."""
    cdef Entry entry = Entry.__new__(Entry)
    entry.word.size = size
    return entry


cdef int _take_buffer(object obj, Py_buffer *view, int flags) except -1:
    """Take a view of ``obj`` with ``flags``: 1, or 0 (no error set) if it has none (BufferError,
    TypeError, ValueError: numpy's word for a read-only array).  No try block: the call is on every put
    and read."""
    if _get_buffer(obj, view, flags | AS_BYTES) == 0:
        if not _holds_objects(view.format):
            return 1
        PyBuffer_Release(view)  # Python objects: the general path says why they are no value
        return 0
    if PyErr_ExceptionMatches(BufferError) or PyErr_ExceptionMatches(TypeError) or PyErr_ExceptionMatches(ValueError):
        PyErr_Clear()
        return 0
    return -1


cdef inline int _readable(object obj, Py_buffer *view) except -1:
    """Take a C-contiguous view of ``obj``: 1, or 0 (no error set) if it has none."""
    return _take_buffer(obj, view, PyBUF_SIMPLE)


cdef inline int _writable(object obj, Py_buffer *view) except -1:
    """Take a writable C-contiguous view of ``obj``: 1, or 0 (no error set) if it has none."""
    return _take_buffer(obj, view, PyBUF_SIMPLE | PyBUF_WRITABLE)


# ---------------------------------------------------------------------------------------------------
# The transfer engine's same-host batches.  Twin: _reference.copy_at.

STREAM_COPY_MIN = MC_STREAM_MIN
_STREAM_KINDS = ("memcpy", "sse2", "avx2")  # the header's MC_STREAM_MEMCPY, _SSE2, _AVX2


def stream_copy_kind() -> str:
    """How a copy of STREAM_COPY_MIN bytes or more stores: "avx2" or "sse2" (streaming, what the CPU has),
    or "memcpy" (not x86-64, or forced): the benches print it beside their references."""
    return _STREAM_KINDS[mc_stream_current()]


def force_stream_copy(kind: str) -> str:
    """Pin the large copies' path to ``kind`` ("memcpy", "sse2", "avx2", or "auto": the best again), so
    tests reach every path on one CPU; one the CPU lacks falls to the best it has.  Returns the path taken."""
    if kind != "auto" and kind not in _STREAM_KINDS:
        raise ValueError(f"stream copy kind {kind!r}: expected auto, {', '.join(_STREAM_KINDS)}")
    return _STREAM_KINDS[mc_stream_force(-1 if kind == "auto" else _STREAM_KINDS.index(kind))]


def copy_at(dst_addrs, src_addrs, lengths, pinned=()) -> int:
    """Copy ``lengths[i]`` bytes from address ``src_addrs[i]`` to ``dst_addrs[i]``, every copy with the
    GIL released once: a same-host batch given as pointers, with no memoryview per block (building 64 of
    them cost as much as copying 1 MiB); STREAM_COPY_MIN bytes or more in all with streaming stores (the
    destinations are a peer's or a caller's memory, not read back at once).  ``pinned``: buffers held
    (exported) until the copies end, so that a mapping they own cannot be closed meanwhile.  The caller has checked every range against what
    its owner registered; nothing here can.  Returns the bytes copied."""
    cdef Py_ssize_t count = len(lengths), npin = len(pinned), i, held = 0
    if len(dst_addrs) != count or len(src_addrs) != count:
        raise ValueError(f"{len(dst_addrs)} destinations and {len(src_addrs)} sources for {count} lengths")
    cdef size_t *d = <size_t *>malloc(max(count, 1) * 3 * sizeof(size_t))
    cdef Py_buffer *pins = <Py_buffer *>malloc(max(npin, 1) * sizeof(Py_buffer))
    if d == NULL or pins == NULL:
        c_free(d)
        c_free(pins)
        raise MemoryError()
    cdef size_t *s = d + count
    cdef size_t *n = s + count
    cdef size_t total = 0
    try:
        for i in range(count):
            d[i], s[i], n[i] = dst_addrs[i], src_addrs[i], lengths[i]
            if n[i] and (d[i] == 0 or s[i] == 0):
                raise ValueError(f"copy {i}: no memory at address 0")
            total += n[i]
        for held in range(npin):
            _get_read(pinned[held], &pins[held], "pinned buffer")
        held = npin
        if mc_stream_worth(total):  # far past the caches: streaming stores (_stream_copy.h says why)
            with nogil:
                for i in range(count):
                    mc_stream_copy(<void *>d[i], <const void *>s[i], n[i])
        elif total >= GIL_FREE_BYTES:
            with nogil:
                for i in range(count):
                    mc_copy(<void *>d[i], <const void *>s[i], n[i])
        else:
            for i in range(count):
                mc_copy(<void *>d[i], <const void *>s[i], n[i])
        return total
    finally:
        for i in range(held):
            PyBuffer_Release(&pins[i])
        c_free(d)
        c_free(pins)


# ------------------------------------------------------------------------ the framing of a connection

import socket as _socket
import struct as _struct
import errno as _errno

import msgpack as _msgpack

from mooncakefs.errors import ProtocolError, Unavailable
from mooncakefs import frame as _frame

from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.string cimport memmove

cdef Py_ssize_t HEADER_SIZE = _frame.HEADER.size
cdef unsigned int FRAME_MAGIC = _frame.MAGIC
cdef Py_ssize_t RECV_BUFFER = _frame.RECV_BUFFER
cdef Py_ssize_t FIRST_READ = _frame.FIRST_READ
cdef Py_ssize_t SMALL_SEND = _frame.SMALL_SEND
cdef Py_ssize_t IOV_CHUNK = _frame.IOV_CHUNK
cdef Py_ssize_t MAX_META = _frame.MAX_META
cdef uint64_t MAX_PAYLOAD = _frame.MAX_PAYLOAD
cdef int PAD_SHIFT = _frame.PAD_SHIFT
cdef int FLAGS_MASK = _frame.FLAGS_MASK
cdef Py_ssize_t LINE = _frame.LINE
cdef Py_ssize_t CRC_CHUNK = _frame.CRC_CHUNK
cdef int WITH_CRC = _frame.WITH_CRC
assert _frame.CRC_TRAILER.format == "<I", "a value's CRC trailer changed: update Framing"
assert HEADER_SIZE == 16 and _frame.HEADER.format == "<HBBIQ", "frame header layout changed: update Framing"

cdef object _pack = _msgpack.Packer(use_bin_type=True).pack
cdef object _unpackb = _msgpack.unpackb
cdef object _UnpackException = _msgpack.UnpackException
cdef int _MSG_WAITALL = _socket.MSG_WAITALL


cdef inline double _monotonic() noexcept:
    """time.monotonic(): the same clock (CLOCK_MONOTONIC), without a call into Python."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline uint64_t _le(const unsigned char *p, int n) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n - 1, -1, -1):
        v = (v << 8) | p[i]
    return v


cdef inline void _put_le(unsigned char *p, uint64_t v, int n) noexcept:
    cdef int i
    for i in range(n):
        p[i] = <unsigned char>(v & 0xFF)
        v >>= 8


cdef Py_ssize_t _pad_for(object first, object destination) except -1:
    """The padding that starts a large payload at its ``frame.payload_phase`` (a frame's header and meta
    are added by the caller's arithmetic: see ``frame_head``)."""
    cdef size_t source = address(first)
    cdef size_t dest = <size_t>(destination % LINE)  # any int a peer names: only its phase counts
    cdef size_t skew = (dest - source) % LINE
    if 0 < skew < <size_t>(LINE // 2):
        return <Py_ssize_t>((source + LINE // 2) % LINE)
    return <Py_ssize_t>(source % LINE)


cdef bytes _frame_head(int op, int flags, bytes m, uint64_t payload_len, object first, object destination,
                       Py_ssize_t room=0):
    """A frame's header and meta, padded for ``first`` (None: no padding), and ``room`` bytes after them
    left for the caller to fill (a small payload sent in the same buffer)."""
    if not 0 <= op < 256 or not 0 <= flags <= FLAGS_MASK:
        raise ValueError(f"opcode {op} or flags {flags} out of a frame header's range")
    cdef Py_ssize_t mlen = len(m)
    cdef Py_ssize_t pad = 0
    if first is not None:
        pad = ((_pad_for(first, destination) - HEADER_SIZE - mlen) % LINE + LINE) % LINE  # C's % may be < 0
    cdef bytes head = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + mlen + pad + room)
    cdef unsigned char *w = <unsigned char *>PyBytes_AS_STRING(head)
    _put_le(w, FRAME_MAGIC, 2)
    w[2] = <unsigned char>op
    w[3] = <unsigned char>(flags | pad << PAD_SHIFT)
    _put_le(w + 4, <uint64_t>mlen, 4)
    _put_le(w + 8, payload_len, 8)
    memcpy(w + HEADER_SIZE, PyBytes_AS_STRING(m), mlen)
    memset(w + HEADER_SIZE + mlen, 0, pad)
    return head


def frame_head(int op, int flags, bytes m, uint64_t payload_len, first=None, destination=0) -> bytes:
    """A frame's header and meta ``m``; with ``first`` (the first buffer of a large payload) padded so
    that the payload starts at its ``payload_phase`` for ``destination``."""
    return _frame_head(op, flags, m, payload_len, first, destination)


cdef bint _timed_out(object exc):
    """Whether a socket call failed only because its timeout passed."""
    return exc.errno in (_errno.EAGAIN, _errno.EWOULDBLOCK) or isinstance(exc, TimeoutError)


cdef class Framing:
    """The part of a connection every request and reply goes through (``wire.Channel`` adds the rest):
    its receive buffer, reading a frame's header and meta, receiving a payload, sending a frame.  Not
    thread-safe: one request at a time, by one thread.

    Reads are buffered, so a small frame costs one ``recv``; payloads bigger than what is buffered are
    received straight into the caller's memory.  The socket is called through its Python methods, so a
    test may hand in any object that has them."""

    cdef public object sock, peer
    # A node's limit on receiving the current frame (time.monotonic()): a peer that trickles its bytes
    # is dropped once it passes, even though each recv makes progress.
    cdef public object deadline
    cdef public long long payload_left  # bytes of the current frame's payload not yet read
    cdef public int flags  # the current frame's header flags
    cdef public bint closed
    cdef public Py_ssize_t _start, _end
    cdef readonly bytearray _buf
    cdef readonly object _view
    cdef unsigned char *_p

    def __init__(self, sock, peer, timeout=None):
        self.sock, self.peer = sock, peer
        if timeout is not None:
            self.set_timeout(timeout)
        if sock.family != _socket.AF_UNIX:
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._p = <unsigned char *>PyByteArray_AS_STRING(self._buf)
        self._start = self._end = 0
        self.payload_left = 0
        self.flags = 0
        self.closed = False
        self.deadline = None

    def close(self):
        if not self.closed:
            self.closed = True
            self.sock.close()

    def set_timeout(self, seconds):
        """How long one send or recv may wait: kernel-side timeouts keep the socket blocking, so a recv
        is one syscall."""
        tv = _struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
        self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, tv)

    def _lost(self, exc):
        """The peer is gone or silent: this connection is done for."""
        self.close()
        if exc is None:
            why = "closed by the peer"
        elif _timed_out(exc):
            why = "timed out"
        else:
            why = f"failed: {exc.strerror or exc}"
        return Unavailable(f"{self.peer}: connection {why}")

    # -- sending ----------------------------------------------------------------------------------------

    def send(self, int op, meta=(), payload=None, int flags=0, destination=0):
        """Send one frame; ``payload`` is a buffer or a list of buffers (sent without copying if large),
        ``destination`` the address (or only its phase in a line) where the peer receives a large one.

        A small frame is one buffer (header, meta and payload copied together) and one ``sendall``.  A
        large payload goes out with its header in one ``sendmsg``, as its padding (``payload_phase``)
        assumes; the peer's first read then finds the header with the start of the payload (a reader
        expecting a large payload asks for little: ``read_frame``'s ``first_read``)."""
        cdef bytes m = _pack(meta)
        cdef list parts = payload if isinstance(payload, list) else ([] if payload is None else [payload])
        cdef Py_ssize_t n = len(parts), taken = 0, size = 0, at, i
        cdef Py_buffer few[4]
        cdef Py_buffer *views = &few[0]
        if n > 4:
            views = <Py_buffer *>malloc(n * sizeof(Py_buffer))
            if views == NULL:
                raise MemoryError()
        try:  # each part's buffer taken once: for its size, then for its copy
            for part in parts:
                _get_read(part, &views[taken], "payload")
                size += views[taken].len
                taken += 1
            try:
                if size > SMALL_SEND:  # one system call for the header and the payload (a READV reply's ranges too)
                    self._send_parts([_frame_head(op, flags, m, size, parts[0], destination), *parts])
                    return
                out = _frame_head(op, flags, m, size, None, 0, size)
                at = HEADER_SIZE + len(m)
                for i in range(taken):
                    memcpy(PyBytes_AS_STRING(out) + at, views[i].buf, views[i].len)
                    at += views[i].len
                self.sock.sendall(out)
            except OSError as exc:
                raise self._lost(exc) from None
        finally:
            for i in range(taken):
                PyBuffer_Release(&views[i])
            if views != &few[0]:
                c_free(views)

    def send_value(self, int op, meta, value, crc=None):
        """Send a frame whose payload is ``value`` then its CRC-32C (CRC_TRAILER); returns the CRC.  A small
        value goes in one buffer with its header and CRC; a large one CRC_CHUNK at a time (the header with
        the first), each chunk's CRC computed right after it is sent, while the peer receives it (and
        checks what came before); the CRC follows.  A ``crc`` the caller already has (a copy of a stored
        value, or of one sent to several nodes) goes out with the value in one call, as it is, so a copy
        whose bytes differ from it is refused."""
        cdef Py_buffer view
        cdef Py_ssize_t n, at, start
        cdef uint32_t running = 0
        cdef bytes m = _pack(meta)
        _get_read(value, &view, "value")
        try:
            n = view.len
            if n <= SMALL_SEND:
                running = <uint32_t>crc if crc is not None else _crc(0, <const uint8_t *>view.buf, n)
                try:
                    if n + 4 > SMALL_SEND:  # with its CRC, a large payload: padded, as send pads it
                        self._send_parts([_frame_head(op, WITH_CRC, m, n + 4, value, 0), value,
                                          _frame.CRC_TRAILER.pack(running)])
                        return running
                    out = _frame_head(op, WITH_CRC, m, n + 4, None, 0, n + 4)
                    at = HEADER_SIZE + len(m)
                    memcpy(PyBytes_AS_STRING(out) + at, view.buf, n)
                    _put_le(<unsigned char *>PyBytes_AS_STRING(out) + at + n, running, 4)
                    self.sock.sendall(out)
                except OSError as exc:
                    raise self._lost(exc) from None
                return running
            parts = [_frame_head(op, WITH_CRC, m, n + 4, value, 0)]
            try:
                if crc is not None:
                    self._send_parts([*parts, value, _frame.CRC_TRAILER.pack(crc)])
                    return crc
                whole = PyMemoryView_FromMemory(<char *>view.buf, n, PyBUF_READ)  # value is held meanwhile
                for start in range(0, n, CRC_CHUNK):
                    self._send_parts([*parts, whole[start : start + CRC_CHUNK]])
                    parts = []
                    running = _crc(running, <const uint8_t *>view.buf + start, min(CRC_CHUNK, n - start))
                self.sock.sendall(_frame.CRC_TRAILER.pack(running))
            except OSError as exc:
                raise self._lost(exc) from None
            return running
        finally:
            PyBuffer_Release(&view)

    def _send_parts(self, list parts):
        """Send a few buffers back to back in one system call (a partial send, which a send timeout can
        cause, goes on where it stopped)."""
        views = [memoryview(p) for p in parts]
        views = [v if v.format == "B" and v.ndim == 1 else v.cast("B") for v in views if v.nbytes]
        cdef Py_ssize_t first = 0, sent
        while first < len(views):
            sent = self.sock.sendmsg(views[first : first + IOV_CHUNK])
            while first < len(views) and sent >= len(views[first]):
                sent -= len(views[first])
                first += 1
            if sent:
                views[first] = views[first][sent:]

    # -- receiving --------------------------------------------------------------------------------------

    def read_frame(self, Py_ssize_t max_meta=MAX_META, uint64_t max_payload=MAX_PAYLOAD, *, idle=None,
                   within=None, Py_ssize_t first_read=FIRST_READ):
        """The next frame's (opcode, flags, meta, payload length); read the payload next.  A frame larger
        than the limits is refused before anything is allocated for it.

        A server passes ``idle``, how long to wait for the frame to begin (the socket's own timeout
        repeats until then), and ``within``, how long its header and meta may take once it has begun:
        that sets ``deadline``, which a peer trickling bytes cannot push back."""
        if self.payload_left:
            self.skip_payload()
        if idle is not None and self._start == self._end:
            self._await_frame(idle)
        if within is not None:
            self.deadline = _monotonic() + within
        self._fill(HEADER_SIZE, first_read)
        cdef const unsigned char *h = self._p + self._start
        cdef unsigned int magic = <unsigned int>_le(h, 2)
        cdef int op = h[2]
        cdef int flags = h[3]
        cdef uint64_t meta_len = _le(h + 4, 4)
        cdef uint64_t payload_len = _le(h + 8, 8)
        if magic != FRAME_MAGIC:
            raise ProtocolError(f"{self.peer}: bad frame magic {magic:#06x}")
        if meta_len > <uint64_t>max(max_meta, 0) or payload_len > max_payload:
            raise ProtocolError(f"{self.peer}: frame too large (meta {meta_len}, payload {payload_len})")
        self._start += HEADER_SIZE
        meta = self._read_meta(<Py_ssize_t>meta_len) if meta_len else ()
        cdef int pad = flags >> PAD_SHIFT
        if pad:
            self._fill(pad, FIRST_READ)
            self._start += pad
            flags &= FLAGS_MASK
        self.payload_left = <long long>payload_len
        self.flags = flags
        return op, flags, meta, payload_len

    def read_payload_into(self, dst):
        """Fill ``dst`` (a writable buffer) from the current payload.  What the buffer holds is copied; a
        small rest refills the buffer (one recv for the many small values of a batch); a large one is
        received in place."""
        cdef Py_buffer view
        _get_write(dst, &view, "destination")
        try:
            self._read_into(<unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int _read_into(self, unsigned char *dst, Py_ssize_t n) except -1:
        if n > self.payload_left:
            raise ProtocolError(f"{self.peer}: payload has {self.payload_left} bytes left, {n} wanted")
        self.payload_left -= n
        cdef Py_ssize_t have = min(n, self._end - self._start), got
        if have:
            memcpy(dst, self._p + self._start, have)
            self._start += have
        if have < n and n - have < FIRST_READ:
            self._fill(n - have, min(n - have + self.payload_left, RECV_BUFFER))
            memcpy(dst + have, self._p + self._start, n - have)
            self._start += n - have
            return 0
        while have < n:
            try:  # the caller holds dst's buffer: a view of its rest without an owner is safe meanwhile
                got = self.sock.recv_into(PyMemoryView_FromMemory(<char *>dst + have, n - have, PyBUF_WRITE),
                                          n - have, _MSG_WAITALL)
            except OSError as exc:
                raise self._lost(exc) from None
            if not got:
                raise self._lost(None)
            have += got
            if have < n and self.deadline is not None and _monotonic() > self.deadline:
                raise self._lost(TimeoutError())
        return 0

    def read_payload_crc(self, dst):
        """``read_payload_into`` that returns the CRC-32C of what it received, computed chunk by chunk as
        the bytes arrive (the GIL is released for it), while the rest is still in flight."""
        cdef Py_buffer view
        _get_write(dst, &view, "destination")
        try:
            return self._read_crc(<unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef uint32_t _read_crc(self, unsigned char *dst, Py_ssize_t n) except? 0xFFFFFFFF:
        cdef uint32_t crc = 0
        cdef Py_ssize_t start, size
        for start in range(0, n, CRC_CHUNK):
            size = min(CRC_CHUNK, n - start)
            self._read_into(dst + start, size)
            crc = _crc(crc, dst + start, size)
        return crc

    def read_value_into(self, dst, what):
        """Receive a PUT's payload: the value into ``dst``, then, if the frame is flagged WITH_CRC, its
        CRC (CRC_TRAILER), which must match what arrived; returns the CRC (None: the sender named none).
        ChecksumError on a mismatch, with the whole payload read, so the connection stays in step.
        ``what`` names the value for the message."""
        cdef Py_buffer view
        cdef unsigned char trailer[4]
        cdef uint32_t got
        _get_write(dst, &view, "destination")
        try:
            if not self.flags & WITH_CRC:
                if self.payload_left != view.len:
                    raise ValueError(f"{what()}: {view.len} bytes expected, {self.payload_left} sent")
                self._read_into(<unsigned char *>view.buf, view.len)
                return None
            if self.payload_left != view.len + 4:
                raise ValueError(
                    f"{what()}: a put's payload is its value then a 4-byte CRC-32C: "
                    f"{view.len} + 4 bytes expected, {self.payload_left} sent"
                )
            got = self._read_crc(<unsigned char *>view.buf, view.len)  # while the sender computes the CRC
            self._read_into(trailer, 4)
            _frame.check_crc(<uint32_t>_le(trailer, 4), got, what)
            return got
        finally:
            PyBuffer_Release(&view)

    def skip_payload(self):
        """Drain what is left of the current payload (a request that failed before reading it)."""
        cdef Py_ssize_t n
        scratch = None
        while self.payload_left:
            n = min(self.payload_left, RECV_BUFFER)
            if scratch is None:
                scratch = bytearray(n)
            self._read_into(<unsigned char *>PyByteArray_AS_STRING(scratch), n)

    cdef object _read_meta(self, Py_ssize_t n):
        cdef object raw
        if n <= RECV_BUFFER:
            self._fill(n, FIRST_READ)
            raw = self._view[self._start : self._start + n]
            self._start += n
        else:
            raw = bytearray(n)
            self.payload_left = n
            self._read_into(<unsigned char *>PyByteArray_AS_STRING(raw), n)
        try:
            return _unpackb(raw, use_list=True, raw=False, strict_map_key=False)
        except (ValueError, _UnpackException) as exc:
            raise ProtocolError(f"{self.peer}: undecodable frame meta ({exc})") from None

    cdef int _await_frame(self, double idle) except -1:
        """Block until a frame's first bytes arrive, for at most ``idle`` seconds."""
        self._start = self._end = 0
        cdef double until = _monotonic() + idle
        cdef Py_ssize_t got
        while True:
            try:
                got = self.sock.recv_into(self._view, FIRST_READ)
            except OSError as exc:
                if _timed_out(exc) and _monotonic() < until:
                    continue
                raise self._lost(exc) from None
            if not got:
                raise self._lost(None)
            self._end = got
            return 0

    cdef int _fill(self, Py_ssize_t n, Py_ssize_t ask) except -1:
        """Make at least ``n`` bytes (at most RECV_BUFFER) readable from the buffer, each recv asking for
        up to ``ask`` (more when ``n`` needs it): a frame's first read takes little of a large payload,
        which is received in place instead."""
        if self._end - self._start >= n:
            return 0
        cdef Py_ssize_t left, want, got
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start + max(n, ask) > RECV_BUFFER:  # no room behind: move what is left to the front
            left = self._end - self._start
            memmove(self._p, self._p + self._start, left)
            self._start, self._end = 0, left
        while self._end - self._start < n:
            want = min(RECV_BUFFER - self._end, max(n - (self._end - self._start), ask))
            try:
                got = self.sock.recv_into(self._view[self._end :], want)
            except OSError as exc:
                raise self._lost(exc) from None
            if not got:
                raise self._lost(None)
            self._end += got
            if self.deadline is not None and _monotonic() > self.deadline:
                raise self._lost(TimeoutError())
        return 0
