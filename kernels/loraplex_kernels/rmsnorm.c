/* RMSNorm of bfloat16 rows, in the Llama family's order of operations (model/norm.py):

     h = bf16(x * 1 / sqrt(mean(x^2) + eps))   statistics and scaling in float32
     out = bf16(w * h)                          the weight multiply after the cast, as HF does

   One call per norm instead of ~8 torch ops (cast, square, mean, add, rsqrt, multiply, cast,
   multiply), each of which re-reads the rows: on a decode step these are ~60 calls of [32, 576]
   where the per-op cost dominates. The sum of squares runs in float32 lanes (another order than
   torch's reduction: the variance differs by float rounding only, so a result can differ from
   torch's by one bfloat16 step where h sits on a rounding boundary). */

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "bf16.h"
#include "layer_kernels.h"
#include "parallel.h"

typedef struct {
    int64_t dim, heads;                     /* row r: token r / heads, head r % heads */
    int64_t x_stride, x_head_stride, out_stride, out_head_stride;
    const uint16_t *x, *w;
    float eps;
    uint16_t *out;                          /* may be x (in place: a row is read before written) */
} norm_call_t;

static int norm_rows(const void *call, int64_t lo, int64_t hi) {
    const norm_call_t *c = call;
    const int64_t dim = c->dim;
    const uint16_t *w = c->w;
    const float eps = c->eps;
    for (int64_t r = lo; r < hi; r++) {
        const int64_t t = r / c->heads, h = r % c->heads;
        const uint16_t *xr = c->x + t * c->x_stride + h * c->x_head_stride;
        uint16_t *o = c->out + t * c->out_stride + h * c->out_head_stride;
        float acc[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= dim; i += 16)
            for (int l = 0; l < 16; l++) {
                float v = bf16_to_f32(xr[i + l]);
                acc[l] += v * v;
            }
        float ss = 0.0f;
        for (int l = 0; l < 16; l++) ss += acc[l];
        for (; i < dim; i++) {
            float v = bf16_to_f32(xr[i]);
            ss += v * v;
        }
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        i = 0;
#if LP_BF16X16
        const __m512 invv = _mm512_set1_ps(inv);
        for (; i + 16 <= dim; i += 16)
            bf16x16_store(o + i, _mm512_mul_ps(bf16x16_load(w + i),
                                               bf16x16_round(_mm512_mul_ps(bf16x16_load(xr + i), invv))));
#endif
        for (; i < dim; i++) {
            float h = bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[i]) * inv));
            o[i] = f32_to_bf16(bf16_to_f32(w[i]) * h);
        }
    }
    return 0;
}

/* Rows at which a call is split over the calling thread's OpenMP team (parallel.h): below it the
 * hand-off costs more than the rows (a decode step's [B, 576] at B >= 16 gains). Each row is
 * computed by one thread alone: the result does not depend on the split. */
#define PARALLEL_MIN_ROWS 16

static int run_norm(const norm_call_t *call, int64_t rows) {
    const int nt = lp_max_threads();
    if (nt <= 1 || rows < PARALLEL_MIN_ROWS) return norm_rows(call, 0, rows);
    return lp_run_shares(nt, NULL, rows, norm_rows, call);
}

int loraplex_rmsnorm_bf16(int64_t rows, int64_t dim, const uint16_t *x, int64_t x_stride,
                          const uint16_t *w, float eps, uint16_t *out, int64_t out_stride) {
    const norm_call_t call = {dim, 1, x_stride, 0, out_stride, 0, x, w, eps, out};
    return run_norm(&call, rows);
}

/* Each head of each token normalised on its own (Qwen3's q/k norms): x [tokens, heads, dim] with
 * token and head strides, out likewise (out may be x). */
int loraplex_rmsnorm_heads_bf16(int64_t tokens, int64_t heads, int64_t dim, const uint16_t *x,
                                int64_t x_stride, int64_t x_head_stride, const uint16_t *w, float eps,
                                uint16_t *out, int64_t out_stride, int64_t out_head_stride) {
    if (heads < 1) return heads == 0 ? 0 : -2;
    const norm_call_t call = {dim, heads, x_stride, x_head_stride, out_stride, out_head_stride, x, w, eps, out};
    return run_norm(&call, tokens * heads);
}
