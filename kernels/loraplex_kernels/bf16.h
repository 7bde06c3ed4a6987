/* bfloat16 <-> float32 for the CPU kernels: bfloat16 is the top half of a float32. */
#ifndef LORAPLEX_BF16_H
#define LORAPLEX_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even (as torch), NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* 16 at a time where the CPU has AVX-512 BF16: VCVTNEPS2BF16 rounds to nearest even like
 * f32_to_bf16 in one instruction (~10x fewer than the portable select above, which kept the row
 * kernels at ~6 cycles per element), but flushes float32 denormals to zero: a result below
 * ~1.2e-38 in magnitude becomes 0 (the only difference). */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define LP_BF16X16 1
static inline __m512 bf16x16_load(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline void bf16x16_store(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}
static inline __m512 bf16x16_round(__m512 v) {  /* v rounded to bfloat16, as float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
#else
#define LP_BF16X16 0
#endif

#endif
