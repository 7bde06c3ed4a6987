/* Rotary position embedding of bfloat16 heads (rotate_half layout, model/rope.py):

     out = bf16( bf16(x * cos) + bf16(rotate_half(x) * sin) ),  rotate_half(x) = [-x2, x1]

   with exactly torch's rounding steps on bfloat16 tensors (each product of two bfloat16 values is
   exact in float32 and rounded once; the sum of the two rounded products is rounded once), so the
   result is bit-identical to `_rotate` in rope.py -- in one pass instead of ~6 ops and two
   temporaries per tensor -- except that with AVX-512 BF16 (bf16.h's 16-wide path) a float32
   denormal intermediate flushes to zero. x may be a strided view (q/k are column slices of one
   q/k/v GEMM). */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "kv_int8.h"
#include "layer_kernels.h"
#include "parallel.h"

static inline float r16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

/* One head: o = rotary(x) over dim = 2 * half values (x1 = x, x2 = x + half; cos/sin rows c1, s1). */
static void rotate_head(const uint16_t *x1, const uint16_t *c1, const uint16_t *s1, int64_t half,
                        uint16_t *restrict o1) {
    const uint16_t *x2 = x1 + half, *c2 = c1 + half, *s2 = s1 + half;
    uint16_t *o2 = o1 + half;
    int64_t i0 = 0;
#if LP_BF16X16
    for (; i0 + 16 <= half; i0 += 16) {
        const __m512 a = bf16x16_load(x1 + i0), b = bf16x16_load(x2 + i0);
        const __m512 minus_b = _mm512_castsi512_ps(  /* -b exactly (sign bit flipped) */
            _mm512_xor_si512(_mm512_castps_si512(b), _mm512_set1_epi32((int)0x80000000u)));
        bf16x16_store(o1 + i0, _mm512_add_ps(bf16x16_round(_mm512_mul_ps(a, bf16x16_load(c1 + i0))),
                                             bf16x16_round(_mm512_mul_ps(minus_b, bf16x16_load(s1 + i0)))));
        bf16x16_store(o2 + i0, _mm512_add_ps(bf16x16_round(_mm512_mul_ps(b, bf16x16_load(c2 + i0))),
                                             bf16x16_round(_mm512_mul_ps(a, bf16x16_load(s2 + i0)))));
    }
#endif
    /* two loops of unit stride (one per half) so that each vectorises */
    for (int64_t i = i0; i < half; i++)
        o1[i] = f32_to_bf16(r16(bf16_to_f32(x1[i]) * bf16_to_f32(c1[i]))
                            + r16(-bf16_to_f32(x2[i]) * bf16_to_f32(s1[i])));
    for (int64_t i = i0; i < half; i++)
        o2[i] = f32_to_bf16(r16(bf16_to_f32(x2[i]) * bf16_to_f32(c2[i]))
                            + r16(bf16_to_f32(x1[i]) * bf16_to_f32(s2[i])));
}

int loraplex_rotary_bf16(int64_t tokens, int64_t heads, int64_t dim, const uint16_t *x,
                         int64_t x_tok_stride, int64_t x_head_stride, const uint16_t *cos,
                         const uint16_t *sin, int64_t cs_stride, uint16_t *restrict out) {
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++)
            rotate_head(x + t * x_tok_stride + h * x_head_stride, cos + t * cs_stride, sin + t * cs_stride,
                        dim / 2, out + (t * heads + h) * dim);
    return 0;
}

typedef struct {
    int64_t hq, hkv, dim, q_ts, q_hs, k_ts, k_hs, v_ts, v_hs, cs_stride, rec;
    const uint16_t *q, *k, *v, *cos, *sin;
    uint16_t *q_out, *k_out;
    void *k_cache, *v_cache;
    int kv_dtype;                  /* LP_BF16, or LP_I8 with per-(slot, head) scales */
    float *k_scale, *v_scale;      /* [num_slots, hkv] (LP_I8 only) */
    const int64_t *slots;
} rotary_kv_call_t;

static int rotary_kv_tokens(const void *call, int64_t lo, int64_t hi) {
    const rotary_kv_call_t *c = call;
    const int64_t half = c->dim / 2, dim = c->dim;
    for (int64_t t = lo; t < hi; t++) {
        const uint16_t *cs = c->cos + t * c->cs_stride, *sn = c->sin + t * c->cs_stride;
        for (int64_t h = 0; h < c->hq; h++)
            rotate_head(c->q + t * c->q_ts + h * c->q_hs, cs, sn, half, c->q_out + (t * c->hq + h) * dim);
        const int64_t slot = c->slots[t];
        for (int64_t h = 0; h < c->hkv; h++) {
            uint16_t *ko = c->k_out + (t * c->hkv + h) * dim;
            const uint16_t *vi = c->v + t * c->v_ts + h * c->v_hs;
            const int64_t at = slot * c->rec + h * dim;  /* the head's first element in the caches */
            rotate_head(c->k + t * c->k_ts + h * c->k_hs, cs, sn, half, ko);
            if (c->kv_dtype == LP_I8) {
                quantize_head_i8(ko, dim, (int8_t *)c->k_cache + at, c->k_scale + slot * c->hkv + h);
                quantize_head_i8(vi, dim, (int8_t *)c->v_cache + at, c->v_scale + slot * c->hkv + h);
            } else {
                memcpy((uint16_t *)c->k_cache + at, ko, (size_t)dim * 2);
                memcpy((uint16_t *)c->v_cache + at, vi, (size_t)dim * 2);
            }
        }
    }
    return 0;
}

/* Tokens at which a call is split over the calling thread's OpenMP team (parallel.h). */
#define PARALLEL_MIN_TOKENS 16

/* A layer's attention inputs in one pass, for the decode step (model/attention.py
 * rotate_and_write_kv): q_out [T, Hq, D] = rotary(q); k_out [T, Hkv, D] = rotary(k); and the
 * paged caches' slot slots[t] ([num_slots, Hkv, D] contiguous) get k_out[t] and v[t] -- what
 * rotary() twice and two index_copy_ calls do, with the same bits. An int8 cache (kv_dtype
 * LP_I8) gets them quantized per head (kv_int8.h), their scales going to k_scale / v_scale
 * [num_slots, Hkv] at the same slots (model/kv_quant.py's bits). q, k, v may be strided views
 * (column slices of the fused q/k/v GEMM): strides in elements per token and per head. Tokens are
 * split over threads (a token's slot is its own: no two tokens write one slot). Returns 0, or -1
 * (nothing written) when a slot is outside [0, num_slots), -2 for a cache dtype it does not write. */
int loraplex_rotary_kv_bf16(int64_t tokens, int64_t hq, int64_t hkv, int64_t dim,
                            const uint16_t *q, int64_t q_ts, int64_t q_hs,
                            const uint16_t *k, int64_t k_ts, int64_t k_hs,
                            const uint16_t *v, int64_t v_ts, int64_t v_hs,
                            const uint16_t *cos, const uint16_t *sin, int64_t cs_stride,
                            uint16_t *restrict q_out, uint16_t *restrict k_out,
                            void *k_cache, void *v_cache, int kv_dtype, float *k_scale, float *v_scale,
                            int64_t num_slots, const int64_t *slots) {
    if (kv_dtype != LP_BF16 && (kv_dtype != LP_I8 || !k_scale || !v_scale)) return -2;
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    const rotary_kv_call_t call = {hq, hkv, dim, q_ts, q_hs, k_ts, k_hs, v_ts, v_hs, cs_stride, hkv * dim,
                                   q, k, v, cos, sin, q_out, k_out, k_cache, v_cache, kv_dtype, k_scale, v_scale,
                                   slots};
    const int nt = lp_max_threads();
    if (nt <= 1 || tokens < PARALLEL_MIN_TOKENS) return rotary_kv_tokens(&call, 0, tokens);
    return lp_run_shares(nt, NULL, tokens, rotary_kv_tokens, &call);
}
