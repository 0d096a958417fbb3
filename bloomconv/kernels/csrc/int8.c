/* LLM.int8() vector-wise quantization on CPU: each row's absmax (SCB) and its int8 codes (CB).
 *
 * Bit for bit what quantize_int8 (bloomconv/storage/int8.py) computes with torch, which is what
 * bitsandbytes' `int8_vectorwise_quant` computes (tests/test_quant.py checks all three):
 *   w      the row, as fp32; with `to_fp16` first rounded to fp16 (the "float16" scale source:
 *          what transformers quantizes), ties to even, overflowing to inf from 65520 on;
 *   SCB    max |w|, or NaN when the row holds NaN or inf (the caller refuses such a weight);
 *   scale  (1 / SCB) * 127 in fp32, rounded twice: torch computes `127.0 / absmax` as a reciprocal
 *          times 127, and so does bitsandbytes; 0 for a zero row;
 *   CB     round-half-even(w * scale) in fp32, as int8. A row whose scale overflows to inf (SCB
 *          below ~3.7e-37) gets 0 everywhere, as torch's conversion of inf and NaN to int8 gives.
 * -ffp-contract=off (setup.py) keeps the compiler from fusing or reordering these roundings.
 *
 * Three implementations, chosen at run time: AVX-512 (16 lanes), AVX2 (8 lanes) and portable C,
 * for any row length (the SIMD code finishes a row's last few elements in C). A row is read twice,
 * for its absmax and for its codes; the second pass finds it in L1/L2 (a 14336-column bf16 row is
 * 28 KB). Rows are shared out among threads (parallel.c).
 *
 * Called from Python with raw data pointers (bloomconv/kernels/int8.py validates the arguments)
 * through the entry point at the end of this file, which module.c's table lists.
 */
#include "kernels.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

enum { SOURCE_FP32 = 0, SOURCE_BF16 = 1, SOURCE_FP16 = 2 };
/* Quantizing streams the input once at a few GB/s per core: a second thread pays off from a few
 * hundred KB on. */
enum { MIN_BYTES_PER_THREAD = 256 * 1024 };

typedef struct {
    const void *x;       /* (rows, cols), contiguous */
    int kind;            /* SOURCE_* */
    int to_fp16;         /* round each value to fp16 first */
    int64_t cols;
    int8_t *CB;          /* (rows, cols) */
    float *SCB;          /* (rows,) */
} Job;

static inline float load_value(const Job *j, int64_t i)
{
    float v;
    if (j->kind == SOURCE_BF16)
        v = bf16_to_float(((const uint16_t *)j->x)[i]);
    else if (j->kind == SOURCE_FP16)
        return fp16_to_float(((const uint16_t *)j->x)[i]);  /* already a float16 value */
    else
        v = ((const float *)j->x)[i];
    return j->to_fp16 ? round_to_fp16(v) : v;
}

/* The row's multiplier from its absmax; 0 for a zero row. */
static inline float row_scale(float absmax)
{
    if (!(absmax > 0.0f))
        return 0.0f;
    const float reciprocal = 1.0f / absmax;
    return reciprocal * 127.0f;
}

/* Elements [c0, cols) of row r, whose absmax so far (elements before c0) is `absmax` and `bad`. */
static void scalar_row(const Job *j, int64_t r, int64_t c0, float absmax, int bad)
{
    const int64_t first = r * j->cols;
    for (int64_t c = c0; c < j->cols; c++) {
        const float a = fabsf(load_value(j, first + c));
        bad |= !(a <= 3.4028234663852886e38f);
        absmax = a > absmax ? a : absmax;
    }
    int8_t *out = j->CB + first;
    if (bad) {
        j->SCB[r] = NAN;
        memset(out, 0, (size_t)j->cols);
        return;
    }
    j->SCB[r] = absmax;
    const float scale = row_scale(absmax);
    if (!(scale <= 3.4028234663852886e38f)) {
        memset(out, 0, (size_t)j->cols);
        return;
    }
    for (int64_t c = 0; c < j->cols; c++) {
        /* round half to even without a libm call: |product| <= 127.5, and adding 1.5 * 2^23
         * (where a float's step is 1) rounds it in the current (nearest-even) mode */
        const float product = load_value(j, first + c) * scale;
        out[c] = (int8_t)(int32_t)((product + 12582912.0f) - 12582912.0f);
    }
}

static void scalar_rows(const void *job, int64_t begin, int64_t end)
{
    for (int64_t r = begin; r < end; r++)
        scalar_row(job, r, 0, 0.0f, 0);
}

#ifdef HAVE_X86_KERNELS
/* --------------------------------------------------------------------------------- AVX-512 */

AVX512_TARGET static ALWAYS_INLINE __m512 load16(const Job *j, int64_t i)
{
    __m512 v;
    if (j->kind == SOURCE_FP32) {
        v = _mm512_loadu_ps((const float *)j->x + i);
    } else {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)j->x + i));
        if (j->kind == SOURCE_FP16)
            return _mm512_cvtph_ps(h);
        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return j->to_fp16 ? _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)) : v;
}

AVX512_TARGET static void avx512_rows(const void *job, int64_t begin, int64_t end)
{
    const Job *j = job;
    const int64_t cols = j->cols, simd_cols = cols / 16 * 16;
    const __m512 largest = _mm512_set1_ps(3.4028234663852886e38f);
    for (int64_t r = begin; r < end; r++) {
        const int64_t first = r * cols;
        __m512 max = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (int64_t c = 0; c < simd_cols; c += 16) {
            const __m512 a = _mm512_abs_ps(load16(j, first + c));
            bad |= _mm512_cmp_ps_mask(a, largest, _CMP_NLE_UQ);  /* inf or NaN */
            max = _mm512_max_ps(max, a);
        }
        if (simd_cols < cols) {  /* the last few elements, and every code, in C */
            scalar_row(j, r, simd_cols, _mm512_reduce_max_ps(max), bad != 0);
            continue;
        }
        const float absmax = _mm512_reduce_max_ps(max);
        const float scale = row_scale(absmax);
        int8_t *out = j->CB + first;
        j->SCB[r] = bad ? NAN : absmax;
        if (bad || !(scale <= 3.4028234663852886e38f)) {
            memset(out, 0, (size_t)cols);
            continue;
        }
        const __m512 s = _mm512_set1_ps(scale);
        for (int64_t c = 0; c < cols; c += 16) {
            const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(load16(j, first + c), s),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_storeu_si128((__m128i *)(out + c), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)));
        }
    }
}

/* ------------------------------------------------------------------------------------ AVX2 */

AVX2_TARGET static ALWAYS_INLINE __m256 load8(const Job *j, int64_t i)
{
    __m256 v;
    if (j->kind == SOURCE_FP32) {
        v = _mm256_loadu_ps((const float *)j->x + i);
    } else if (j->kind == SOURCE_FP16) {
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)j->x + i)));
    } else {
        v = load_bf16x8((const uint16_t *)j->x + i);
    }
    return j->to_fp16 ? _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)) : v;
}

AVX2_TARGET static ALWAYS_INLINE __m256i codes8(const Job *j, int64_t i, __m256 scale)
{
    const __m256 q = _mm256_round_ps(_mm256_mul_ps(load8(j, i), scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(q);
}

AVX2_TARGET static void avx2_rows(const void *job, int64_t begin, int64_t end)
{
    const Job *j = job;
    const int64_t cols = j->cols, simd_cols = cols / 32 * 32;
    const __m256 sign = _mm256_set1_ps(-0.0f), largest = _mm256_set1_ps(3.4028234663852886e38f);
    /* packs interleave the 128-bit lanes: this puts the 32 bytes back in order */
    const __m256i in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t r = begin; r < end; r++) {
        const int64_t first = r * cols;
        __m256 max = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int64_t c = 0; c < simd_cols; c += 8) {
            const __m256 a = _mm256_andnot_ps(sign, load8(j, first + c));
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, largest, _CMP_NLE_UQ));  /* inf or NaN */
            max = _mm256_max_ps(max, a);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps(max, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float absmax = _mm_cvtss_f32(m4);
        const int row_bad = _mm256_movemask_ps(bad) != 0;
        if (simd_cols < cols) {  /* the last few elements, and every code, in C */
            scalar_row(j, r, simd_cols, absmax, row_bad);
            continue;
        }
        const float scale = row_scale(absmax);
        int8_t *out = j->CB + first;
        j->SCB[r] = row_bad ? NAN : absmax;
        if (row_bad || !(scale <= 3.4028234663852886e38f)) {
            memset(out, 0, (size_t)cols);
            continue;
        }
        const __m256 s = _mm256_set1_ps(scale);
        for (int64_t c = 0; c < cols; c += 32) {
            const __m256i w01 = _mm256_packs_epi32(codes8(j, first + c, s), codes8(j, first + c + 8, s));
            const __m256i w23 = _mm256_packs_epi32(codes8(j, first + c + 16, s), codes8(j, first + c + 24, s));
            const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), in_order);
            _mm256_storeu_si256((__m256i *)(out + c), bytes);
        }
    }
}
#endif

/* ------------------------------------------------------------------------------ Python glue */

PyObject *int8_quantize(PyObject *self, PyObject *args)
{
    unsigned long long x, CB, SCB;
    long long rows, cols;
    int kind, to_fp16, threads, isa;
    if (!PyArg_ParseTuple(args, "KiiLLKKii", &x, &kind, &to_fp16, &rows, &cols, &CB, &SCB, &threads, &isa))
        return NULL;
    if (kind < SOURCE_FP32 || kind > SOURCE_FP16 || isa < ISA_AUTO || isa > ISA_AVX512) {
        PyErr_SetString(PyExc_ValueError, "unknown source kind or instruction set");
        return NULL;
    }
    Job job = {.x = (const void *)(uintptr_t)x, .kind = kind, .to_fp16 = to_fp16, .cols = cols,
               .CB = (int8_t *)(uintptr_t)CB, .SCB = (float *)(uintptr_t)SCB};
    RangeFunction run = scalar_rows;
#ifdef HAVE_X86_KERNELS
    if ((isa == ISA_AUTO || isa == ISA_AVX512) && cpu_has_avx512())
        run = avx512_rows;
    else if ((isa == ISA_AUTO || isa == ISA_AVX2) && cpu_has_avx2())
        run = avx2_rows;
#endif
    const int64_t bytes_per_row = cols * (kind == SOURCE_FP32 ? 4 : 2);
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_parallel(run, &job, rows, bytes_per_row, threads, MIN_BYTES_PER_THREAD);
    Py_END_ALLOW_THREADS
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}
