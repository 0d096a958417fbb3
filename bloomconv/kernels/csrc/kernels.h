/* What the files of the one kernels extension share (fourbit.c, dense.c, int8.c, step_ops.c, parallel.c,
 * module.c):
 *   - the instruction-set codes callers pass (one enum; bloomconv/kernels/__init__.py mirrors it);
 *   - compiling x86 SIMD code without a -march flag and choosing it at run time: HAVE_X86_KERNELS
 *     where gcc/clang target x86, the per-function target attributes, and the CPU checks that both
 *     kernels and `isas()` must agree on;
 *   - the conversions the kernels make (bf16 and fp16 widening, fp16 rounding, float bits,
 *     horizontal sums);
 *   - the thread pool's entry point (parallel.c: one pool for every kernel);
 *   - the Python entry points that module.c puts in its method table.
 */
#ifndef BLOOMCONV_KERNELS_H
#define BLOOMCONV_KERNELS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* Shared between this extension's files only: not exported from it, and not replaced by a
 * same-named symbol of another library loaded into the process. */
#if defined(__GNUC__) || defined(__clang__)
#define INTERNAL __attribute__((visibility("hidden")))
#else
#define INTERNAL
#endif

/* The instruction set a caller asks for: AUTO takes the fastest this CPU runs. */
enum { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

/* ------------------------------------------------------------------------------- x86 targets */

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_X86_KERNELS 1
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#define ALWAYS_INLINE __attribute__((always_inline)) inline

static inline int cpu_has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* what AVX512_TARGET code needs (its AVX2 part included) */
static inline int cpu_has_avx512(void)
{
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

/* bf16 dot-product instructions (AVX512-BF16; CPUs with AMX have them too), which torch's bf16 GEMM
 * (oneDNN) uses; without them it emulates bf16 products at about the fp32 rate. Read from CPUID
 * (leaf 7, subleaf 1, EAX bit 5): older compilers' __builtin_cpu_supports does not know the name,
 * and a build error would leave the extension out. The OS's AVX-512 state is cpu_has_avx512's check. */
static inline int cpu_has_bf16_dot(void)
{
    unsigned int eax, ebx, ecx, edx;
    return cpu_has_avx512() && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 5) & 1);
}

/* int8 dot products (AVX512-VNNI: vpdpbusd, 64 byte products per instruction), for 4-bit weights
 * times int8 activations. */
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
static inline int cpu_has_avx512_vnni(void)
{
    return cpu_has_avx512() && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* AMX tiles of bf16 products (AMX-TILE + AMX-BF16; gcc 11 and clang 12 compile them, and the Linux
 * kernel must let the process use the tile registers: cpu_has_amx_bf16 asks it, once). */
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                           (!defined(__clang__) && __GNUC__ >= 11))
#define HAVE_AMX_KERNELS 1
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16,avx2,fma,f16c")))
#endif
INTERNAL int cpu_has_amx_bf16(void);

#ifdef HAVE_AMX_KERNELS
/* tiles.c: bf16 products on AMX tiles (up to TILE_MAX_X tiles of TILE_X_ROWS rows of x). */
enum { TILE_X_ROWS = 16, TILE_MAX_X = 4, TILE_COLS = 32 };
/* Weight rows [row, row + rows) (rows <= 16), columns [col, col + 32), as bf16 into dst. */
typedef void (*TileDecoder)(const void *matrix, int64_t row, int rows, int64_t col, uint16_t (*dst)[TILE_COLS]);
typedef struct {
    TileDecoder decode;
    const void *matrix;
    const float *scale;            /* (rows,) a row's sums are multiplied by, or NULL */
    int64_t batch, rows, cols;     /* M, N, K (K a multiple of TILE_COLS) */
    float *out;                    /* (M, N) fp32 */
    const uint32_t *x_tiles;       /* set by tiles_matmul */
} TileJob;
/* out = x (batch, cols) fp32, rounded to bf16, @ the decoded weights^T: 0, or 1 when out of memory. */
INTERNAL int tiles_matmul(TileJob *job, const float *x, int threads, int64_t bytes_per_row,
                          int64_t min_bytes_per_thread);
#endif
#else
static inline int cpu_has_avx2(void) { return 0; }
static inline int cpu_has_avx512(void) { return 0; }
static inline int cpu_has_bf16_dot(void) { return 0; }
static inline int cpu_has_amx_bf16(void) { return 0; }
static inline int cpu_has_avx512_vnni(void) { return 0; }
#endif

/* ------------------------------------------------------------------------------ conversions */

static inline float bits_to_float(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

/* bf16 is the high half of an fp32, so widening is exact. */
static inline float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

/* IEEE half -> single, exactly (subnormals, infinities and NaN included). */
static inline float fp16_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0x1f)
        bits = sign | 0x7f800000u | (mantissa << 13);
    else if (exponent)
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    else if (!mantissa)
        bits = sign;
    else {
        int shift = 0;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            shift++;
        }
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((mantissa & 0x3ff) << 13);
    }
    return bits_to_float(bits);
}

/* The nearest fp16 value, ties to even, as torch's .to(torch.float16) and F16C's vcvtps2ph round:
 * inf from 65520 on (NaN and inf stay as they are), subnormals on fp16's 2^-24 grid. */
static inline float round_to_fp16(float v)
{
    uint32_t b = float_to_bits(v);
    uint32_t sign = b & 0x80000000u, mag = b & 0x7FFFFFFFu;
    float a = bits_to_float(mag);
    if (mag >= 0x7F800000u)                  /* inf or NaN */
        return v;
    if (a >= 65520.0f)                       /* rounds past fp16's largest finite value */
        mag = 0x7F800000u;
    else if (a < 6.103515625e-05f) {         /* fp16 subnormals: multiples of 2^-24 */
        volatile float shifted = a + 0.5f;   /* rounded to float's 2^-24 steps in [0.5, 1) */
        mag = float_to_bits(shifted - 0.5f);
    }
    else
        mag = (mag + 0xFFFu + ((mag >> 13) & 1u)) & ~0x1FFFu;
    return bits_to_float(sign | mag);
}

#ifdef HAVE_X86_KERNELS
/* 8 bf16 values from p, widened to fp32. */
AVX2_TARGET static ALWAYS_INLINE __m256 load_bf16x8(const uint16_t *p)
{
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The sum of 8 lanes, always in the same order: (0+4 + 2+6) + (1+5 + 3+7). */
AVX2_TARGET static ALWAYS_INLINE float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ------------------------------------------------------------------------------ thread pool */

/* Computes items [begin, end) of the job described by `job`. */
typedef void (*RangeFunction)(const void *job, int64_t begin, int64_t end);

/* Runs `run(job, ...)` over items [0, count) on up to `threads` threads, this one included, one
 * per `min_bytes_per_thread` of work (below that, handing work over costs more than it saves);
 * -1 when out of memory. `job` must stay valid until the call returns. Each item's result must
 * not depend on which thread computes it. Call without the GIL held. */
INTERNAL int run_parallel(RangeFunction run, const void *job, int64_t count, int64_t bytes_per_item, int threads,
                          int64_t min_bytes_per_thread);
/* How long the pool's helpers spin between jobs before they sleep (negative: the default); returns
 * the setting it replaces. */
INTERNAL int64_t helpers_spin(int64_t nanoseconds);

/* ---------------------------------------------------------------------- Python entry points */

/* int8.c */
INTERNAL PyObject *int8_quantize(PyObject *self, PyObject *args);
/* fourbit.c */
INTERNAL PyObject *fourbit_matmul(PyObject *self, PyObject *args);
INTERNAL PyObject *fourbit_matmul_bf16_tiles(PyObject *self, PyObject *args);
INTERNAL PyObject *fourbit_matmul_int8_activations(PyObject *self, PyObject *args);
INTERNAL PyObject *dense_matmul_bf16_tiles(PyObject *self, PyObject *args);
INTERNAL PyObject *fourbit_dequantize(PyObject *self, PyObject *args);
INTERNAL PyObject *fourbit_quantize(PyObject *self, PyObject *args);
/* dense.c */
INTERNAL PyObject *dense_matmul(PyObject *self, PyObject *args);
/* step_ops.c */
INTERNAL PyObject *attention_step(PyObject *self, PyObject *args);
INTERNAL PyObject *gelu_tanh(PyObject *self, PyObject *args);
INTERNAL PyObject *argmax_rows(PyObject *self, PyObject *args);

#endif
