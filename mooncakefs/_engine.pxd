# Declarations for the hot paths in _engine.pyx; the logic lives there.
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef extern from "_crc32c.h" nogil:
    void mc_crc32c_init()
    uint32_t mc_crc32c(uint32_t crc, const uint8_t *p, size_t n)
    uint32_t mc_crc32c_portable(uint32_t crc, const uint8_t *p, size_t n)


cdef extern from *:
    int __builtin_ctz(unsigned int x) nogil
    int __builtin_clz(unsigned int x) nogil
    int __builtin_ctzll(unsigned long long x) nogil


cdef class OffsetAllocator:
    cdef readonly size_t capacity
    cdef uint32_t units
    cdef size_t used_units
    cdef uint32_t count, room
    cdef uint32_t *n_off
    cdef uint32_t *n_size
    cdef uint32_t *n_bin_prev
    cdef uint32_t *n_bin_next
    cdef uint32_t *n_addr_prev
    cdef uint32_t *n_addr_next
    cdef uint8_t *n_state
    cdef uint32_t *spare
    cdef uint32_t spare_len
    cdef uint32_t heads[256]
    cdef uint32_t top_mask
    cdef uint8_t leaf_mask[32]

    cdef uint32_t _new_node(self) except 0xFFFFFFFF
    cdef void _insert_free(self, uint32_t n) noexcept nogil
    cdef void _remove_free(self, uint32_t n) noexcept nogil
    cdef uint32_t _find_bin(self, uint32_t b) noexcept nogil
    cdef void _retire(self, uint32_t n) noexcept nogil


cdef class Arena:
    cdef Py_buffer buf
    cdef bint held
    cdef uint8_t *base
    cdef readonly size_t size

    cdef int _check(self, size_t off, size_t n) except -1


cdef class Entry:
    cdef public long long size
    cdef public long long dram
    cdef public long long dram_off
    cdef public long long seg
    cdef public long long seg_off
    cdef public long long vram
    cdef public long long vram_off
    cdef public long long crc
    cdef public unsigned long long version_hi
    cdef public unsigned long long version_lo
    cdef public unsigned int tag
    cdef public double expires
    cdef public int readers
    cdef public int hits
    cdef public unsigned int seen
    cdef public bint pinned
    cdef public bint sticky
    cdef public bint dead
    cdef public bint durable
    cdef public int queue
