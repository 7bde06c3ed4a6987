/* The panel GEMM (gemm_panels.c), called by gemm_bf16.c for many rows. */
#ifndef LORAPLEX_GEMM_PANELS_H
#define LORAPLEX_GEMM_PANELS_H

#include <stdint.h>

/* y [m, n] = bf16(x [m, k] @ W.T + bias) in float32 math. W is row-major [n, k] with row stride
 * w_stride (packed = 0) or pre-packed panels (packed = 1, w_stride unused; loraplex_pack_panels).
 * Returns 0, or -1 when scratch memory cannot be allocated. */
int lp_gemm_panels(int64_t m, int64_t n, int64_t k, const uint16_t *x, int64_t x_stride, const uint16_t *w,
                   int64_t w_stride, int packed, const uint16_t *bias, uint16_t *y, int64_t y_stride);

#endif
