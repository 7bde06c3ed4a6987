/* Paged attention for decode tokens on the CPU: one query token per sequence, keys and values read
 * in place from the block KV cache.
 *
 * Why: the torch formulation (model/attention.py) gathers every sequence's blocks into a padded
 * [B, L, H_kv, D] copy and runs scaled_dot_product_attention with a mask; on the default model's
 * decode steps that is ~20 % of the step (a flash kernel's start-up and a copy per layer for a few
 * hundred thousand multiply-adds). Here each sequence reads its own blocks where they lie.
 *
 * Semantics, per sequence b (context length n = seq_lens[b], its new token already written), per
 * query head h with kv head g = h / (H / H_kv) (grouped-query attention):
 *   keys j in [lo, n) with lo = max(0, n - window) when window > 0, else 0;
 *   s_j = scale * dot(q[b, h], K[j]),  p = softmax(s),  out[b, h] = sum_j p_j V[j]
 * where K[j] / V[j] is position j % block_size of block block_table[b, j / block_size], head g.
 * Sums and the softmax in float32; q, the cache and out are all float32 (dtype 0) or all
 * bfloat16 (1) -- or q and out are either and the cache is int8 (2, --kv-cache-dtype int8):
 * K[j] = scale_k[slot(j), g] * Kq[j] (and V likewise), the scales [num_slots, H_kv] float32 beside
 * the cache (kv_int8.h has the rule). The scale multiplies the dot product (K) or the probability
 * (V) once per position and head, not every element.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "layer_kernels.h"
#include "parallel.h"
#include "exp_nonpos.h"
#include "prefetch.h"
#include "widen.h"

#define AS_FLOAT(v) (v)
#define STORE_F32(v) (v)

/* Positions ahead at which a row's K (scores) and V (weighted sum) records are asked for while
 * it walks its context: the blocks are cold (the layer's weights went through the caches since
 * they were written) and scattered, so reading them on demand leaves the core waiting on one
 * miss after another (perf: most of a long row's time on the V loads). */
#define PF_DIST 16
/* Of the next row's context, the first PF_HEAD positions are asked for before the row starts
 * (the in-loop prefetch takes over from there; asking for all of a long context at once only
 * floods the queues). */
#define PF_HEAD 32

/* Ask for the record at position off of block b (every kv head: pos_bytes from its slot) of one
 * cache, and its scales' line when the cache has scales (sc: [num_slots, hkv] float32, or NULL). */
static inline void prefetch_slot(const char *cache, const float *sc, int64_t hkv, int64_t b, int64_t off,
                                 int64_t block_size, int64_t blk_bytes, int64_t pos_bytes) {
    const char *rec = cache + b * blk_bytes + off * pos_bytes;
    for (int64_t c = 0; c < pos_bytes; c += 64) lp_prefetch_l2(rec + c);
    if (sc) lp_prefetch_l2(sc + (b * block_size + off) * hkv);
}

/* The same for a row's position j. */
static inline void prefetch_record(const char *cache, const float *sc, int64_t hkv, const int64_t *table,
                                   int64_t j, int64_t block_size, int64_t blk_bytes, int64_t pos_bytes) {
    prefetch_slot(cache, sc, hkv, table[j / block_size], j % block_size, block_size, blk_bytes, pos_bytes);
}

/* Position j's record of `cache` on a row's walk through its blocks (blk / off: j's block in the
 * row's table and its offset there, moved on to j + 1; *slot: j's flat slot, where its scales
 * are), asking for the record PF_DIST positions ahead while that is before pf_end (the row's
 * context; 0 on a walk that follows another over the same records, which are in cache by then). */
static inline const char *walk_record(const char *cache, const float *sc, int64_t hkv, const int64_t *table,
                                      int64_t j, int64_t pf_end, int64_t *blk, int64_t *off, int64_t block_size,
                                      int64_t blk_bytes, int64_t pos_bytes, int64_t *slot) {
    const int64_t b = table[*blk];
    const char *rec = cache + b * blk_bytes + *off * pos_bytes;
    *slot = b * block_size + *off;
    if (j + PF_DIST < pf_end) {  /* j + PF_DIST's block and offset, stepped from j's: no division */
        int64_t b2 = *blk, o2 = *off + PF_DIST;
        while (o2 >= block_size) {
            o2 -= block_size;
            ++b2;
        }
        prefetch_slot(cache, sc, hkv, table[b2], o2, block_size, blk_bytes, pos_bytes);
    }
    if (++*off == block_size) {
        *off = 0;
        ++*blk;
    }
    return rec;
}

/* The next row's first PF_HEAD positions from lo (K and V), before it starts. */
static void prefetch_blocks(const char *k, const char *v, const float *ks, const float *vs, int64_t hkv,
                            const int64_t *table, int64_t n, int64_t lo, int64_t block_size, int64_t blk_bytes,
                            int64_t pos_bytes) {
    const int64_t end = n - lo > PF_HEAD ? lo + PF_HEAD : n;
    for (int64_t j = lo; j < end; j++) {
        prefetch_record(k, ks, hkv, table, j, block_size, blk_bytes, pos_bytes);
        prefetch_record(v, vs, hkv, table, j, block_size, blk_bytes, pos_bytes);
    }
}

#if LP_BF16X16
/* CALL(NR) with NR = min(left, 4) as a constant, so that each head count gets its own
 * register-resident instance of an always_inline pass. */
#define BY_HEAD_COUNT(left, CALL)                          \
    switch ((left) < 4 ? (int)(left) : 4) {                \
    case 1: CALL(1); break;                                \
    case 2: CALL(2); break;                                \
    case 3: CALL(3); break;                                \
    default: CALL(4); break;                               \
    }

/* One head's 64 values of a record as 4 x 16 float32: bfloat16 widened, or int8 converted (I8;
 * its scale is applied by the caller, once per position). */
static inline __attribute__((always_inline)) void load_head64(const char *p, const int I8, __m512 v[4]) {
    for (int i = 0; i < 4; i++)
        v[i] = I8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16 * i))))
                  : bf16x16_load((const uint16_t *)p + 16 * i);
}

/* acc[h] += p[h][j] * V_j over the row's positions, for heads of 64 and NR query heads of KV head g
 * at once (NR <= 4: 16 float32 accumulators in registers); with an int8 cache (I8) p[h][j] is
 * first multiplied by V_j's scale (sc: the scales of KV head g, hkv apart per slot). Why: summing
 * into acc in memory position by position (the generic loop) costs a load and a store per 16
 * sums and was the kernel's largest part (72 -> 55 us a layer at 32 rows of 40 tokens without
 * it). The sums are the same fused multiply-adds in the same order (position by position). */
static inline __attribute__((always_inline)) void v_heads_64(
        const char *v_cache, const float *sc, int64_t hkv, const int64_t *table, int64_t lo, int64_t n,
        int64_t block_size, int64_t blk_bytes, int64_t pos_bytes, int64_t pf_end, int64_t head_off, const float *p0,
        int64_t len, float *acc0, const int NR, const int I8) {
    __m512 a[4][4];
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < 4; i++) a[r][i] = _mm512_setzero_ps();
    for (int64_t j = lo, blk = lo / block_size, off = lo % block_size; j < n; j++) {
        int64_t slot;
        const char *rec = walk_record(v_cache, I8 ? sc : NULL, hkv, table, j, pf_end, &blk, &off, block_size,
                                      blk_bytes, pos_bytes, &slot);
        __m512 v[4];
        load_head64(rec + head_off, I8, v);
        const float vs = I8 ? sc[slot * hkv] : 1.0f;
        for (int r = 0; r < NR; r++) {
            const __m512 p = _mm512_set1_ps(I8 ? p0[r * len + (j - lo)] * vs : p0[r * len + (j - lo)]);
            for (int i = 0; i < 4; i++) a[r][i] = _mm512_fmadd_ps(p, v[i], a[r][i]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(acc0 + r * 64 + 16 * i, a[r][i]);
}

/* out[j] = the sum of v[j]'s 16 lanes, j < 16: a transposing reduction (4 levels of shuffles and
 * adds) instead of 16 horizontal sums. */
static inline __m512 sum_lanes16(const __m512 v[16]) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per lane: v[4i .. 4i + 3]'s sums over that lane */
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Scores s[r][j - lo] = q_r . K_j of NR query heads (qf rows, scaled) of one KV head, 16
 * positions at a time: each position's 64 products folded into one vector of 16 partial sums,
 * the 16 positions' vectors then reduced together (sum_lanes16) -- and, with an int8 cache (I8),
 * multiplied by the 16 positions' K scales. */
static inline __attribute__((always_inline)) void k_heads_64(
        const char *k_cache, const float *sc, int64_t hkv, const int64_t *table, int64_t lo, int64_t n,
        int64_t block_size, int64_t blk_bytes, int64_t pos_bytes, int64_t pf_end, int64_t head_off, const float *q0,
        float *s0, int64_t len, const int NR, const int I8) {
    __m512 q[4][4], part[4][16];
    float ks[16];
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < 4; i++) q[r][i] = _mm512_loadu_ps(q0 + r * 64 + 16 * i);
    for (int64_t j0 = lo, blk = lo / block_size, off = lo % block_size; j0 < n; j0 += 16) {
        const int cnt = n - j0 < 16 ? (int)(n - j0) : 16;
        for (int jj = 0; jj < 16; jj++) {
            if (jj >= cnt) {
                for (int r = 0; r < NR; r++) part[r][jj] = _mm512_setzero_ps();
                if (I8) ks[jj] = 0.f;
                continue;
            }
            int64_t slot;
            const char *rec = walk_record(k_cache, I8 ? sc : NULL, hkv, table, j0 + jj, pf_end, &blk, &off,
                                          block_size, blk_bytes, pos_bytes, &slot);
            __m512 k[4];
            load_head64(rec + head_off, I8, k);
            if (I8) ks[jj] = sc[slot * hkv];
            for (int r = 0; r < NR; r++)
                part[r][jj] = _mm512_fmadd_ps(q[r][3], k[3], _mm512_fmadd_ps(q[r][2], k[2],
                              _mm512_fmadd_ps(q[r][1], k[1], _mm512_mul_ps(q[r][0], k[0]))));
        }
        const __mmask16 m = (__mmask16)((1u << cnt) - 1u);
        for (int r = 0; r < NR; r++) {
            const __m512 dots = sum_lanes16(part[r]);
            _mm512_mask_storeu_ps(s0 + r * len + (j0 - lo), m, I8 ? _mm512_mul_ps(dots, _mm512_loadu_ps(ks)) : dots);
        }
    }
}

/* The K pass (values 0: scores s from the scaled queries qf) or the V pass (values 1: acc from
 * the probabilities s) of the head-64 instances (bfloat16 cache, or int8 with scales sc): KV head
 * by KV head, up to 4 of its query heads per walk (the row's records stay in L1/L2 between the
 * walks, so only the first walk prefetches). Returns 0: done (NO_PASS stands for it where it
 * does not apply). */
static inline __attribute__((always_inline)) int pass_64(
        const char *cache, const float *sc, int64_t hkv, const int64_t *table, int64_t lo, int64_t n,
        int64_t block_size, int64_t blk_bytes, int64_t pos_bytes, int64_t g_lo, int64_t g_hi, int64_t rep,
        int64_t kv_head_stride, const float *qf, float *s, int64_t len, float *acc, int values, const int I8) {
    for (int64_t g = g_lo; g < g_hi; g++) {
        const int64_t head_off = g * kv_head_stride * (I8 ? 1 : 2);  /* the KV head's place in a record, bytes */
        const float *sg = I8 ? sc + g : NULL;
        for (int64_t r0 = 0; r0 < rep; r0 += 4) {
            const int64_t h = g * rep + r0;
            const int64_t pf_end = g == g_lo && r0 == 0 ? n : 0;
#define K_HEADS(NR) k_heads_64(cache, sg, hkv, table, lo, n, block_size, blk_bytes, pos_bytes, pf_end, head_off, \
                               qf + h * 64, s + h * len, len, NR, I8)
#define V_HEADS(NR) v_heads_64(cache, sg, hkv, table, lo, n, block_size, blk_bytes, pos_bytes, pf_end, head_off, \
                               s + h * len, len, acc + h * 64, NR, I8)
            if (values) {
                BY_HEAD_COUNT(rep - r0, V_HEADS)
            } else {
                BY_HEAD_COUNT(rep - r0, K_HEADS)
            }
#undef K_HEADS
#undef V_HEADS
        }
    }
    return 0;
}

#define PASS_ARGS const char *cache, const float *sc, int64_t hkv, const int64_t *table, int64_t lo, int64_t n, \
    int64_t block_size, int64_t blk_bytes, int64_t pos_bytes, int64_t g_lo, int64_t g_hi, int64_t rep,         \
    int64_t kv_head_stride, const float *qf, float *s, int64_t len, float *acc, int values
#define PASS_CALL(I8) pass_64(cache, sc, hkv, table, lo, n, block_size, blk_bytes, pos_bytes, g_lo, g_hi, rep, \
                              kv_head_stride, qf, s, len, acc, values, I8)
static int pass_bf16_64(PASS_ARGS) { return PASS_CALL(0); }
static int pass_i8_64(PASS_ARGS) { return PASS_CALL(1); }
#undef PASS_ARGS
#undef PASS_CALL
#endif

/* An instance without a specialised K or V pass: "not done", the generic loop runs. */
#define NO_PASS(...) (-1)
#if !LP_BF16X16
#define pass_bf16_64 NO_PASS
#define pass_i8_64 NO_PASS
#endif

/* The whole kernel for one element type T of q and out (float / bfloat16) and C of the cache (T,
 * or int8 with SCALED 1); LOAD / LOADC widen one element to float, STORE narrows a float.
 * Separate instances so that every inner loop is branch-free and vectorises. */
#define DEFINE_DECODE_ATTENTION(SUFFIX, T, LOAD, STORE, C, LOADC, SCALED, DFIX, PASS)                    \
static void decode_attention_##SUFFIX(                                                             \
    int64_t num_seqs, int64_t num_kv_heads, int64_t g_lo, int64_t g_hi, int64_t rep, int64_t d_arg, \
    const T *q, const int64_t *q_rows, int64_t q_row_stride, int64_t q_head_stride,                 \
    const C *k_cache, const C *v_cache, const float *k_scale, const float *v_scale,                 \
    int64_t blk_stride, int64_t pos_stride,                                                        \
    int64_t kv_head_stride, int64_t block_size, const int64_t *block_table, int64_t table_stride,   \
    const int64_t *seq_lens, int64_t window, float scale, T *out, int64_t out_row_stride,           \
    float *s, float *qf, float *acc, float *row)                                                   \
{                                                                                                  \
    const int64_t D = DFIX ? DFIX : d_arg;  /* a constant in the common head sizes' instances */  \
    const int64_t blk_bytes = blk_stride * (int64_t)sizeof(C), pos_bytes = pos_stride * (int64_t)sizeof(C); \
    const float *ksc = SCALED ? k_scale : NULL, *vsc = SCALED ? v_scale : NULL;                    \
    for (int64_t b = 0; b < num_seqs; b++) {                                                       \
        const int64_t n = seq_lens[b];                                                             \
        const int64_t lo = (window > 0 && n - window > 0) ? n - window : 0;                        \
        const int64_t len = n - lo;                                                                \
        const int64_t *table = block_table + b * table_stride;                                     \
        const int64_t qrow = q_rows ? q_rows[b] : b;                                               \
        if (b + 1 < num_seqs) {                                                                    \
            const int64_t n2 = seq_lens[b + 1];                                                    \
            const int64_t lo2 = (window > 0 && n2 - window > 0) ? n2 - window : 0;                 \
            prefetch_blocks((const char *)k_cache, (const char *)v_cache, ksc, vsc, num_kv_heads,  \
                            block_table + (b + 1) * table_stride, n2, lo2, block_size,             \
                            blk_bytes, pos_bytes);                                                 \
        }                                                                                          \
        /* Every head at once, position by position: a position's keys (values) for all kv    \
         * heads are one contiguous record, read once and in order through the blocks, instead \
         * of one strided pass per kv head (same sums in the same order). */                    \
        const int64_t h_lo = g_lo * rep, h_hi = g_hi * rep;  /* this call's query heads */        \
        for (int64_t h = h_lo; h < h_hi; h++) {                                                    \
            const T *qs = q + qrow * q_row_stride + h * q_head_stride;                             \
            for (int64_t d = 0; d < D; d++) qf[h * D + d] = LOAD(qs[d]) * scale;                   \
        }                                                                                          \
        if (PASS((const char *)k_cache, ksc, num_kv_heads, table, lo, n, block_size, blk_bytes, pos_bytes, \
                 g_lo, g_hi, rep, kv_head_stride, qf, s, len, acc, 0) != 0)                         \
        for (int64_t j = lo, blk = lo / block_size, off = lo % block_size; j < n; j++) {           \
            int64_t slot;                                                                          \
            const C *rec = (const C *)walk_record((const char *)k_cache, ksc, num_kv_heads, table, j, n, \
                                                  &blk, &off, block_size, blk_bytes, pos_bytes, &slot); \
            for (int64_t g = g_lo; g < g_hi; g++) {                                                \
                const C *kr = rec + g * kv_head_stride;                                            \
                const float ks = SCALED ? ksc[slot * num_kv_heads + g] : 1.0f;                     \
                for (int64_t d = 0; d < D; d++) row[d] = LOADC(kr[d]);                             \
                for (int64_t r = 0; r < rep; r++) {                                                \
                    const float *qr = qf + (g * rep + r) * D;                                      \
                    float dot = 0.f;                                                               \
                    for (int64_t d = 0; d < D; d++) dot += qr[d] * row[d];                         \
                    s[(g * rep + r) * len + (j - lo)] = SCALED ? dot * ks : dot;                   \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int64_t h = h_lo; h < h_hi; h++) {                                                    \
            float *sr = s + h * len;                                                               \
            const float m = max_of(sr, len);                                                       \
            float sum = 0.f;                                                                       \
            for (int64_t j = 0; j < len; j++) {                                                    \
                float e = exp_nonpos(sr[j] - m);                                                   \
                sr[j] = e;                                                                         \
                sum += e;                                                                          \
            }                                                                                      \
            float inv = 1.0f / sum;                                                                \
            for (int64_t j = 0; j < len; j++) sr[j] *= inv;                                        \
        }                                                                                          \
        if (PASS((const char *)v_cache, vsc, num_kv_heads, table, lo, n, block_size, blk_bytes, pos_bytes, \
                 g_lo, g_hi, rep, kv_head_stride, qf, s, len, acc, 1) != 0) {                       \
        memset(acc + h_lo * D, 0, (size_t)((h_hi - h_lo) * D) * sizeof(float));                   \
        for (int64_t j = lo, blk = lo / block_size, off = lo % block_size; j < n; j++) {           \
            int64_t slot;                                                                          \
            const C *rec = (const C *)walk_record((const char *)v_cache, vsc, num_kv_heads, table, j, n, \
                                                  &blk, &off, block_size, blk_bytes, pos_bytes, &slot); \
            for (int64_t g = g_lo; g < g_hi; g++) {                                                \
                const C *vr = rec + g * kv_head_stride;                                            \
                const float vs = SCALED ? vsc[slot * num_kv_heads + g] : 1.0f;                     \
                for (int64_t d = 0; d < D; d++) row[d] = LOADC(vr[d]);                             \
                for (int64_t r = 0; r < rep; r++) {                                                \
                    float p = SCALED ? s[(g * rep + r) * len + (j - lo)] * vs : s[(g * rep + r) * len + (j - lo)]; \
                    float *ar = acc + (g * rep + r) * D;                                           \
                    for (int64_t d = 0; d < D; d++) ar[d] += p * row[d];                           \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        }                                                                                          \
        for (int64_t h = h_lo; h < h_hi; h++) {                                                    \
            T *o = out + b * out_row_stride + h * D;                                               \
            for (int64_t d = 0; d < D; d++) o[d] = STORE(acc[h * D + d]);                          \
        }                                                                                          \
    }                                                                                              \
}

/* Head sizes 64 and 128 get instances with D known at compile time: the per-row loops are then
 * fully unrolled (with D a variable, loop set-up and remainder handling cost more than the work). */
#define I8_TO_F32(v) ((float)(v))
DEFINE_DECODE_ATTENTION(f32, float, AS_FLOAT, STORE_F32, float, AS_FLOAT, 0, 0, NO_PASS)
DEFINE_DECODE_ATTENTION(bf16, uint16_t, bf16_to_f32, f32_to_bf16, uint16_t, bf16_to_f32, 0, 0, NO_PASS)
DEFINE_DECODE_ATTENTION(f32_64, float, AS_FLOAT, STORE_F32, float, AS_FLOAT, 0, 64, NO_PASS)
DEFINE_DECODE_ATTENTION(bf16_64, uint16_t, bf16_to_f32, f32_to_bf16, uint16_t, bf16_to_f32, 0, 64, pass_bf16_64)
DEFINE_DECODE_ATTENTION(f32_128, float, AS_FLOAT, STORE_F32, float, AS_FLOAT, 0, 128, NO_PASS)
DEFINE_DECODE_ATTENTION(bf16_128, uint16_t, bf16_to_f32, f32_to_bf16, uint16_t, bf16_to_f32, 0, 128, NO_PASS)
/* int8 caches (q and out float32 or bfloat16) */
DEFINE_DECODE_ATTENTION(f32_i8, float, AS_FLOAT, STORE_F32, int8_t, I8_TO_F32, 1, 0, NO_PASS)
DEFINE_DECODE_ATTENTION(bf16_i8, uint16_t, bf16_to_f32, f32_to_bf16, int8_t, I8_TO_F32, 1, 0, NO_PASS)
DEFINE_DECODE_ATTENTION(bf16_i8_64, uint16_t, bf16_to_f32, f32_to_bf16, int8_t, I8_TO_F32, 1, 64, pass_i8_64)
DEFINE_DECODE_ATTENTION(bf16_i8_128, uint16_t, bf16_to_f32, f32_to_bf16, int8_t, I8_TO_F32, 1, 128, NO_PASS)

#define DISPATCH(FN) FN(num_seqs, num_kv_heads, g_lo, g_hi, rep, D, q, q_rows, q_row_stride, q_head_stride,         \
                        k_cache, v_cache, k_scale, v_scale, blk_stride, pos_stride, kv_head_stride, block_size, \
                        block_table, table_stride, seq_lens, window, scale, out, out_row_stride,         \
                        s, qf, acc, row)

/* One call's operands, for its shares (lp_run_shares). */
typedef struct {
    int64_t num_heads, num_kv_heads, head_dim;
    const void *q;
    int q_dtype;
    const int64_t *q_rows;
    int64_t q_row_stride, q_head_stride;
    const void *k_cache, *v_cache;
    int kv_dtype;
    const float *k_scale, *v_scale;
    int64_t blk_stride, pos_stride, kv_head_stride, block_size;
    const int64_t *block_table;
    int64_t table_stride;
    const int64_t *seq_lens;
    int64_t window;
    float scale;
    void *out;
    int64_t out_row_stride;
} attention_call_t;

/* Rows [lo, hi) of a call, KV heads [g_lo, g_hi) of each (their query heads), on the calling
 * thread, with its own scratch. A head's sums do not depend on which other heads run with it. */
static int attention_range(const attention_call_t *c, int64_t lo, int64_t hi, int64_t g_lo, int64_t g_hi) {
    const int64_t num_kv_heads = c->num_kv_heads, rep = c->num_heads / num_kv_heads, D = c->head_dim;
    const int64_t num_seqs = hi - lo, el = c->q_dtype == 0 ? 4 : 2;
    const int64_t q_row_stride = c->q_row_stride, q_head_stride = c->q_head_stride;
    const int64_t blk_stride = c->blk_stride, pos_stride = c->pos_stride, kv_head_stride = c->kv_head_stride;
    const int64_t block_size = c->block_size, table_stride = c->table_stride, window = c->window;
    const int64_t out_row_stride = c->out_row_stride;
    const float scale = c->scale;
    const void *k_cache = c->k_cache, *v_cache = c->v_cache;
    const float *k_scale = c->k_scale, *v_scale = c->v_scale;
    /* This range's rows: q through its row index (or from row lo on), table, lengths, out. */
    const int64_t *q_rows = c->q_rows ? c->q_rows + lo : NULL;
    const void *q = c->q_rows ? c->q : (const char *)c->q + lo * q_row_stride * el;
    const int64_t *block_table = c->block_table + lo * table_stride, *seq_lens = c->seq_lens + lo;
    void *out = (char *)c->out + lo * out_row_stride * el;
    int64_t max_len = 1;
    for (int64_t b = 0; b < num_seqs; b++)
        if (seq_lens[b] > max_len) max_len = seq_lens[b];
    const int64_t H = c->num_heads;  /* every query head of a sequence at once */
    float *s = malloc((size_t)(H * max_len) * sizeof(float));
    float *qf = malloc((size_t)(H * D) * sizeof(float));
    float *acc = malloc((size_t)(H * D) * sizeof(float));
    float *row = malloc((size_t)D * sizeof(float));
    if (!s || !qf || !acc || !row) {
        free(s); free(qf); free(acc); free(row);
        return -1;
    }
    if (c->kv_dtype == LP_I8) {
        if (c->q_dtype == LP_F32) DISPATCH(decode_attention_f32_i8);
        else if (D == 64) DISPATCH(decode_attention_bf16_i8_64);
        else if (D == 128) DISPATCH(decode_attention_bf16_i8_128);
        else DISPATCH(decode_attention_bf16_i8);
    } else if (c->q_dtype == 0) {
        if (D == 64) DISPATCH(decode_attention_f32_64);
        else if (D == 128) DISPATCH(decode_attention_f32_128);
        else DISPATCH(decode_attention_f32);
    } else {
        if (D == 64) DISPATCH(decode_attention_bf16_64);
        else if (D == 128) DISPATCH(decode_attention_bf16_128);
        else DISPATCH(decode_attention_bf16);
    }
    free(s); free(qf); free(acc); free(row);
    return 0;
}

/* A share of rows (every KV head of each). */
static int attention_rows(const void *call, int64_t lo, int64_t hi) {
    const attention_call_t *c = call;
    return attention_range(c, lo, hi, 0, c->num_kv_heads);
}

/* A share of (row, KV head) items, item i = row i / H_kv, head i % H_kv: for fewer rows than
 * threads (one long sequence), its heads go to different threads. */
static int attention_heads(const void *call, int64_t lo, int64_t hi) {
    const attention_call_t *c = call;
    const int64_t hk = c->num_kv_heads;
    while (lo < hi) {
        const int64_t row = lo / hk, g_lo = lo % hk, g_hi = hi - row * hk < hk ? hi - row * hk : hk;
        const int rc = attention_range(c, row, row + 1, g_lo, g_hi);
        if (rc) return rc;
        lo = (row + 1) * hk;
    }
    return 0;
}

/* Below this many attended keys in a call, one thread does it all (a parallel region costs a few
 * microseconds of hand-off). */
#define PARALLEL_MIN_KEYS 512

/* Returns 0; -1 when scratch memory cannot be had; -2 when q, the cache and out are not all one
 * dtype, nor an int8 cache with both scale tables (nothing written then). k_scale / v_scale:
 * [num_slots, num_kv_heads] float32, slot = block id * block_size + position in the block (int8
 * caches only; NULL otherwise). Rows are split over the calling thread's OpenMP threads
 * (parallel.h) in shares of equal attended keys; each row is computed by one thread alone, so
 * the result does not depend on the thread count. */
int loraplex_decode_attention(
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    const void *q, int q_dtype, const int64_t *q_rows, int64_t q_row_stride, int64_t q_head_stride,
    const void *k_cache, const void *v_cache, int kv_dtype, const float *k_scale, const float *v_scale,
    int64_t blk_stride, int64_t pos_stride, int64_t kv_head_stride, int64_t block_size,
    const int64_t *block_table, int64_t table_stride, const int64_t *seq_lens,
    int64_t window, float scale,
    void *out, int64_t out_row_stride)
{
    if (q_dtype != LP_F32 && q_dtype != LP_BF16) return -2;
    if (kv_dtype == LP_I8 ? !k_scale || !v_scale : q_dtype != kv_dtype) return -2;
    const attention_call_t call = {num_heads, num_kv_heads, head_dim, q, q_dtype, q_rows, q_row_stride,
                                   q_head_stride, k_cache, v_cache, kv_dtype, k_scale, v_scale,
                                   blk_stride, pos_stride, kv_head_stride,
                                   block_size, block_table, table_stride, seq_lens, window, scale, out,
                                   out_row_stride};
    const int threads = lp_max_threads();
    /* Fewer rows than threads: split by (row, KV head) instead, so one long sequence's heads run
     * side by side (bit-identical: each head is computed alone either way). */
    const int by_head = num_seqs < threads && num_kv_heads > 1;
    const int64_t per = by_head ? num_kv_heads : 1, items = num_seqs * per;
    int nt = threads > items ? (int)items : threads;
    if (nt <= 1) return attention_rows(&call, 0, num_seqs);
    int64_t *cum = malloc((size_t)items * sizeof(int64_t));  /* keys attended, running total */
    if (!cum) return -1;
    int64_t total = 0;
    for (int64_t i = 0; i < items; i++) {
        int64_t n = seq_lens[i / per], len = (window > 0 && n > window) ? window : n;
        total += len + 1;
        cum[i] = total;
    }
    int rc = total < PARALLEL_MIN_KEYS * per ? attention_rows(&call, 0, num_seqs)
                                             : lp_run_shares(nt, cum, items, by_head ? attention_heads : attention_rows, &call);
    free(cum);
    return rc;
}
