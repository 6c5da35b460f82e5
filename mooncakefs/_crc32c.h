/* CRC-32C (Castagnoli) for mooncakefs._engine.
 *
 * x86-64 with VPCLMULQDQ and AVX2: 128 bytes at a time folded by carry-less multiplication into four
 * 256-bit accumulators, which the crc32 instruction then reduces (about 1.5x the lanes below on the
 * 2-core AMD EPYC VM of docs/scaling.md: every put is checksummed by its sender and by the node).
 * x86-64 with SSE4.2: the crc32 instruction on three interleaved lanes (it has a 3-cycle latency and
 * 1-cycle throughput, so one lane runs at a third of the speed), lanes joined by a table-driven shift.
 * Elsewhere: slicing-by-8 tables.  All compute the same function; the tests compare them with a
 * pure-Python bitwise reference. */
#ifndef MC_CRC32C_H
#define MC_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#define MC_CRC32C_POLY 0x82F63B78u
#define MC_LANE 8192u /* bytes per lane in the interleaved loop */

static uint32_t mc_crc_table[8][256];
static uint32_t mc_shift_table[4][256]; /* register -> register after MC_LANE zero bytes */
static int mc_crc_hw = 0;
static int mc_crc_fold = 0;

static uint32_t mc_crc32c_sw(uint32_t crc, const uint8_t *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) { crc = mc_crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8); n--; }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = mc_crc_table[7][w & 0xff] ^ mc_crc_table[6][(w >> 8) & 0xff] ^
              mc_crc_table[5][(w >> 16) & 0xff] ^ mc_crc_table[4][(w >> 24) & 0xff] ^
              mc_crc_table[3][(w >> 32) & 0xff] ^ mc_crc_table[2][(w >> 40) & 0xff] ^
              mc_crc_table[1][(w >> 48) & 0xff] ^ mc_crc_table[0][w >> 56];
        p += 8; n -= 8;
    }
    while (n--) crc = mc_crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

static inline uint32_t mc_shift_lane(uint32_t crc) {
    return mc_shift_table[0][crc & 0xff] ^ mc_shift_table[1][(crc >> 8) & 0xff] ^
           mc_shift_table[2][(crc >> 16) & 0xff] ^ mc_shift_table[3][crc >> 24];
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("sse4.2"))) static uint32_t mc_crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t a = crc;
    while (n && ((uintptr_t)p & 7)) { a = __builtin_ia32_crc32qi((uint32_t)a, *p++); n--; }
    while (n >= 3 * MC_LANE) {
        uint64_t b = 0, c = 0;
        const uint8_t *pb = p + MC_LANE, *pc = p + 2 * MC_LANE;
        for (size_t i = 0; i < MC_LANE; i += 8) {
            uint64_t wa, wb, wc;
            memcpy(&wa, p + i, 8); memcpy(&wb, pb + i, 8); memcpy(&wc, pc + i, 8);
            a = __builtin_ia32_crc32di(a, wa);
            b = __builtin_ia32_crc32di(b, wb);
            c = __builtin_ia32_crc32di(c, wc);
        }
        a = mc_shift_lane(mc_shift_lane((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
        p += 3 * MC_LANE; n -= 3 * MC_LANE;
    }
    while (n >= 8) { uint64_t w; memcpy(&w, p, 8); a = __builtin_ia32_crc32di(a, w); p += 8; n -= 8; }
    while (n--) a = __builtin_ia32_crc32qi((uint32_t)a, *p++);
    return (uint32_t)a;
}

/* Folding: a 128-bit block A that lies D bits before block C (the message is A.x^D + C + ...) is
 * replaced, modulo the polynomial, by lo(A).(x^(D+31) mod P) + hi(A).(x^(D-33) mod P), a product that
 * fits 128 bits and is XORed into C.  The constants are bit-reflected 32-bit remainders (the register's
 * own layout), the exponents shifted by 33 for the reflected product's one-bit offset and the 32 bits
 * of the lane above them.  Here D = 1024 (each 128-bit lane folds onto the block 128 bytes on).  The CRC
 * of the message is then that of the last 128 folded bytes followed by the tail. */
#define MC_FOLD_BYTES 128u
#define MC_FOLD_LO 0x6992cea2 /* x^(1024+31) mod P, reflected */
#define MC_FOLD_HI 0x0d3b6092 /* x^(1024-33) mod P, reflected */

__attribute__((target("sse4.2,pclmul,avx2,vpclmulqdq"))) static uint32_t mc_crc32c_fold(uint32_t crc, const uint8_t *p,
                                                                                          size_t n) {
    __m256i acc[4], k = _mm256_setr_epi32(MC_FOLD_LO, 0, MC_FOLD_HI, 0, MC_FOLD_LO, 0, MC_FOLD_HI, 0);
    uint8_t last[MC_FOLD_BYTES];
    for (int i = 0; i < 4; i++) acc[i] = _mm256_loadu_si256((const __m256i *)(p + 32 * i));
    /* A register carried in is the same as its bits XORed into the message's first four bytes. */
    acc[0] = _mm256_xor_si256(acc[0], _mm256_zextsi128_si256(_mm_cvtsi32_si128((int)crc)));
    p += MC_FOLD_BYTES;
    n -= MC_FOLD_BYTES;
    while (n >= MC_FOLD_BYTES) {
        for (int i = 0; i < 4; i++) {
            __m256i lo = _mm256_clmulepi64_epi128(acc[i], k, 0x00), hi = _mm256_clmulepi64_epi128(acc[i], k, 0x11);
            acc[i] = _mm256_xor_si256(_mm256_xor_si256(lo, hi), _mm256_loadu_si256((const __m256i *)(p + 32 * i)));
        }
        p += MC_FOLD_BYTES;
        n -= MC_FOLD_BYTES;
    }
    for (int i = 0; i < 4; i++) _mm256_storeu_si256((__m256i *)(last + 32 * i), acc[i]);
    return mc_crc32c_hw(mc_crc32c_hw(0, last, MC_FOLD_BYTES), p, n);
}
#endif

static void mc_crc32c_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (MC_CRC32C_POLY & (0u - (c & 1u)));
        mc_crc_table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++)
            mc_crc_table[t][i] = (mc_crc_table[t - 1][i] >> 8) ^ mc_crc_table[0][mc_crc_table[t - 1][i] & 0xff];
    /* The register is linear in its bits, so shifting it over MC_LANE zero bytes is four byte lookups. */
    static const uint8_t zeros[MC_LANE];
    for (int t = 0; t < 4; t++)
        for (uint32_t i = 0; i < 256; i++)
            mc_shift_table[t][i] = mc_crc32c_sw(i << (8 * t), zeros, MC_LANE);
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    mc_crc_hw = __builtin_cpu_supports("sse4.2");
    mc_crc_fold = mc_crc_hw && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("pclmul") &&
                  __builtin_cpu_supports("vpclmulqdq");
#endif
}

/* The path mc_crc32c takes (from 256 bytes on): "fold", "lanes" (the crc32 instruction) or "table". */
static const char *mc_crc32c_path(void) { return mc_crc_fold ? "fold" : mc_crc_hw ? "lanes" : "table"; }

/* Keep mc_crc32c off the paths faster than `path` (one of mc_crc32c_path's names; 0 if unknown), as on a
 * CPU without their instructions: lets the tests and a user pin the path the CPU would otherwise pick. */
static int mc_crc32c_limit(const char *path) {
    if (strcmp(path, "table") == 0) mc_crc_hw = mc_crc_fold = 0;
    else if (strcmp(path, "lanes") == 0) mc_crc_fold = 0;
    else if (strcmp(path, "fold") != 0) return 0;
    return 1;
}

/* Standard CRC-32C of p[0:n], continuing from a previous result `crc` (0 to start). */
static uint32_t mc_crc32c(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
#if defined(__x86_64__) && defined(__GNUC__)
    if (mc_crc_fold && n >= 2 * MC_FOLD_BYTES) return ~mc_crc32c_fold(crc, p, n);
    if (mc_crc_hw) return ~mc_crc32c_hw(crc, p, n);
#endif
    return ~mc_crc32c_sw(crc, p, n);
}

static uint32_t mc_crc32c_portable(uint32_t crc, const uint8_t *p, size_t n) {
    return ~mc_crc32c_sw(~crc, p, n);
}

#endif
