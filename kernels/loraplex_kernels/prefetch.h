/* Software prefetch that the compiler keeps.
 *
 * Why not __builtin_prefetch / _mm_prefetch: GCC treats them as free of side effects, so a loop or
 * a helper that does nothing but prefetch is dead code to it and goes away (GCC 12 at -O3 deleted
 * lora_rows.c's whole prefetch of the next adapter's weights, and gemm_amx.c's weight prefetch
 * once its steps were inlined another way). A volatile asm stays where it is written. Other
 * architectures keep the builtin. */
#ifndef LORAPLEX_PREFETCH_H
#define LORAPLEX_PREFETCH_H

#if defined(__x86_64__) || defined(__i386__)
#define LP_PREFETCH_ASM(insn, p) __asm__ volatile(insn " %0" : : "m"(*(const char *)(p)))
/* Into every cache level: data needed within the next few hundred cycles. */
static inline void lp_prefetch_l1(const void *p) { LP_PREFETCH_ASM("prefetcht0", p); }
/* Into L2 and below, not L1: data needed a while later, or too much for L1. */
static inline void lp_prefetch_l2(const void *p) { LP_PREFETCH_ASM("prefetcht2", p); }
/* Read once: close to the core, kept out of the outer levels where it would push out more. */
static inline void lp_prefetch_once(const void *p) { LP_PREFETCH_ASM("prefetchnta", p); }
#else
static inline void lp_prefetch_l1(const void *p) { __builtin_prefetch(p, 0, 3); }
static inline void lp_prefetch_l2(const void *p) { __builtin_prefetch(p, 0, 1); }
static inline void lp_prefetch_once(const void *p) { __builtin_prefetch(p, 0, 0); }
#endif

#endif
