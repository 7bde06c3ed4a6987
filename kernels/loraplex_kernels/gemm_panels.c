/* bfloat16 GEMM on panels of W: y = bf16(x @ W.T + bias), float32 math (as gemm_bf16.c).
 *
 * The dot-product tiles of gemm_bf16.c keep one operand in registers and take the other from
 * memory on every FMA (GCC's choice with 12 accumulators: 15 loads per 12 FMAs, load-bound).
 * This is the classic GEMM shape instead: a panel of NR = 16 columns of W laid out k-major
 * ([kc][16] float32, 16 KB: L1) and a tile of MR = 6 rows of x, so each k step is two vector
 * loads of the panel, six broadcasts of x and twelve FMAs on registers.
 *
 * W comes in one of two layouts:
 * - pre-packed (loraplex_pack_panels, once at load): bfloat16 panels [ceil(n / 16)][kpad][16],
 *   zero-padded, kpad = k rounded up to 8. A panel's k-block is contiguous: widening it into the
 *   float32 buffer is one sequential pass. Used for every row count;
 * - row-major [n, k] (a tied embedding table used as the vocab projection, which the token
 *   lookup needs row-major): each k-block of 16 rows is widened and transposed by 8x8 register
 *   transposes (AVX2 only), a cost spread over the rows, so gemm_bf16.c sends only calls of
 *   PANEL_MIN_ROWS rows or more here and keeps its dot tiles for fewer.
 *
 * Rows of x are widened in chunks of MC (MC x kpad x 4 bytes: L2); the panels are split over the
 * calling thread's OpenMP team (parallel.h); a thread accumulates a panel's columns for the
 * chunk's rows over the k-blocks in a float32 buffer and rounds once at the end. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "gemm_panels.h"
#include "parallel.h"
#include "widen.h"

#define NR 16
#define MR 6
#define KC 256
#define MC 64

typedef struct {
    int64_t rows, n, k, kpad;
    const float *xf;                  /* [rows, kpad] the chunk of x, widened, zero-padded */
    const uint16_t *w;                /* packed panels, or row-major [n, k] with row stride w_stride */
    int64_t w_stride;
    int packed;
    const uint16_t *bias;             /* [n] or NULL */
    uint16_t *y;                      /* [rows, n] the chunk's output rows, row stride y_stride */
    int64_t y_stride;
} panel_call_t;

#if defined(__AVX2__)
/* 8 bfloat16 of a W row from column k, widened; zeros past the row's end (k + 8 > kk). */
static inline __m256 w8(const uint16_t *row, int64_t k, int64_t kk) {
    if (k + LANES <= kk) return (__m256)widen8(row + k);
    float t[LANES] = {0};
    for (int64_t i = k; i < kk; i++) t[i - k] = bf16_to_f32(row[i]);
    return _mm256_loadu_ps(t);
}

/* panel[k][0..16) = W[n0 + 0..16, k0 + k] for k < kc from row-major W (rows past n, columns
 * past K: zero), 8 rows x 8 columns at a time through an 8x8 register transpose. */
static void transpose_block(float *panel, const panel_call_t *c, int64_t n0, int64_t k0, int64_t kc) {
    for (int half = 0; half < 2; half++) {
        const uint16_t *rows[8];
        int valid[8];
        for (int j = 0; j < 8; j++) {
            int64_t n = n0 + half * 8 + j;
            valid[j] = n < c->n;
            rows[j] = c->w + (valid[j] ? n : 0) * c->w_stride;
        }
        for (int64_t k = 0; k < kc; k += LANES) {
            __m256 r[8];
            for (int j = 0; j < 8; j++) r[j] = valid[j] ? w8(rows[j], k0 + k, c->k) : _mm256_setzero_ps();
            __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
            __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
            __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
            __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *dst = panel + k * NR + half * 8;  /* column k + i of the 8 rows -> panel row k + i */
            _mm256_store_ps(dst + 0 * NR, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_store_ps(dst + 1 * NR, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_store_ps(dst + 2 * NR, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_store_ps(dst + 3 * NR, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_store_ps(dst + 4 * NR, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_store_ps(dst + 5 * NR, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_store_ps(dst + 6 * NR, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_store_ps(dst + 7 * NR, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
    }
}
#else
static void transpose_block(float *panel, const panel_call_t *c, int64_t n0, int64_t k0, int64_t kc) {
    for (int64_t k = 0; k < kc; k++)
        for (int j = 0; j < NR; j++) {
            int64_t n = n0 + j, kk = k0 + k;
            panel[k * NR + j] = n < c->n && kk < c->k ? bf16_to_f32(c->w[n * c->w_stride + kk]) : 0.0f;
        }
}
#endif

/* The float32 k-block [kc][16] of panel p starting at k0, from either layout. */
static void load_block(float *panel, const panel_call_t *c, int64_t p, int64_t k0, int64_t kc) {
    if (c->packed) {
        const uint16_t *src = c->w + (p * c->kpad + k0) * NR;  /* contiguous [kc][16] */
        for (int64_t i = 0; i < kc * NR; i += LANES) store8(panel + i, widen8(src + i));
    } else {
        transpose_block(panel, c, p * NR, k0, kc);
    }
}

/* cbuf rows [0, mr) (+)= x rows [0, mr) of the tile, columns k0..k0+kc, @ the block. */
static inline __attribute__((always_inline)) void panel_tile(float *cbuf, const float *xf, int64_t kpad,
                                                            int64_t k0, int64_t kc, const float *panel,
                                                            int mr, int first) {
    v8f acc[MR][2];
    for (int i = 0; i < mr; i++) {
        acc[i][0] = first ? (v8f){0} : load8(cbuf + i * NR);
        acc[i][1] = first ? (v8f){0} : load8(cbuf + i * NR + 8);
    }
    const float *xk = xf + k0;
    for (int64_t k = 0; k < kc; k++) {
        v8f w0 = load8(panel + k * NR), w1 = load8(panel + k * NR + 8);
        for (int i = 0; i < mr; i++) {
            float xs = xk[i * kpad + k];
            acc[i][0] += w0 * xs;
            acc[i][1] += w1 * xs;
        }
    }
    for (int i = 0; i < mr; i++) {
        store8(cbuf + i * NR, acc[i][0]);
        store8(cbuf + i * NR + 8, acc[i][1]);
    }
}

/* Few rows (fewer than DIRECT_MAX_ROWS) of pre-packed panels: the panel's bfloat16 is widened
 * straight into the FMAs, no float32 buffer (each weight is used by so few rows that a buffer
 * pass would cost as much as the FMAs), two k steps at a time into separate sums so that a row
 * keeps four independent FMA chains. out[i][0..16) = x row i @ panel p, for i < mr (<= 3). */
#define DIRECT_MAX_ROWS 8
static inline __attribute__((always_inline)) void direct_tile(float out[3][NR], const float *xf, int64_t kpad,
                                                             const uint16_t *src, int mr) {
    v8f acc[3][2][2];
    for (int i = 0; i < mr; i++)
        for (int h = 0; h < 2; h++) acc[i][h][0] = acc[i][h][1] = (v8f){0};
    for (int64_t k = 0; k < kpad; k += 2) {  /* kpad is a multiple of 8 */
        const uint16_t *s0 = src + k * NR, *s1 = s0 + NR;
        v8f a0 = widen8(s0), a1 = widen8(s0 + 8), b0 = widen8(s1), b1 = widen8(s1 + 8);
        for (int i = 0; i < mr; i++) {
            float x0 = xf[i * kpad + k], x1 = xf[i * kpad + k + 1];
            acc[i][0][0] += a0 * x0;
            acc[i][1][0] += a1 * x0;
            acc[i][0][1] += b0 * x1;
            acc[i][1][1] += b1 * x1;
        }
    }
    for (int i = 0; i < mr; i++) {
        store8(out[i], acc[i][0][0] + acc[i][0][1]);
        store8(out[i] + 8, acc[i][1][0] + acc[i][1][1]);
    }
}

#define PANEL_CASE(MRV) panel_tile(cbuf + m * NR, c->xf + m * c->kpad, c->kpad, k0, kc, panel, MRV, k0 == 0)

/* y[rows, panel p's columns] = bf16(cbuf + bias): the one rounding. */
static void store_panel(const panel_call_t *c, const float *cbuf, int64_t p) {
    int64_t n0 = p * NR;
    int nb = (int)(c->n - n0 < NR ? c->n - n0 : NR);
    for (int64_t m = 0; m < c->rows; m++) {
        uint16_t *yr = c->y + m * c->y_stride + n0;
        const float *cr = cbuf + m * NR;
        for (int j = 0; j < nb; j++)
            yr[j] = f32_to_bf16(cr[j] + (c->bias ? bf16_to_f32(c->bias[n0 + j]) : 0.0f));
    }
}

/* Panels [p0, p1) for every row of the chunk: this thread's share. */
static int panel_share(const void *call, int64_t p0, int64_t p1) {
    const panel_call_t *c = (const panel_call_t *)call;
    float *panel = aligned_alloc(64, KC * NR * sizeof(float));
    float *cbuf = aligned_alloc(64, (size_t)c->rows * NR * sizeof(float));
    if (!panel || !cbuf) {
        free(panel);
        free(cbuf);
        return -1;
    }
    if (c->packed && c->rows < DIRECT_MAX_ROWS) {
        for (int64_t p = p0; p < p1; p++) {
            const uint16_t *src = c->w + p * c->kpad * NR;
            for (int64_t m = 0; m < c->rows; m += 3) {
                float out[3][NR];
                int mr = (int)(c->rows - m < 3 ? c->rows - m : 3);
                const float *xm = c->xf + m * c->kpad;
                if (mr == 3) direct_tile(out, xm, c->kpad, src, 3);
                else if (mr == 2) direct_tile(out, xm, c->kpad, src, 2);
                else direct_tile(out, xm, c->kpad, src, 1);
                memcpy(cbuf + m * NR, out, (size_t)mr * NR * sizeof(float));
            }
            store_panel(c, cbuf, p);
        }
        free(panel);
        free(cbuf);
        return 0;
    }
    for (int64_t p = p0; p < p1; p++) {
        for (int64_t k0 = 0; k0 < c->kpad; k0 += KC) {
            int64_t kc = c->kpad - k0 < KC ? c->kpad - k0 : KC;
            load_block(panel, c, p, k0, kc);
            for (int64_t m = 0; m < c->rows; m += MR) {
                switch (c->rows - m < MR ? c->rows - m : MR) {
                    case 6: PANEL_CASE(6); break;
                    case 5: PANEL_CASE(5); break;
                    case 4: PANEL_CASE(4); break;
                    case 3: PANEL_CASE(3); break;
                    case 2: PANEL_CASE(2); break;
                    default: PANEL_CASE(1); break;
                }
            }
        }
        store_panel(c, cbuf, p);
    }
    free(panel);
    free(cbuf);
    return 0;
}

int lp_gemm_panels(int64_t m, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride, const uint16_t *w,
                   int64_t w_stride, int packed, const uint16_t *bias, uint16_t *y, int64_t y_stride) {
    if (m <= 0 || n <= 0) return 0;
    int64_t kpad = (k + LANES - 1) / LANES * LANES;
    int64_t chunk = m < MC ? m : MC;
    int64_t panels = (n + NR - 1) / NR;
    float *xf = aligned_alloc(64, (size_t)(chunk * kpad * sizeof(float) + 63) / 64 * 64);
    int64_t *cum = malloc((size_t)panels * sizeof(int64_t));  /* equal work per panel */
    if (!xf || !cum) {
        free(xf);
        free(cum);
        return -1;
    }
    for (int64_t p = 0; p < panels; p++) cum[p] = p + 1;
    /* At least 3 panels (48 columns) per thread: a narrow k/v projection is not worth waking
     * the whole team for. */
    int nt = lp_max_threads();
    if (panels / 3 < nt) nt = panels / 3 > 0 ? (int)(panels / 3) : 1;
    int rc = 0;
    for (int64_t m0 = 0; m0 < m && rc == 0; m0 += MC) {
        int64_t rows = m - m0 < MC ? m - m0 : MC;
        for (int64_t i = 0; i < rows; i++) widen_row(xf + i * kpad, x + (m0 + i) * x_stride, k, kpad);
        panel_call_t call = {rows, n, k, kpad, xf, w, w_stride, packed, bias, y + m0 * y_stride, y_stride};
        rc = lp_run_shares(nt, cum, panels, panel_share, &call);
    }
    free(xf);
    free(cum);
    return rc;
}

/* out = W [n, k] (row stride w_stride) as bfloat16 panels [ceil(n / 16)][kpad][16], zero-padded:
 * the layout loraplex_gemm_panels reads. Once per weight, at load. */
int loraplex_pack_panels(int64_t n, int64_t k, const uint16_t *w, int64_t w_stride, uint16_t *out) {
    int64_t kpad = (k + LANES - 1) / LANES * LANES, panels = (n + NR - 1) / NR;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t kk = 0; kk < kpad; kk++)
            for (int j = 0; j < NR; j++) {
                int64_t row = p * NR + j;
                out[(p * kpad + kk) * NR + j] = row < n && kk < k ? w[row * w_stride + kk] : 0;
            }
    return 0;
}

/* y [m, n] = bf16(x @ W.T + bias) with W pre-packed by loraplex_pack_panels. */
int loraplex_gemm_panels(int64_t m, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride,
                         const uint16_t *packed, const uint16_t *bias, uint16_t *y, int64_t y_stride) {
    return lp_gemm_panels(m, n, k, x, x_stride, packed, 0, 1, bias, y, y_stride);
}
