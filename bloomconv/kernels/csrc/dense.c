/* Matrix-vector products straight from stored int8, bf16 and fp16 weights, in fp32, on CPU.
 *
 * out (M, N) = x (M, K) @ W (N, K)^T * scale[n], for small M (decoding: one token per sequence).
 * W is read as stored and widened to fp32 in registers, never as a whole fp32 copy:
 *   - int8 (bitsandbytes LLM.int8() `CB`), with scale[n] = SCB[n] / 127 applied to each row's sum;
 *   - bf16 and fp16 (BLOOM's released dtypes), no scale.
 * Every product and sum is fp32, so the result differs from F.linear on the fp32 weight only in the
 * order of the sums (and, for int8, in applying the row scale once per row instead of per weight).
 *
 * Why: at batch 1 a token reads every weight once, so speed is how fast the weights stream. Torch's
 * paths here either widen first (bf16 weights with fp32 activations: a converted copy) or compute
 * in bf16 (`torch._weight_int8pack_mm`: bf16 activations, 1e-2 relative error on logits).
 *
 * Three implementations, chosen at run time: AVX-512 (16 lanes), AVX2+FMA (8 lanes), compiled per
 * function with target attributes so the build needs no -march flag, both for rows of a multiple
 * of 16 elements; portable C for anything else. Four weight rows are processed together so each x
 * vector loaded serves four rows, and up to BATCH_GROUP x rows share each widened weight vector
 * while the four rows sit in L1; the rows two steps ahead are prefetched. Rows are shared out
 * among threads (parallel.c).
 *
 * Called from Python with raw data pointers (bloomconv/kernels/dense.py validates the arguments)
 * through the entry point at the end of this file, which module.c's table lists.
 */
#include "kernels.h"

#include <stdint.h>

enum { KIND_INT8 = 0, KIND_BF16 = 1, KIND_FP16 = 2 };
enum { ROWS = 4 };         /* weight rows per step */
enum { BATCH_GROUP = 4 };  /* x rows per pass over a step's weight rows: 16 accumulators */
enum { LANES_NEEDED = 16 };
/* Software prefetch of the weight rows two steps ahead: a step's 4 rows are 4-8 KB, too short for
 * the hardware prefetcher to ramp up, and without it one core read the weights far below the
 * memory's speed. Into L2 (hint T1), not L1: with long rows two steps are 32 KB, L1's size, and
 * prefetching them into L1 evicted x, which every step reads whole (short rows ran alike with
 * either hint). */
enum { PREFETCH_GROUPS = 2 };
/* One core with prefetch streams nearly as fast as the memory allows, so a second thread adds
 * little and only pays off once a matrix is larger than handing it work costs (waking a pool
 * helper). Matrices of a few MB gained from a second thread; with a thread per 256 KB the torch
 * ops between the kernel calls slowed down more than the kernels gained. */
enum { MIN_BYTES_PER_THREAD = 1024 * 1024 };

typedef struct {
    const void *w;         /* (N, K) */
    int kind;
    const float *scale;    /* (N,) or NULL */
    const float *x;        /* (M, K) fp32 */
    float *out;            /* (M, N) fp32 */
    int64_t batch, rows, cols;
} Job;

/* ------------------------------------------------------------------------------ scalar path */

static inline float widen(const void *w, int kind, int64_t i)
{
    if (kind == KIND_INT8)
        return (float)((const int8_t *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    return kind == KIND_BF16 ? bf16_to_float(h) : fp16_to_float(h);
}

/* Weight rows [begin, end). */
static void scalar_rows(const void *job, int64_t begin, int64_t end)
{
    const Job *j = job;
    for (int64_t n = begin; n < end; n++)
        for (int64_t m = 0; m < j->batch; m++) {
            const float *x = j->x + m * j->cols;
            float sum = 0.0f;
            for (int64_t k = 0; k < j->cols; k++)
                sum += widen(j->w, j->kind, n * j->cols + k) * x[k];
            j->out[m * j->rows + n] = j->scale ? sum * j->scale[n] : sum;
        }
}

/* Groups of ROWS weight rows [begin, end), as the SIMD paths take their work. */
static void scalar_groups(const void *job, int64_t begin, int64_t end)
{
    const Job *j = job;
    scalar_rows(job, begin * ROWS, end * ROWS < j->rows ? end * ROWS : j->rows);
}

#ifdef HAVE_X86_KERNELS
/* ----------------------------------------------------------------------------- AVX-512 path */

AVX512_TARGET static inline __m512 widen16(const void *w, int kind, int64_t i)
{
    if (kind == KIND_INT8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + i))));
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    if (kind == KIND_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* ROWS weight rows n.. times x rows m0 .. m0 + MC - 1: MC is a constant in every call (see the
 * switch below), so the accumulators stay in registers. */
#define DEFINE_STEP(PREFIX, TARGET, VEC, LANES, ZERO, WIDEN, LOADX, FMA, REDUCE, KIND, NAME)          \
    TARGET static ALWAYS_INLINE void NAME(const Job *j, int64_t n, int64_t m0, const int MC)       \
    {                                                                                              \
        const int64_t K = j->cols;                                                                 \
        VEC acc[ROWS][BATCH_GROUP];                                                                \
        for (int r = 0; r < ROWS; r++)                                                             \
            for (int b = 0; b < MC; b++)                                                           \
                acc[r][b] = ZERO();                                                                \
        const int elem = KIND == KIND_INT8 ? 1 : 2;                                                \
        /* the group PREFETCH_GROUPS ahead, spread over this group's steps (prefetches never fault) */\
        const uintptr_t ahead = (uintptr_t)j->w + (uintptr_t)((n + PREFETCH_GROUPS * ROWS) * K * elem);  \
        for (int64_t k = 0; k < K; k += LANES) {                                                   \
            for (int line = 0; line < ROWS * LANES * elem; line += 64)                             \
                _mm_prefetch((const char *)(ahead + (uintptr_t)(k * ROWS * elem + line)), _MM_HINT_T1); \
            VEC wv[ROWS];                                                                          \
            for (int r = 0; r < ROWS; r++)                                                         \
                wv[r] = WIDEN(j->w, KIND, (n + r) * K + k);                                        \
            for (int b = 0; b < MC; b++) {                                                         \
                VEC xv = LOADX(j->x + (m0 + b) * K + k);                                           \
                for (int r = 0; r < ROWS; r++)                                                     \
                    acc[r][b] = FMA(wv[r], xv, acc[r][b]);                                         \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < ROWS; r++)                                                             \
            for (int b = 0; b < MC; b++) {                                                         \
                float sum = REDUCE(acc[r][b]);                                                     \
                j->out[(m0 + b) * j->rows + n + r] = j->scale ? sum * j->scale[n + r] : sum;       \
            }                                                                                      \
    }

/* Items are groups of ROWS weight rows; a last, partial group runs the scalar code. */
#define DEFINE_GROUPS(TARGET, STEP, NAME)                                                          \
    TARGET static void NAME(const void *job, int64_t begin, int64_t end)                           \
    {                                                                                              \
        const Job *j = job;                                                                        \
        for (int64_t g = begin; g < end; g++) {                                                    \
            const int64_t n = g * ROWS;                                                            \
            if (n + ROWS > j->rows) {                                                              \
                scalar_rows(job, n, j->rows);                                                      \
                continue;                                                                          \
            }                                                                                      \
            int64_t m0 = 0;                                                                        \
            for (; m0 + BATCH_GROUP <= j->batch; m0 += BATCH_GROUP)                                \
                STEP(j, n, m0, BATCH_GROUP);                                                       \
            switch (j->batch - m0) {                                                               \
            case 3: STEP(j, n, m0, 3); break;                                                      \
            case 2: STEP(j, n, m0, 2); break;                                                      \
            case 1: STEP(j, n, m0, 1); break;                                                      \
            default: break;                                                                        \
            }                                                                                      \
        }                                                                                          \
    }

AVX512_TARGET static inline float reduce16(__m512 v) { return _mm512_reduce_add_ps(v); }

#define AVX512_KERNELS(KIND, SUFFIX)                                                               \
    DEFINE_STEP(avx512, AVX512_TARGET, __m512, 16, _mm512_setzero_ps, widen16, _mm512_loadu_ps,   \
                _mm512_fmadd_ps, reduce16, KIND, avx512_step_##SUFFIX)                             \
    DEFINE_GROUPS(AVX512_TARGET, avx512_step_##SUFFIX, avx512_rows_##SUFFIX)

AVX512_KERNELS(KIND_INT8, int8)
AVX512_KERNELS(KIND_BF16, bf16)
AVX512_KERNELS(KIND_FP16, fp16)

/* -------------------------------------------------------------------------------- AVX2 path */

AVX2_TARGET static inline __m256 widen8(const void *w, int kind, int64_t i)
{
    if (kind == KIND_INT8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
    if (kind == KIND_BF16)
        return load_bf16x8((const uint16_t *)w + i);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
}

/* 8 lanes, 16 registers: ROWS x BATCH_GROUP = 16 accumulators would spill; gcc keeps what fits and
 * spills the rest to L1, which costs less than re-widening the weights per batch row. */
#define AVX2_KERNELS(KIND, SUFFIX)                                                                 \
    DEFINE_STEP(avx2, AVX2_TARGET, __m256, 8, _mm256_setzero_ps, widen8, _mm256_loadu_ps,          \
                _mm256_fmadd_ps, hsum8, KIND, avx2_step_##SUFFIX)                                  \
    DEFINE_GROUPS(AVX2_TARGET, avx2_step_##SUFFIX, avx2_rows_##SUFFIX)

AVX2_KERNELS(KIND_INT8, int8)
AVX2_KERNELS(KIND_BF16, bf16)
AVX2_KERNELS(KIND_FP16, fp16)

#endif

static int cpu_has(int isa) { return isa == ISA_AVX2 ? cpu_has_avx2() : cpu_has_avx512(); }

/* The fastest row function allowed by `isa` for this job, or NULL if `isa` cannot run here. */
static RangeFunction pick(int isa, const Job *j)
{
    const int simd = j->cols % LANES_NEEDED == 0;
#ifdef HAVE_X86_KERNELS
    static const RangeFunction avx512[] = {avx512_rows_int8, avx512_rows_bf16, avx512_rows_fp16};
    static const RangeFunction avx2[] = {avx2_rows_int8, avx2_rows_bf16, avx2_rows_fp16};
    if ((isa == ISA_AUTO || isa == ISA_AVX512) && cpu_has(ISA_AVX512) && simd)
        return avx512[j->kind];
    if (isa == ISA_AVX512)
        return cpu_has(ISA_AVX512) ? scalar_groups : NULL;
    if ((isa == ISA_AUTO || isa == ISA_AVX2) && cpu_has(ISA_AVX2) && simd)
        return avx2[j->kind];
    if (isa == ISA_AVX2)
        return cpu_has(ISA_AVX2) ? scalar_groups : NULL;
#else
    (void)simd;
    if (isa == ISA_AVX2 || isa == ISA_AVX512)
        return NULL;
#endif
    return scalar_groups;
}

/* --------------------------------------------------------------------------------- AMX tiles */
#ifdef HAVE_AMX_KERNELS
/* tiles.c's decoders: weight rows as bf16 (int8 codes are exact in bf16; bf16 weights as stored),
 * each row's next bytes prefetched (16 rows are read side by side, 32 columns at a time). */
enum { TILE_PREFETCH_BYTES = 512 };

AMX_TARGET static void decode_int8_tile(const void *matrix, int64_t row, int rows, int64_t col,
                                        uint16_t (*dst)[TILE_COLS])
{
    const Job *j = matrix;
    for (int i = 0; i < rows; i++) {
        const int8_t *w = (const int8_t *)j->w + (row + i) * j->cols + col;
        _mm_prefetch((const char *)w + TILE_PREFETCH_BYTES, _MM_HINT_T0);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16))));
        _mm512_store_si512(dst[i], (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

AMX_TARGET static void decode_bf16_tile(const void *matrix, int64_t row, int rows, int64_t col,
                                        uint16_t (*dst)[TILE_COLS])
{
    const Job *j = matrix;
    for (int i = 0; i < rows; i++) {
        const uint16_t *w = (const uint16_t *)j->w + (row + i) * j->cols + col;
        _mm_prefetch((const char *)w + 2 * TILE_PREFETCH_BYTES, _MM_HINT_T0);
        _mm512_store_si512(dst[i], _mm512_loadu_si512(w));
    }
}
#endif

/* ------------------------------------------------------------------------------ Python glue */

static PyObject *tiles_matmul_call(Job job, int threads);

/* dense_matmul and dense_matmul_bf16_tiles (`tiles`). */
static PyObject *matmul_call(PyObject *args, int tiles)
{
    unsigned long long x, out, weight, scale;
    long long batch, rows, cols;
    int threads, isa, kind;
    if (!PyArg_ParseTuple(args, "KLKiiKLLiK", &x, &batch, &out, &threads, &isa, &weight, &rows, &cols, &kind,
                          &scale))
        return NULL;
    Job job = {.w = (const void *)(uintptr_t)weight, .kind = kind, .scale = (const float *)(uintptr_t)scale,
               .x = (const float *)(uintptr_t)x, .out = (float *)(uintptr_t)out, .batch = batch, .rows = rows,
               .cols = cols};
    if (tiles)
        return tiles_matmul_call(job, threads);
    if (kind < KIND_INT8 || kind > KIND_FP16 || isa < ISA_AUTO || isa > ISA_AVX512) {
        PyErr_SetString(PyExc_ValueError, "unknown weight kind or instruction set");
        return NULL;
    }
    RangeFunction run = pick(isa, &job);
    if (!run) {
        PyErr_SetString(PyExc_ValueError, "this CPU lacks the requested instruction set");
        return NULL;
    }
    const int64_t bytes_per_row = cols * (kind == KIND_INT8 ? 1 : 2) * (batch > 0 ? batch : 1);
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_parallel(run, &job, (rows + ROWS - 1) / ROWS, ROWS * bytes_per_row, threads, MIN_BYTES_PER_THREAD);
    Py_END_ALLOW_THREADS
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyObject *dense_matmul(PyObject *self, PyObject *args) { return matmul_call(args, 0); }

PyObject *dense_matmul_bf16_tiles(PyObject *self, PyObject *args) { return matmul_call(args, 1); }

static PyObject *tiles_matmul_call(Job job, int threads)
{
#ifdef HAVE_AMX_KERNELS
    const int kind = job.kind;
    const int64_t batch = job.batch, cols = job.cols;
    if (!cpu_has_amx_bf16() || (kind != KIND_INT8 && kind != KIND_BF16) || cols % TILE_COLS != 0 || batch < 1 ||
        batch > TILE_X_ROWS * TILE_MAX_X) {
        PyErr_SetString(PyExc_ValueError, "AMX tiles take 1-64 rows of x and int8 or bf16 weights in rows of a "
                                          "multiple of 32, on a CPU with AMX-BF16");
        return NULL;
    }
    TileJob tiles = {.decode = kind == KIND_INT8 ? decode_int8_tile : decode_bf16_tile, .matrix = &job,
                     .scale = job.scale, .batch = batch, .rows = job.rows, .cols = cols, .out = job.out};
    if (tiles_matmul(&tiles, job.x, threads, cols * (kind == KIND_INT8 ? 1 : 2), MIN_BYTES_PER_THREAD))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)job; (void)threads;
    PyErr_SetString(PyExc_ValueError, "this build has no AMX kernels");
    return NULL;
#endif
}
