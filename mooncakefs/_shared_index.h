/* The node's shared index: a hash table in shared memory that clients on the host read without any
 * round trip to the node.  One writer (the node, under its store lock), many lock-free readers.
 *
 * Slot (32 bytes): seq | hits | h1 | h2 | off (64-byte units into the pool) | size.
 * A slot is empty when h1 == h2 == 0 and a tombstone when size == MC_TOMB.  The writer makes seq odd,
 * changes the slot, then makes it even again (a seqlock).  A reader copies the value and then checks
 * that seq did not move: the node frees or reuses a block only after it has changed the slot that
 * pointed at it, so an unchanged seq means the copy is exactly the value that was published.
 * Any doubt (odd seq, seq moved, probe limit, stale heartbeat) is a miss, and the reader asks the
 * node instead: misses are always safe, only a wrong hit would not be.
 */
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "_stream_copy.h"

#define MC_IDX_MAGIC 0x31584449434d4f4fULL /* "OOMCIDX1" */
#define MC_TOMB 0xFFFFFFFFu
#define MC_PROBES 32
#define MC_STALE_NS 2000000000LL /* a node silent this long is presumed dead: ask it, and fail */

typedef struct {
    uint64_t magic;
    uint64_t slots;      /* a power of two */
    int64_t heartbeat;   /* CLOCK_MONOTONIC ns of the node's last sign of life; 0 once it stopped */
    uint64_t pad[5];
} mc_idx_header;

typedef struct {
    uint32_t seq;
    uint32_t hits;       /* bumped by readers (racy, approximate): the node's LRU sees shared-memory hits */
    uint64_t h1, h2;
    uint32_t off;
    uint32_t size;
} mc_idx_slot;

#define MC_BARRIER() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define MC_LOAD32(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)

static inline mc_idx_slot *mc_idx_slots(void *base) { return (mc_idx_slot *)((char *)base + sizeof(mc_idx_header)); }

static inline int64_t mc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* -- the writer (node) ---------------------------------------------------------------------------- */

static inline void mc_idx_write(mc_idx_slot *s, uint64_t h1, uint64_t h2, uint32_t off, uint32_t size) {
    __atomic_store_n(&s->seq, s->seq + 1, __ATOMIC_RELAXED);
    MC_BARRIER();
    s->h1 = h1; s->h2 = h2; s->off = off; s->size = size; s->hits = 0;
    MC_BARRIER();
    __atomic_store_n(&s->seq, s->seq + 1, __ATOMIC_RELEASE);
}

/* Every function takes the table's size as `mask` (slots - 1) from the caller's own copy, never from
 * the shared header: a client that scribbles over the header cannot send the node or another client
 * past the end of the mapping. */

/* The slot holding (h1, h2), or NULL. */
static mc_idx_slot *mc_idx_find(void *base, uint64_t mask, uint64_t h1, uint64_t h2) {
    mc_idx_slot *slots = mc_idx_slots(base);
    uint64_t i = h1 & mask;
    for (int p = 0; p < MC_PROBES; p++, i = (i + 1) & mask) {
        mc_idx_slot *s = &slots[i];
        if (s->h1 == h1 && s->h2 == h2) return s;
        if (s->h1 == 0 && s->h2 == 0) return NULL;
    }
    return NULL;
}

/* Publish (h1, h2) -> (off, size); 0 if there was no room within the probe limit (the key is then
 * simply not in the shared index: readers ask the node). */
static int mc_idx_publish(void *base, uint64_t mask, uint64_t h1, uint64_t h2, uint32_t off, uint32_t size) {
    mc_idx_slot *slots = mc_idx_slots(base);
    uint64_t i = h1 & mask;
    mc_idx_slot *free_slot = NULL;
    for (int p = 0; p < MC_PROBES; p++, i = (i + 1) & mask) {
        mc_idx_slot *s = &slots[i];
        if (s->h1 == h1 && s->h2 == h2) { mc_idx_write(s, h1, h2, off, size); return 1; }
        int empty = s->h1 == 0 && s->h2 == 0;
        if (!free_slot && (empty || s->size == MC_TOMB)) free_slot = s;
        if (empty) break;
    }
    if (!free_slot) return 0;
    mc_idx_write(free_slot, h1, h2, off, size);
    return 1;
}

/* Unpublish (h1, h2): its slot becomes a tombstone (probe chains stay intact).  Returns 1 if found. */
static int mc_idx_remove(void *base, uint64_t mask, uint64_t h1, uint64_t h2) {
    mc_idx_slot *s = mc_idx_find(base, mask, h1, h2);
    if (!s || s->size == MC_TOMB) return 0;
    mc_idx_write(s, h1, h2, 0, MC_TOMB);
    return 1;
}

/* -- the readers (clients) ------------------------------------------------------------------------ */

/* Copy the value of (h1, h2) into dst (room bytes); returns its size, -1 for "ask the node", or
 * -2 - size if dst is too small. */
static int64_t mc_idx_read(void *base, uint64_t mask, const uint8_t *pool, uint64_t pool_size, uint64_t h1,
                           uint64_t h2, uint8_t *dst, uint64_t room) {
    mc_idx_header *hd = (mc_idx_header *)base;
    int64_t beat = __atomic_load_n(&hd->heartbeat, __ATOMIC_ACQUIRE);
    if (beat == 0 || mc_now_ns() - beat > MC_STALE_NS) return -1;
    mc_idx_slot *slots = mc_idx_slots(base);
    uint64_t i = h1 & mask;
    for (int p = 0; p < MC_PROBES; p++, i = (i + 1) & mask) {
        mc_idx_slot *s = &slots[i];
        uint32_t seq = MC_LOAD32(&s->seq);
        if (seq & 1) return -1;
        uint64_t a = s->h1, b = s->h2;
        if (a == 0 && b == 0) return -1;
        if (a != h1 || b != h2) continue;
        uint64_t off = (uint64_t)s->off * 64;
        uint32_t size = s->size;
        MC_BARRIER();
        if (MC_LOAD32(&s->seq) != seq || size == MC_TOMB || off + size > pool_size) return -1;
        if (size > room) return -2 - (int64_t)size;
        if (mc_stream_worth(size))
            mc_stream_copy(dst, pool + off, size); /* a large value: streaming stores (_stream_copy.h) */
        else
            mc_copy(dst, pool + off, size);
        MC_BARRIER();
        if (MC_LOAD32(&s->seq) != seq) return -1;
        __atomic_fetch_add(&s->hits, 1, __ATOMIC_RELAXED);
        return size;
    }
    return -1;
}
