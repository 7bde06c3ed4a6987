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
 * Sums and the softmax in float32; q, the cache and out are float32 (dtype 0) or bfloat16 (1).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float ld(const void *p, int dtype, int64_t i) {
    if (dtype == 0) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void st(void *p, int dtype, int64_t i, float f) {
    if (dtype == 0) { ((float *)p)[i] = f; return; }
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { ((uint16_t *)p)[i] = (uint16_t)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);  /* round to nearest even */
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0 (softmax after subtracting the max), written so the loop that calls it
 * vectorises: 2^n * e^r with |r| <= ln2 / 2 and a degree-6 polynomial (relative error < 2e-7). */
static inline float exp_nonpos(float x) {
    if (x < -87.0f) x = -87.0f;
    float n = floorf(x * 1.44269504f + 0.5f);
    float r = x - n * 0.693145752f - n * 1.42860677e-6f;  /* ln2 split in two for exactness */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f + r * (0.0416666418f
              + r * (0.00833336450f + r * 0.00138888182f)))));
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
}

/* Returns 0, or -1 when scratch memory cannot be had (nothing written then). */
int loraplex_decode_attention(
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    const void *q, int q_dtype, const int64_t *q_rows, int64_t q_row_stride, int64_t q_head_stride,
    const void *k_cache, const void *v_cache, int kv_dtype,
    int64_t blk_stride, int64_t pos_stride, int64_t kv_head_stride, int64_t block_size,
    const int64_t *block_table, int64_t table_stride, const int64_t *seq_lens,
    int64_t window, float scale,
    void *out, int64_t out_row_stride)
{
    const int64_t rep = num_heads / num_kv_heads, D = head_dim;
    int64_t max_len = 1;
    for (int64_t b = 0; b < num_seqs; b++)
        if (seq_lens[b] > max_len) max_len = seq_lens[b];
    float *s = malloc((size_t)(rep * max_len) * sizeof(float));
    float *qf = malloc((size_t)(rep * D) * sizeof(float));
    float *acc = malloc((size_t)(rep * D) * sizeof(float));
    float *row = malloc((size_t)D * sizeof(float));
    if (!s || !qf || !acc || !row) {
        free(s); free(qf); free(acc); free(row);
        return -1;
    }
    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t n = seq_lens[b];
        const int64_t lo = (window > 0 && n - window > 0) ? n - window : 0;
        const int64_t len = n - lo;
        const int64_t *table = block_table + b * table_stride;
        const int64_t qrow = q_rows ? q_rows[b] : b;
        for (int64_t g = 0; g < num_kv_heads; g++) {
            for (int64_t r = 0; r < rep; r++) {
                int64_t base = qrow * q_row_stride + (g * rep + r) * q_head_stride;
                for (int64_t d = 0; d < D; d++) qf[r * D + d] = ld(q, q_dtype, base + d) * scale;
            }
            for (int64_t j = lo; j < n; j++) {
                int64_t off = table[j / block_size] * blk_stride + (j % block_size) * pos_stride + g * kv_head_stride;
                for (int64_t d = 0; d < D; d++) row[d] = ld(k_cache, kv_dtype, off + d);
                for (int64_t r = 0; r < rep; r++) {
                    const float *qr = qf + r * D;
                    float dot = 0.f;
                    for (int64_t d = 0; d < D; d++) dot += qr[d] * row[d];
                    s[r * len + (j - lo)] = dot;
                }
            }
            for (int64_t r = 0; r < rep; r++) {
                float *sr = s + r * len;
                float m = sr[0];
                for (int64_t j = 1; j < len; j++) m = sr[j] > m ? sr[j] : m;
                float sum = 0.f;
                for (int64_t j = 0; j < len; j++) {
                    float e = exp_nonpos(sr[j] - m);
                    sr[j] = e;
                    sum += e;
                }
                float inv = 1.0f / sum;
                for (int64_t j = 0; j < len; j++) sr[j] *= inv;
            }
            memset(acc, 0, (size_t)(rep * D) * sizeof(float));
            for (int64_t j = lo; j < n; j++) {
                int64_t off = table[j / block_size] * blk_stride + (j % block_size) * pos_stride + g * kv_head_stride;
                for (int64_t d = 0; d < D; d++) row[d] = ld(v_cache, kv_dtype, off + d);
                for (int64_t r = 0; r < rep; r++) {
                    float p = s[r * len + (j - lo)];
                    float *ar = acc + r * D;
                    for (int64_t d = 0; d < D; d++) ar[d] += p * row[d];
                }
            }
            for (int64_t r = 0; r < rep; r++) {
                int64_t base = b * out_row_stride + (g * rep + r) * D;
                for (int64_t d = 0; d < D; d++) st(out, q_dtype, base + d, acc[r * D + d]);
            }
        }
    }
    free(s); free(qf); free(acc); free(row);
    return 0;
}
