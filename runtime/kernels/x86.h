/* What both kernel modules need to compile x86 SIMD code without a -march flag and pick it at run
 * time: HAVE_X86_KERNELS where gcc/clang target x86, the per-function target attributes, and the
 * CPU checks the two must agree on. Header-only (static functions). */
#ifndef BLOOMCONV_X86_H
#define BLOOMCONV_X86_H

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86_KERNELS 1
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))

static int cpu_has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* what AVX512_TARGET code needs (its AVX2 part included) */
static int cpu_has_avx512(void)
{
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
#else
static int cpu_has_avx2(void) { return 0; }
static int cpu_has_avx512(void) { return 0; }
#endif

#endif
