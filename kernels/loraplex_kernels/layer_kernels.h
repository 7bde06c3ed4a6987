/* The compiled kernels that decode_layers.c calls from other files, declared once: each defining
 * file includes this too, so a signature that drifts fails the build instead of a run. */
#ifndef LORAPLEX_LAYER_KERNELS_H
#define LORAPLEX_LAYER_KERNELS_H

#include <stdint.h>

/* loraplex_amx_gemm_epilogue's modes (what it writes from its sums: see gemm_amx.c) */
enum { EPI_PLAIN = 0, EPI_RESIDUAL = 1, EPI_SWIGLU = 2, EPI_FLOAT = 3, EPI_ARGMAX = 4 };
/* element types of the attention and LoRA kernels' operands (native.DTYPE_CODES) */
enum { LP_F32 = 0, LP_BF16 = 1, LP_I8 = 2 };  /* LP_I8: KV caches only, with per-(slot, head) scales */

int loraplex_rmsnorm_bf16(int64_t rows, int64_t dim, const uint16_t *x, int64_t x_stride,
                          const uint16_t *w, float eps, uint16_t *out, int64_t out_stride);
int loraplex_rmsnorm_heads_bf16(int64_t tokens, int64_t heads, int64_t dim, const uint16_t *x,
                                int64_t x_stride, int64_t x_head_stride, const uint16_t *w, float eps,
                                uint16_t *out, int64_t out_stride, int64_t out_head_stride);
int loraplex_amx_gemm_epilogue(int64_t m, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride,
                               const uint16_t *panels, const uint16_t *bias, void *y, int64_t y_stride,
                               int mode, const uint16_t *residual, int64_t r_stride);
int loraplex_rotary_kv_bf16(int64_t tokens, int64_t hq, int64_t hkv, int64_t dim,
                            const uint16_t *q, int64_t q_ts, int64_t q_hs,
                            const uint16_t *k, int64_t k_ts, int64_t k_hs,
                            const uint16_t *v, int64_t v_ts, int64_t v_hs,
                            const uint16_t *cos, const uint16_t *sin, int64_t cs_stride,
                            uint16_t *q_out, uint16_t *k_out,
                            void *k_cache, void *v_cache, int kv_dtype, float *k_scale, float *v_scale,
                            int64_t num_slots, const int64_t *slots);
int loraplex_decode_attention(
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    const void *q, int q_dtype, const int64_t *q_rows, int64_t q_row_stride, int64_t q_head_stride,
    const void *k_cache, const void *v_cache, int kv_dtype, const float *k_scale, const float *v_scale,
    int64_t blk_stride, int64_t pos_stride, int64_t kv_head_stride, int64_t block_size,
    const int64_t *block_table, int64_t table_stride, const int64_t *seq_lens,
    int64_t window, float scale, void *out, int64_t out_row_stride);
/* lora_rows.c's pooled entry point; its first argument is that file's lora_pool_t (opaque here),
 * so lora_rows.c does not include this header. */
int loraplex_lora_pooled(const void *p, const int64_t *order, int64_t num_rows, const int64_t *idx,
                         const void *x, int x_dtype, int64_t x_stride,
                         void *y0, void *y1, void *y2, void *y3,
                         int64_t ys0, int64_t ys1, int64_t ys2, int64_t ys3);

#endif
