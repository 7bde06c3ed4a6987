/* The decoder layers of a bfloat16 step in one call (model/compiled_layers.py): a run of attention
 * and MLP blocks, each the same kernels in the same order as the model's Python path, so the
 * result is bit-identical to it -- only the Python between them is gone (on the 2-core dev box
 * ~7 calls a layer, each a few microseconds of argument checks, tensor allocation and ctypes:
 * a visible share of a decode step once the GEMMs stream at the machine's read rate).
 *
 *   attention block:  xn = rmsnorm(x) ; qkv = xn @ Wqkv.T (+b) ; (Qwen3: each head of q and k
 *                     RMSNorm-ed) ; q, k = rotary(q, k) with k, v
 *                     written to the layer's KV cache ; a = decode attention of every row ;
 *                     x = x + a @ Wo.T (+b)                          (the residual epilogue)
 *   MLP block:        xn = rmsnorm(x) ; h = silu(xn Wg.T) * (xn Wu.T) (the SwiGLU epilogue) ;
 *                     x = x + h @ Wd.T (+b)
 *
 * With LoRA (a step's `sites`: per layer, the q/k/v, o, gate/up and down deltas that are due),
 * a site's projection is computed plainly, its delta added in place by the pooled LoRA kernel
 * (lora_rows.c, the same call the Python path makes), and only then SwiGLU or the residual add
 * run as separate passes with torch's rounding: the delta goes in before them, as in Python.
 *
 * x [T, hidden] (the residual stream) is updated in place. Every row must be an attention row of
 * the compiled kernel (decode tokens and short prefill chunks: model/attention.py native_rows),
 * row r reading table row r. Weights are AMX K-pair panels (gemm_amx.c). */
#define _POSIX_C_SOURCE 199309L  /* clock_gettime under -std=c11 */
#include <stdint.h>
#include <time.h>

#include "bf16.h"
#include "layer_kernels.h"
#include "silu.h"

typedef struct {  /* one decoder layer's fixed operands: pointers into the model's tensors */
    const uint16_t *in_norm, *post_norm;         /* [hidden] RMSNorm weights */
    const uint16_t *qkv, *qkv_bias;              /* panels of [q; k; v] (q + 2 kv columns), bias or NULL */
    const uint16_t *o, *o_bias;                  /* panels [hidden columns] */
    const uint16_t *gate_up, *gate_up_bias;      /* panels of [gate; up] (2 inter columns) */
    const uint16_t *down, *down_bias;            /* panels [hidden columns] */
    void *k_cache, *v_cache;                     /* [num_slots, hkv, dim] bfloat16, or int8 (step kv_dtype) */
    float *k_scale, *v_scale;                    /* [num_slots, hkv] the int8 caches' scales, or NULL */
    int64_t window;                              /* sliding window, 0 = none */
    const uint16_t *q_norm, *k_norm;             /* [dim] per-head RMSNorm weights (Qwen3), or NULL */
} lp_layer_t;

typedef struct {  /* one LoRA delta due at a layer's projection(s) this step */
    const void *pool;     /* the pooled kernel's lora_pool_t for the due members (lora_native.PreparedPool), NULL = none */
    int64_t y_cols[4];    /* each due member's first column in the site's output */
} lp_lora_site_t;

enum { SITE_QKV = 0, SITE_O = 1, SITE_GATE_UP = 2, SITE_DOWN = 3, SITES = 4 };

typedef struct {  /* the model's sizes and one step's operands */
    int64_t hidden, heads, kv_heads, head_dim, inter, block_size, num_slots;
    int64_t kv_dtype;                            /* the caches' LP_BF16 or LP_I8 */
    float eps, scale;
    int64_t tokens;
    uint16_t *x;                                 /* [T, hidden], updated in place */
    const uint16_t *cos, *sin;                   /* [T, head_dim] rows (cs_stride apart) */
    int64_t cs_stride;
    const int64_t *slots;                        /* [T] flat KV slots of this step's tokens */
    const int64_t *table, *seq_lens;             /* [T, >= nb] block ids (table_stride), [T] keys per row */
    int64_t table_stride;
    uint16_t *xn, *qkv_out, *q_rot, *k_rot, *attn, *h, *gate_up;  /* scratch: [T, hidden], [T, q + 2 kv],
                                                                    [T, q], [T, kv], [T, q], [T, inter], [T, 2 inter] */
    const lp_lora_site_t *sites;                 /* [layers][SITES], or NULL: no delta anywhere */
    const int64_t *lora_order, *lora_idx;        /* LoraMeta.sorted_token_ids [lora_rows], token_slots [T] */
    int64_t lora_rows;
    int64_t *phase_ns;                           /* [PHASES] nanoseconds added per phase, or NULL: no timing */
} lp_step_t;

/* Where a compiled step's time goes (benchmarks/profile_decode.py reads these; the names are in
 * decode_layers_native.PHASES). Timing costs two clock reads per kernel call, only when asked. */
enum { PH_NORM, PH_QKV, PH_ROTARY_KV, PH_ATTENTION, PH_O, PH_GATE_UP, PH_DOWN, PH_LORA, PH_ROWS, PHASES };

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* rc = CALL, its time added to phase P when the step is timed */
#define TIMED(S, P, CALL)                                        \
    do {                                                         \
        const int64_t t0_ = (S)->phase_ns ? now_ns() : 0;        \
        CALL;                                                    \
        if ((S)->phase_ns) (S)->phase_ns[P] += now_ns() - t0_;   \
    } while (0)


/* The site's delta (if due) added to y (row stride ys; each member's columns at y + y_cols[i]). */
static int add_delta(const lp_step_t *s, const lp_lora_site_t *site, const uint16_t *x, int64_t xs,
                     uint16_t *y, int64_t ys) {
    if (!site || !site->pool) return 0;
    int rc;
    TIMED(s, PH_LORA, rc = loraplex_lora_pooled(site->pool, s->lora_order, s->lora_rows, s->lora_idx, x, LP_BF16, xs,
                                                y + site->y_cols[0], y + site->y_cols[1], y + site->y_cols[2],
                                                y + site->y_cols[3], ys, ys, ys, ys));
    return rc;
}

#if LP_BF16X16
/* x = bf16(x + y) over [T, n] (row strides xs, ys): torch's bfloat16 add. */
static void add_rows(int64_t t, int64_t n, uint16_t *x, int64_t xs, const uint16_t *y, int64_t ys) {
    for (int64_t r = 0; r < t; r++)
        for (int64_t i = 0; i < n; i += 16)
            bf16x16_store(x + r * xs + i, _mm512_add_ps(bf16x16_load(x + r * xs + i), bf16x16_load(y + r * ys + i)));
}

/* h = bf16(bf16(silu(g)) * u) for g, u the halves of gu [T, 2 n]: torch's F.silu(gate) * up. */
static void swiglu_rows(int64_t t, int64_t n, const uint16_t *gu, uint16_t *h) {
    for (int64_t r = 0; r < t; r++)
        for (int64_t i = 0; i < n; i += 16) {
            const __m512 g = bf16x16_load(gu + r * 2 * n + i), u = bf16x16_load(gu + r * 2 * n + n + i);
            bf16x16_store(h + r * n + i, swiglu16(g, u));
        }
}
#define HAVE_ROWS 1
#else
#define HAVE_ROWS 0  /* never called: the compiled layers need AMX, which comes with AVX-512 BF16 */
#endif

/* x += proj(a) (+ its due delta of a): the residual epilogue in place when no delta is due, else
 * the plain GEMM into xn, the delta, and the add. */
static int project_residual(const lp_step_t *s, const lp_lora_site_t *site, const uint16_t *a, int64_t k,
                            const uint16_t *panels, const uint16_t *bias, int phase) {
    const int64_t t = s->tokens, hid = s->hidden;
    int rc;
    if (!site || !site->pool) {
        TIMED(s, phase, rc = loraplex_amx_gemm_epilogue(t, hid, k, a, k, panels, bias, s->x, hid, EPI_RESIDUAL, s->x, hid));
        return rc;
    }
    if (!HAVE_ROWS) return -3;
    TIMED(s, phase, rc = loraplex_amx_gemm_epilogue(t, hid, k, a, k, panels, bias, s->xn, hid, EPI_PLAIN, 0, 0));
    if (!rc) rc = add_delta(s, site, a, k, s->xn, hid);
#if LP_BF16X16
    if (!rc) TIMED(s, PH_ROWS, add_rows(t, hid, s->x, hid, s->xn, hid));
#endif
    return rc;
}

static int attention_block(const lp_step_t *s, const lp_layer_t *l, const lp_lora_site_t *sites) {
    const int64_t t = s->tokens, hid = s->hidden, d = s->head_dim;
    const int64_t qw = s->heads * d, kvw = s->kv_heads * d, width = qw + 2 * kvw;
    int rc;
    TIMED(s, PH_NORM, rc = loraplex_rmsnorm_bf16(t, hid, s->x, hid, l->in_norm, s->eps, s->xn, hid));
    if (!rc) TIMED(s, PH_QKV, rc = loraplex_amx_gemm_epilogue(t, width, hid, s->xn, hid, l->qkv, l->qkv_bias,
                                                              s->qkv_out, width, EPI_PLAIN, 0, 0));
    if (!rc && sites) rc = add_delta(s, sites + SITE_QKV, s->xn, hid, s->qkv_out, width);
    if (!rc && l->q_norm)  /* Qwen3: each head of q and k normalised before rotary, in place */
        TIMED(s, PH_NORM, rc = loraplex_rmsnorm_heads_bf16(t, s->heads, d, s->qkv_out, width, d, l->q_norm,
                                                           s->eps, s->qkv_out, width, d));
    if (!rc && l->k_norm)
        TIMED(s, PH_NORM, rc = loraplex_rmsnorm_heads_bf16(t, s->kv_heads, d, s->qkv_out + qw, width, d,
                                                           l->k_norm, s->eps, s->qkv_out + qw, width, d));
    if (!rc) TIMED(s, PH_ROTARY_KV, rc = loraplex_rotary_kv_bf16(t, s->heads, s->kv_heads, d, s->qkv_out, width, d,
                                                                 s->qkv_out + qw, width, d, s->qkv_out + qw + kvw,
                                                                 width, d, s->cos, s->sin, s->cs_stride, s->q_rot,
                                                                 s->k_rot, l->k_cache, l->v_cache, (int)s->kv_dtype,
                                                                 l->k_scale, l->v_scale, s->num_slots,
                                                                 s->slots));
    if (!rc) TIMED(s, PH_ATTENTION, rc = loraplex_decode_attention(t, s->heads, s->kv_heads, d, s->q_rot, LP_BF16, 0,
                                                                   qw, d, l->k_cache, l->v_cache, (int)s->kv_dtype,
                                                                   l->k_scale, l->v_scale,
                                                                   s->block_size * kvw, kvw, d, s->block_size,
                                                                   s->table, s->table_stride, s->seq_lens,
                                                                   l->window, s->scale, s->attn, qw));
    if (!rc) rc = project_residual(s, sites ? sites + SITE_O : 0, s->attn, qw, l->o, l->o_bias, PH_O);
    return rc;
}

static int mlp_block(const lp_step_t *s, const lp_layer_t *l, const lp_lora_site_t *sites) {
    const int64_t t = s->tokens, hid = s->hidden, inter = s->inter;
    const lp_lora_site_t *gu = sites ? sites + SITE_GATE_UP : 0;
    int rc;
    TIMED(s, PH_NORM, rc = loraplex_rmsnorm_bf16(t, hid, s->x, hid, l->post_norm, s->eps, s->xn, hid));
    if (rc) return rc;
    if (!gu || !gu->pool) {
        TIMED(s, PH_GATE_UP, rc = loraplex_amx_gemm_epilogue(t, 2 * inter, hid, s->xn, hid, l->gate_up,
                                                             l->gate_up_bias, s->h, inter, EPI_SWIGLU, 0, 0));
    } else if (!HAVE_ROWS) {
        rc = -3;
    } else {  /* the delta goes into gate / up before silu(gate) * up */
        TIMED(s, PH_GATE_UP, rc = loraplex_amx_gemm_epilogue(t, 2 * inter, hid, s->xn, hid, l->gate_up,
                                                             l->gate_up_bias, s->gate_up, 2 * inter, EPI_PLAIN, 0, 0));
        if (!rc) rc = add_delta(s, gu, s->xn, hid, s->gate_up, 2 * inter);
#if LP_BF16X16
        if (!rc) TIMED(s, PH_ROWS, swiglu_rows(t, inter, s->gate_up, s->h));
#endif
    }
    if (!rc) rc = project_residual(s, sites ? sites + SITE_DOWN : 0, s->h, inter, l->down, l->down_bias, PH_DOWN);
    return rc;
}

/* Runs blocks[0 .. n) in order: block b is layer b / 2's attention (b even) or MLP (b odd).
 * Returns 0, or the first failing kernel's code (the step is then unusable: x half updated). */
int loraplex_decode_layers(const lp_step_t *step, const lp_layer_t *layers, const int64_t *blocks, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t layer = blocks[i] / 2;
        const lp_lora_site_t *sites = step->sites ? step->sites + layer * SITES : 0;
        const int rc = blocks[i] % 2 ? mlp_block(step, layers + layer, sites)
                                     : attention_block(step, layers + layer, sites);
        if (rc) return rc;
    }
    return 0;
}
