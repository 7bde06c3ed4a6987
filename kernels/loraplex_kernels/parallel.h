/* Splitting one kernel call over threads. The kernels are built with -fopenmp when the compiler
 * has it (native.py); in a torch process the loader then binds them to the libgomp torch already
 * loaded, so `omp_get_max_threads()` is torch's intra-op thread count for the calling thread
 * (torch.set_num_threads) and the parallel regions reuse torch's own worker pool: no second pool
 * spinning against it. Without OpenMP every call runs on the calling thread. */
#ifndef LORAPLEX_PARALLEL_H
#define LORAPLEX_PARALLEL_H

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define LP_MAX_THREADS 64

static inline int lp_max_threads(void) {
#ifdef _OPENMP
    int n = omp_get_max_threads();
    return n < 1 ? 1 : (n > LP_MAX_THREADS ? LP_MAX_THREADS : n);
#else
    return 1;
#endif
}

/* The first index i of cum[0..n) (a non-decreasing prefix sum of per-item work, cum[n-1] = total)
 * with cum[i] > total * part / parts: items [split(part), split(part + 1)) are part's share.
 * cum NULL: every item is the same work (an even split, no table to build). */
static inline int64_t lp_split(const int64_t *cum, int64_t n, int part, int parts) {
    if (part <= 0) return 0;
    if (part >= parts) return n;
    if (!cum) return n * part / parts;
    int64_t target = cum[n - 1] * part / parts, lo = 0, hi = n;
    while (lo < hi) {  /* binary search: first cum[i] > target */
        int64_t mid = (lo + hi) / 2;
        if (cum[mid] > target) hi = mid; else lo = mid + 1;
    }
    return lo;
}

/* One share of a call: items [lo, hi) of it, on the calling thread; returns the kernel's code. */
typedef int (*lp_share_fn)(const void *call, int64_t lo, int64_t hi);

/* Runs `share` over n items split into up to nt shares of equal work (cum: running total of each
 * item's work, or NULL for items of equal work: see lp_split) on the calling thread's OpenMP
 * team, each share on one thread. Returns 0 when every share returned 0, else a failing share's
 * code. */
static inline int lp_run_shares(int nt, const int64_t *cum, int64_t n, lp_share_fn share, const void *call) {
    int rcs[LP_MAX_THREADS] = {0};
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), k = omp_get_num_threads();
#else
        int t = 0, k = 1;
#endif
        int64_t lo = lp_split(cum, n, t, k), hi = lp_split(cum, n, t + 1, k);
        if (hi > lo) rcs[t] = share(call, lo, hi);
    }
    int rc = 0;
    for (int i = 0; i < nt; i++)
        if (rcs[i]) rc = rcs[i];
    return rc;
}

#endif
