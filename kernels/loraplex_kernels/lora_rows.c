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
        for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(bf16_to_f32(dst[i]) + d[i]);
    }
}

/* Ask for [p, p + bytes) ahead of use. On decode steps each row reads another slot's weights
 * that are cold (the base model's weights streamed through the caches since the last LoRA call):
 * touching them one row at a time leaves the core waiting on one miss stream after another, while
 * requesting the next block's lines up front keeps many misses in flight at once (measured on the
 * dev box: ~2x for a cold q/k/v call). */
static void prefetch_range(const void *p, int64_t bytes) {
    const char *c = (const char *)p;
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 1);
}

/* Weights are float32 (WT = float, W(v) = v) or bfloat16 (WT = uint16_t, W(v) = bf16_to_f32(v)):
 * the same two loops are instantiated for each. */
#define DEFINE_SHRINK_EXPAND(SUFFIX, WT, W)                                                       \
/* h[j * r + k] = dot(xs[j], a_k) for the block's nb rows (xs: nb rows of length n, contiguous).   \
 * Four ranks at a time: four independent sums per x load (one sum would wait on each FMA). */     \
static void shrink_##SUFFIX(float *h, const float *xs, int nb, int64_t n, const WT *a,            \
                            int64_t a_rank_stride, int r) {                                        \
    int k = 0;                                                                                     \
    for (; k + 4 <= r; k += 4) {                                                                   \
        const WT *a0 = a + k * a_rank_stride, *a1 = a0 + a_rank_stride;                            \
        const WT *a2 = a1 + a_rank_stride, *a3 = a2 + a_rank_stride;                               \
        for (int j = 0; j < nb; j++) {                                                             \
            const float *xj = xs + j * n;                                                          \
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
                            int64_t b_rank_stride, int64_t n) {                                    \
    for (int j = 0; j < nb; j++) {                                                                 \
        const float *hj = h + j * r;                                                               \
        float *aj = acc + j * n;                                                                   \
        int64_t o0 = 0;                                                                            \
        for (; o0 + TILE <= n; o0 += TILE) {                                                       \
            float t[TILE] = {0};                                                                   \
            for (int k = 0; k < r; k++) {                                                          \
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

/* Rows order[0..num_rows) on the calling thread, with its own scratch. */
static int lora_rows_serial(
    const lora_weights_t *w,
    const int64_t *order, int64_t num_rows, const int64_t *idx, const int64_t *ranks,
    const void *x, int x_dtype, int64_t x_stride,
    void *y0, void *y1, void *y2, void *y3,
    int64_t ys0, int64_t ys1, int64_t ys2, int64_t ys3)
{
    void *const ys[MAX_MEMBERS] = {y0, y1, y2, y3};
    const int64_t y_strides[MAX_MEMBERS] = {ys0, ys1, ys2, ys3};
    const int y_dtype = x_dtype;
    const int64_t d_in = w->d_in, max_rank = w->max_rank;
    const int w_dtype = w->w_dtype, num_members = w->num_members;
    const void *A = w->A;
    const int64_t a_slot = w->a_slot, a_rank = w->a_rank, a_member = w->a_member;
    const float *scales = w->scales;
    const int64_t sc_slot = w->sc_slot, sc_member = w->sc_member;
    const int32_t *member_ids = w->member_ids;
    const void *const *bts = w->bts;
    const int64_t *bt_slot = w->bt_slot, *bt_rank = w->bt_rank, *d_outs = w->d_outs;
    int64_t max_out = 0;
    for (int m = 0; m < num_members; m++)
        if (d_outs[m] > max_out) max_out = d_outs[m];
    float *xs = malloc((size_t)BLOCK * (size_t)d_in * sizeof(float));
    float *acc = malloc((size_t)BLOCK * (size_t)max_out * sizeof(float));
    float *h = malloc((size_t)BLOCK * (size_t)(max_rank > 0 ? max_rank : 1) * sizeof(float));
    float *hall = malloc((size_t)BLOCK * (size_t)(max_rank > 0 ? max_rank : 1) * MAX_MEMBERS * sizeof(float));
    if (!xs || !acc || !h || !hall) {
        free(xs); free(acc); free(h); free(hall);
        return -1;
    }
    /* All members of a contiguous [slots, R, M, in] A asked for, in order: a slot's first r ranks
     * of every member are one block, read in one sequential pass (not M strided ones). */
    int fused = num_members > 1 && a_rank == num_members * a_member && a_member == d_in;
    for (int mi = 0; mi < num_members; mi++)
        if (member_ids[mi] != mi) fused = 0;
    int64_t w_size = w_dtype == 0 ? 4 : 2;
    int64_t i = 0;
    while (i < num_rows) {
        int64_t s = idx[order[i]];
        if (s < 0) { i++; continue; }
        int nb = 1;  /* the block: up to BLOCK rows of this slot, adjacent in `order` */
        while (nb < BLOCK && i + nb < num_rows && idx[order[i + nb]] == s) nb++;
        int r = (int)(ranks[s] < max_rank ? ranks[s] : max_rank);
        /* The next block's slot (the first row of another slot after this block): its weights. */
        int64_t nxt = i + nb;
        while (nxt < num_rows && idx[order[nxt]] == s) nxt++;
        if (nxt < num_rows && idx[order[nxt]] >= 0) {
            int64_t s2 = idx[order[nxt]];
            int r2 = (int)(ranks[s2] < max_rank ? ranks[s2] : max_rank);
            if (fused) {
                prefetch_range((const char *)A + s2 * a_slot * w_size, r2 * a_rank * w_size);
            } else {
                for (int mi = 0; mi < num_members; mi++) {
                    const char *a2 = (const char *)A + (s2 * a_slot + member_ids[mi] * a_member) * w_size;
                    for (int k = 0; k < r2; k++) prefetch_range(a2 + k * a_rank * w_size, d_in * w_size);
                }
            }
            for (int mi = 0; mi < num_members; mi++)
                prefetch_range((const char *)bts[mi] + s2 * bt_slot[mi] * w_size, r2 * bt_rank[mi] * w_size);
        }
        if (r > 0) {
            for (int j = 0; j < nb; j++) load_row(xs + j * d_in, x, x_dtype, order[i + j], x_stride, d_in);
            if (fused) {  /* every member's first r ranks: one contiguous [r * M, in] block */
                int rr = r * num_members;
                if (w_dtype == 0)
                    shrink_f32(hall, xs, nb, d_in, (const float *)A + s * a_slot, a_member, rr);
                else
                    shrink_bf16(hall, xs, nb, d_in, (const uint16_t *)A + s * a_slot, a_member, rr);
            }
            for (int mi = 0; mi < num_members; mi++) {
                int m = member_ids[mi];
                int64_t n = d_outs[mi];
                int64_t a_off = s * a_slot + m * a_member, b_off = s * bt_slot[mi];
                float sc = scales[s * sc_slot + m * sc_member];
                if (fused) {  /* member m's column of the block's dots: rank k is row k * M + m */
                    int rr = r * num_members;
                    for (int j = 0; j < nb; j++)
                        for (int k = 0; k < r; k++) h[j * r + k] = hall[j * rr + k * num_members + m] * sc;
                } else {
                    if (w_dtype == 0)
                        shrink_f32(h, xs, nb, d_in, (const float *)A + a_off, a_rank, r);
                    else
                        shrink_bf16(h, xs, nb, d_in, (const uint16_t *)A + a_off, a_rank, r);
                    for (int q = 0; q < nb * r; q++) h[q] *= sc;
                }
                if (w_dtype == 0)
                    expand_f32(acc, h, nb, r, (const float *)bts[mi] + b_off, bt_rank[mi], n);
                else
                    expand_bf16(acc, h, nb, r, (const uint16_t *)bts[mi] + b_off, bt_rank[mi], n);
                for (int j = 0; j < nb; j++) add_row(ys[mi], y_dtype, order[i + j], y_strides[mi], acc + j * n, n);
            }
        }
        i += nb;
    }
    free(xs); free(acc); free(h); free(hall);
    return 0;
}

/* Below this many rows a call runs on one thread (a parallel region costs a few microseconds). */
#define PARALLEL_MIN_ROWS 8

/* One call's operands, for its shares (lp_run_shares). */
typedef struct {
    const lora_weights_t *w;
    const int64_t *order, *idx, *ranks;
    int64_t num_rows;
    const void *x;
    int x_dtype;
    int64_t x_stride;
    void *ys[MAX_MEMBERS];
    int64_t y_strides[MAX_MEMBERS];
} lora_call_t;

static int lora_rows_range(const lora_call_t *c, int64_t lo, int64_t hi) {
    return lora_rows_serial(c->w, c->order + lo, hi - lo, c->idx, c->ranks, c->x, c->x_dtype, c->x_stride,
                            c->ys[0], c->ys[1], c->ys[2], c->ys[3],
                            c->y_strides[0], c->y_strides[1], c->y_strides[2], c->y_strides[3]);
}

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
    return hi > lo ? lora_rows_range(c, lo, hi) : 0;
}

/* Returns 0, or -1 when scratch memory cannot be had (nothing written then, or, split over
 * threads, only other rows written). The rows in `order` are split over the calling thread's
 * OpenMP threads (parallel.h) into contiguous shares of equal rank work, each share ending where
 * a slot's run of rows ends when that is close, so a slot's weights are mostly read by one thread;
 * every row is computed by one thread alone, so the result does not depend on the thread count. */
int loraplex_lora_rows(
    const lora_weights_t *w,
    const int64_t *order, int64_t num_rows, const int64_t *idx, const int64_t *ranks,
    const void *x, int x_dtype, int64_t x_stride,
    void *y0, void *y1, void *y2, void *y3,
    int64_t ys0, int64_t ys1, int64_t ys2, int64_t ys3)
{
    const lora_call_t call = {w, order, idx, ranks, num_rows, x, x_dtype, x_stride,
                              {y0, y1, y2, y3}, {ys0, ys1, ys2, ys3}};
    int nt = lp_max_threads();
    if (nt <= 1 || num_rows < PARALLEL_MIN_ROWS) return lora_rows_range(&call, 0, num_rows);
    int64_t *cum = malloc((size_t)num_rows * sizeof(int64_t));  /* rank work, running total */
    if (!cum) return -1;
    int64_t total = 0;
    for (int64_t i = 0; i < num_rows; i++) {
        int64_t s = idx[order[i]];
        total += s < 0 ? 0 : 1 + (ranks[s] < w->max_rank ? ranks[s] : w->max_rank);
        cum[i] = total;
    }
    int rc = lp_run_shares(nt, cum, num_rows, lora_share, &call);
    free(cum);
    return rc;
}
