# Declarations for the hot paths in _engine.pyx; the logic lives there.
from cpython.object cimport PyObject
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef extern from "_crc32c.h" nogil:
    void mc_crc32c_init()
    uint32_t mc_crc32c(uint32_t crc, const uint8_t *p, size_t n)
    uint32_t mc_crc32c_portable(uint32_t crc, const uint8_t *p, size_t n)
    const char *mc_crc32c_path()
    int mc_crc32c_limit(const char *path)


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
    cdef uint32_t spare_head  # the last retired node, NONE if none: node records to reuse, newest first
    cdef uint32_t heads[256]
    cdef uint32_t top_mask
    cdef uint8_t leaf_mask[32]

    cdef uint32_t _new_node(self) except 0xFFFFFFFF
    cdef long long _alloc(self, size_t nbytes) except -2
    cdef int _free(self, long long handle) except -1
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


cdef extern from *:
    """
    /* An entry's size and flags in one word: values are under 2**48 bytes (Store.begin_put checks). */
    typedef struct {
        uint64_t size : 48;
        uint64_t queue : 2;
        uint64_t pinned : 1;
        uint64_t sticky : 1;
        uint64_t dead : 1;
        uint64_t durable : 1;
        uint64_t has_crc : 1;
    } mc_entry_word;
    """
    ctypedef struct mc_entry_word:
        uint64_t size
        unsigned int queue
        bint pinned
        bint sticky
        bint dead
        bint durable
        bint has_crc


cdef class Entry:
    # 8-byte fields first, then 4-byte ones: 96 bytes after the object header, so 112 in all (pymalloc
    # rounds to 16: one 4-byte field more would cost 16 bytes an object).
    cdef PyObject *prev  # the neighbours in the eviction queue holding it (borrowed: the queue owns it)
    cdef PyObject *next
    cdef readonly bytes key  # set when first queued: what eviction needs to find it in the index
    cdef mc_entry_word word
    cdef public double expires
    cdef public unsigned long long version_hi
    cdef public unsigned long long version_lo
    cdef uint32_t dram_unit  # dram_off // 64, or NONE
    cdef public int dram
    cdef public int seg
    cdef uint32_t seg_unit  # seg_off // 512 (the SSD tier's record alignment), or NONE
    cdef public int vram  # a VRAM block's handle (its offset is the VRAM tier's allocator's to say)
    cdef uint32_t crc32
    cdef public unsigned int tag
    cdef public int readers
    cdef public int hits
    cdef public unsigned int seen


cdef class EntryQueue:
    cdef PyObject *head
    cdef PyObject *tail
    cdef readonly Py_ssize_t count
    cdef readonly long long nbytes
    cdef readonly unsigned int ident

    cdef int push(self, bytes key, Entry entry) except -1
    cdef void unlink(self, Entry entry) noexcept
    cdef void to_back(self, Entry entry) noexcept
    cdef void drop_all(self) noexcept
    cdef int check(self, Entry entry) except -1


cdef extern from "Python.h":
    ctypedef Py_ssize_t Py_hash_t


cdef struct IndexSlot:
    Py_hash_t hash
    PyObject *entry  # owned; NULL: empty


cdef class KeyIndex:
    cdef IndexSlot *slots
    cdef Py_ssize_t mask  # the slots less one: a power of two less one
    cdef Py_ssize_t used

    cdef void _drop_all(self) noexcept
    cdef Py_ssize_t _find(self, const char *p, Py_ssize_t n, Py_hash_t h) noexcept
    cdef Py_ssize_t _find_raw(self, bytes raw, Py_hash_t h) noexcept
    cdef PyObject *_at(self, raw) except? NULL
    cpdef object lookup(self, key)
    cdef object swap(self, bytes raw, Entry entry, Py_hash_t h)
    cdef int _grow(self) except -1
    cdef object _take(self, Py_ssize_t i)
    cpdef object remove(self, bytes raw)
