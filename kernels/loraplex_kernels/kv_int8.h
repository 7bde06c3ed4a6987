/* The int8 KV cache's element rule (--kv-cache-dtype int8; its torch twin is
 * server/loraplex/model/kv_quant.py, and the two must give the same bits):
 *
 *   per (slot, kv head): amax = max_d |x_d|;  scale = amax / 127 (1 when amax is 0);
 *                        q_d = round_half_even(x_d / scale), in [-127, 127]
 *
 * all in float32 (x widened from bfloat16 exactly). A head's values come back as q_d * scale:
 * within scale / 2 of x_d, i.e. amax / 254 (symmetric, so no zero point to store; -128 unused). */
#ifndef LORAPLEX_KV_INT8_H
#define LORAPLEX_KV_INT8_H

#include <math.h>
#include <stdint.h>

#include "bf16.h"

/* x [dim] bfloat16 -> q [dim] int8, *scale. */
static inline void quantize_head_i8(const uint16_t *x, int64_t dim, int8_t *restrict q, float *scale) {
    float amax = 0.f;
    for (int64_t d = 0; d < dim; d++) {
        const float a = fabsf(bf16_to_f32(x[d]));
        amax = a > amax ? a : amax;
    }
    const float s = amax > 0.f ? amax / 127.0f : 1.0f;
    for (int64_t d = 0; d < dim; d++) {
        float v = bf16_to_f32(x[d]) / s;  /* |v| <= 127 up to the division's rounding */
        v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
        q[d] = (int8_t)lrintf(v);  /* the default rounding mode: nearest, ties to even (torch.round) */
    }
    *scale = s;
}

#endif
