/* silu(g) = g / (1 + exp(-g)) on 16 float32 lanes, as torch writes it for float32 vectors; for
 * SwiGLU (gemm_amx.c's epilogue, decode_layers.c). AVX-512 only: the callers are built for AMX. */
#ifndef LORAPLEX_SILU_H
#define LORAPLEX_SILU_H

#include "bf16.h"

#if defined(__AVX512F__)
#include <immintrin.h>

/* exp(v): v = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts so r is exact), exp(r) by a degree-7
 * polynomial (Cephes' expf coefficients), times 2^n by VSCALEFPS (which gives inf / 0 past the
 * float range). ~1-2 ulps; NaN lanes are not used (silu keeps g's NaN). */
static inline __m512 exp512(__m512 v) {
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 silu512(__m512 g) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

#if LP_BF16X16
/* SwiGLU of bfloat16 gate and up values (as float32 lanes): bf16(silu(g)) * u, to be stored as
 * bfloat16 -- torch's F.silu(gate) * up, each op rounding once. The one recipe both the GEMM's
 * SWIGLU epilogue and the compiled layers' post-LoRA pass use, so the two agree bit for bit. */
static inline __m512 swiglu16(__m512 g, __m512 u) {
    return _mm512_mul_ps(bf16x16_round(silu512(g)), u);
}
#endif
#endif

#endif
