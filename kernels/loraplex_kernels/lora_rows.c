/* Per-row multi-LoRA on the CPU: every row of a batch times its own slot's A then B, in place.
 *
 * Built at first use by native.py (cc -O3 -march=native, cached per machine) and called through
 * ctypes. It exists because on decode shapes the work is tiny (32 rows x rank 8 x 576 wide is
 * ~0.3 MFLOP) and the torch formulations pay per call for gathers of the rows' weights or for one
 * small-GEMM start-up per adapter (~1 ms per projection in all); reading each row's slot weights
 * in place costs only the FLOPs and one pass over the weights that are really used.
 *
 * Semantics (loraplex_kernels.add_lora_multi, for the members listed):
 *   for t in rows with s = idx[t] >= 0, r = min(ranks[s], R):
 *     for m in members:
 *       h[k] = scales[s, m] * dot(x[t], A[s, k, m, :])            k < r   (float32)
 *       y_m[t, o] += sum_k h[k] * Bt_m[s, k, o]                        (float32, then y's dtype)
 * Rows with idx < 0 are not touched. Weights beyond a slot's rank are never read.
 *
 * Two entry points share every loop below: loraplex_lora_rows reads dense slot tensors
 * (lora_weights_t: A [slots, R, M, in], Bt_m [slots, R, out_m]), loraplex_lora_pooled finds each
 * (member, slot)'s blocks in one flat adapter memory pool through offset tables and reads each
 * member's own rank (lora_pool_t; loraplex_kernels.add_lora_pooled). The loops see a slot's
 * weights only as a member_view_t (pointers, rank strides, rank, scale).
 *
 * Rows are visited in `order` (the step's rows sorted by slot, LoraMeta.sorted_token_ids), so the
 * rows of one slot are adjacent: they go through in blocks of 4 and each weight row is loaded
 * once per block, not once per row (on decode steps the weights come from DRAM: the base model's
 * weights stream through the caches between two LoRA calls).
 *
 * Activations (x, y) and weights (A, Bt) are each float32 (dtype 0) or bfloat16 (dtype 1);
 * scales float32; all sums in float32.
 * Every stride is in elements; the innermost dimension of x, y, A and Bt is contiguous.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"
#include "prefetch.h"

#define BLOCK 4
#define TILE 64

static void load_row(float *dst, const void *base, int dtype, int64_t row, int64_t stride, int64_t n) {
    if (dtype == 0) {
        memcpy(dst, (const float *)base + row * stride, (size_t)n * sizeof(float));
    } else {
        const uint16_t *src = (const uint16_t *)base + row * stride;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    }
}

static void add_row(void *base, int dtype, int64_t row, int64_t stride, const float *d, int64_t n) {
    if (dtype == 0) {
        float *dst = (float *)base + row * stride;
        for (int64_t i = 0; i < n; i++) dst[i] += d[i];
    } else {
        uint16_t *dst = (uint16_t *)base + row * stride;
        int64_t i = 0;
#if LP_BF16X16  /* 16 at a time through VCVTNEPS2BF16 (bf16.h): the portable rounding costs ~6
                 * cycles an element, ~3 us a row of a q/k/v group (960 outputs) */
        for (; i + 16 <= n; i += 16)
            bf16x16_store(dst + i, _mm512_add_ps(bf16x16_load(dst + i), _mm512_loadu_ps(d + i)));
#endif
        for (; i < n; i++) dst[i] = f32_to_bf16(bf16_to_f32(dst[i]) + d[i]);
    }
}

/* The weights of the slot after the current one, requested a few lines at a time while the
 * current one computes. On decode steps each row reads another slot's weights, and they are cold
 * (the base model's weights streamed through the caches since the last LoRA call). Requesting a
 * slot's ~43 KB in one burst (the earlier form) stalls the core until the burst's misses find
 * fill buffers, and only then computes; spreading the requests over the previous slot's loops
 * keeps the misses in flight while it computes (a step's 60 LoRA calls at 32 rows on 32
 * adapters, builds alternated in one process: 3.4 -> 2.8 ms, against ~2.9 ms for a build that only
 * touches the weights and computes nothing). A cursor walks ranges of rows of whole lines. */
#define PF_RANGES (2 * 4)  /* A and Bt of up to MAX_MEMBERS members */
typedef struct {
    const char *row[PF_RANGES];      /* the next line to request is row[i] + line[i] * 64 */
    int64_t line[PF_RANGES], lines[PF_RANGES], rows_left[PF_RANGES], stride[PF_RANGES];  /* bytes */
    int n, at;                       /* ranges added, first range not yet fully requested */
} pf_cursor_t;

/* Adds `rows` rows of `row_bytes` each, `stride` bytes apart, to the ranges to request. */
static void pf_add(pf_cursor_t *c, const void *p, int64_t rows, int64_t row_bytes, int64_t stride) {
    if (rows <= 0 || row_bytes <= 0 || c->n == PF_RANGES) return;
    const int i = c->n++;
    c->row[i] = (const char *)p;
    c->line[i] = 0;
    c->lines[i] = (row_bytes + 63) / 64;
    c->rows_left[i] = rows;
    c->stride[i] = stride;
}

/* Requests up to `lines` more lines, in order. */
static inline void pf_next(pf_cursor_t *c, int64_t lines) {
    for (; lines > 0 && c->at < c->n; lines--) {
        const int i = c->at;
        lp_prefetch_l2(c->row[i] + c->line[i] * 64);
        if (++c->line[i] == c->lines[i]) {
            c->line[i] = 0;
            c->row[i] += c->stride[i];
            if (--c->rows_left[i] == 0) c->at++;
        }
    }
}

#define PF_ALL INT64_MAX

/* Weights are float32 (WT = float, W(v) = v) or bfloat16 (WT = uint16_t, W(v) = bf16_to_f32(v)):
 * the same two loops are instantiated for each. */
#define DEFINE_SHRINK_EXPAND(SUFFIX, WT, W)                                                       \
/* h[j * r + k] = dot(xs[j], a_k) for the block's nb rows (xs: nb rows of length n, contiguous).   \
 * Four ranks at a time: four independent sums per x load (one sum would wait on each FMA). */     \
static void shrink_##SUFFIX(float *h, const float *xs, int nb, int64_t n, const WT *a,            \
                            int64_t a_rank_stride, int r, pf_cursor_t *pf) {                       \
    const int64_t row_lines = (n * (int64_t)sizeof(WT) + 63) / 64;  /* lines of one rank of a */   \
    int k = 0;                                                                                     \
    for (; k + 4 <= r; k += 4) {                                                                   \
        const WT *a0 = a + k * a_rank_stride, *a1 = a0 + a_rank_stride;                            \
        const WT *a2 = a1 + a_rank_stride, *a3 = a2 + a_rank_stride;                               \
        for (int j = 0; j < nb; j++) {                                                             \
            const float *xj = xs + j * n;                                                          \
            if (j == 0) pf_next(pf, 4 * row_lines);  /* as many of the next slot's as read here */ \
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                          \
            for (int64_t i = 0; i < n; i++) {                                                      \
                float xv = xj[i];                                                                  \
                s0 += W(a0[i]) * xv;                                                               \
                s1 += W(a1[i]) * xv;                                                               \
                s2 += W(a2[i]) * xv;                                                               \
                s3 += W(a3[i]) * xv;                                                               \
            }                                                                                      \
            h[j * r + k] = s0;                                                                     \
            h[j * r + k + 1] = s1;                                                                 \
            h[j * r + k + 2] = s2;                                                                 \
            h[j * r + k + 3] = s3;                                                                 \
        }                                                                                          \
    }                                                                                              \
    for (; k < r; k++) {                                                                           \
        const WT *ak = a + k * a_rank_stride;                                                      \
        pf_next(pf, row_lines);                                                                    \
        for (int j = 0; j < nb; j++) {                                                             \
            const float *xj = xs + j * n;                                                          \
            float s = 0.f;                                                                         \
            for (int64_t i = 0; i < n; i++) s += W(ak[i]) * xj[i];                                 \
            h[j * r + k] = s;                                                                      \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
/* acc[j] (length n) = sum_k h[j * r + k] * b_k for the block's nb rows, a tile of TILE outputs  \
 * at a time so the partial sums stay in registers across the rank loop. */                        \
static void expand_##SUFFIX(float *acc, const float *h, int nb, int r, const WT *b,               \
                            int64_t b_rank_stride, int64_t n, pf_cursor_t *pf) {                   \
    for (int j = 0; j < nb; j++) {                                                                 \
        const float *hj = h + j * r;                                                               \
        float *aj = acc + j * n;                                                                   \
        int64_t o0 = 0;                                                                            \
        for (; o0 + TILE <= n; o0 += TILE) {                                                       \
            float t[TILE] = {0};                                                                   \
            for (int k = 0; k < r; k++) {                                                          \
                if (j == 0) pf_next(pf, TILE * (int64_t)sizeof(WT) / 64);                          \
                const WT *bk = b + k * b_rank_stride + o0;                                         \
                float hv = hj[k];                                                                  \
                for (int o = 0; o < TILE; o++) t[o] += hv * W(bk[o]);                              \
            }                                                                                      \
            memcpy(aj + o0, t, sizeof t);                                                          \
        }                                                                                          \
        for (int64_t o = o0; o < n; o++) {                                                         \
            float t = 0.f;                                                                         \
            for (int k = 0; k < r; k++) t += hj[k] * W(b[k * b_rank_stride + o]);                  \
            aj[o] = t;                                                                             \
        }                                                                                          \
    }                                                                                              \
}

#define AS_FLOAT(v) (v)
DEFINE_SHRINK_EXPAND(f32, float, AS_FLOAT)
DEFINE_SHRINK_EXPAND(bf16, uint16_t, bf16_to_f32)

#if LP_BF16X16
/* shrink_bf16 for bfloat16 activations read in place (x rows xr[j]; n a multiple of 32): VDPBF16PS
 * multiplies 32 bfloat16 pairs exactly and sums them in float32, so neither x nor A is widened
 * (the widening loop spends more on conversions than on FMAs). Four ranks at a time, as there. */
static void shrink_bf16_dp(float *h, const uint16_t *const *xr, int nb, int64_t n, const uint16_t *a,
                           int64_t a_rank_stride, int r, pf_cursor_t *pf) {
    for (int j = 0; j < nb; j++) {
        const uint16_t *x = xr[j];
        int k = 0;
        for (; k + 4 <= r; k += 4) {
            const uint16_t *a0 = a + k * a_rank_stride, *a1 = a0 + a_rank_stride;
            const uint16_t *a2 = a1 + a_rank_stride, *a3 = a2 + a_rank_stride;
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            for (int64_t i = 0; i < n; i += 32) {
                if (j == 0) pf_next(pf, 4);  /* one line of each of the four ranks read here */
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
                s0 = _mm512_dpbf16_ps(s0, xv, (__m512bh)_mm512_loadu_si512(a0 + i));
                s1 = _mm512_dpbf16_ps(s1, xv, (__m512bh)_mm512_loadu_si512(a1 + i));
                s2 = _mm512_dpbf16_ps(s2, xv, (__m512bh)_mm512_loadu_si512(a2 + i));
                s3 = _mm512_dpbf16_ps(s3, xv, (__m512bh)_mm512_loadu_si512(a3 + i));
            }
            h[j * r + k] = _mm512_reduce_add_ps(s0);
            h[j * r + k + 1] = _mm512_reduce_add_ps(s1);
            h[j * r + k + 2] = _mm512_reduce_add_ps(s2);
            h[j * r + k + 3] = _mm512_reduce_add_ps(s3);
        }
        for (; k < r; k++) {
            const uint16_t *ak = a + k * a_rank_stride;
            __m512 s0 = _mm512_setzero_ps();
            for (int64_t i = 0; i < n; i += 32)
                s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(x + i), (__m512bh)_mm512_loadu_si512(ak + i));
            h[j * r + k] = _mm512_reduce_add_ps(s0);
        }
    }
}
#define HAVE_DP_SHRINK 1

/* expand_bf16 + add_row for a block of nb <= BLOCK rows, bfloat16 weights, n a multiple of 64:
 * each 64-wide tile of a weight row is widened once for the whole block (expand_bf16 widens it
 * again for every row), and each row's sums go straight into y. Same sums in the same order, so
 * the same bits. A 480-token prefill step over 10 adapters (q/k/v/o rank 8), builds alternated:
 * LoRA 14.0 -> 8.7 ms with the prefetch change below; decode steps unchanged. */
static void expand_add_bf16_block(void *y, int y_dtype, const int64_t *rows, int64_t y_stride, const float *h,
                                  int nb, int r, const uint16_t *b, int64_t b_rank_stride, int64_t n,
                                  pf_cursor_t *pf) {
    for (int64_t o0 = 0; o0 < n; o0 += 64) {
        __m512 t[BLOCK][4];
        for (int j = 0; j < BLOCK; j++)
            for (int q = 0; q < 4; q++) t[j][q] = _mm512_setzero_ps();
        for (int k = 0; k < r; k++) {
            pf_next(pf, 2);
            const uint16_t *bk = b + k * b_rank_stride + o0;
            const __m512 w0 = bf16x16_load(bk), w1 = bf16x16_load(bk + 16);
            const __m512 w2 = bf16x16_load(bk + 32), w3 = bf16x16_load(bk + 48);
            for (int j = 0; j < nb; j++) {
                const __m512 hv = _mm512_set1_ps(h[j * r + k]);
                t[j][0] = _mm512_fmadd_ps(hv, w0, t[j][0]);
                t[j][1] = _mm512_fmadd_ps(hv, w1, t[j][1]);
                t[j][2] = _mm512_fmadd_ps(hv, w2, t[j][2]);
                t[j][3] = _mm512_fmadd_ps(hv, w3, t[j][3]);
            }
        }
        for (int j = 0; j < nb; j++) {
            if (y_dtype == 0) {
                float *dst = (float *)y + rows[j] * y_stride + o0;
                for (int q = 0; q < 4; q++)
                    _mm512_storeu_ps(dst + 16 * q, _mm512_add_ps(_mm512_loadu_ps(dst + 16 * q), t[j][q]));
            } else {
                uint16_t *dst = (uint16_t *)y + rows[j] * y_stride + o0;
                for (int q = 0; q < 4; q++)
                    bf16x16_store(dst + 16 * q, _mm512_add_ps(bf16x16_load(dst + 16 * q), t[j][q]));
            }
        }
    }
}
#else
#define HAVE_DP_SHRINK 0
#endif

#define MAX_MEMBERS 4

/* One projection group's slot weights: fixed while the server runs, so native.py builds this once
 * per group and each call passes only what changes (the step's rows, x, the outputs). */
typedef struct {
    int64_t d_in, max_rank;
    int32_t w_dtype, num_members;
    const void *A;                          /* [slots, R, M, in] */
    int64_t a_slot, a_rank, a_member;
    const float *scales;                    /* [slots, M] */
    int64_t sc_slot, sc_member;
    int32_t member_ids[MAX_MEMBERS];        /* which members, in the order of bts / ys */
    const void *bts[MAX_MEMBERS];           /* [slots, R, out_m] each */
    int64_t bt_slot[MAX_MEMBERS], bt_rank[MAX_MEMBERS], d_outs[MAX_MEMBERS];
} lora_weights_t;

/* One projection group's view of the adapter memory pool (loraplex_kernels/pool_table.py): the
 * pool and the group's tables never move, so this too is built once per group and member set.
 * Member m's weights for slot s: A = pool + a_offs[m][s], [r, d_in] row-major; Bt = pool +
 * bt_offs[m][s], [r, d_out_m] row-major; r = ranks[m][s] (0: not targeted, nothing is read). */
typedef struct {
    int64_t d_in, num_slots, pool_numel;
    int32_t w_dtype, num_members;
    const void *pool;                       /* [pool_numel] */
    const int64_t *a_offs, *bt_offs, *ranks; /* [M_all, slots] each, contiguous */
    const float *scales;                    /* [M_all, slots] */
    int32_t member_ids[MAX_MEMBERS];        /* which members, in the order of ys */
    int64_t d_outs[MAX_MEMBERS];
} lora_pool_t;

/* One call's operands. Exactly one of w (dense slot tensors, rank per slot in `ranks`) and p
 * (the pool) is set; everything below reads weights only through member_view(). */
typedef struct {
    const lora_weights_t *w;
    const lora_pool_t *p;
    const int64_t *order, *idx, *ranks;
    int64_t num_rows;
    const void *x;
    int x_dtype;
    int64_t x_stride;
    void *ys[MAX_MEMBERS];
    int64_t y_strides[MAX_MEMBERS];
    int max_rank;                           /* largest member rank of the call's rows (scratch size) */
    int dense_fused;                        /* dense: all members of an interleaved A asked for */
} lora_call_t;

/* Member mi's weights for slot s: rank k of A at a + k * a_stride, of Bt at bt + k * bt_stride
 * (in elements), `rank` of them. */
typedef struct {
    const void *a, *bt;
    int64_t a_stride, bt_stride;
    float scale;
    int rank;
} member_view_t;

static int call_members(const lora_call_t *c) { return c->w ? c->w->num_members : c->p->num_members; }
static int64_t call_d_in(const lora_call_t *c) { return c->w ? c->w->d_in : c->p->d_in; }
static int call_w_dtype(const lora_call_t *c) { return c->w ? c->w->w_dtype : c->p->w_dtype; }
static const int64_t *call_d_outs(const lora_call_t *c) { return c->w ? c->w->d_outs : c->p->d_outs; }

/* Pool entries are checked once per call (pool_entry_ok) before any row is computed. */
static void member_view(const lora_call_t *c, int64_t s, int mi, member_view_t *v) {
    if (c->w) {
        const lora_weights_t *w = c->w;
        const int64_t m = w->member_ids[mi], wsz = w->w_dtype == 0 ? 4 : 2;
        int64_t r = c->ranks[s] < w->max_rank ? c->ranks[s] : w->max_rank;
        v->rank = r > 0 ? (int)r : 0;
        v->a = (const char *)w->A + (s * w->a_slot + m * w->a_member) * wsz;
        v->a_stride = w->a_rank;
        v->bt = (const char *)w->bts[mi] + s * w->bt_slot[mi] * wsz;
        v->bt_stride = w->bt_rank[mi];
        v->scale = w->scales[s * w->sc_slot + m * w->sc_member];
    } else {
        const lora_pool_t *p = c->p;
        const int64_t e = (int64_t)p->member_ids[mi] * p->num_slots + s, wsz = p->w_dtype == 0 ? 4 : 2;
        int64_t r = p->ranks[e];
        v->rank = r > 0 ? (int)r : 0;
        v->a = (const char *)p->pool + p->a_offs[e] * wsz;
        v->a_stride = p->d_in;
        v->bt = (const char *)p->pool + p->bt_offs[e] * wsz;
        v->bt_stride = p->d_outs[mi];
        v->scale = p->scales[e];
    }
}

/* A pool entry whose blocks lie inside the pool (rank 0: nothing to check, nothing is read). */
#define MAX_POOL_RANK 65536
static int pool_entry_ok(const lora_pool_t *p, int64_t s, int mi) {
    const int64_t e = (int64_t)p->member_ids[mi] * p->num_slots + s, r = p->ranks[e];
    if (r <= 0) return 1;
    const int64_t a = p->a_offs[e], b = p->bt_offs[e];
    return r <= MAX_POOL_RANK && a >= 0 && b >= 0 && a <= p->pool_numel - r * p->d_in
           && b <= p->pool_numel - r * p->d_outs[mi];
}

/* Can the members of one slot be shrunk as one contiguous [rr, d_in] block (one pass over x for
 * all of them)? Then rank k of member mi is row k * km + mi * mm of it, which starts at v[0].a.
 * Dense: ranks interleaved ([slots, R, M, in]: row k * M + m). Pool: member blocks adjacent with
 * equal ranks, member-major (row m * r + k). */
static int fused_layout(const lora_call_t *c, const member_view_t *v, int n, int *km, int *mm) {
    if (n < 2 || v[0].rank <= 0) return 0;
    const int r = v[0].rank;
    for (int mi = 1; mi < n; mi++)
        if (v[mi].rank != r) return 0;
    if (c->w) {
        if (!c->dense_fused) return 0;
        *km = n; *mm = 1;
        return 1;
    }
    const int64_t block = (int64_t)r * c->p->d_in * (c->p->w_dtype == 0 ? 4 : 2);  /* bytes */
    for (int mi = 1; mi < n; mi++)
        if ((const char *)v[mi].a != (const char *)v[0].a + mi * block) return 0;
    *km = 1; *mm = r;
    return 1;
}

/* Adds slot s's weights (all members, up to their ranks) to a cursor's ranges. */
static void slot_cursor(const lora_call_t *c, int64_t s, int n, int64_t d_in, int64_t w_size, pf_cursor_t *pf) {
    member_view_t v[MAX_MEMBERS];
    for (int mi = 0; mi < n; mi++) member_view(c, s, mi, &v[mi]);
    int km, mm;
    if (fused_layout(c, v, n, &km, &mm)) {
        pf_add(pf, v[0].a, 1, (int64_t)v[0].rank * n * d_in * w_size, 0);
    } else {
        for (int mi = 0; mi < n; mi++)
            pf_add(pf, v[mi].a, v[mi].rank, d_in * w_size, v[mi].a_stride * w_size);
    }
    for (int mi = 0; mi < n; mi++)
        pf_add(pf, v[mi].bt, 1, v[mi].rank * v[mi].bt_stride * w_size, 0);
}

/* Rows order[lo..hi) of the call on the calling thread, with its own scratch. */
static int lora_rows_serial(const lora_call_t *c, int64_t lo, int64_t hi) {
    const int64_t *order = c->order + lo, *idx = c->idx;
    const int64_t num_rows = hi - lo;
    const int y_dtype = c->x_dtype;
    const int64_t d_in = call_d_in(c), *d_outs = call_d_outs(c);
    const int w_dtype = call_w_dtype(c), num_members = call_members(c);
    const int64_t w_size = w_dtype == 0 ? 4 : 2;
    const int max_r = c->max_rank > 0 ? c->max_rank : 1;
    int64_t max_out = 0;
    for (int m = 0; m < num_members; m++)
        if (d_outs[m] > max_out) max_out = d_outs[m];
    float *xs = malloc((size_t)BLOCK * (size_t)d_in * sizeof(float));
    float *acc = malloc((size_t)BLOCK * (size_t)max_out * sizeof(float));
    float *h = malloc((size_t)BLOCK * (size_t)max_r * sizeof(float));
    float *hall = malloc((size_t)BLOCK * (size_t)max_r * MAX_MEMBERS * sizeof(float));
    if (!xs || !acc || !h || !hall) {
        free(xs); free(acc); free(h); free(hall);
        return -1;
    }
    pf_cursor_t pf = {0};
    int64_t i = 0, first = -1;
    while (i < num_rows) {
        int64_t s = idx[order[i]];
        if (s < 0) { i++; continue; }
        if (first < 0) first = i;
        int nb = 1;  /* the block: up to BLOCK rows of this slot, adjacent in `order` */
        while (nb < BLOCK && i + nb < num_rows && idx[order[i + nb]] == s) nb++;
        member_view_t v[MAX_MEMBERS];
        int any = 0;
        for (int mi = 0; mi < num_members; mi++) {
            member_view(c, s, mi, &v[mi]);
            any |= v[mi].rank > 0;
        }
        /* This slot's lines not yet requested (all of them for the share's first block), then
         * the next block's slot (the first row of another slot after this block), whose lines the
         * loops below request as they read this one's. */
        if (i == first) slot_cursor(c, s, num_members, d_in, w_size, &pf);
        pf_next(&pf, PF_ALL);
        pf = (pf_cursor_t){0};
        /* The next slot's lines: during this slot's last block only. Asked for in every block of
         * a long run (prefill), they were ~670 prefetches per 4 rows of a q/k/v call. */
        const int64_t nxt = i + nb;
        if (nxt < num_rows && idx[order[nxt]] >= 0 && idx[order[nxt]] != s)
            slot_cursor(c, idx[order[nxt]], num_members, d_in, w_size, &pf);
        if (any) {
            /* bfloat16 x and weights: the dot products straight from x's rows (shrink_bf16_dp) */
            const int dp = HAVE_DP_SHRINK && w_dtype == 1 && c->x_dtype == 1 && d_in % 32 == 0;
            const uint16_t *xr[BLOCK];
            for (int j = 0; j < nb; j++) {
                if (dp)
                    xr[j] = (const uint16_t *)c->x + order[i + j] * c->x_stride;
                else
                    load_row(xs + j * d_in, c->x, c->x_dtype, order[i + j], c->x_stride, d_in);
            }
            (void)xr;  /* read only by shrink_bf16_dp (AVX-512 BF16 builds) */
            int km = 0, mm = 0;
            const int fused = fused_layout(c, v, num_members, &km, &mm);
            const int rr = fused ? v[0].rank * num_members : 0;
            if (fused) {  /* every member's ranks: one contiguous [rr, in] block, one pass over x */
                if (w_dtype == 0)
                    shrink_f32(hall, xs, nb, d_in, (const float *)v[0].a, d_in, rr, &pf);
#if HAVE_DP_SHRINK
                else if (dp)
                    shrink_bf16_dp(hall, xr, nb, d_in, (const uint16_t *)v[0].a, d_in, rr, &pf);
#endif
                else
                    shrink_bf16(hall, xs, nb, d_in, (const uint16_t *)v[0].a, d_in, rr, &pf);
            }
            for (int mi = 0; mi < num_members; mi++) {
                const int r = v[mi].rank;
                if (r <= 0) continue;  /* the adapter does not target this member: read nothing */
                const int64_t n = d_outs[mi];
                const float sc = v[mi].scale;
                if (fused) {  /* member mi's column of the block's dots */
                    for (int j = 0; j < nb; j++)
                        for (int k = 0; k < r; k++) h[j * r + k] = hall[j * rr + k * km + mi * mm] * sc;
                } else {
                    if (w_dtype == 0)
                        shrink_f32(h, xs, nb, d_in, (const float *)v[mi].a, v[mi].a_stride, r, &pf);
#if HAVE_DP_SHRINK
                    else if (dp)
                        shrink_bf16_dp(h, xr, nb, d_in, (const uint16_t *)v[mi].a, v[mi].a_stride, r, &pf);
#endif
                    else
                        shrink_bf16(h, xs, nb, d_in, (const uint16_t *)v[mi].a, v[mi].a_stride, r, &pf);
                    for (int q = 0; q < nb * r; q++) h[q] *= sc;
                }
#if LP_BF16X16
                if (w_dtype == 1 && n % 64 == 0) {  /* widened once per block, added into y */
                    expand_add_bf16_block(c->ys[mi], y_dtype, order + i, c->y_strides[mi], h, nb, r,
                                          (const uint16_t *)v[mi].bt, v[mi].bt_stride, n, &pf);
                    continue;
                }
#endif
                if (w_dtype == 0)
                    expand_f32(acc, h, nb, r, (const float *)v[mi].bt, v[mi].bt_stride, n, &pf);
                else
                    expand_bf16(acc, h, nb, r, (const uint16_t *)v[mi].bt, v[mi].bt_stride, n, &pf);
                for (int j = 0; j < nb; j++)
                    add_row(c->ys[mi], y_dtype, order[i + j], c->y_strides[mi], acc + j * n, n);
            }
        }
        i += nb;
    }
    free(xs); free(acc); free(h); free(hall);
    return 0;
}

/* Below this many rows a call runs on one thread (a parallel region costs a few microseconds). */
#define PARALLEL_MIN_ROWS 8

/* A thread's share: its ends moved to the end of the slot run they fall in (up to BLOCK rows
 * further), so neighbouring shares rarely both read one slot (neighbours move a shared end alike). */
static int lora_share(const void *call, int64_t lo, int64_t hi) {
    const lora_call_t *c = call;
    int64_t *ends[2] = {&lo, &hi};
    for (int e = 0; e < 2; e++) {
        int64_t *end = ends[e];
        for (int moved = 0; moved < BLOCK && *end > 0 && *end < c->num_rows
                            && c->idx[c->order[*end]] == c->idx[c->order[*end - 1]]; moved++)
            (*end)++;
    }
    return hi > lo ? lora_rows_serial(c, lo, hi) : 0;
}

/* Runs a call: one pass over its rows first (each row's work: 1 + its members' real ranks; the
 * largest rank, which sizes the scratch; for the pool, that every entry it will read lies inside
 * the pool and every slot inside the table, so a bad entry is refused before anything is
 * written), then the rows in `order`, split over the calling thread's OpenMP threads
 * (parallel.h) into contiguous shares of equal work, each share ending where a slot's run of
 * rows ends when that is close, so a slot's weights are mostly read by one thread; every row is
 * computed by one thread alone, so the result does not depend on the thread count.
 * Returns 0; -1 when scratch memory cannot be had (nothing written then, or, split over threads,
 * only other rows written); -2 for a pool entry or slot out of range (nothing written). */
static int lora_run(lora_call_t *c) {
    const int n = call_members(c);
    const int nt = lp_max_threads();
    const int split = nt > 1 && c->num_rows >= PARALLEL_MIN_ROWS;
    int64_t *cum = split ? malloc((size_t)c->num_rows * sizeof(int64_t)) : NULL;  /* work, running total */
    if (split && !cum) return -1;
    int64_t total = 0, prev = -1;
    int max_r = 0;
    for (int64_t i = 0; i < c->num_rows; i++) {
        const int64_t s = c->idx[c->order[i]];
        if (s >= 0) {
            if (c->p && s != prev) {  /* rows of one slot are adjacent: check each run once */
                int ok = s < c->p->num_slots;
                for (int mi = 0; ok && mi < n; mi++) ok = pool_entry_ok(c->p, s, mi);
                if (!ok) { free(cum); return -2; }
            }
            total += 1;
            for (int mi = 0; mi < n; mi++) {
                member_view_t v;
                member_view(c, s, mi, &v);
                total += v.rank;
                if (v.rank > max_r) max_r = v.rank;
            }
        }
        prev = s;
        if (cum) cum[i] = total;
    }
    c->max_rank = max_r;
    int rc = cum ? lp_run_shares(nt, cum, c->num_rows, lora_share, c) : lora_rows_serial(c, 0, c->num_rows);
    free(cum);
    return rc;
}

/* Semantics: see the top of this file; weights in dense slot tensors (lora_weights_t). */
int loraplex_lora_rows(
    const lora_weights_t *w,
    const int64_t *order, int64_t num_rows, const int64_t *idx, const int64_t *ranks,
    const void *x, int x_dtype, int64_t x_stride,
    void *y0, void *y1, void *y2, void *y3,
    int64_t ys0, int64_t ys1, int64_t ys2, int64_t ys3)
{
    lora_call_t call = {w, NULL, order, idx, ranks, num_rows, x, x_dtype, x_stride,
                        {y0, y1, y2, y3}, {ys0, ys1, ys2, ys3}, 0, 0};
    /* All members of a contiguous [slots, R, M, in] A asked for, in order: a slot's first r ranks
     * of every member are one block, read in one sequential pass (not M strided ones). */
    int fused = w->num_members > 1 && w->a_rank == w->num_members * w->a_member && w->a_member == w->d_in;
    for (int mi = 0; mi < w->num_members; mi++)
        if (w->member_ids[mi] != mi) fused = 0;
    call.dense_fused = fused;
    return lora_run(&call);
}

/* Semantics: the same, each member's weights found through the pool tables (lora_pool_t):
 *   for t in rows with s = idx[t] >= 0, for m in members with r = ranks[m][s] > 0:
 *     A = pool + a_offs[m][s] ([r, d_in]), Bt = pool + bt_offs[m][s] ([r, d_out_m])
 *     y_m[t] += scales[m][s] * (x[t] @ A.T) @ Bt
 * Nothing beyond a member's r rows is read; a member of rank 0 is skipped. */
int loraplex_lora_pooled(
    const lora_pool_t *p,
    const int64_t *order, int64_t num_rows, const int64_t *idx,
    const void *x, int x_dtype, int64_t x_stride,
    void *y0, void *y1, void *y2, void *y3,
    int64_t ys0, int64_t ys1, int64_t ys2, int64_t ys3)
{
    lora_call_t call = {NULL, p, order, idx, NULL, num_rows, x, x_dtype, x_stride,
                        {y0, y1, y2, y3}, {ys0, ys1, ys2, ys3}, 0, 0};
    return lora_run(&call);
}
