/* Large same-host copies with non-temporal (streaming) stores.
 *
 * glibc's memcpy streams its stores only above x86_non_temporal_threshold, three quarters of what it
 * reads as the L3 share of a thread.  On the KVM dev VMs it reads 256 MiB there and so never streams a
 * copy below 192 MiB: a 16 MiB or 32 MiB copy, which cannot stay in any cache anyway, first reads
 * every destination line into the cache (read-for-ownership), then writes it back, a third more memory
 * traffic.  Measured on the dev VM (AMD EPYC, KVM), CPU time, interleaved: streaming stores copied
 * 1 MiB x32 at 1.5-1.7x and 16 MiB x4 at 1.3-1.4x glibc's memcpy, out of or into a 4 KiB-paged memfd.
 *
 * mc_stream_worth(total): whether a call copying ``total`` bytes in all streams (MC_STREAM_MIN and up:
 * well past a core's L2, so the destination would leave the cache before anyone reads it).
 * mc_stream_copy(dst, src, n): memcpy's contract (no overlap), AVX2 where the CPU has it, else SSE2
 * (every x86-64); unaligned sources, the destination aligned by a short memcpy first.  Elsewhere, or
 * for short copies, memcpy.
 */
#ifndef MC_STREAM_COPY_H
#define MC_STREAM_COPY_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MC_STREAM_MIN ((size_t)4 << 20)
#define MC_STREAM_BLOCK_MIN ((size_t)4096) /* blocks below this in a streamed call are memcpy'd */

static inline int mc_stream_worth(size_t total) { return total >= MC_STREAM_MIN; }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

__attribute__((target("avx2"))) static void mc_stream_avx2(char *d, const char *s, size_t n) {
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(s + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(s + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(s + i + 64));
        __m256i e = _mm256_loadu_si256((const __m256i *)(s + i + 96));
        _mm256_stream_si256((__m256i *)(d + i), a);
        _mm256_stream_si256((__m256i *)(d + i + 32), b);
        _mm256_stream_si256((__m256i *)(d + i + 64), c);
        _mm256_stream_si256((__m256i *)(d + i + 96), e);
    }
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

static inline void mc_stream_copy(void *dst, const void *src, size_t n) {
    static int avx2 = -1; /* racy first use is harmless: every thread computes the same answer */
    char *d = (char *)dst;
    const char *s = (const char *)src;
    if (n < MC_STREAM_BLOCK_MIN) {
        memcpy(d, s, n);
        return;
    }
    size_t head = (32 - ((uintptr_t)d & 31)) & 31;
    memcpy(d, s, head);
    if (avx2 < 0) avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    if (avx2)
        mc_stream_avx2(d + head, s + head, n - head);
    else
        mc_stream_sse2(d + head, s + head, n - head);
}

#else
static inline void mc_stream_copy(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
#endif

#endif
