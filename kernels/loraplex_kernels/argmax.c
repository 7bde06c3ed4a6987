/* Each row's index of its largest float32 value, the first one on ties, NaN counting as largest
 * (the first NaN): exactly torch.argmax's answer, for the sampler's greedy pick
 * (argmax_native.first_argmax). torch's max-with-indices reduction over [32, 49152] logits
 * takes ~0.5-1 ms on the 2-core dev box, a few percent of a decode step; here two passes over
 * each row (the maximum, 64 lanes at a time; then the first index holding it, 16 at a time, from
 * cache), rows split over the calling thread's OpenMP team. AVX-512 builds only: a portable loop
 * (tried) is slower than torch.max, which then stays the sampler's path. */
#include <stddef.h>
#include <stdint.h>

#include "parallel.h"

typedef struct {
    const float *x;
    int64_t cols, stride;
    int64_t *out;
} argmax_call_t;

#if defined(__AVX512F__)
#include <immintrin.h>

/* First index i >= 0 with x[i] == m (want_nan: with x[i] a NaN), 16 at a time; one exists. */
static int64_t first_match(const float *x, int64_t cols, float m, int want_nan) {
    const __m512 mv = _mm512_set1_ps(m);
    int64_t i = 0;
    for (; i + 16 <= cols; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        const __mmask16 k = want_nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, mv, _CMP_EQ_OQ);
        if (k) return i + __builtin_ctz(k);
    }
    for (; i < cols; i++)
        if (want_nan ? x[i] != x[i] : x[i] == m) return i;
    return 0;  /* not reached */
}

static int argmax_rows(const void *call, int64_t lo, int64_t hi) {
    const argmax_call_t *c = call;
    const int64_t cols = c->cols;
    for (int64_t r = lo; r < hi; r++) {
        const float *x = c->x + r * c->stride;
        /* the maximum (VMAXPS returns its second operand when either is NaN: NaN never enters
         * the running maxima) and whether any lane is NaN, four accumulators for throughput */
        __m512 m0 = _mm512_set1_ps(-__builtin_inff()), m1 = m0, m2 = m0, m3 = m0;
        __mmask16 nan = 0;
        int64_t i = 0;
        for (; i + 64 <= cols; i += 64) {
            const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
            const __m512 cc = _mm512_loadu_ps(x + i + 32), d = _mm512_loadu_ps(x + i + 48);
            m0 = _mm512_max_ps(a, m0);
            m1 = _mm512_max_ps(b, m1);
            m2 = _mm512_max_ps(cc, m2);
            m3 = _mm512_max_ps(d, m3);
            nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(cc, d, _CMP_UNORD_Q);
        }
        float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
        int any_nan = nan != 0;
        for (; i < cols; i++) {
            m = x[i] > m ? x[i] : m;
            any_nan |= x[i] != x[i];
        }
        c->out[r] = first_match(x, cols, m, any_nan);  /* -0.0 == 0.0, as torch compares */
    }
    return 0;
}

/* 1 when this build has the kernel (AVX-512): elsewhere torch.max's reduction is as fast as a
 * portable loop, and the sampler keeps it (argmax_native.supports). */
int loraplex_argmax_available(void) { return 1; }

/* out[r] = argmax of x[r, 0 .. cols) (row stride `stride` elements), for r < rows; cols >= 1.
 * Returns 0, -2 for a bad shape. */
int loraplex_argmax_f32(int64_t rows, int64_t cols, const float *x, int64_t stride, int64_t *out) {
    if (cols < 1 || rows < 0) return -2;
    const argmax_call_t call = {x, cols, stride, out};
    int nt = lp_max_threads();
    if (nt > rows) nt = (int)rows;
    if (nt <= 1) return argmax_rows(&call, 0, rows);
    return lp_run_shares(nt, NULL, rows, argmax_rows, &call);
}

#else  /* no AVX-512 in this build */

int loraplex_argmax_available(void) { return 0; }

int loraplex_argmax_f32(int64_t rows, int64_t cols, const float *x, int64_t stride, int64_t *out) {
    (void)rows; (void)cols; (void)x; (void)stride; (void)out;
    return -3;
}

#endif
