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
#include <string.h>

#include "bf16.h"
#include "parallel.h"

#if defined(__linux__) && defined(__x86_64__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define PREFETCH_AHEAD 2048  /* bytes ahead in a panel: two B tiles */
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

typedef struct {
    const uint16_t *x, *panels, *bias;
    int64_t m, k, x_stride, n, y_stride;
    uint16_t *y;
} amx_call_t;

/* Accumulator tile T -> y rows [M0, M0 + ROWS), columns of panel NB, plus bias, rounded to
 * bfloat16 (round to nearest even, as torch; float32 denormals flush to zero). */
#define STORE_TILE(T, NB, M0, ROWS)                                                             \
    do {                                                                                        \
        _tile_stored(T, acc, 64);                                                               \
        const int64_t col = (NB) * 16;                                                          \
        const __m512 bv = c->bias ? bf16x16_load(c->bias + col) : _mm512_setzero_ps();         \
        for (int r = 0; r < (ROWS); r++) {                                                      \
            const __m512 v = _mm512_add_ps(_mm512_load_ps(acc + r * 16), bv);                   \
            bf16x16_store(c->y + ((M0) + r) * c->y_stride + col, v);                            \
        }                                                                                       \
    } while (0)

static void prefetch_panel(const uint16_t *b) {
    _mm_prefetch((const char *)b + PREFETCH_AHEAD, _MM_HINT_T0);
    _mm_prefetch((const char *)b + PREFETCH_AHEAD + 512, _MM_HINT_T0);
}

/* Panels [lo, hi) for all rows, on the calling thread. Outer loop over chunks of ROW_CHUNK rows,
 * then groups of 4 panels (the last 1-3 one at a time), inner over row blocks of 32: a group's
 * weights come from memory once per chunk and from L2 for the further row blocks. */
static int amx_share(const void *call, int64_t lo, int64_t hi) {
    const amx_call_t *c = call;
    const int64_t k = c->k, panel = k * 16;  /* elements per panel */
    const int64_t xs = c->x_stride * 2;      /* bytes */
    float acc[16 * 16] __attribute__((aligned(64)));
    /* The thread's tile configuration as the caller left it, put back at the end: oneDNN and
     * ATen run AMX kernels on these same (torch intra-op) threads and may keep theirs loaded
     * between calls. Palette 0 (nothing loaded) restores as a release. */
    tile_config_t saved __attribute__((aligned(64)));
    _tile_storeconfig(&saved);
    int configured = -1;                     /* tall * 64 + rows of the loaded configuration */
    for (int64_t mc = 0; mc < c->m; mc += ROW_CHUNK) {
        const int64_t mend = c->m - mc < ROW_CHUNK ? c->m : mc + ROW_CHUNK;
        int64_t nb = lo;
        while (nb < hi) {
            const int group = hi - nb >= 4 ? 4 : 1;
            for (int64_t m0 = mc; m0 < mend; m0 += 32) {
                const int rows = mend - m0 < 32 ? (int)(mend - m0) : 32;
                const int tall = rows > 16;
                if (tall * 64 + rows != configured) {
                    configure(tall, rows);
                    configured = tall * 64 + rows;
                }
                const uint16_t *xr = c->x + m0 * c->x_stride;
                if (tall) {  /* 32 rows (or 17-31) x panel pairs: 2 x 2 accumulators */
                    const uint16_t *xr2 = xr + 16 * c->x_stride;
                    for (int g = 0; g < group; g += 2) {
                        const int pair = group - g >= 2;
                        const uint16_t *p0 = c->panels + (nb + g) * panel;
                        _tile_zero(0);
                        _tile_zero(2);
                        if (pair) {
                            _tile_zero(1);
                            _tile_zero(3);
                        }
                        for (int64_t k0 = 0; k0 < k; k0 += 32) {
                            const uint16_t *b = p0 + k0 * 16;
                            _tile_loadd(4, xr + k0, xs);
                            _tile_loadd(5, xr2 + k0, xs);
                            prefetch_panel(b);
                            _tile_loadd(6, b, 64);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_dpbf16ps(2, 5, 6);
                            if (pair) {
                                prefetch_panel(b + panel);
                                _tile_loadd(7, b + panel, 64);
                                _tile_dpbf16ps(1, 4, 7);
                                _tile_dpbf16ps(3, 5, 7);
                            }
                        }
                        STORE_TILE(0, nb + g, m0, 16);
                        STORE_TILE(2, nb + g, m0 + 16, rows - 16);
                        if (pair) {
                            STORE_TILE(1, nb + g + 1, m0, 16);
                            STORE_TILE(3, nb + g + 1, m0 + 16, rows - 16);
                        }
                    }
                    continue;
                }
                const uint16_t *p0 = c->panels + nb * panel;
                _tile_zero(0);
                if (group == 4) {
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t k0 = 0; k0 < k; k0 += 32) {
                        const uint16_t *b = p0 + k0 * 16;  /* this 32-deep slice of panel nb */
                        _tile_loadd(4, xr + k0, xs);
                        prefetch_panel(b);
                        _tile_loadd(5, b, 64);
                        _tile_dpbf16ps(0, 4, 5);
                        prefetch_panel(b + panel);
                        _tile_loadd(6, b + panel, 64);
                        _tile_dpbf16ps(1, 4, 6);
                        prefetch_panel(b + 2 * panel);
                        _tile_loadd(5, b + 2 * panel, 64);
                        _tile_dpbf16ps(2, 4, 5);
                        prefetch_panel(b + 3 * panel);
                        _tile_loadd(6, b + 3 * panel, 64);
                        _tile_dpbf16ps(3, 4, 6);
                    }
                    STORE_TILE(0, nb, m0, rows);
                    STORE_TILE(1, nb + 1, m0, rows);
                    STORE_TILE(2, nb + 2, m0, rows);
                    STORE_TILE(3, nb + 3, m0, rows);
                } else {
                    for (int64_t k0 = 0; k0 < k; k0 += 32) {
                        const uint16_t *b = p0 + k0 * 16;
                        _tile_loadd(4, xr + k0, xs);
                        prefetch_panel(b);
                        _tile_loadd(5, b, 64);
                        _tile_dpbf16ps(0, 4, 5);
                    }
                    STORE_TILE(0, nb, m0, rows);
                }
            }
            nb += group;
        }
    }
    if (saved.palette) _tile_loadconfig(&saved);
    else _tile_release();
    return 0;
}

/* y[m, n] (row stride y_stride) = bf16(x[m, k] @ W.T + bias), W as K-pair panels (see the top).
 * x rows contiguous (row stride x_stride elements), bias [n] or NULL. Returns 0; -1 when AMX was
 * not enabled (loraplex_amx_enable), -2 for a shape the layout does not cover. */
int loraplex_amx_gemm(int64_t m, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride,
                      const uint16_t *panels, const uint16_t *bias, uint16_t *y, int64_t y_stride) {
    if (!amx_enabled) return -1;
    if (m < 0 || n % 16 || k % 32 || k <= 0) return -2;
    if (m == 0 || n == 0) return 0;
    amx_call_t call = {x, panels, bias, m, k, x_stride, n, y_stride, y};
    const int64_t num_panels = n / 16;
    int nt = lp_max_threads();
    if (nt > num_panels) nt = (int)num_panels;
    if (nt <= 1) return amx_share(&call, 0, num_panels);
    return lp_run_shares(nt, NULL, num_panels, amx_share, &call);  /* every panel is the same work */
}

#else  /* no AMX in this build (another CPU or OS, or a compiler without the intrinsics) */

int loraplex_amx_enable(void) { return -3; }

int loraplex_amx_gemm(int64_t m, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride,
                      const uint16_t *panels, const uint16_t *bias, uint16_t *y, int64_t y_stride) {
    (void)m; (void)n; (void)k; (void)x; (void)x_stride; (void)panels; (void)bias; (void)y; (void)y_stride;
    return -3;
}

#endif
