/* Large same-host copies with non-temporal (streaming) stores.
 *
 * glibc's memcpy streams its stores only above x86_non_temporal_threshold, three quarters of what it
 * reads as the L3 share of a thread.  On the KVM dev VMs it reads 256 MiB there and so never streams a
 * copy below 192 MiB: a 16 MiB or 32 MiB copy, which cannot stay in any cache anyway, first reads
 * every destination line into the cache (read-for-ownership), then writes it back, a third more memory
 * traffic.  What it gained on the dev VM: README, the same-host rows and the A/B below them.
 *
 * Used only where it helps: a call that copies MC_STREAM_MIN bytes or more in all (mc_stream_worth),
 * into a peer's memory or a caller's buffer, most of which would have left a core's L2 before anyone
 * read it (4 MiB is past it, and near glibc's own threshold on hosts that report their L3 share
 * right); a reader coming at once may lose some L3 hits.  Blocks under MC_STREAM_BLOCK_MIN in such a
 * call are mc_copy'd.  Also a small put's value of MC_STREAM_BLOCK_MIN or more into its pool block
 * (_engine's _copy_to_pool): that block is rarely cached or read back at once.
 *
 * mc_stream_copy(dst, src, n): memcpy's contract (no overlap).  AVX2 where the CPU (and the kernel's
 * saved state) has it, checked at run time, else SSE2 (every x86-64); the destination is first aligned
 * to 32 bytes by a short memcpy of the head, the loads are unaligned, the tail (under one 128- or 64-byte
 * step) is memcpy'd after an sfence, so that the streamed stores are ordered before any later store.
 * Elsewhere (not x86-64 or not GCC/clang), memcpy.  mc_stream_force(kind) pins the path (tests):
 * MC_STREAM_AUTO, MC_STREAM_MEMCPY, MC_STREAM_SSE2 or MC_STREAM_AVX2 (taken only where the CPU has it).
 *
 * mc_copy(dst, src, n): every other copy of the store and the transfer engine (memcpy's contract).
 * glibc copies 2112 bytes and more (x86_rep_movsb_threshold, on CPUs with FSRM) with REP MOVSB, which
 * on the AMD EPYC dev VMs runs 3-7x slower when the destination is 1 to 31 bytes past the source, modulo
 * a page (tools/bench/copy_skew.py): every 4 KiB get_into a slice of a large numpy array (numpy's data
 * starts 16 bytes into a page, the pool's values at 0) took that path, and so did larger copies.
 * Such copies (MC_SKEW_MIN bytes or more) take a 32-byte vector loop whose aligned stores trail its
 * loads; all others, and any without AVX2 or with the memcpy path forced, are memcpy.
 */
#ifndef MC_STREAM_COPY_H
#define MC_STREAM_COPY_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MC_STREAM_MIN ((size_t)4 << 20)
#define MC_STREAM_BLOCK_MIN ((size_t)4096) /* blocks below this in a streamed call are memcpy'd */
#define MC_SKEW_MIN ((size_t)2048)         /* glibc's REP MOVSB starts at 2112 */
#define MC_SKEW_SPAN ((uintptr_t)64)       /* dst - src, modulo a page, in [1, 64): the slow case */

enum { MC_STREAM_AUTO = -1, MC_STREAM_MEMCPY = 0, MC_STREAM_SSE2 = 1, MC_STREAM_AVX2 = 2 };

static inline int mc_stream_worth(size_t total) { return total >= MC_STREAM_MIN; }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

static int mc_stream_kind = MC_STREAM_AUTO; /* racy first use is harmless: every thread finds the same */

static int mc_stream_best(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? MC_STREAM_AVX2 : MC_STREAM_SSE2;
}

/* The path copies take now: the one forced, else the best the CPU has. */
static inline int mc_stream_current(void) {
    if (mc_stream_kind == MC_STREAM_AUTO) mc_stream_kind = mc_stream_best();
    return mc_stream_kind;
}

/* Pin the path (MC_STREAM_AUTO: the best again); AVX2 on a CPU without it falls to the best. */
static inline int mc_stream_force(int kind) {
    int best = mc_stream_best();
    if (kind < MC_STREAM_MEMCPY || kind > best) kind = best;
    mc_stream_kind = kind;
    return kind;
}

/* Copy whole 128-byte steps with AVX2, streaming or plain stores to a 32-byte aligned d; the bytes done. */
__attribute__((target("avx2"), always_inline)) static inline size_t mc_avx2_steps(char *d, const char *s, size_t n,
                                                                                int stream) {
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        __m256i v[4];
        for (int k = 0; k < 4; k++) v[k] = _mm256_loadu_si256((const __m256i *)(s + i + 32 * k));
        for (int k = 0; k < 4; k++) {
            if (stream)
                _mm256_stream_si256((__m256i *)(d + i + 32 * k), v[k]);
            else
                _mm256_store_si256((__m256i *)(d + i + 32 * k), v[k]);
        }
    }
    return i;
}

__attribute__((target("avx2"))) static void mc_stream_avx2(char *d, const char *s, size_t n) {
    size_t i = mc_avx2_steps(d, s, n, 1);
    _mm_sfence();
    memcpy(d + i, s + i, n - i);
}

static void mc_stream_sse2(char *d, const char *s, size_t n) {
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
    _mm_sfence();
    memcpy(d + i, s + i, n - i);
}

__attribute__((target("avx2"))) static void mc_skew_avx2(char *d, const char *s, size_t n) {
    size_t i = (32 - ((uintptr_t)d & 31)) & 31; /* n >= MC_SKEW_MIN: the head always fits */
    memcpy(d, s, i);
    i += mc_avx2_steps(d + i, s + i, n - i, 0);
    memcpy(d + i, s + i, n - i);
}

/* 1 if a copy of n bytes from s to d is REP MOVSB's slow case (the header's comment). */
static inline int mc_skewed(const void *d, const void *s, size_t n) {
    return n >= MC_SKEW_MIN && (((uintptr_t)d - (uintptr_t)s) & 4095) - 1 < MC_SKEW_SPAN - 1;
}

static inline void mc_copy(void *dst, const void *src, size_t n) {
    if (mc_skewed(dst, src, n) && mc_stream_current() == MC_STREAM_AVX2)
        mc_skew_avx2((char *)dst, (const char *)src, n);
    else
        memcpy(dst, src, n);
}

static inline void mc_stream_copy(void *dst, const void *src, size_t n) {
    char *d = (char *)dst;
    const char *s = (const char *)src;
    int kind = mc_stream_current();
    if (n < MC_STREAM_BLOCK_MIN || kind == MC_STREAM_MEMCPY) {
        mc_copy(d, s, n);
        return;
    }
    size_t head = (32 - ((uintptr_t)d & 31)) & 31; /* n >= 4096: the head always fits */
    memcpy(d, s, head);
    if (kind == MC_STREAM_AVX2)
        mc_stream_avx2(d + head, s + head, n - head);
    else
        mc_stream_sse2(d + head, s + head, n - head);
}

#else
static inline int mc_stream_current(void) { return MC_STREAM_MEMCPY; }
static inline int mc_stream_force(int kind) {
    (void)kind;
    return MC_STREAM_MEMCPY;
}
static inline void mc_copy(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
static inline void mc_stream_copy(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
#endif

#endif
