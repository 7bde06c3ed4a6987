/* bfloat16 GEMM on Intel AMX tiles: y[M, N] = bf16(x[M, K] @ W.T + bias), float32 sums.
 *
 * Why: on a decode step the projections' weights stream from memory once per step and the GEMMs
 * are bound by how fast they do; oneDNN's packed bfloat16 GEMM (model/packed_linear.py) reads
 * them at ~12-15 GB/s on the 2-core AMX dev box, where a plain read of the same matrices runs at
 * ~23 GB/s. Here the weight is read in one sequential pass of 1 KB tiles per 16 output columns,
 * each tile used for every row of x while it is in L1 (benchmarks/results/amx_gemm_cpu.md).
 *
 * Weight layout ("K-pair panels", built by gemm_amx_native.pack): [N / 16, K / 2, 16, 2]
 * bfloat16, element [nb, kp, c, j] = W[16 nb + c, 2 kp + j]. One panel holds 16 output columns
 * for all of K; its 32-deep slices are exactly AMX B tiles (16 rows of 16 column pairs, 64 bytes).
 * N must be a multiple of 16 and K of 32 (the caller falls back to oneDNN otherwise).
 *
 * Work split: the calling thread's OpenMP team (parallel.h) takes contiguous ranges of panels;
 * each thread runs groups of 4 panels over row blocks of 32 (see amx_share), so a group's
 * weights (4 x K x 32 bytes: 72 KB at K = 576) come from memory once and stay in L2 across the
 * row blocks.
 * Every output element is one float32 dot product over K in a fixed order (32-deep slices, in
 * order), whatever M, N, the thread count or the panel grouping: a projection's columns come out
 * identical when it runs alone or fused with its siblings.
 */
#define _GNU_SOURCE  /* syscall() under -std=c11 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "layer_kernels.h"
#include "parallel.h"
#include "prefetch.h"
#include "silu.h"

#if defined(__linux__) && defined(__x86_64__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define PREFETCH_AHEAD 2048  /* bytes ahead in a step's weight stream: one B tile per panel of a pair */
/* Rows per pass over a thread's panels (a multiple of 32): prefill's x rows ([ROW_CHUNK, K]
 * bfloat16, <= 768 KB at K = 1536) stay in L2 across the panel groups instead of streaming
 * from L3 once per group; decode steps (<= 256 rows) make one pass. */
#define ROW_CHUNK 256

static int amx_enabled = 0;

/* Linux gives a process AMX state only on request (kernel >= 5.16); without it a tile
 * instruction faults. Returns 0 when the tiles may be used. */
int loraplex_amx_enable(void) {
    if (!amx_enabled && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0)
        amx_enabled = 1;
    return amx_enabled ? 0 : -1;
}

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config_t;

/* Two tile layouts. Wide (a row block of <= 16 rows): tiles 0-3 float32 accumulators
 * [rows x 16] for 4 panels, 4 the x rows [rows x 32 bf16], 5 and 6 weight slices. Tall (17-32
 * rows): tiles 0, 1 accumulate rows 0-15 and tiles 2, 3 the rest for 2 panels, 4 and 5 hold the
 * two x row tiles, 6 and 7 the weight slices: each weight slice loaded once for 32 rows. */
static void configure(int tall, int rows) {
    tile_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    if (tall) {
        cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = (uint8_t)(rows - 16);
    } else {
        for (int t = 0; t < 5; t++) cfg.rows[t] = (uint8_t)rows;
        cfg.rows[7] = 0;
        cfg.colsb[7] = 0;
    }
    _tile_loadconfig(&cfg);
}

/* What a call writes from its float32 sums (acc) -- the epilogue, fused here so that the decode
 * step's elementwise ops around a projection cost no extra torch call and no extra pass:
 *   PLAIN     y = bf16(acc + bias)
 *   RESIDUAL  y = bf16(bf16(acc + bias) + residual): torch's `residual + linear(x)` on bfloat16,
 *             bit for bit (o_proj and down_proj add into the residual stream)
 *   SWIGLU    W = [W_gate; W_up] (two halves of N / 2 columns), y [M, N / 2] =
 *             bf16(bf16(silu(g)) * u) with g, u = bf16(acc + bias) of the two halves: torch's
 *             `F.silu(gate) * up` on bfloat16 tensors (each op rounds once), but silu's exp is ours
 *             (silu.h, within ~2 float32 ulps of torch's), so a product lying on a bfloat16
 *             rounding boundary can come out one bfloat16 step apart.
 *   FLOAT     y (float32) = bf16(acc + bias) widened: torch's `linear(x).float()`, bit for bit,
 *             without the bfloat16 tensor and the copy (the vocab projection's logits).
 *   ARGMAX    y (int64) [M] = each row's index of its largest FLOAT value, the first one on ties,
 *             NaN counting as largest (the first NaN): torch.argmax(linear(x).float(), -1), without
 *             writing the [M, N] logits and reading them back (a greedy step's token; 2 x 6.3 MB
 *             at 32 rows of a 49152-token vocabulary). Each thread keeps, per row, the best of
 *             each of 16 lanes over its columns (visited in increasing order, so a strict compare
 *             keeps the first), then merges its rows' best into the call's. */

typedef struct {
    const uint16_t *x, *panels, *bias, *residual;
    int64_t m, k, x_stride, y_stride, r_stride;
    int64_t half;  /* SWIGLU: panels in the gate half (item i's up panel is i + half) */
    int mode;
    uint16_t *y;                             /* float * for FLOAT, int64_t * for ARGMAX */
    float *best;                             /* ARGMAX: [m] the value at y[r] (merged over threads) */
} amx_call_t;

/* ARGMAX: a thread's best value and its column so far per row and lane (column % 16), [m, 16]
 * each; column -1: nothing seen yet. */
typedef struct {
    float *v;
    int32_t *col;
} lanes_t;

/* Is (v, i) the argmax rather than (bv, bi) (bi < 0: none yet)? The larger value; NaN above all;
 * the lower index between equals and between NaNs. */
static inline int argmax_better(float v, int64_t i, float bv, int64_t bi) {
    if (bi < 0) return 1;
    const int vn = v != v, bn = bv != bv;
    if (vn || bn) return vn && (!bn || i < bi);
    return v > bv || (v == bv && i < bi);
}

static inline __m512 bias16(const amx_call_t *c, int64_t col) {
    return c->bias ? bf16x16_load(c->bias + col) : _mm512_setzero_ps();
}

/* Rows [r0, r1) of item `item`'s 16 output columns (block rows m0 + r) from its sums: a [rows, 16]
 * (its panel, or its gate panel) and u (SWIGLU: its up panel), row-major float32. */
static void emit(const amx_call_t *c, const lanes_t *lanes, int64_t item, const float *a, const float *u,
                 int64_t m0, int r0, int r1) {
    const int64_t col = item * 16;
    uint16_t *y = c->y + m0 * c->y_stride + col;
    if (c->mode == EPI_SWIGLU) {
        const __m512 bg = bias16(c, col), bu = bias16(c, col + c->half * 16);
        for (int r = r0; r < r1; r++) {
            const __m512 g = bf16x16_round(_mm512_add_ps(_mm512_load_ps(a + r * 16), bg));
            const __m512 up = bf16x16_round(_mm512_add_ps(_mm512_load_ps(u + r * 16), bu));
            bf16x16_store(y + r * c->y_stride, swiglu16(g, up));
        }
        return;
    }
    const __m512 bv = bias16(c, col);
    if (c->mode == EPI_ARGMAX) {
        const __m512i cols = _mm512_add_epi32(_mm512_set1_epi32((int32_t)col),
                                              _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        for (int r = r0; r < r1; r++) {
            const __m512 v = bf16x16_round(_mm512_add_ps(_mm512_load_ps(a + r * 16), bv));
            float *lv = lanes->v + (m0 + r) * 16;
            int32_t *lc = lanes->col + (m0 + r) * 16;
            const __m512 best = _mm512_load_ps(lv);
            const __m512i best_col = _mm512_load_si512(lc);
            /* columns of a lane come in increasing order: strictly larger, or the first NaN */
            const __mmask16 take = _mm512_cmplt_epi32_mask(best_col, _mm512_setzero_si512())
                                   | _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ)
                                   | (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) & ~_mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q));
            _mm512_store_ps(lv, _mm512_mask_mov_ps(best, take, v));
            _mm512_store_si512(lc, _mm512_mask_mov_epi32(best_col, take, cols));
        }
        return;
    }
    if (c->mode == EPI_FLOAT) {  /* y is float32: same row stride in elements */
        float *yf = (float *)c->y + m0 * c->y_stride + col;
        for (int r = r0; r < r1; r++)
            _mm512_storeu_ps(yf + r * c->y_stride, bf16x16_round(_mm512_add_ps(_mm512_load_ps(a + r * 16), bv)));
        return;
    }
    for (int r = r0; r < r1; r++) {
        __m512 v = _mm512_add_ps(_mm512_load_ps(a + r * 16), bv);
        if (c->mode == EPI_RESIDUAL)
            v = _mm512_add_ps(bf16x16_round(v), bf16x16_load(c->residual + (m0 + r) * c->r_stride + col));
        bf16x16_store(y + r * c->y_stride, v);
    }
}

#define ACC_STRIDE (32 * 16)  /* floats per weight panel's sums in a step's buffer: 32 rows x 16 */

/* A step's sums waiting for their epilogue. Why: the epilogue is AVX-512 work on the core while
 * the next step's tile loads wait on memory, so it runs in slices inside the next step's K loop
 * (a few rows per 32-deep slice) instead of between the steps, where the weight stream would
 * stall behind it (0.7 ms of a 32-sequence decode step's GEMMs on the 2-core AMX box). */
typedef struct {
    int n, per_item, rows, done;  /* items, panels per item, block rows, rows emitted */
    int per_slice;                /* rows to emit per 32-deep slice of the next step's K loop */
    int64_t item, m0;             /* first item (the others follow it), first row */
    const float *acc;             /* the items' sums: panel j at acc + j * ACC_STRIDE */
    const lanes_t *lanes;         /* ARGMAX: the thread's per-row best */
} pending_t;

/* Emits the pending rows up to `upto` (all of them when upto >= rows). */
static void drain(const amx_call_t *c, pending_t *p, int upto) {
    if (upto > p->rows) upto = p->rows;
    if (p->done >= upto) return;
    for (int i = 0; i < p->n; i++) {
        const float *a = p->acc + i * p->per_item * ACC_STRIDE;
        emit(c, p->lanes, p->item + i, a, p->per_item == 2 ? a + ACC_STRIDE : NULL, p->m0, p->done, upto);
    }
    p->done = upto;
}

/* Software prefetch of the 1 KB weight slice PREFETCH_AHEAD bytes past `off` in panel w; past
 * the panel's end it is the same place in the panels the next step reads (w + next elements).
 * Every line is asked for, into L1, so that the memory system keeps streaming while the tile
 * unit and the epilogue work (with the hardware prefetchers alone, a step's GEMMs ran ~1.07x
 * slower at one row and at 32). The last step's addresses run past the weights: harmless, a
 * prefetch never faults. */
static inline void prefetch_slice(const uint16_t *w, int64_t off, int64_t panel, int64_t next) {
    const int64_t o = off + PREFETCH_AHEAD / 2;
    const char *p = (const char *)(o < panel ? w + o : w + next + (o - panel));
    for (int l = 0; l < 1024; l += 64) lp_prefetch_l1(p + l);
}

/* Sums of <= 16 rows (xr, row stride xs bytes) against nw (1, 2 or 4) weight panels w[], each
 * one float32 tile; stored to acc + j * ACC_STRIDE, row-major [rows, 16]. `next`: elements from
 * a panel to the one the next step reads in its place (prefetch). `p`: the previous step's
 * epilogue, drained over the K loop. */
static void wide_step(const uint16_t *xr, int64_t xs, const uint16_t *const *w, int nw, int64_t k, float *acc,
                      int64_t next, int pf, const amx_call_t *c, pending_t *p) {
    const int64_t panel = k * 16;
    _tile_zero(0);
    if (nw > 1) _tile_zero(1);
    if (nw > 2) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t k0 = 0; k0 < k; k0 += 32) {
        const int64_t off = k0 * 16;  /* this 32-deep slice of each panel */
        _tile_loadd(4, xr + k0, xs);
        if (pf) prefetch_slice(w[0], off, panel, next);
        _tile_loadd(5, w[0] + off, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (nw > 1) {
            if (pf) prefetch_slice(w[1], off, panel, next);
            _tile_loadd(6, w[1] + off, 64);
            _tile_dpbf16ps(1, 4, 6);
        }
        if (nw > 2) {
            if (pf) prefetch_slice(w[2], off, panel, next);
            _tile_loadd(5, w[2] + off, 64);
            _tile_dpbf16ps(2, 4, 5);
            if (pf) prefetch_slice(w[3], off, panel, next);
            _tile_loadd(6, w[3] + off, 64);
            _tile_dpbf16ps(3, 4, 6);
        }
        drain(c, p, p->done + p->per_slice);
    }
    drain(c, p, p->rows);
    _tile_stored(0, acc, 64);
    if (nw > 1) _tile_stored(1, acc + ACC_STRIDE, 64);
    if (nw > 2) {
        _tile_stored(2, acc + 2 * ACC_STRIDE, 64);
        _tile_stored(3, acc + 3 * ACC_STRIDE, 64);
    }
}

/* Sums of 17-32 rows (xr; xr2 = its 17th row) against nw (1 or 2) weight panels: tiles 0 / 2
 * hold panel 0's rows 0-15 / 16-31, tiles 1 / 3 panel 1's; each weight slice loaded once for
 * all the rows. Stored, prefetched and drained like wide_step's. */
static void tall_step(const uint16_t *xr, const uint16_t *xr2, int64_t xs, const uint16_t *const *w, int nw,
                      int64_t k, float *acc, int64_t next, int pf, const amx_call_t *c, pending_t *p) {
    const int64_t panel = k * 16;
    _tile_zero(0);
    _tile_zero(2);
    if (nw > 1) {
        _tile_zero(1);
        _tile_zero(3);
    }
    for (int64_t k0 = 0; k0 < k; k0 += 32) {
        const int64_t off = k0 * 16;
        _tile_loadd(4, xr + k0, xs);
        _tile_loadd(5, xr2 + k0, xs);
        if (pf) prefetch_slice(w[0], off, panel, next);
        _tile_loadd(6, w[0] + off, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (nw > 1) {
            if (pf) prefetch_slice(w[1], off, panel, next);
            _tile_loadd(7, w[1] + off, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
        drain(c, p, p->done + p->per_slice);
    }
    drain(c, p, p->rows);
    _tile_stored(0, acc, 64);
    _tile_stored(2, acc + 16 * 16, 64);
    if (nw > 1) {
        _tile_stored(1, acc + ACC_STRIDE, 64);
        _tile_stored(3, acc + ACC_STRIDE + 16 * 16, 64);
    }
}

/* ARGMAX: this thread's best per row (over its 16 lanes) merged into the call's (y, best). The
 * merge keeps the better of the two whatever order the threads come in, so the answer does not
 * depend on the thread count. */
static void merge_lanes(const amx_call_t *c, const lanes_t *lanes) {
    int64_t *y = (int64_t *)c->y;
#ifdef _OPENMP
#pragma omp critical(loraplex_amx_argmax)
#endif
    for (int64_t r = 0; r < c->m; r++) {
        float v = 0.f;
        int64_t col = -1;
        for (int l = 0; l < 16; l++) {
            const int64_t lc = lanes->col[r * 16 + l];
            if (lc >= 0 && argmax_better(lanes->v[r * 16 + l], lc, v, col)) {
                v = lanes->v[r * 16 + l];
                col = lc;
            }
        }
        if (col >= 0 && argmax_better(v, col, c->best[r], y[r])) {
            c->best[r] = v;
            y[r] = col;
        }
    }
}

/* Items [lo, hi) for all rows, on the calling thread (an item is 16 output columns: one weight
 * panel, or for SWIGLU a gate and an up panel). Outer loop over chunks of ROW_CHUNK rows, then
 * groups of items with 4 weight panels (the last ones one item at a time), inner over row blocks
 * of 32: a group's weights come from memory once per chunk and from L2 for the further blocks. */
static int amx_share(const void *call, int64_t lo, int64_t hi) {
    const amx_call_t *c = call;
    const int64_t k = c->k, panel = k * 16;  /* elements per panel */
    const int64_t xs = c->x_stride * 2;      /* bytes */
    const int per_item = c->mode == EPI_SWIGLU ? 2 : 1;  /* weight panels per item */
    const int full = 4 / per_item;                       /* items per group of 4 panels */
    const int64_t slices = k / 32;                       /* 32-deep slices of a step's K loop */
    /* Software prefetch only where a group's weights serve one row block: with more (> 32 rows)
     * the tiles are busy longer per weight byte and the hardware streamer keeps up; asking for
     * every line then costs more than it saves (64 rows: 1.1x slower with it, 32 rows: 1.1x
     * faster). */
    const int pf = c->m <= 32;
    lanes_t lanes = {NULL, NULL};
    if (c->mode == EPI_ARGMAX) {
        lanes.v = aligned_alloc(64, (size_t)c->m * 16 * sizeof(float));
        lanes.col = aligned_alloc(64, (size_t)c->m * 16 * sizeof(int32_t));
        if (!lanes.v || !lanes.col) {
            free(lanes.v);
            free(lanes.col);
            return -4;
        }
        for (int64_t i = 0; i < c->m * 16; i++) lanes.col[i] = -1;
    }
    /* Two sum buffers: a step stores into one while the previous step's epilogue reads the other. */
    float acc[2][4 * ACC_STRIDE] __attribute__((aligned(64)));
    int cur = 0;
    pending_t pend = {0};
    /* The thread's tile configuration as the caller left it, put back at the end: oneDNN and
     * ATen run AMX kernels on these same (torch intra-op) threads and may keep theirs loaded
     * between calls. Palette 0 (nothing loaded) restores as a release. */
    tile_config_t saved __attribute__((aligned(64)));
    _tile_storeconfig(&saved);
    int configured = -1;                     /* tall * 64 + rows of the loaded configuration */
    for (int64_t mc = 0; mc < c->m; mc += ROW_CHUNK) {
        const int64_t mend = c->m - mc < ROW_CHUNK ? c->m : mc + ROW_CHUNK;
        int64_t it = lo;
        while (it < hi) {
            const int group = hi - it >= full ? full : 1;
            const uint16_t *w[4];  /* the group's weight panels: item by item, gate before up */
            int nw = 0;
            for (int i = 0; i < group; i++) {
                w[nw++] = c->panels + (it + i) * panel;
                if (per_item == 2) w[nw++] = c->panels + (it + i + c->half) * panel;
            }
            for (int64_t m0 = mc; m0 < mend; m0 += 32) {
                const int rows = mend - m0 < 32 ? (int)(mend - m0) : 32;
                const int tall = rows > 16;
                if (tall * 64 + rows != configured) {
                    configure(tall, rows);
                    configured = tall * 64 + rows;
                }
                const uint16_t *xr = c->x + m0 * c->x_stride;
                const int per_slice = (int)((rows + slices - 1) / slices);
                if (tall) {  /* two weight panels at a time: one SWIGLU item or two plain ones */
                    for (int j = 0; j < nw; j += 2) {
                        const int pair = nw - j >= 2 ? 2 : 1;
                        /* the next pair: the following item (SWIGLU), or the panels after these */
                        const int64_t next = (per_item == 2 ? 1 : pair) * panel;
                        tall_step(xr, xr + 16 * c->x_stride, xs, w + j, pair, k, acc[cur], next, pf, c, &pend);
                        pend = (pending_t){pair / per_item, per_item, rows, 0, per_slice, it + j / per_item, m0,
                                           acc[cur], &lanes};
                        cur ^= 1;
                    }
                    continue;
                }
                wide_step(xr, xs, w, nw, k, acc[cur], group * panel, pf, c, &pend);
                pend = (pending_t){group, per_item, rows, 0, per_slice, it, m0, acc[cur], &lanes};
                cur ^= 1;
            }
            it += group;
        }
    }
    drain(c, &pend, pend.rows);
    if (saved.palette) _tile_loadconfig(&saved);
    else _tile_release();
    if (c->mode == EPI_ARGMAX) {
        merge_lanes(c, &lanes);
        free(lanes.v);
        free(lanes.col);
    }
    return 0;
}

/* y = epilogue(x[m, k] @ W.T + bias) (see the modes above), W [n, k] as K-pair panels (see the
 * top). x rows contiguous (row stride x_stride elements), bias [n] or NULL, y row stride
 * y_stride: [m, n] for PLAIN and RESIDUAL ([m, n] float32 for FLOAT), [m, n / 2] for SWIGLU (n / 2 a
 * multiple of 16); for ARGMAX y is int64 [m] (y_stride unused);
 * residual [m, n] (row stride r_stride) for RESIDUAL, else NULL. Returns 0; -1 when AMX was not
 * enabled (loraplex_amx_enable), -2 for a shape or mode the layout does not cover, -4 when
 * ARGMAX's scratch memory cannot be had (y is then incomplete). */
int loraplex_amx_gemm_epilogue(int64_t m, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride,
                               const uint16_t *panels, const uint16_t *bias, void *y, int64_t y_stride,
                               int mode, const uint16_t *residual, int64_t r_stride) {
    if (!amx_enabled) return -1;
    if (m < 0 || n % 16 || k % 32 || k <= 0 || mode < EPI_PLAIN || mode > EPI_ARGMAX) return -2;
    if ((mode == EPI_SWIGLU && n % 32) || (mode == EPI_RESIDUAL) != (residual != NULL)) return -2;
    if (mode == EPI_ARGMAX && (n == 0 || n > INT32_MAX)) return -2;
    if (m == 0 || n == 0) return 0;
    const int64_t items = mode == EPI_SWIGLU ? n / 32 : n / 16;
    amx_call_t call = {x, panels, bias, residual, m, k, x_stride, y_stride, r_stride, n / 32, mode, y, NULL};
    if (mode == EPI_ARGMAX) {
        call.best = malloc((size_t)m * sizeof(float));
        if (!call.best) return -4;
        for (int64_t r = 0; r < m; r++) ((int64_t *)y)[r] = -1;
    }
    int nt = lp_max_threads();
    if (nt > items) nt = (int)items;
    const int rc = nt <= 1 ? amx_share(&call, 0, items)
                           : lp_run_shares(nt, NULL, items, amx_share, &call);  /* every item is the same work */
    free(call.best);
    return rc;
}

#else  /* no AMX in this build (another CPU or OS, or a compiler without the intrinsics) */

int loraplex_amx_enable(void) { return -3; }

int loraplex_amx_gemm_epilogue(int64_t m, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride,
                               const uint16_t *panels, const uint16_t *bias, void *y, int64_t y_stride,
                               int mode, const uint16_t *residual, int64_t r_stride) {
    (void)m; (void)n; (void)k; (void)x; (void)x_stride; (void)panels; (void)bias; (void)y; (void)y_stride;
    (void)mode; (void)residual; (void)r_stride;
    return -3;
}

#endif
