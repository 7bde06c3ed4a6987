/* exp(x) for x <= 0 in plain C that the compiler vectorises: softmax terms after subtracting the
 * row's maximum (decode attention's scores, the sampler's logits). */
#ifndef LORAPLEX_EXP_NONPOS_H
#define LORAPLEX_EXP_NONPOS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

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

#endif
