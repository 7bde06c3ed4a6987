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
 * - PANEL_MIN_ROWS rows and more, with AVX2: outer products on k-major panels (further down),
 *   ~1.4x the dot tiles at 32-64 rows (130-160 GFLOP/s on the dev box's 2 cores, where torch's
 *   float32 GEMM reaches ~100 at those shapes).
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

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define LANES 8
#ifndef MB
#define MB 4
#endif
#ifndef NB
#define NB 3
#endif
#define MC 64
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2048  /* elements of a W row requested ahead of the one-row loop's reads */
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));

typedef struct {
    int64_t rows, n, k, kpad;         /* rows of this chunk; columns; inner size; k rounded up to LANES */
    const float *xf;                  /* [rows, kpad] the chunk of x, widened, zero-padded */
    const uint16_t *w;                /* [n, k] bfloat16, row stride w_stride */
    int64_t w_stride;
    const uint16_t *bias;             /* [n] or NULL */
    uint16_t *y;                      /* [rows, n] the chunk's output rows, row stride y_stride */
    int64_t y_stride;
} gemm_call_t;

static inline float hsum(v8f v) {
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += v[l];
    return s;
}

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
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

static void widen_row(float *dst, const uint16_t *src, int64_t k, int64_t kpad) {
    int64_t i = 0;
    for (; i + LANES <= k; i += LANES) {
        v8f v = widen8(src + i);
        memcpy(dst + i, &v, sizeof v);
    }
    for (; i < k; i++) dst[i] = bf16_to_f32(src[i]);
    for (; i < kpad; i++) dst[i] = 0.0f;
}

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
            __builtin_prefetch(w[j] + i + PREFETCH_AHEAD, 0, 0);
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

#if defined(__AVX2__)
/* ---- Many rows (M >= PANEL_MIN_ROWS): outer products on a k-major panel of W ----
 *
 * The dot-product tiles above keep one operand in registers and take the other from memory on
 * every FMA (GCC's choice with 12 accumulators: 15 loads per 12 FMAs, load-bound). With many
 * rows the classic GEMM shape wins: a panel of NR = 16 columns of W, widened and transposed to
 * k-major ([kc][16] float32, 16 KB: L1), and a tile of MR = 6 rows, so that each k step is two
 * vector loads of the panel, six broadcasts of x and twelve register-only FMAs. The transposition
 * is an 8x8 register transpose (one pass over W per chunk of rows); its cost is spread over the
 * rows, which is why few rows keep the dot tiles. */
#define NR 16
#define MR 6
#define KC 256
#ifndef PANEL_MIN_ROWS
#define PANEL_MIN_ROWS 24  /* measured: below ~24 rows the dot tiles win (the transposition is paid per chunk) */
#endif

/* 8 bfloat16 of a W row from column k, widened; zeros past the row's end (k + 8 > kk). */
static inline __m256 w8(const uint16_t *row, int64_t k, int64_t kk) {
    if (k + LANES <= kk) return (__m256)widen8(row + k);
    float t[LANES] = {0};
    for (int64_t i = k; i < kk; i++) t[i - k] = bf16_to_f32(row[i]);
    return _mm256_loadu_ps(t);
}

/* panel[k][0..16) = W[n0 + 0..16, k0 + k] for k < kc (rows past n zero, columns past K zero). */
static void pack_panel(float *panel, const gemm_call_t *c, int64_t n0, int64_t k0, int64_t kc) {
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

/* acc rows m..m+mr of the chunk (cbuf [rows][NR] float32) += x[m.., k0..k0+kc) @ panel. */
static inline __attribute__((always_inline)) void panel_tile(float *cbuf, const float *xf, int64_t kpad,
                                                            int64_t k0, int64_t kc, const float *panel,
                                                            int mr, int first) {
    __m256 acc[MR][2];
    for (int i = 0; i < mr; i++) {
        acc[i][0] = first ? _mm256_setzero_ps() : _mm256_load_ps(cbuf + i * NR);
        acc[i][1] = first ? _mm256_setzero_ps() : _mm256_load_ps(cbuf + i * NR + 8);
    }
    const float *xk = xf + k0;
    for (int64_t k = 0; k < kc; k++) {
        __m256 w0 = _mm256_load_ps(panel + k * NR), w1 = _mm256_load_ps(panel + k * NR + 8);
        for (int i = 0; i < mr; i++) {
            __m256 xb = _mm256_broadcast_ss(xk + i * kpad + k);
            acc[i][0] = _mm256_fmadd_ps(xb, w0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(xb, w1, acc[i][1]);
        }
    }
    for (int i = 0; i < mr; i++) {
        _mm256_store_ps(cbuf + i * NR, acc[i][0]);
        _mm256_store_ps(cbuf + i * NR + 8, acc[i][1]);
    }
}

#define PANEL_CASE(MRV) panel_tile(cbuf + m * NR, c->xf + m * c->kpad, c->kpad, k0, kc, panel, MRV, k0 == 0)

/* Panels [b0, b1) of NR columns for every row of the chunk: this thread's share. */
static int panel_share(const void *call, int64_t b0, int64_t b1) {
    const gemm_call_t *c = (const gemm_call_t *)call;
    float *panel = aligned_alloc(64, KC * NR * sizeof(float));
    float *cbuf = aligned_alloc(64, (size_t)c->rows * NR * sizeof(float));
    if (!panel || !cbuf) {
        free(panel);
        free(cbuf);
        return -1;
    }
    for (int64_t b = b0; b < b1; b++) {
        int64_t n0 = b * NR;
        for (int64_t k0 = 0; k0 < c->kpad; k0 += KC) {
            int64_t kc = c->kpad - k0 < KC ? c->kpad - k0 : KC;
            pack_panel(panel, c, n0, k0, kc);
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
        int nb = (int)(c->n - n0 < NR ? c->n - n0 : NR);
        for (int64_t m = 0; m < c->rows; m++) {
            uint16_t *yr = c->y + m * c->y_stride + n0;
            const float *cr = cbuf + m * NR;
            for (int j = 0; j < nb; j++)
                yr[j] = f32_to_bf16(cr[j] + (c->bias ? bf16_to_f32(c->bias[n0 + j]) : 0.0f));
        }
    }
    free(panel);
    free(cbuf);
    return 0;
}
#endif

int loraplex_gemm_bf16(int64_t m, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride,
                       const uint16_t *w, int64_t w_stride, const uint16_t *bias, uint16_t *y,
                       int64_t y_stride) {
    if (m <= 0 || n <= 0) return 0;
    int64_t kpad = (k + LANES - 1) / LANES * LANES;
    int64_t chunk = m < MC ? m : MC;
    float *xf = aligned_alloc(64, (size_t)(chunk * kpad * sizeof(float) + 63) / 64 * 64);
    lp_share_fn share = gemm_share;
    int64_t width = NB;  /* columns per work item */
#if defined(__AVX2__)
    if (m >= PANEL_MIN_ROWS) {
        share = panel_share;
        width = NR;
    }
#endif
    int64_t blocks = (n + width - 1) / width;
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
    int64_t min_blocks = 48 / width;  /* >= 48 columns per thread */
    if (blocks / min_blocks < nt) nt = blocks / min_blocks > 0 ? (int)(blocks / min_blocks) : 1;
    int rc = 0;
    for (int64_t m0 = 0; m0 < m && rc == 0; m0 += MC) {
        int64_t rows = m - m0 < MC ? m - m0 : MC;
        for (int64_t i = 0; i < rows; i++) widen_row(xf + i * kpad, x + (m0 + i) * x_stride, k, kpad);
        gemm_call_t call = {rows, n, k, kpad, xf, w, w_stride, bias, y + m0 * y_stride, y_stride};
        rc = lp_run_shares(nt, cum, blocks, share, &call);
    }
    free(xf);
    free(cum);
    return rc;
}
