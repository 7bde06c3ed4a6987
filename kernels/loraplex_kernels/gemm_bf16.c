/* bfloat16 GEMM for CPUs without native bfloat16 arithmetic: y = x @ W.T (+ bias), every
 * product and sum in float32, the result rounded to bfloat16 once.
 *
 *   y[m, n] = bf16( sum_k f32(x[m, k]) * f32(W[n, k])  (+ f32(bias[n])) )
 *
 * Why it exists: on a CPU with AVX2 but no AVX-512 BF16 / AMX (the dev and CI machines, many
 * cloud AMD EPYCs), torch's bfloat16 F.linear runs oneDNN's emulated path at ~20 GFLOP/s, while
 * the same CPU does float32 FMAs at ~140 GFLOP/s (benchmarks/results/roofline_cpu.md). A
 * bfloat16 value is the top half of a float32, so widening it costs one shift: this kernel widens
 * each block of W once into an L1-sized float32 buffer and runs float32 FMAs, so a bfloat16
 * model decodes at float32's arithmetic speed while reading half of float32's bytes.
 *
 * Three loops, by the number of rows M (decode: M = running sequences; prefill: thousands):
 * - one row: W streamed through the FMAs as it is widened (gemv4), no buffer;
 * - 2 to PANEL_MIN_ROWS - 1 rows: dot-product tiles (below);
 * - PANEL_MIN_ROWS rows and more, with AVX2: outer products on k-major panels (gemm_panels.c),
 *   ~1.4x the dot tiles at 32-64 rows (130-160 GFLOP/s on the dev box's 2 cores, where torch's
 *   float32 GEMM reaches ~100 at those shapes). (Weights pre-packed into panels once at load,
 *   loraplex_gemm_panels, skip this file altogether.)
 * The dot tiles:
 * - x is widened to float32 in chunks of MC rows (MC x K x 4 bytes stays in L2);
 * - the output columns are split over the calling thread's OpenMP team (parallel.h); a thread
 *   takes NB rows of W at a time, widens them into its buffer, and computes the NB columns for
 *   every row of the chunk in register tiles of MB rows x NB columns (MB * NB = 12 accumulators
 *   of 8 lanes: the FMAs of a tile are independent, so they pipeline);
 * - each row of W is read from memory once per chunk: at decode, once per call.
 * Rows of x, W and y may be strided (stride in elements); their last dimension is contiguous.
 * The sums run in another order than oneDNN's (8 lanes, then the lanes added): results differ
 * from torch's bfloat16 F.linear by float32 rounding before the one bfloat16 rounding, i.e. at
 * most a bfloat16 step where the sum sits on a rounding boundary (tests/test_widened_linear.py checks
 * against float64). Returns 0, or -1 when scratch memory cannot be allocated. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"
#include "prefetch.h"
#include "gemm_panels.h"
#include "widen.h"

#ifndef MB
#define MB 4
#endif
#ifndef NB
#define NB 3
#endif
#define MC 64
/* Below this many rows the dot tiles win (the panel path transposes W per chunk of rows). */
#ifndef PANEL_MIN_ROWS
#define PANEL_MIN_ROWS 24
#endif
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2048  /* elements of a W row requested ahead of the one-row loop's reads */
#endif

typedef struct {
    int64_t rows, n, k, kpad;         /* rows of this chunk; columns; inner size; k rounded up to LANES */
    const float *xf;                  /* [rows, kpad] the chunk of x, widened, zero-padded */
    const uint16_t *w;                /* [n, k] bfloat16, row stride w_stride */
    int64_t w_stride;
    const uint16_t *bias;             /* [n] or NULL */
    uint16_t *y;                      /* [rows, n] the chunk's output rows, row stride y_stride */
    int64_t y_stride;
} gemm_call_t;


/* One row of x (a decode step of one sequence): every W element is used once, so widening it
 * into a buffer first would only add a pass; W is widened as it is read, four rows of it at a
 * time (eight independent sums keep the FMA pipeline full and four streams of W in flight).
 * out[j] = dot(xf, w[j]) for j < 4. */
static inline void gemv4(float out[4], const float *xf, const uint16_t *const w[4], int64_t k) {
    v8f acc[4][2] = {{{0}}};
    int64_t i = 0;
    for (; i + 2 * LANES <= k; i += 2 * LANES) {
        v8f x0 = load8(xf + i), x1 = load8(xf + i + LANES);
        for (int j = 0; j < 4; j++) {
            lp_prefetch_once(w[j] + i + PREFETCH_AHEAD);
            acc[j][0] += x0 * widen8(w[j] + i);
            acc[j][1] += x1 * widen8(w[j] + i + LANES);
        }
    }
    for (int j = 0; j < 4; j++) {
        float s = hsum(acc[j][0] + acc[j][1]);
        for (int64_t t = i; t < k; t++) s += xf[t] * bf16_to_f32(w[j][t]);
        out[j] = s;
    }
}

/* out[i][j] = dot(xf row i, wf row j) for i < mb, j < nb (mb <= MB, nb <= NB: constants at the
 * call sites, so the loops unroll and the accumulators live in registers). */
static inline __attribute__((always_inline)) void tile(float out[MB][NB], const float *xf, int64_t kpad,
                                                      const float *wf, int mb, int nb) {
    v8f acc[MB][NB];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) acc[i][j] = (v8f){0};
    for (int64_t k = 0; k < kpad; k += LANES) {
        v8f xv[MB];
        for (int i = 0; i < mb; i++) xv[i] = load8(xf + i * kpad + k);
        for (int j = 0; j < nb; j++) {
            v8f wv = load8(wf + j * kpad + k);
            for (int i = 0; i < mb; i++) acc[i][j] += xv[i] * wv;
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) out[i][j] = hsum(acc[i][j]);
}

#define TILE_CASE(MBV, NBV) tile(out, xf + m * c->kpad, c->kpad, wf, MBV, NBV)

/* The columns [n0, n1) for every row of the chunk: this thread's share. */
static int gemm_share(const void *call, int64_t b0, int64_t b1) {
    const gemm_call_t *c = (const gemm_call_t *)call;
    int64_t kpad = c->kpad;
    if (c->rows == 1) {  /* one row: stream W through the FMAs, four rows of it at a time */
        int64_t hi = b1 * NB < c->n ? b1 * NB : c->n;  /* this share's columns end here */
        for (int64_t n = b0 * NB; n < hi; n += 4) {
            float out[4];
            const uint16_t *w[4];
            for (int j = 0; j < 4; j++)  /* past the share's end: repeat its last row, unused */
                w[j] = c->w + (n + j < hi ? n + j : hi - 1) * c->w_stride;
            gemv4(out, c->xf, w, c->k);
            for (int j = 0; j < 4 && n + j < hi; j++)
                c->y[n + j] = f32_to_bf16(out[j] + (c->bias ? bf16_to_f32(c->bias[n + j]) : 0.0f));
        }
        return 0;
    }
    float *wf = aligned_alloc(64, (size_t)(NB * kpad * sizeof(float) + 63) / 64 * 64);
    if (!wf) return -1;
    for (int64_t b = b0; b < b1; b++) {
        int64_t n0 = b * NB;
        int nb = (int)(c->n - n0 < NB ? c->n - n0 : NB);
        for (int j = 0; j < nb; j++)  /* widen the block's rows of W once */
            widen_row(wf + j * kpad, c->w + (n0 + j) * c->w_stride, c->k, kpad);
        float bias[NB] = {0};
        if (c->bias)
            for (int j = 0; j < nb; j++) bias[j] = bf16_to_f32(c->bias[n0 + j]);
        const float *xf = c->xf;
        for (int64_t m = 0; m < c->rows; m += MB) {
            int mb = (int)(c->rows - m < MB ? c->rows - m : MB);
            float out[MB][NB];
            if (nb == NB) {
                switch (mb) {
                    case 4: TILE_CASE(4 <= MB ? 4 : 1, NB); break;
                    case 3: TILE_CASE(3 <= MB ? 3 : 1, NB); break;
                    case 2: TILE_CASE(2 <= MB ? 2 : 1, NB); break;
                    default: TILE_CASE(1, NB); break;
                }
            } else {  /* the last block of columns, narrower: one column at a time */
                for (int j = 0; j < nb; j++) {
                    float col[MB][NB];
                    switch (mb) {
                        case 4: tile(col, xf + m * c->kpad, c->kpad, wf + j * kpad, 4 <= MB ? 4 : 1, 1); break;
                        case 3: tile(col, xf + m * c->kpad, c->kpad, wf + j * kpad, 3 <= MB ? 3 : 1, 1); break;
                        case 2: tile(col, xf + m * c->kpad, c->kpad, wf + j * kpad, 2 <= MB ? 2 : 1, 1); break;
                        default: tile(col, xf + m * c->kpad, c->kpad, wf + j * kpad, 1, 1); break;
                    }
                    for (int i = 0; i < mb; i++) out[i][j] = col[i][0];
                }
            }
            for (int i = 0; i < mb; i++) {
                uint16_t *yr = c->y + (m + i) * c->y_stride + n0;
                for (int j = 0; j < nb; j++) yr[j] = f32_to_bf16(out[i][j] + bias[j]);
            }
        }
    }
    free(wf);
    return 0;
}

int loraplex_gemm_bf16(int64_t m, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride,
                       const uint16_t *w, int64_t w_stride, const uint16_t *bias, uint16_t *y,
                       int64_t y_stride) {
    if (m <= 0 || n <= 0) return 0;
    int64_t kpad = (k + LANES - 1) / LANES * LANES;
    int64_t chunk = m < MC ? m : MC;
    float *xf = aligned_alloc(64, (size_t)(chunk * kpad * sizeof(float) + 63) / 64 * 64);
#if defined(__AVX2__)
    if (m >= PANEL_MIN_ROWS)  /* many rows: outer products on panels of W (gemm_panels.c) */
        return lp_gemm_panels(m, n, k, x, x_stride, w, w_stride, 0, bias, y, y_stride);
#endif
    int64_t blocks = (n + NB - 1) / NB;
    int64_t *cum = malloc((size_t)blocks * sizeof(int64_t));  /* equal work per block of columns */
    if (!xf || !cum) {
        free(xf);
        free(cum);
        return -1;
    }
    for (int64_t b = 0; b < blocks; b++) cum[b] = b + 1;
    /* One thread per ~48 columns at least: a k/v projection of a small model is too narrow to
     * be worth waking the team for more. */
    int nt = lp_max_threads();
    if (blocks / 16 < nt) nt = blocks / 16 > 0 ? (int)(blocks / 16) : 1;
    int rc = 0;
    for (int64_t m0 = 0; m0 < m && rc == 0; m0 += MC) {
        int64_t rows = m - m0 < MC ? m - m0 : MC;
        for (int64_t i = 0; i < rows; i++) widen_row(xf + i * kpad, x + (m0 + i) * x_stride, k, kpad);
        gemm_call_t call = {rows, n, k, kpad, xf, w, w_stride, bias, y + m0 * y_stride, y_stride};
        rc = lp_run_shares(nt, cum, blocks, gemm_share, &call);
    }
    free(xf);
    free(cum);
    return rc;
}
