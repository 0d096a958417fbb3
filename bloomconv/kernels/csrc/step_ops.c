/* What a decoding step computes besides its matrix products, on CPU in fp32: the attention over
 * the KV cache, BLOOM's GELU (which every pass uses), and the greedy choice of the next token.
 *
 * Why: these are tiny next to the products, but torch runs each as several ops with its own
 * dispatch, or on one thread with scalar code (argmax over a 250880-token vocabulary took 0.2 ms),
 * and in a decoding step (one token per sequence) that is their whole cost: for 16 sequences of
 * bloom-560m, torch's fused attention and GELU took a fifth of a step (bench/profile_step.py).
 * Here each is one call.
 *
 * attention_step: for each sequence b and head h, the step's key and value (from the fused QKV
 * projection, laid out per head as [q, k, v]) are written into the cache at position `length`,
 * then softmax(q K^T / sqrt(hs) + bias) V over the S = length + 1 cached positions, the softmax in
 * fp32 with its maximum subtracted, as torch's scaled_dot_product_attention computes it (only the
 * order of the sums and exp's last bit differ). `bias` is the ALiBi bias plus the mask, (B, nh, S).
 *
 * gelu_tanh: x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³))), computed as x / (1 + exp(-2u)), the same
 * function without tanh's cancellation near 0.
 *
 * argmax_rows: each row's index of its largest value, the first one where several are equal, and
 * of its first NaN where there is one, as torch.argmax answers.
 *
 * AVX2+FMA code (a target attribute, as in the other kernels) where the head size is a multiple of
 * 8, portable C elsewhere. Sequences × heads, GELU's elements and argmax's rows are shared out
 * among threads.
 */
#include "kernels.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Handing work to a second thread costs about a wake-up; below these it is not worth it. Attention
 * counts the cached keys and values it reads, GELU the elements it computes (an exp each). */
enum { ATTENTION_MIN_BYTES_PER_THREAD = 256 * 1024 };
enum { GELU_GRAIN = 4096, GELU_MIN_ELEMENTS_PER_THREAD = 16384 };
enum { ARGMAX_MIN_BYTES_PER_THREAD = 1024 * 1024 };

/* Below this, exp's result is under fp32's smallest normal: the kernels return 0, as expf does
 * (to within subnormals), so masked positions (bias = fp32's minimum) get no weight at all. */
#define EXP_ZERO_BELOW -87.0f

typedef struct {
    const float *fused;   /* (B, 3H): per head [q, k, v], hs each */
    float *keys, *values; /* (B, nh, capacity, hs) */
    const float *bias;    /* (B, nh, S) */
    float *out;           /* (B, H): head h at h * hs */
    int64_t heads, head_size, capacity, length;
    float scale;
} Attention;

typedef struct {
    const float *x;
    float *out;
    int64_t n;
} Gelu;

typedef struct {
    const float *x;   /* (rows, n) */
    int64_t *out;     /* (rows,) */
    int64_t n;
    int vector;
} Argmax;

/* ------------------------------------------------------------------------------ scalar path */

/* Sequence b = item / heads, head h = item % heads: where its query, cache, bias and output are,
 * after its new key and value have been written into the cache. */
typedef struct {
    const float *q, *bias;
    const float *keys, *values;  /* S positions, the new one included */
    float *out;
} Head;

static Head head_of(const Attention *a, int64_t item)
{
    const int64_t hs = a->head_size, H = a->heads * hs, b = item / a->heads, h = item % a->heads;
    const float *q = a->fused + b * 3 * H + h * 3 * hs;
    float *keys = a->keys + item * a->capacity * hs, *values = a->values + item * a->capacity * hs;
    memcpy(keys + a->length * hs, q + hs, (size_t)hs * sizeof(float));
    memcpy(values + a->length * hs, q + 2 * hs, (size_t)hs * sizeof(float));
    return (Head){.q = q, .bias = a->bias + item * (a->length + 1), .keys = keys, .values = values,
                  .out = a->out + b * H + h * hs};
}


static inline float exp_or_zero(float v) { return v < EXP_ZERO_BELOW ? 0.0f : expf(v); }

static inline float gelu_one(float v)
{
    const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return v / (1.0f + expf(-2.0f * u));
}

static void scalar_attention(const Attention *a, int64_t item, float *scores)
{
    const int64_t hs = a->head_size, S = a->length + 1;
    const Head head = head_of(a, item);
    const float *q = head.q, *keys = head.keys, *values = head.values, *bias = head.bias;
    float top = -INFINITY, total = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        float dot = 0.0f;
        for (int64_t d = 0; d < hs; d++)
            dot += q[d] * keys[s * hs + d];
        scores[s] = dot * a->scale + bias[s];
        top = scores[s] > top ? scores[s] : top;
    }
    for (int64_t s = 0; s < S; s++) {
        scores[s] = exp_or_zero(scores[s] - top);
        total += scores[s];
    }
    float *out = head.out;
    for (int64_t d = 0; d < hs; d++)
        out[d] = 0.0f;
    for (int64_t s = 0; s < S; s++)
        for (int64_t d = 0; d < hs; d++)
            out[d] += scores[s] * values[s * hs + d];
    for (int64_t d = 0; d < hs; d++)
        out[d] /= total;
}

/* The row's first NaN, else its first largest value. */
static int64_t scalar_argmax(const float *x, int64_t n)
{
    int64_t best = 0;
    for (int64_t i = 0; i < n; i++) {
        if (x[i] != x[i])
            return i;
        if (x[i] > x[best])
            best = i;
    }
    return best;
}

static void scalar_gelu(const void *job, int64_t begin, int64_t end)
{
    const Gelu *g = job;
    end = end * GELU_GRAIN < g->n ? end * GELU_GRAIN : g->n;
    for (int64_t i = begin * GELU_GRAIN; i < end; i++)
        g->out[i] = gelu_one(g->x[i]);
}

/* -------------------------------------------------------------------------------- AVX2 path */
#ifdef HAVE_X86_KERNELS

/* exp for 8 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial, 2^n
 * from the exponent bits), within 2 ulp of expf; 0 below EXP_ZERO_BELOW, inf above 88.7. */
AVX2_TARGET static ALWAYS_INLINE __m256 exp8(__m256 v)
{
    const __m256 zero_below = _mm256_cmp_ps(v, _mm256_set1_ps(EXP_ZERO_BELOW), _CMP_GE_OQ);
    const __m256 overflow = _mm256_cmp_ps(v, _mm256_set1_ps(88.72283935546875f), _CMP_GT_OQ);
    v = _mm256_max_ps(_mm256_min_ps(v, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(EXP_ZERO_BELOW));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
    v = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), v);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(v, v), _mm256_add_ps(v, _mm256_set1_ps(1.0f)));
    const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(power));
    return _mm256_and_ps(_mm256_blendv_ps(result, _mm256_set1_ps(INFINITY), overflow), zero_below);
}

AVX2_TARGET static void avx2_attention(const Attention *a, int64_t item, float *scores)
{
    const int64_t hs = a->head_size, S = a->length + 1;
    const Head head = head_of(a, item);
    const float *q = head.q, *keys = head.keys, *values = head.values, *bias = head.bias;
    float top = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < hs; d += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(keys + s * hs + d), acc);
        scores[s] = hsum8(acc) * a->scale + bias[s];
        top = scores[s] > top ? scores[s] : top;
    }
    __m256 sums = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= S; s += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + s), _mm256_set1_ps(top)));
        _mm256_storeu_ps(scores + s, e);
        sums = _mm256_add_ps(sums, e);
    }
    float total = hsum8(sums);
    for (; s < S; s++) {
        scores[s] = exp_or_zero(scores[s] - top);
        total += scores[s];
    }
    float *out = head.out;
    const __m256 reciprocal = _mm256_set1_ps(1.0f / total);
    for (int64_t d = 0; d < hs; d += 8) {  /* a head's output, 8 columns at a time, over every position */
        __m256 acc = _mm256_setzero_ps();
        for (int64_t p = 0; p < S; p++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[p]), _mm256_loadu_ps(values + p * hs + d), acc);
        _mm256_storeu_ps(out + d, _mm256_mul_ps(acc, reciprocal));
    }
}

/* The largest value 8 lanes at a time (and whether there is a NaN), then the first index holding
 * it: two passes over a row that stays in cache, each far faster than one scalar pass. */
AVX2_TARGET static int64_t avx2_argmax(const float *x, int64_t n)
{
    if (n < 8)
        return scalar_argmax(x, n);
    __m256 top = _mm256_loadu_ps(x), nan = _mm256_cmp_ps(top, top, _CMP_UNORD_Q);
    int64_t i = 8;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        top = _mm256_max_ps(top, v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    if (_mm256_movemask_ps(nan))
        return scalar_argmax(x, n);  /* the first NaN */
    float best = x[0];
    float lanes[8];
    _mm256_storeu_ps(lanes, top);
    for (int l = 0; l < 8; l++)
        best = lanes[l] > best ? lanes[l] : best;
    for (; i < n; i++) {
        if (x[i] != x[i])
            return scalar_argmax(x, n);
        best = x[i] > best ? x[i] : best;
    }
    const __m256 target = _mm256_set1_ps(best);
    for (i = 0; i + 8 <= n; i += 8) {
        const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
        if (hit)
            return i + __builtin_ctz((unsigned)hit);
    }
    for (; x[i] != best; i++)
        ;
    return i;
}

AVX2_TARGET static void avx2_gelu(const void *job, int64_t begin, int64_t end)
{
    const Gelu *g = job;
    end = end * GELU_GRAIN < g->n ? end * GELU_GRAIN : g->n;
    int64_t i = begin * GELU_GRAIN;
    for (; i + 8 <= end; i += 8) {
        const __m256 v = _mm256_loadu_ps(g->x + i);
        const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
        const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                       _mm256_add_ps(v, _mm256_mul_ps(_mm256_set1_ps(0.044715f), cube)));
        const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u));
        _mm256_storeu_ps(g->out + i, _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
    }
    for (; i < end; i++)
        g->out[i] = gelu_one(g->x[i]);
}
#endif

/* ------------------------------------------------------------------------------- threading */

typedef struct {
    const Attention *a;
    int vector;
    int64_t failed;  /* atomic: a thread could not allocate its scores */
} AttentionJob;

/* run_parallel's RangeFunction: sequence × head items [begin, end), with their own scores buffer. */
static void attention_items(const void *job, int64_t begin, int64_t end)
{
    AttentionJob *j = (AttentionJob *)job;
    float *scores = malloc((size_t)(j->a->length + 1) * sizeof(float));
    if (!scores) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELEASE);
        return;
    }
    for (int64_t item = begin; item < end; item++) {
#ifdef HAVE_X86_KERNELS
        if (j->vector) {
            avx2_attention(j->a, item, scores);
            continue;
        }
#endif
        scalar_attention(j->a, item, scores);
    }
    free(scores);
}

/* run_parallel's RangeFunction: rows [begin, end). */
static void argmax_items(const void *job, int64_t begin, int64_t end)
{
    const Argmax *a = job;
    for (int64_t row = begin; row < end; row++) {
#ifdef HAVE_X86_KERNELS
        if (a->vector) {
            a->out[row] = avx2_argmax(a->x + row * a->n, a->n);
            continue;
        }
#endif
        a->out[row] = scalar_argmax(a->x + row * a->n, a->n);
    }
}

/* ------------------------------------------------------------------------------ Python glue */

PyObject *attention_step(PyObject *self, PyObject *args)
{
    unsigned long long fused, keys, values, bias, out;
    long long batch, heads, head_size, capacity, length;
    int threads, isa;
    if (!PyArg_ParseTuple(args, "KLLLKKLLKKii", &fused, &batch, &heads, &head_size, &keys, &values, &capacity,
                          &length, &bias, &out, &threads, &isa))
        return NULL;
    Attention a = {.fused = (const float *)(uintptr_t)fused, .keys = (float *)(uintptr_t)keys,
                   .values = (float *)(uintptr_t)values, .bias = (const float *)(uintptr_t)bias,
                   .out = (float *)(uintptr_t)out, .heads = heads, .head_size = head_size, .capacity = capacity,
                   .length = length, .scale = (float)(1.0 / sqrt((double)head_size))};
    AttentionJob job = {.a = &a, .vector = isa != ISA_SCALAR && cpu_has_avx2() && head_size % 8 == 0};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_parallel(attention_items, &job, batch * heads, 2 * (length + 1) * head_size * (int64_t)sizeof(float),
                          threads, ATTENTION_MIN_BYTES_PER_THREAD);
    Py_END_ALLOW_THREADS
    if (status || job.failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyObject *gelu_tanh(PyObject *self, PyObject *args)
{
    unsigned long long x, out;
    long long n;
    int threads, isa;
    if (!PyArg_ParseTuple(args, "KKLii", &x, &out, &n, &threads, &isa))
        return NULL;
    Gelu g = {.x = (const float *)(uintptr_t)x, .out = (float *)(uintptr_t)out, .n = n};
    RangeFunction run = scalar_gelu;
#ifdef HAVE_X86_KERNELS
    if (isa != ISA_SCALAR && cpu_has_avx2())
        run = avx2_gelu;
#endif
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_parallel(run, &g, (n + GELU_GRAIN - 1) / GELU_GRAIN, GELU_GRAIN, threads, GELU_MIN_ELEMENTS_PER_THREAD);
    Py_END_ALLOW_THREADS
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyObject *argmax_rows(PyObject *self, PyObject *args)
{
    unsigned long long x, out;
    long long rows, n;
    int threads, isa;
    if (!PyArg_ParseTuple(args, "KLLKii", &x, &rows, &n, &out, &threads, &isa))
        return NULL;
    Argmax a = {.x = (const float *)(uintptr_t)x, .out = (int64_t *)(uintptr_t)out, .n = n,
                .vector = isa != ISA_SCALAR && cpu_has_avx2()};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_parallel(argmax_items, &a, rows, n * (int64_t)sizeof(float), threads, ARGMAX_MIN_BYTES_PER_THREAD);
    Py_END_ALLOW_THREADS
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}
