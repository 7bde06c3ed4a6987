/* One sampled token per row: softmax(logits / T), cut to the top k then to the top-p nucleus, drawn
 * by inverse CDF from one uniform number per row (engine/sampler.py, the non-greedy rows).
 *
 * Why: torch's formulation (an exponential variate per vocabulary entry, and a full sort of every
 * row for top-k / top-p) took 30-40 ms (temperature alone) to 80-100 ms (with top-p) for 32 rows
 * of a 49152-token vocabulary on the 2-core dev box: several times the decode step's forward. Here
 * a row costs a few passes over its logits, and a sort of its candidates only: 1-4 ms for the 32
 * rows (benchmarks/results/sampler_cpu_amx.md).
 *
 * Semantics, per row r (s = logits[r] / T[r], float32 as torch divides; e_i = exp(s_i - max s),
 * 0 where s_i = -inf; sums in float64):
 *   order     tokens by e descending, ties by index ascending
 *   top-k     k = top_k[r] > 0: the first min(k, V) tokens of that order, else all
 *   top-p     p = top_p[r] < 1: of those, token j stays while (mass of the tokens before j) /
 *             (mass of the top-k set) < p; the first always stays
 *   draw      target = u[r] * (mass of what stays); the first token, in index order, whose
 *             running mass (over what stays) exceeds target
 * which is engine/sampler.apply_top_k_top_p's set and a draw from the renormalised distribution
 * over it. A row with no positive mass (every logit -inf or NaN) gets its first largest logit.
 *
 * Finding what stays without sorting the row: first the tokens above a threshold of e, when few
 * of them already hold k tokens or mass p (a peaked row, the usual case: peaked_candidates);
 * otherwise a histogram of e by its float32 bit pattern
 * (monotone for e >= 0; bins 2^19 patterns wide, ~1/16 of an octave), walked from the top bin down
 * to the one that completes k tokens (top-k: the tokens of the bins down to it are sorted, a few
 * more than k) or mass p of the row (top-p alone: every token above that bin stays, only that
 * bin's tokens are sorted). What stays is then "before or at the last kept token in the order",
 * and the draw walks the row in index order. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp_nonpos.h"
#include "parallel.h"

#include "widen.h"


#define BIN_SHIFT 19                     /* bins of 2^19 float32 bit patterns: 2^13 of them for e in [0, 1] */
#define BINS ((0x3F800000 >> BIN_SHIFT) + 1)
#define WAYS 4                           /* histogram copies (see binned_candidates) */
#define BLOCK 512                        /* index-order draws first find the block, then the token */

typedef struct {
    int64_t vocab, stride;
    const float *logits, *temperature, *top_p, *uniform;
    const int64_t *rows, *top_k;
    int64_t *out;
} sample_call_t;

typedef struct {
    float e;
    int32_t i;
} cand_t;

static int by_e_then_index(const void *pa, const void *pb) {
    const cand_t *a = pa, *b = pb;
    if (a->e != b->e) return a->e > b->e ? -1 : 1;
    return (a->i > b->i) - (a->i < b->i);
}

static inline uint32_t bits_of(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

/* First index of the largest value (NaN skipped; 0 when none is a number). */
static int64_t first_max(const float *x, int64_t n) {
    int64_t best = 0;
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        if (x[i] > m) {
            m = x[i];
            best = i;
        }
    return best;
}

typedef struct {  /* a thread's scratch for one row at a time */
    float *e;       /* [V] */
    double *block;  /* [V / BLOCK + 1] mass per block of indices */
    cand_t *cand;   /* [V] */
    int32_t *count; /* [WAYS, BINS] tokens per bin (top-k) */
    double *mass;   /* [WAYS, BINS] mass per bin (top-p alone) */
} scratch_t;

/* The candidates through a histogram of e (see the top): top-k, every token of the top bins down
 * to the one that completes k tokens; top-p alone, the tokens of the bin in which the nucleus
 * ends (*above_out: the mass of the bins above it, all in the nucleus). Returns how many. */
static int64_t binned_candidates(const float *e, int64_t V, int64_t k, double p, double z, scratch_t *w,
                                 cand_t *cand, double *above_out) {
    /* Top-k needs the bins' counts, top-p alone their mass. WAYS copies, element i into copy
     * i % WAYS: neighbours often share a bin, and one copy would chain every add on the last. */
    int32_t *count = w->count;
    double *mass = w->mass;
    int64_t i = 0;
    if (k > 0) {
        memset(count, 0, WAYS * BINS * sizeof(int32_t));
        for (; i + WAYS <= V; i += WAYS)
            for (int j = 0; j < WAYS; j++) count[j * BINS + (bits_of(e[i + j]) >> BIN_SHIFT)]++;
        for (; i < V; i++) count[bits_of(e[i]) >> BIN_SHIFT]++;
    } else {
        memset(mass, 0, WAYS * BINS * sizeof(double));
        for (; i + WAYS <= V; i += WAYS)
            for (int j = 0; j < WAYS; j++) mass[j * BINS + (bits_of(e[i + j]) >> BIN_SHIFT)] += e[i + j];
        for (; i < V; i++) mass[bits_of(e[i]) >> BIN_SHIFT] += e[i];
    }
    /* From the top bin down to the one that completes k tokens (top-k) or mass p (top-p alone). */
    int64_t floor_bin = -1, held = 0, lowest = 0;  /* lowest: the lowest bin with mass seen */
    double above = 0.0, above_lowest = 0.0;  /* top-p alone: the mass of the bins above floor_bin */
    for (int64_t bin = BINS - 1; bin >= 0; bin--) {
        int64_t cnt = 0;
        double ms = 0.0;
        for (int j = 0; j < WAYS; j++) {
            if (k > 0) cnt += count[j * BINS + bin];
            else ms += mass[j * BINS + bin];
        }
        if ((k > 0 && held + cnt >= k) || (k == 0 && above + ms >= p * z)) {
            floor_bin = bin;
            break;
        }
        if (ms > 0.0) {
            lowest = bin;
            above_lowest = above;
        }
        held += cnt;
        above += ms;
    }
    if (floor_bin < 0) {  /* top-p: the bins' mass (summed in another order) fell short of p z by a rounding */
        floor_bin = lowest;
        above = above_lowest;
    }
    *above_out = above;
    /* Sorted candidates: top-k, every token of the top bins (the k-th is among them); top-p
     * alone, only the tokens of floor_bin (those above it are all in the nucleus). */
    int64_t n = 0;
    for (i = 0; i < V; i++) {  /* written always, kept when it qualifies: no branch to mispredict */
        const int64_t bin = bits_of(e[i]) >> BIN_SHIFT;
        cand[n] = (cand_t){e[i], (int32_t)i};
        n += e[i] > 0.f && (bin == floor_bin || (k > 0 && bin > floor_bin));
    }
    return n;
}

/* Most rows of a language model are peaked: a few tokens hold most of the mass. For the largest
 * threshold t of PEAKS (of the largest token's e = 1) whose tokens number at least k (top-k) or
 * hold mass p (top-p alone), those tokens are the only candidates: what stays is among them. One
 * pass counts and sums every threshold at once (it vectorises, unlike the histogram's bin
 * updates), and the sort is of a few tokens more than needed. Returns how many, or -1: no
 * threshold qualifies with at most PEAK_MAX tokens, use the bins. */
#define NPEAKS 5
static const float PEAKS[NPEAKS] = {1.0f / 16, 1.0f / 64, 1.0f / 256, 1.0f / 1024, 1.0f / 4096};
#define PEAK_MAX 2048
static int64_t peaked_candidates(const float *e, int64_t V, int64_t k, double p, double z, cand_t *cand) {
    float big[NPEAKS] = {0};
    int32_t nbig[NPEAKS] = {0};
    for (int64_t i = 0; i < V; i++)
        for (int t = 0; t < NPEAKS; t++) {
            const int in = e[i] >= PEAKS[t];
            big[t] += in ? e[i] : 0.f;
            nbig[t] += in;
        }
    for (int t = 0; t < NPEAKS; t++) {
        if (nbig[t] > PEAK_MAX) break;
        /* top-p: a margin over p for the float sums (the nucleus walk sums in another order) */
        if ((k > 0 && nbig[t] >= k) || (k == 0 && big[t] >= p * z * (1.0 + 1e-4))) {
            int64_t n = 0;
            for (int64_t i = 0; i < V; i++)  /* few qualify: a branch predicted right */
                if (e[i] >= PEAKS[t]) cand[n++] = (cand_t){e[i], (int32_t)i};
            return n;
        }
    }
    return -1;
}

static int64_t sample_row(const sample_call_t *c, int64_t r, scratch_t *w) {
    const int64_t V = c->vocab;
    const float *restrict x = c->logits + c->rows[r] * c->stride;
    const float t = c->temperature[r];
    float *restrict e = w->e;
    /* s = x / t (as torch divides: the same values, so the same order) and its maximum, 8 lanes
     * at a time (GCC leaves a plain loop's max reduction scalar: it may not reorder it). A NaN
     * compares false, so it never enters the maximum. */
    const v8f tv = {t, t, t, t, t, t, t, t};
    v8f mx = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t i0 = 0;
    for (; i0 + LANES <= V; i0 += LANES) {
        const v8f v = load8(x + i0) / tv;
        store8(e + i0, v);
        const v8i take = v > mx;
        mx = (v8f)(((v8i)v & take) | ((v8i)mx & ~take));
    }
    float m = -INFINITY;
    for (int l = 0; l < LANES; l++) m = mx[l] > m ? mx[l] : m;
    for (; i0 < V; i0++) {
        e[i0] = x[i0] / t;
        m = e[i0] > m ? e[i0] : m;
    }
    if (!(m > -INFINITY)) return first_max(x, V);  /* every logit -inf or NaN */
    double z = 0.0;
    const int64_t nblocks = (V + BLOCK - 1) / BLOCK;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t lo = b * BLOCK, hi = lo + BLOCK < V ? lo + BLOCK : V;
        float part = 0.f;  /* <= BLOCK terms of at most 1: float32 sums are exact to ~1e-7 here */
        for (int64_t i = lo; i < hi; i++) {
            const float s = e[i];
            e[i] = s == -INFINITY || s != s ? 0.f : exp_nonpos(s - m);
            part += e[i];
        }
        w->block[b] = part;
        z += part;
    }
    if (!(z > 0.0)) return first_max(x, V);
    const int64_t k = c->top_k[r] > 0 && c->top_k[r] < V ? c->top_k[r] : 0;
    const double p = c->top_p[r];
    if (k == 0 && !(p < 1.0)) {  /* nothing cut: index order, block by block */
        double target = (double)c->uniform[r] * z, run = 0.0;
        int64_t b = 0;
        while (b + 1 < nblocks && run + w->block[b] <= target) run += w->block[b++];
        const int64_t hi = (b + 1) * BLOCK < V ? (b + 1) * BLOCK : V;
        int64_t last = -1;
        for (int64_t i = b * BLOCK; i < hi; i++) {
            if (e[i] <= 0.f) continue;
            last = i;
            run += e[i];
            if (run > target) return i;
        }
        if (last >= 0) return last;  /* target at the very top (rounding): the last token with mass */
        for (int64_t i = V - 1; i >= 0; i--)
            if (e[i] > 0.f) return i;
        return first_max(x, V);
    }
    double above = 0.0;  /* top-p alone: the mass of the tokens above the candidates */
    int64_t n = peaked_candidates(e, V, k, p, z, w->cand);
    if (n < 0) n = binned_candidates(e, V, k, p, z, w, w->cand, &above);
    if (n == 0) return first_max(x, V);
    qsort(w->cand, (size_t)n, sizeof(cand_t), by_e_then_index);
    int64_t keep;
    double kept;  /* the kept tokens' mass */
    if (k > 0) {
        if (n > k) n = k;
        double zk = 0.0;
        for (int64_t j = 0; j < n; j++) zk += w->cand[j].e;
        if (p < 1.0) {  /* the nucleus of the top-k set */
            keep = 1;
            kept = w->cand[0].e;
            while (keep < n && kept / zk < p) kept += w->cand[keep++].e;
        } else {
            keep = n;
            kept = zk;
        }
    } else {  /* floor_bin's tokens join the nucleus while the mass before them is below p */
        keep = 0;
        kept = above;
        while (keep < n && (keep == 0 || kept / z < p)) kept += w->cand[keep++].e;
    }
    /* The last kept token in (e descending, index ascending) order: token i is kept when it comes
     * before or is that one. Drawn in index order. */
    const float e_last = w->cand[keep - 1].e;
    const int64_t i_last = w->cand[keep - 1].i;
    const double target = (double)c->uniform[r] * kept;
    double run = 0.0;
    int64_t last = i_last;
    for (int64_t i = 0; i < V; i++) {
        if (e[i] > e_last || (e[i] == e_last && i <= i_last)) {
            last = i;
            run += e[i];
            if (run > target) return i;
        }
    }
    return last;  /* target at the very top (rounding): the last kept token */
}

static int sample_share(const void *call, int64_t lo, int64_t hi) {
    const sample_call_t *c = call;
    const int64_t V = c->vocab;
    scratch_t w = {malloc((size_t)V * sizeof(float)), malloc((size_t)(V / BLOCK + 1) * sizeof(double)),
                   malloc((size_t)V * sizeof(cand_t)), malloc(WAYS * BINS * sizeof(int32_t)), malloc(WAYS * BINS * sizeof(double))};
    int rc = 0;
    if (!w.e || !w.block || !w.cand || !w.count || !w.mass) {
        rc = -1;
    } else {
        for (int64_t r = lo; r < hi; r++) c->out[r] = sample_row(c, r, &w);
    }
    free(w.e);
    free(w.block);
    free(w.cand);
    free(w.count);
    free(w.mass);
    return rc;
}

/* out[r] = the token drawn for row rows[r] of logits [*, vocab] (row stride `stride`) with
 * temperature[r] > 0, top_k[r] (0 = off), top_p[r] in (0, 1] (1 = off) and uniform[r] in [0, 1),
 * for r < n (see the top). Rows are split over the calling thread's OpenMP team; each row is
 * drawn by one thread alone, so the result does not depend on the thread count.
 * Returns 0; -1 when scratch memory cannot be had; -2 for a bad shape or operand. */
int loraplex_sample_rows(int64_t n, int64_t vocab, const float *logits, int64_t stride, const int64_t *rows,
                         const float *temperature, const int64_t *top_k, const float *top_p,
                         const float *uniform, int64_t *out) {
    if (n < 0 || vocab < 1 || vocab > INT32_MAX) return -2;
    for (int64_t r = 0; r < n; r++)
        if (!(temperature[r] > 0.f) || !(top_p[r] > 0.f && top_p[r] <= 1.f) || !(uniform[r] >= 0.f && uniform[r] < 1.f))
            return -2;
    const sample_call_t call = {vocab, stride, logits, temperature, top_p, uniform, rows, top_k, out};
    int nt = lp_max_threads();
    if (nt > n) nt = (int)n;
    if (nt <= 1) return n > 0 ? sample_share(&call, 0, n) : 0;
    return lp_run_shares(nt, NULL, n, sample_share, &call);
}
