/* float32 vectors of 8 lanes for the GEMM kernels (GCC/Clang vector extensions: AVX2 registers
 * on x86, pairs of NEON registers elsewhere) and bfloat16 -> float32 widening. */
#ifndef LORAPLEX_WIDEN_H
#define LORAPLEX_WIDEN_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define LANES 8

typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline float hsum(v8f v) {
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += v[l];
    return s;
}

/* The largest of x[0..n), n >= 1, as `m = x[0]; m = x[j] > m ? x[j] : m` finds it, but 8 lanes at
 * a time: GCC keeps that loop scalar (it may not reorder a reduction whose NaN handling depends on
 * the order), one compare per element in a chain of 4-cycle steps -- in decode attention's softmax
 * that chain was a third of the int8 kernel's time. Every lane starts at x[0], so a NaN x[0]
 * gives NaN and any later NaN never enters, as in the scalar loop. */
static inline float max_of(const float *x, int64_t n) {
    const float x0 = x[0];
    v8f mx = {x0, x0, x0, x0, x0, x0, x0, x0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        const v8f v = load8(x + j);
        const v8i take = v > mx;
        mx = (v8f)(((v8i)v & take) | ((v8i)mx & ~take));
    }
    float m = mx[0];
    for (int l = 1; l < LANES; l++) m = mx[l] > m ? mx[l] : m;
    for (; j < n; j++) m = x[j] > m ? x[j] : m;
    return m;
}

/* 8 bfloat16 values widened to float32 lanes (a zero-extend and a shift: bf16 is the top half).
 * With AVX2 as one 256-bit zero-extend: GCC lowers the generic form to two 128-bit halves. */
static inline v8f widen8(const uint16_t *p) {
#if defined(__AVX2__)
    __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
    return (v8f)_mm256_castsi256_ps(u);
#else
    v8h h;
    memcpy(&h, p, sizeof h);
    v8u u = __builtin_convertvector(h, v8u) << 16;
    return (v8f)u;
#endif
}

/* A row of k bfloat16 values widened into dst[0..kpad), zeros past k. */
static inline void widen_row(float *dst, const uint16_t *src, int64_t k, int64_t kpad) {
    int64_t i = 0;
    for (; i + LANES <= k; i += LANES) store8(dst + i, widen8(src + i));
    for (; i < k; i++) {
        uint32_t u = (uint32_t)src[i] << 16;
        memcpy(dst + i, &u, 4);
    }
    for (; i < kpad; i++) dst[i] = 0.0f;
}

#endif
