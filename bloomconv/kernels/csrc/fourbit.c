/* Fused dequantize-and-multiply for bitsandbytes' 4-bit (NF4/FP4) weights on CPU.
 *
 * out (M, N) = x (M, K) @ W (N, K)^T, where W is stored as bitsandbytes stores it: packed uint8
 * over the flattened row-major matrix (element 2i in the HIGH nibble), one absmax per block of
 * `block_size` consecutive elements (fp32, or uint8 codes of an 8-bit "nested" quantization).
 * Each weight is code[q] * absmax in fp32, optionally rounded to bf16/fp16 (the dtype the matrix
 * was quantized from), exactly what dequantize_4bit (bloomconv.storage) computes; only the order of
 * the fp32 sums differs from F.linear on the dequantized matrix.
 *
 * Three implementations, chosen at run time: AVX-512 for decoding steps (any batch the matmul
 * entry point is given; batch 1 of blocks of 32 through a loop of its own) and AVX2+FMA where the
 * CPU lacks it (both for rows of a multiple of 32 elements; compiled per function with a target
 * attribute, so the build needs no -march flag) and portable C (any shape). Weight rows
 * are shared out among `threads` threads (parallel.c). Two more entry points multiply otherwise,
 * where the caller asks: bf16 products on AMX tiles (tiles.c) and int8 activations (AVX512-VNNI;
 * not fp32 products, see its section).
 *
 * Called from Python with raw data pointers (bloomconv/kernels/fourbit.py validates every
 * argument) through the entry points at the end of this file, which module.c's table lists.
 */
#include "kernels.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { ROUND_NONE = 0, ROUND_BF16 = 1, ROUND_FP16 = 2 };
enum { AVX512_GROUP = 8 };      /* x rows the AVX-512 matvec multiplies per pass over a weight row */
enum { AVX512_ROWS = 16 };      /* weight rows it takes through each group of x rows in turn */
enum { AVX512_GROUP_BYTES = 32 * 1024 };  /* a slab of a group of x rows, in L1 */
enum { CHUNK = 32 };            /* elements decoded per AVX2 step: 16 packed bytes */
/* Decoding is compute-bound, so a second thread pays off from small matrices on. */
enum { MIN_BYTES_PER_THREAD = 64 * 1024 };
/* Software prefetch distance in packed bytes: rows are short (512 bytes for 1024 columns) and a
 * thread's rows are not all contiguous, so the hardware prefetcher alone kept a core well below
 * the memory's speed (as in dense.c). Prefetches never fault, even past the end. */
enum { PREFETCH_BYTES = 4096 };
enum { SLICE_FLOATS = 65536 };  /* AVX2 small batches: x floats (batch * columns) per pass, in L2 */
enum { ROW_BUFFER = 4096 };     /* small batches: decoded weights per pass, in L1 */

typedef struct {
    const uint8_t *packed;         /* ceil(N*K/2) bytes */
    const float *code;             /* 16 values */
    const float *absmax;           /* one per block; NULL when nested */
    const uint8_t *absmax_codes;   /* nested: one uint8 code per block */
    const float *nested_absmax;    /* nested: one per nested block */
    const float *nested_code;      /* nested: 256 values */
    float nested_offset;
    int nested_shift;              /* log2(nested block size) */
    int block_shift;               /* log2(block size) */
    int64_t rows, cols;            /* N, K */
    int rounding;
} Matrix;

typedef struct Task Task;
struct Task {
    void (*run)(const Task *);
    const Matrix *w;
    const float *x;                /* (M, K); AVX2: as layout_x arranges it */
    int64_t batch;                 /* M */
    const int64_t *row_ids;        /* dequantize: rows to write, in order */
    float *out;
    uint16_t *out_bf16;            /* dequantize to bf16 instead of out: weights rounded to bf16 only */
    int64_t begin, end;            /* matmul: weight rows; dequantize: positions in row_ids */
    const struct Int8Rows *x8;     /* int8 activations: x quantized (quantize_rows) */
};

/* The nested absmax is a multiply, then an add, each rounded: setup.py passes -ffp-contract=off so
 * gcc does not fuse them (clang fuses only within one expression). */
static inline float block_scale(const Matrix *w, int64_t block)
{
    if (w->absmax)
        return w->absmax[block];
    float scaled = w->nested_code[w->absmax_codes[block]] * w->nested_absmax[block >> w->nested_shift];
    return scaled + w->nested_offset;
}

/* ------------------------------------------------------------------------------ scalar path */

/* Round to the nearest bf16/fp16 value, ties to even, as torch's .to(dtype) does (finite input). */
static inline float round_weight(float v, int rounding)
{
    if (rounding == ROUND_BF16) {
        uint32_t b = float_to_bits(v);
        b += 0x7FFFu + ((b >> 16) & 1u);
        return bits_to_float(b & 0xFFFF0000u);
    }
    return rounding == ROUND_FP16 ? round_to_fp16(v) : v;
}

/* Weights of row elements [c0, c1) into dst: per block, its 16 possible weights are computed once
 * and each packed byte then gives two by lookup. Any row length: rows may start mid-byte. */
static void decode_weights(const Matrix *w, int64_t row, int64_t c0, int64_t c1, float *dst)
{
    const int64_t first = row * w->cols;
    float table[16];
    dst -= c0;
    for (int64_t c = c0; c < c1;) {
        const int64_t block = (first + c) >> w->block_shift;
        const int64_t block_end = ((block + 1) << w->block_shift) - first;
        const int64_t stop = block_end < c1 ? block_end : c1;
        const float scale = block_scale(w, block);
        for (int q = 0; q < 16; q++)
            table[q] = round_weight(w->code[q] * scale, w->rounding);
        if ((first + c) & 1) {  /* a low nibble first */
            dst[c] = table[w->packed[(first + c) >> 1] & 15];
            c++;
        }
        for (; c + 1 < stop; c += 2) {
            const uint8_t byte = w->packed[(first + c) >> 1];
            dst[c] = table[byte >> 4];
            dst[c + 1] = table[byte & 15];
        }
        if (c < stop) {         /* a high nibble last */
            dst[c] = table[w->packed[(first + c) >> 1] >> 4];
            c++;
        }
    }
}

/* Eight running sums, so the compiler can keep them in one vector register without reordering. */
static float dot(const float *a, const float *b, int64_t n)
{
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            acc[j] += a[i + j] * b[i + j];
    for (; i < n; i++)
        acc[0] += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* Each weight row is decoded once, ROW_BUFFER columns at a time, and used for every row of x. */
static void scalar_matmul(const Task *t)
{
    const Matrix *w = t->w;
    const int64_t K = w->cols, N = w->rows;
    float weights[ROW_BUFFER];
    for (int64_t r = t->begin; r < t->end; r++)
        for (int64_t k0 = 0; k0 < K; k0 += ROW_BUFFER) {
            const int64_t k1 = k0 + ROW_BUFFER < K ? k0 + ROW_BUFFER : K;
            decode_weights(w, r, k0, k1, weights);
            for (int64_t m = 0; m < t->batch; m++) {
                float *out = t->out + m * N + r;
                *out = (k0 == 0 ? 0.0f : *out) + dot(weights, t->x + m * K + k0, k1 - k0);
            }
        }
}

/* bf16 weights are the high halves of their fp32 values: dropping the low half is exact. */
static void store_bf16(const float *src, uint16_t *dst, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = (uint16_t)(float_to_bits(src[i]) >> 16);
}

static void scalar_dequantize(const Task *t)
{
    float row[ROW_BUFFER];
    const int64_t K = t->w->cols;
    for (int64_t i = t->begin; i < t->end; i++) {
        if (!t->out_bf16) {
            decode_weights(t->w, t->row_ids[i], 0, K, t->out + i * K);
            continue;
        }
        for (int64_t c = 0; c < K; c += ROW_BUFFER) {
            const int64_t n = K - c < ROW_BUFFER ? K - c : ROW_BUFFER;
            decode_weights(t->w, t->row_ids[i], c, c + n, row);
            store_bf16(row, t->out_bf16 + i * K + c, n);
        }
    }
}

/* -------------------------------------------------------------------------------- AVX2 path */
#ifdef HAVE_X86_KERNELS

/* The code table: as fp32 (for the bf16 tables) and as its 4 byte planes, each in both 128-bit
 * lanes (vpshufb tables). */
typedef struct { __m256 code_lo, code_hi; __m256i plane[4]; } CodeLut;

AVX2_TARGET static CodeLut make_lut(const float *code)
{
    uint8_t planes[4][16];
    for (int q = 0; q < 16; q++) {
        uint32_t b = float_to_bits(code[q]);
        for (int k = 0; k < 4; k++)
            planes[k][q] = (uint8_t)(b >> (8 * k));
    }
    CodeLut lut = {.code_lo = _mm256_loadu_ps(code), .code_hi = _mm256_loadu_ps(code + 8)};
    for (int k = 0; k < 4; k++)
        lut.plane[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)planes[k]));
    return lut;
}

/* What one block needs to turn codes into weights: its scale, or for weights rounded to bf16
 * the block's 16 possible weights round(code[q] * absmax) as 2 byte planes. The bf16 table costs
 * ~17 instructions per block and saves the multiply and the rounding (5 more) on every weight. */
typedef struct { __m256 scale; __m256i bf16_lo, bf16_hi; } BlockDecoder;

AVX2_TARGET static ALWAYS_INLINE void begin_block(const Matrix *w, const CodeLut *lut, int64_t block,
                                                  int rounding, BlockDecoder *d)
{
    const float scale = block_scale(w, block);
    if (rounding != ROUND_BF16) {
        d->scale = _mm256_set1_ps(scale);
        return;
    }
    const __m256 s = _mm256_set1_ps(scale);
    __m256i b0 = _mm256_castps_si256(_mm256_mul_ps(lut->code_lo, s));   /* codes 0..7 */
    __m256i b1 = _mm256_castps_si256(_mm256_mul_ps(lut->code_hi, s));   /* codes 8..15 */
    /* round to nearest even: the top 16 bits are then the bf16 pattern */
    const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7FFF);
    b0 = _mm256_add_epi32(b0, _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(b0, 16), one)));
    b1 = _mm256_add_epi32(b1, _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(b1, 16), one)));
    /* per lane, dwords: low bytes of codes 0-3 | high bytes of 0-3 | low of 8-11 | high of 8-11
     * (codes 4-7 and 12-15 in the high lane) */
    const __m256i bytes = _mm256_or_si256(
        _mm256_shuffle_epi8(b0, _mm256_setr_epi8(2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                                                 2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1)),
        _mm256_shuffle_epi8(b1, _mm256_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, 2, 6, 10, 14, 3, 7, 11, 15,
                                                 -1, -1, -1, -1, -1, -1, -1, -1, 2, 6, 10, 14, 3, 7, 11, 15)));
    d->bf16_lo = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 2, 6, 0, 4, 2, 6));
    d->bf16_hi = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(1, 5, 3, 7, 1, 5, 3, 7));
}

/* The 32 weights of 16 packed bytes, in 4 vectors. Vector j holds elements 8j..8j+7 in the lane
 * order 0,2,4,6,1,3,5,7: high nibbles (even elements) go through the low 128-bit lane and low
 * nibbles (odd elements) through the high one, so the vpshufb lookups and the byte/word
 * interleaves that assemble the floats all stay within lanes. The matmul lays x out to match;
 * dequantize undoes the order with one permute per vector.
 * fp32 weights: 4 byte-plane lookups, interleaved bytes to words to dwords, times the scale.
 * bf16 weights: 2 lookups in the block's table give 16-bit words, which become floats with a shift
 * or a mask; the bytes are first reordered so that this yields the same element order. */
AVX2_TARGET static ALWAYS_INLINE void decode32(const uint8_t *p, const CodeLut *lut, const BlockDecoder *d,
                                               int rounding, __m256 f[4])
{
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    if (rounding == ROUND_BF16)
        bytes = _mm_shuffle_epi8(bytes, _mm_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15));
    const __m256i idx = _mm256_and_si256(
        _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_srli_epi16(bytes, 4)), bytes, 1), _mm256_set1_epi8(15));
    if (rounding == ROUND_BF16) {
        const __m256i lo = _mm256_shuffle_epi8(d->bf16_lo, idx), hi = _mm256_shuffle_epi8(d->bf16_hi, idx);
        const __m256i w0 = _mm256_unpacklo_epi8(lo, hi), w1 = _mm256_unpackhi_epi8(lo, hi);
        const __m256i high_word = _mm256_set1_epi32((int)0xFFFF0000u);
        f[0] = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
        f[1] = _mm256_castsi256_ps(_mm256_and_si256(w0, high_word));
        f[2] = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
        f[3] = _mm256_castsi256_ps(_mm256_and_si256(w1, high_word));
        return;
    }
    const __m256i b0 = _mm256_shuffle_epi8(lut->plane[0], idx), b1 = _mm256_shuffle_epi8(lut->plane[1], idx);
    const __m256i b2 = _mm256_shuffle_epi8(lut->plane[2], idx), b3 = _mm256_shuffle_epi8(lut->plane[3], idx);
    const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
    f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
    f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
    f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
    f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
    for (int j = 0; j < 4; j++) {
        f[j] = _mm256_mul_ps(f[j], d->scale);
        if (rounding == ROUND_FP16)
            f[j] = _mm256_cvtph_ps(_mm256_cvtps_ph(f[j], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}

/* Weights of row elements [c0, c1) (multiples of 32) through `consume(f, c)` for each 32. */
#define FOR_EACH_CHUNK(w, lut, rounding, row, c0, c1, f, c, ...)                                   \
    do {                                                                                          \
        const int64_t first_ = (row) * (w)->cols, mask_ = ((int64_t)1 << (w)->block_shift) - 1;   \
        BlockDecoder d_ = {_mm256_setzero_ps(), _mm256_setzero_si256(), _mm256_setzero_si256()};  \
        for (int64_t c = (c0); c < (c1); c += CHUNK) {                                            \
            if (c == (c0) || ((first_ + c) & mask_) == 0)                                         \
                begin_block(w, lut, (first_ + c) >> (w)->block_shift, rounding, &d_);             \
            _mm_prefetch((const char *)(w)->packed + ((first_ + c) >> 1) + PREFETCH_BYTES, _MM_HINT_T0); \
            __m256 f[4];                                                                          \
            decode32((w)->packed + ((first_ + c) >> 1), lut, &d_, rounding, f);                   \
            __VA_ARGS__                                                                           \
        }                                                                                         \
    } while (0)

/* Each kernel is written once with `rounding` a parameter and compiled once per rounding mode. */
#define DISPATCH_ROUNDING(impl, t)                                                                \
    switch ((t)->w->rounding) {                                                                   \
    case ROUND_BF16: impl(t, ROUND_BF16); break;                                                  \
    case ROUND_FP16: impl(t, ROUND_FP16); break;                                                  \
    default: impl(t, ROUND_NONE); break;                                                          \
    }

/* Batch 1: four independent accumulators per row hide the FMA latency. */
AVX2_TARGET static ALWAYS_INLINE void matvec_impl(const Task *t, int rounding)
{
    const Matrix *w = t->w;
    const CodeLut lut = make_lut(w->code);
    for (int64_t r = t->begin; r < t->end; r++) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        FOR_EACH_CHUNK(w, &lut, rounding, r, 0, w->cols, f, c,
            for (int j = 0; j < 4; j++)
                acc[j] = _mm256_fmadd_ps(f[j], _mm256_loadu_ps(t->x + c + 8 * j), acc[j]);
        );
        t->out[r] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    }
}

AVX2_TARGET static void avx2_matvec(const Task *t) { DISPATCH_ROUNDING(matvec_impl, t) }

/* Rows of x in groups of X_GROUP, laid out for the small-batch kernel: group g holds, for each
 * 8 columns j, its rows' 8 values one after another (xg + (j * width + i) * 8 for row i of the
 * group, width = min(batch, X_GROUP)), columns in decode32's order. One group is then a single
 * sequential stream; rows K floats apart would share L1 sets whenever K*4 is a multiple of 4096. */
enum { X_GROUP = 4 };

static void layout_x(const float *x, float *dst, int64_t batch, int64_t cols)
{
    static const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    const int64_t width = batch < X_GROUP ? batch : X_GROUP;
    for (int64_t m = 0; m < batch; m++) {
        float *group = dst + (m / width) * width * cols;
        for (int64_t j = 0; j < cols / 8; j++)
            for (int k = 0; k < 8; k++)
                group[(j * width + m % width) * 8 + k] = x[m * cols + j * 8 + order[k]];
    }
}

/* sums[v][i] = dot(weights[v][0:n], row i of the x group) for v < vectors, i < rows (constants
 * once inlined). A 2x4 tile loads 6 vectors per 8 FMAs and keeps 8 independent sums in flight;
 * `weights` is in L1, the x group in L1/L2. */
AVX2_TARGET static ALWAYS_INLINE void dot_tile(const float *weights, const float *xg, int64_t n, int64_t width,
                                               int vectors, int rows, float sums[2][X_GROUP])
{
    __m256 acc[2][X_GROUP];
    for (int v = 0; v < vectors; v++)
        for (int i = 0; i < rows; i++)
            acc[v][i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n / 8; j++) {
        const float *p = xg + j * width * 8;
        for (int v = 0; v < vectors; v++) {
            const __m256 wv = _mm256_load_ps(weights + v * ROW_BUFFER + j * 8);
            for (int i = 0; i < rows; i++)
                acc[v][i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p + i * 8), acc[v][i]);
        }
    }
    for (int v = 0; v < vectors; v++)
        for (int i = 0; i < rows; i++)
            sums[v][i] = hsum8(acc[v][i]);
}

AVX2_TARGET static void dot_tiles(const float *weights, const float *xg, int64_t n, int64_t width,
                                  int vectors, int rows, float sums[2][X_GROUP])
{
#define DOT_TILE_ROWS(vectors)                                                                    \
    switch (rows) {                                                                               \
    case 4: dot_tile(weights, xg, n, width, vectors, 4, sums); break;                             \
    case 3: dot_tile(weights, xg, n, width, vectors, 3, sums); break;                             \
    case 2: dot_tile(weights, xg, n, width, vectors, 2, sums); break;                             \
    default: dot_tile(weights, xg, n, width, vectors, 1, sums); break;                            \
    }
    if (vectors == 2) {
        DOT_TILE_ROWS(2)
    } else {
        DOT_TILE_ROWS(1)
    }
#undef DOT_TILE_ROWS
}

/* Small batches: two weight rows at a time are decoded once per column slice into an L1 buffer
 * (exactly the weights dequantize writes) and multiplied there by every row of x. Slices keep
 * the x columns they touch (batch * slice floats) in L2 across all weight rows. */
AVX2_TARGET static ALWAYS_INLINE void matmul_impl(const Task *t, int rounding)
{
    const Matrix *w = t->w;
    const int64_t K = w->cols, N = w->rows, batch = t->batch;
    const int64_t width = batch < X_GROUP ? batch : X_GROUP;
    const CodeLut lut = make_lut(w->code);
    int64_t slice = (SLICE_FLOATS / batch) / CHUNK * CHUNK;
    slice = slice < CHUNK ? CHUNK : slice > ROW_BUFFER ? ROW_BUFFER : slice;
    float weights[2 * ROW_BUFFER] __attribute__((aligned(32)));
    float sums[2][X_GROUP];
    for (int64_t k0 = 0; k0 < K; k0 += slice) {
        const int64_t k1 = k0 + slice < K ? k0 + slice : K;
        for (int64_t r0 = t->begin; r0 < t->end; r0 += 2) {
            const int vectors = t->end - r0 < 2 ? 1 : 2;
            for (int v = 0; v < vectors; v++) {
                float *row = weights + v * ROW_BUFFER - k0;
                FOR_EACH_CHUNK(w, &lut, rounding, r0 + v, k0, k1, f, c,
                    for (int j = 0; j < 4; j++)
                        _mm256_store_ps(row + c + 8 * j, f[j]);
                );
            }
            for (int64_t m0 = 0; m0 < batch; m0 += width) {
                const int rows = batch - m0 < width ? (int)(batch - m0) : (int)width;
                dot_tiles(weights, t->x + m0 * K + k0 * width, k1 - k0, width, vectors, rows, sums);
                for (int v = 0; v < vectors; v++)
                    for (int i = 0; i < rows; i++) {
                        float *out = t->out + (m0 + i) * N + r0 + v;
                        *out = (k0 == 0 ? 0.0f : *out) + sums[v][i];
                    }
            }
        }
    }
}

AVX2_TARGET static void avx2_matmul(const Task *t) { DISPATCH_ROUNDING(matmul_impl, t) }

AVX2_TARGET static ALWAYS_INLINE void dequantize_impl(const Task *t, int rounding)
{
    const Matrix *w = t->w;
    const CodeLut lut = make_lut(w->code);
    const __m256i natural = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  /* undoes decode32's order */
    for (int64_t i = t->begin; i < t->end; i++) {
        if (t->out_bf16) {  /* the high halves, 8 at a time, packed in order */
            uint16_t *dst = t->out_bf16 + i * w->cols;
            FOR_EACH_CHUNK(w, &lut, rounding, t->row_ids[i], 0, w->cols, f, c,
                for (int j = 0; j < 4; j++) {
                    const __m256i high = _mm256_srli_epi32(_mm256_castps_si256(
                        _mm256_permutevar8x32_ps(f[j], natural)), 16);
                    _mm_storeu_si128((__m128i *)(dst + c + 8 * j),
                                     _mm_packus_epi32(_mm256_castsi256_si128(high),
                                                      _mm256_extracti128_si256(high, 1)));
                }
            );
            continue;
        }
        float *dst = t->out + i * w->cols;
        FOR_EACH_CHUNK(w, &lut, rounding, t->row_ids[i], 0, w->cols, f, c,
            for (int j = 0; j < 4; j++)
                _mm256_storeu_ps(dst + c + 8 * j, _mm256_permutevar8x32_ps(f[j], natural));
        );
    }
}

AVX2_TARGET static void avx2_dequantize(const Task *t) { DISPATCH_ROUNDING(dequantize_impl, t) }

/* ----------------------------------------------------------------------------- AVX-512 path
 *
 * Decoding steps (any batch, AVX512_GROUP rows of x per pass). A block's 16 possible weights
 * round(code[q] * absmax) fill exactly one 16-lane register, so a code becomes its weight with one
 * vpermps, which reads only the low 4 bits of each index: 16 packed bytes widened to 16 dwords
 * give the odd elements' weights as they are and the even elements' after a 4-bit shift. 32
 * weights thus cost a load-and-widen, a shift and two permutes, against ~14 instructions for 8
 * lanes in decode32; the table costs ~6 per block. x is laid out so each 32 columns hold their 16
 * even then 16 odd values (layout_x_even_odd), matching the two weight vectors. The weights are
 * bit for bit those of decode_weights; the fp32 sums differ from F.linear only in order.
 */
AVX512_TARGET static ALWAYS_INLINE __m512 block_table(const Matrix *w, __m512 code, int64_t block, int rounding)
{
    const __m512 table = _mm512_mul_ps(code, _mm512_set1_ps(block_scale(w, block)));
    if (rounding == ROUND_BF16) {  /* to nearest even, as round_weight */
        __m512i b = _mm512_castps_si512(table);
        b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                 _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
        return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32((int)0xFFFF0000u)));
    }
    if (rounding == ROUND_FP16)
        return _mm512_cvtph_ps(_mm512_cvtps_ph(table, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return table;
}

/* The 32 weights of 16 packed bytes through their block's table: the even elements (high nibbles)
 * and the odd ones (low nibbles), 16 each, as x is laid out (layout_x_even_odd). */
AVX512_TARGET static ALWAYS_INLINE void decode_chunk512(const uint8_t *packed, __m512 table, __m512 *even, __m512 *odd)
{
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)packed));
    *even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
    *odd = _mm512_permutexvar_ps(bytes, table);
}

static void layout_x_even_odd(const float *x, float *dst, int64_t batch, int64_t cols)
{
    for (int64_t m = 0; m < batch; m++)
        for (int64_t c = 0; c < cols; c += CHUNK)
            for (int i = 0; i < CHUNK / 2; i++) {
                dst[m * cols + c + i] = x[m * cols + c + 2 * i];
                dst[m * cols + c + CHUNK / 2 + i] = x[m * cols + c + 2 * i + 1];
            }
}

/* Weight row r times `batch` (a constant once inlined, at most AVX512_GROUP) rows of x from row
 * `first` on, over columns [c0, c1): two running sums per x row (even, odd elements), taken from
 * `saved` where c0 > 0 and left there where c1 < K, so that a row is summed in the same order
 * whatever the batch and however its columns are cut. */
AVX512_TARGET static ALWAYS_INLINE void matvec512_group(const Task *t, int64_t r, int64_t first, int64_t c0,
                                                        int64_t c1, __m512 *saved, int rounding, const int batch)
{
    const Matrix *w = t->w;
    const int64_t K = w->cols, N = w->rows, mask = ((int64_t)1 << w->block_shift) - 1;
    const __m512 code = _mm512_loadu_ps(w->code);
    const int64_t start = r * K;
    __m512 acc[AVX512_GROUP][2], table = _mm512_setzero_ps();
    for (int b = 0; b < batch; b++) {
        acc[b][0] = c0 ? saved[2 * b] : _mm512_setzero_ps();
        acc[b][1] = c0 ? saved[2 * b + 1] : _mm512_setzero_ps();
    }
    for (int64_t c = c0; c < c1; c += CHUNK) {
        const int64_t e = start + c;
        if (c == c0 || (e & mask) == 0)
            table = block_table(w, code, e >> w->block_shift, rounding);
        if (((e >> 1) & 63) == 0)  /* once per cache line; into L2, as dense.c explains */
            _mm_prefetch((const char *)w->packed + (e >> 1) + PREFETCH_BYTES, _MM_HINT_T1);
        __m512 even, odd;
        decode_chunk512(w->packed + (e >> 1), table, &even, &odd);
        for (int b = 0; b < batch; b++) {
            const float *x = t->x + (first + b) * K + c;
            acc[b][0] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x), acc[b][0]);
            acc[b][1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + CHUNK / 2), acc[b][1]);
        }
    }
    for (int b = 0; b < batch; b++) {
        if (c1 < K) {
            saved[2 * b] = acc[b][0];
            saved[2 * b + 1] = acc[b][1];
        } else {
            t->out[(first + b) * N + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]));
        }
    }
}

#define MATVEC512_GROUP(n, ...)                                                                   \
    switch (n) {                                                                                  \
    case 8: matvec512_group(__VA_ARGS__, 8); break;                                               \
    case 7: matvec512_group(__VA_ARGS__, 7); break;                                               \
    case 6: matvec512_group(__VA_ARGS__, 6); break;                                               \
    case 5: matvec512_group(__VA_ARGS__, 5); break;                                               \
    case 4: matvec512_group(__VA_ARGS__, 4); break;                                               \
    case 3: matvec512_group(__VA_ARGS__, 3); break;                                               \
    case 2: matvec512_group(__VA_ARGS__, 2); break;                                               \
    default: matvec512_group(__VA_ARGS__, 1); break;                                              \
    }

/* One row of x against weight rows [begin, end) whose blocks are single chunks (blocks of 32): each
 * chunk starts a block, so a row is walked with pointers, with no test for a new block, a new slab
 * or a new cache line (prefetched once per 4 chunks, 64 bytes). matvec512_group spends as many
 * instructions on that bookkeeping as on decoding, and at batch 1 instructions are what the time
 * goes by. The weights, and the sums in their order, are matvec512_group's with one row of x. */
AVX512_TARGET static ALWAYS_INLINE void matvec512_single_blocks(const Task *t, int rounding)
{
    const Matrix *w = t->w;
    const int64_t K = w->cols, blocks = K / CHUNK;
    const __m512 code = _mm512_loadu_ps(w->code);
    for (int64_t r = t->begin; r < t->end; r++) {
        const uint8_t *p = w->packed + (r * K >> 1);
        const float *x = t->x;
        int64_t block = r * blocks;
        __m512 even_sum = _mm512_setzero_ps(), odd_sum = _mm512_setzero_ps();
#define SINGLE_BLOCK_CHUNK(j)                                                                     \
        {                                                                                         \
            const __m512 table = block_table(w, code, block + (j), rounding);                      \
            __m512 even, odd;                                                                     \
            decode_chunk512(p + 16 * (j), table, &even, &odd);                                    \
            even_sum = _mm512_fmadd_ps(even, _mm512_loadu_ps(x + CHUNK * (j)), even_sum);          \
            odd_sum = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + CHUNK * (j) + CHUNK / 2), odd_sum); \
        }
        const uint8_t *end4 = p + (blocks & ~(int64_t)3) * (CHUNK / 2);
        for (; p < end4; p += 4 * (CHUNK / 2), x += 4 * CHUNK, block += 4) {
            _mm_prefetch((const char *)p + PREFETCH_BYTES, _MM_HINT_T1);
            SINGLE_BLOCK_CHUNK(0) SINGLE_BLOCK_CHUNK(1) SINGLE_BLOCK_CHUNK(2) SINGLE_BLOCK_CHUNK(3)
        }
        for (int64_t j = 0; j < (blocks & 3); j++)
            SINGLE_BLOCK_CHUNK(j)
#undef SINGLE_BLOCK_CHUNK
        t->out[r] = _mm512_reduce_add_ps(_mm512_add_ps(even_sum, odd_sum));
    }
}

/* AVX512_ROWS weight rows at a time against every x row, AVX512_GROUP x rows per pass, over slabs
 * of columns: a group's slab of x (AVX512_GROUP_BYTES at most: 8 rows of 1024 columns) stays in L1
 * over those weight rows, whose running sums wait in `saved` (L1 too) for the next slab, and their
 * packed bytes stay in L1/L2 from one group to the next, so a batch reads the matrix from memory
 * once. */
AVX512_TARGET static ALWAYS_INLINE void matvec512_impl(const Task *t, int rounding)
{
    if (t->batch == 1 && t->w->block_shift == 5) {
        matvec512_single_blocks(t, rounding);
        return;
    }
    __m512 saved[AVX512_ROWS][2 * AVX512_GROUP];
    const int64_t K = t->w->cols;
    for (int64_t r0 = t->begin; r0 < t->end; r0 += AVX512_ROWS) {
        const int64_t r1 = t->end - r0 < AVX512_ROWS ? t->end : r0 + AVX512_ROWS;
        for (int64_t first = 0; first < t->batch; first += AVX512_GROUP) {
            const int64_t n = t->batch - first < AVX512_GROUP ? t->batch - first : AVX512_GROUP;
            const int64_t slab = AVX512_GROUP_BYTES / ((int64_t)sizeof(float) * n) / CHUNK * CHUNK;
            for (int64_t c0 = 0; c0 < K; c0 += slab) {
                const int64_t c1 = K - c0 < slab ? K : c0 + slab;
                for (int64_t r = r0; r < r1; r++)
                    MATVEC512_GROUP(n, t, r, first, c0, c1, saved[r - r0], rounding)
            }
        }
    }
}

AVX512_TARGET static void avx512_matvec(const Task *t) { DISPATCH_ROUNDING(matvec512_impl, t) }

/* Dequantizing weights rounded to bf16 to bf16 (a prefill's tiles for torch's bf16 GEMM): each 32
 * weights as matvec512_group decodes them, then the high halves of the even and the odd elements'
 * floats (exact) merged pairwise into dwords, which is element order. */
AVX512_TARGET static void avx512_dequantize_bf16(const Task *t)
{
    const Matrix *w = t->w;
    const int64_t K = w->cols, mask = ((int64_t)1 << w->block_shift) - 1;
    const __m512 code = _mm512_loadu_ps(w->code);
    const __m512i high_word = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t i = t->begin; i < t->end; i++) {
        const int64_t start = t->row_ids[i] * K;
        uint16_t *dst = t->out_bf16 + i * K;
        __m512 table = _mm512_setzero_ps();
        for (int64_t c = 0; c < K; c += CHUNK) {
            const int64_t e = start + c;
            if (c == 0 || (e & mask) == 0)
                table = block_table(w, code, e >> w->block_shift, ROUND_BF16);
            __m512 even, odd;
            decode_chunk512(w->packed + (e >> 1), table, &even, &odd);
            /* (even >> 16) | (odd & 0xFFFF0000): element 2j in the low word, 2j + 1 in the high one */
            const __m512i pairs = _mm512_ternarylogic_epi32(_mm512_srli_epi32(_mm512_castps_si512(even), 16),
                                                            _mm512_castps_si512(odd), high_word, 0xF8);
            _mm512_storeu_si512(dst + c, pairs);
        }
    }
}

/* ------------------------------------------------------------ int8 activations (AVX512-VNNI)
 *
 * Decoding steps of a few rows, as llama.cpp multiplies its 4-bit formats: x is rounded to int8 per
 * chunk of 32 columns (scale = the chunk's absmax / 127, as llama.cpp's Q8_0), the code table to
 * int8 (code[q] * 127 / max|code|), and 64 products at a time are summed exactly in int32 by
 * vpdpbusd; each chunk's int32 sum then times its weight block's absmax and its x scale, in fp32.
 * So the products are not fp32's: each weight is an int8 step of its code away from code * absmax
 * (before the bf16 rounding of the weights) and each x value up to half a step of its chunk's
 * scale. Weight blocks of 32 only (the preset's), rows of a multiple of 128 elements.
 *
 * vpdpbusd multiplies unsigned by signed bytes: the codes go in as code + 128 (unsigned), and each
 * sum starts from -128 * (the sum of its x bytes), precomputed once per call. 64 packed bytes are
 * 128 weights of 4 chunks: their high nibbles (even elements) and low nibbles (odd) through one
 * vpshufb each, so lane L of both products sums elements of chunk L / 4; x is laid out to match
 * (per 128 columns: 64 even values, then 64 odd). A row's sum order is fixed by its columns only.
 */
enum { X8_GROUP = 128, X8_CHUNK = 32, X8_PIECE = 16 };  /* columns per step; per scale; chunk scales at once */

typedef struct Int8Rows {
    int8_t *q;            /* (batch, cols): per X8_GROUP columns, the even then the odd elements */
    int32_t *start;       /* (batch, cols / X8_GROUP, 16): -128 * each lane's x bytes */
    float *scale;         /* (batch, cols / X8_CHUNK): chunk absmax / 127 * max|code| / 127 */
    uint8_t lut[16];      /* code[q] as int8, + 128 */
} Int8Rows;

/* n values of x rounded to int8 into q, as llama.cpp's Q8_0 rounds them, with one scale: their
 * absmax / 127 (0 for zeros; NaN when any value is NaN or inf, so that a product with them is NaN
 * as in fp32), returned. */
static inline float quantize_chunk_int8(const float *v, int n, int8_t *q)
{
    float amax = 0.0f;
    int finite = 1;
    for (int i = 0; i < n; i++) {
        const float a = v[i] < 0.0f ? -v[i] : v[i];
        amax = a > amax ? a : amax;
        finite &= (float_to_bits(v[i]) & 0x7F800000u) != 0x7F800000u;
    }
    const float inverse = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int i = 0; i < n; i++)
        q[i] = (int8_t)lrintf(v[i] * inverse);
    return finite ? amax / 127.0f : bits_to_float(0x7FC00000u);
}

/* x rows into `x8`'s arrays (allocated by the caller for batch rows of cols). */
static void quantize_rows(const float *x, int64_t batch, int64_t cols, const float *code, Int8Rows *x8)
{
    float code_max = 0.0f;
    for (int q = 0; q < 16; q++)
        code_max = fabsf(code[q]) > code_max ? fabsf(code[q]) : code_max;
    for (int q = 0; q < 16; q++)
        x8->lut[q] = (uint8_t)(128 + (int)lrintf(code_max > 0.0f ? code[q] * 127.0f / code_max : 0.0f));
    for (int64_t m = 0; m < batch; m++)
        for (int64_t c = 0; c < cols; c += X8_CHUNK) {
            int8_t chunk[X8_CHUNK];
            x8->scale[(m * cols + c) / X8_CHUNK] = quantize_chunk_int8(x + m * cols + c, X8_CHUNK, chunk)
                                                   * (code_max / 127.0f);
            const int64_t group = c / X8_GROUP, within = c % X8_GROUP;  /* chunk within / 32 of its group */
            int8_t *even = x8->q + m * cols + group * X8_GROUP + within / 2, *odd = even + X8_GROUP / 2;
            int32_t *start = x8->start + (m * (cols / X8_GROUP) + group) * 16 + within / 8;
            for (int i = 0; i < X8_CHUNK / 2; i++) {
                even[i] = chunk[2 * i];
                odd[i] = chunk[2 * i + 1];
            }
            for (int lane = 0; lane < 4; lane++) {
                int32_t sum = 0;
                for (int i = 0; i < 4; i++)
                    sum += even[4 * lane + i] + odd[4 * lane + i];
                start[lane] = -128 * sum;
            }
        }
}

/* The absmax of blocks [block, block + count) (count <= 16), as block_scale decodes them. */
VNNI_TARGET static ALWAYS_INLINE __m512 block_scales16(const Matrix *w, int64_t block, __mmask16 mask)
{
    if (w->absmax)
        return _mm512_maskz_loadu_ps(mask, w->absmax + block);
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, w->absmax_codes + block));
    const __m512 decoded = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, codes, w->nested_code, 4);
    __m512 nested;
    const int64_t last = block + 15;
    if ((block >> w->nested_shift) == (last >> w->nested_shift))
        nested = _mm512_set1_ps(w->nested_absmax[block >> w->nested_shift]);
    else {
        const __m512i ids = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)block),
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)), w->nested_shift);
        nested = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, ids, w->nested_absmax, 4);
    }
    return _mm512_add_ps(_mm512_mul_ps(decoded, nested), _mm512_set1_ps(w->nested_offset));
}

VNNI_TARGET static void vnni_matvec(const Task *t)
{
    const Matrix *w = t->w;
    const Int8Rows *x8 = t->x8;
    const int64_t K = w->cols, N = w->rows, chunks = K / X8_CHUNK, groups = K / X8_GROUP;
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)x8->lut));
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512i spread[4];  /* chunk scale of each lane, for the 4 groups of a piece */
    for (int g = 0; g < 4; g++)
        spread[g] = _mm512_setr_epi32(4 * g, 4 * g, 4 * g, 4 * g, 4 * g + 1, 4 * g + 1, 4 * g + 1, 4 * g + 1,
                                      4 * g + 2, 4 * g + 2, 4 * g + 2, 4 * g + 2, 4 * g + 3, 4 * g + 3, 4 * g + 3, 4 * g + 3);
    for (int64_t r = t->begin; r < t->end; r++) {
        const uint8_t *row = w->packed + (r * K >> 1);
        for (int64_t m = 0; m < t->batch; m++) {
            const int8_t *q = x8->q + m * K;
            const int32_t *start = x8->start + m * groups * 16;
            const float *xs = x8->scale + m * chunks;
            __m512 sum[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t j0 = 0; j0 < chunks; j0 += X8_PIECE) {
                const int n = chunks - j0 < X8_PIECE ? (int)(chunks - j0) : X8_PIECE;
                const __mmask16 mask = (__mmask16)((1u << n) - 1);
                const __m512 scales = _mm512_mul_ps(block_scales16(w, r * chunks + j0, mask),
                                                    _mm512_maskz_loadu_ps(mask, xs + j0));
                for (int g = 0; g < n / 4; g++) {
                    const int64_t e = j0 * X8_CHUNK + (int64_t)g * X8_GROUP;
                    const uint8_t *p = row + (e >> 1);
                    _mm_prefetch((const char *)p + PREFETCH_BYTES, _MM_HINT_T1);
                    const __m512i bytes = _mm512_loadu_si512(p);
                    const __m512i even = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4));
                    const __m512i odd = _mm512_shuffle_epi8(lut, _mm512_and_si512(bytes, low4));
                    __m512i acc = _mm512_loadu_si512(start + (e / X8_GROUP) * 16);
                    acc = _mm512_dpbusd_epi32(acc, even, _mm512_loadu_si512(q + e));
                    acc = _mm512_dpbusd_epi32(acc, odd, _mm512_loadu_si512(q + e + X8_GROUP / 2));
                    sum[g & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_permutexvar_ps(spread[g], scales),
                                                 sum[g & 1]);
                }
            }
            t->out[m * N + r] = _mm512_reduce_add_ps(_mm512_add_ps(sum[0], sum[1]));
        }
    }
}
#endif

#ifdef HAVE_AMX_KERNELS
/* tiles.c's decoder: weight rows as matvec512_group decodes them, even elements first (x is laid
 * out to match), as bf16 (exact: the weights were rounded to bf16). */
AMX_TARGET static void decode_tile(const void *matrix, int64_t row, int rows, int64_t col, uint16_t (*dst)[TILE_COLS])
{
    const Matrix *w = matrix;
    const __m512 code = _mm512_loadu_ps(w->code);
    for (int i = 0; i < rows; i++) {
        const int64_t e = (row + i) * w->cols + col;
        const __m512 table = block_table(w, code, e >> w->block_shift, ROUND_BF16);
        _mm_prefetch((const char *)w->packed + (e >> 1) + PREFETCH_BYTES, _MM_HINT_T1);
        __m512 even, odd;
        decode_chunk512(w->packed + (e >> 1), table, &even, &odd);
        _mm512_store_si512(dst[i], (__m512i)_mm512_cvtne2ps_pbh(odd, even));
    }
}
#endif

/* ------------------------------------------------------------------------------- quantize */

/* bitsandbytes' CPU `quantize_4bit`, bit for bit (_quantize_4bit_chunk in bloomconv.storage is the
 * reference): per block absmax; scaled = x * (1 / max(absmax, 1e-38)), or x / absmax for the
 * tensor's last, partial block; clamped to [-1, 1]; sorted position = how many of the 15 midpoints
 * of the sorted code are < scaled (torch.bucketize, ties low); code = order[position]. Non-finite
 * input gives a non-finite absmax, which the caller refuses, so the codes of such a block do not
 * matter. Elements 2i go to the high nibble; an odd count is padded with the code of 0.0. Blocks
 * are shared out among threads (block sizes are even, so no two blocks share a byte); with no
 * `packed` output only the absmax are computed (a pass that needs every absmax before any code). */
typedef struct {
    const void *x;                 /* n elements, fp32 or bf16 */
    int bf16;
    int64_t n, block_size;         /* a partial last block is the tensor's tail */
    const float *bounds;           /* 15 midpoints */
    const uint8_t *order;          /* 16 sorted position -> code, NULL when the code is sorted */
    float *absmax;                 /* ceil(n / block_size) */
    uint8_t *packed;               /* ceil(n / 2), or NULL: absmax only */
} Quantize;

/* Quantizing streams the input once at a few GB/s per core. */
enum { QUANTIZE_MIN_BYTES_PER_THREAD = 256 * 1024 };

static inline float load_element(const Quantize *q, int64_t i)
{
    return q->bf16 ? bf16_to_float(((const uint16_t *)q->x)[i]) : ((const float *)q->x)[i];
}

static inline uint8_t code_of(const Quantize *q, float scaled)
{
    scaled = scaled < -1.0f ? -1.0f : scaled > 1.0f ? 1.0f : scaled;
    int position = 0;
    for (int b = 0; b < 15; b++)
        position += scaled > q->bounds[b];
    return q->order ? q->order[position] : (uint8_t)position;
}

static inline void put_code(uint8_t *packed, int64_t i, uint8_t code)
{
    if (i & 1)
        packed[i >> 1] |= code;
    else
        packed[i >> 1] = (uint8_t)(code << 4);
}

/* One block, elements [begin, end); a partial block (the tensor's tail) divides, as bitsandbytes,
 * and pads an odd count with the code of 0.0. */
static void scalar_quantize_block(const Quantize *q, int64_t block, int64_t begin, int64_t end)
{
    int divide = end - begin < q->block_size;
    float absmax = 0.0f;
    int non_finite = 0;
    for (int64_t i = begin; i < end; i++) {
        float a = fabsf(load_element(q, i));
        non_finite |= !(a <= 3.4028234663852886e38f);
        absmax = a > absmax ? a : absmax;
    }
    if (non_finite) {
        q->absmax[block] = NAN;
        return;
    }
    float clamped = absmax < 1e-38f ? 1e-38f : absmax;
    q->absmax[block] = divide ? clamped : absmax;
    if (!q->packed)
        return;
    float reciprocal = 1.0f / clamped;
    for (int64_t i = begin; i < end; i++) {
        float v = load_element(q, i);
        put_code(q->packed, i, code_of(q, divide ? v / clamped : v * reciprocal));
    }
    if (end == q->n && (q->n & 1))
        put_code(q->packed, q->n, code_of(q, 0.0f));
}

static void scalar_quantize(const void *job, int64_t b0, int64_t b1)
{
    const Quantize *q = job;
    for (int64_t b = b0; b < b1; b++) {
        int64_t begin = b * q->block_size, end = begin + q->block_size < q->n ? begin + q->block_size : q->n;
        scalar_quantize_block(q, b, begin, end);
    }
}

#ifdef HAVE_X86_KERNELS
AVX2_TARGET static inline __m256 load8(const Quantize *q, int64_t i)
{
    return q->bf16 ? load_bf16x8((const uint16_t *)q->x + i) : _mm256_loadu_ps((const float *)q->x + i);
}

/* Whole blocks (a multiple of 8 elements) 8 lanes at a time: the 15 comparisons as mask sums, the
 * order as two in-lane permutes, two codes to a byte in 64-bit lanes. */
AVX2_TARGET static void avx2_quantize(const void *job, int64_t b0, int64_t b1)
{
    const Quantize *q = job;
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f);
    const __m256 largest = _mm256_set1_ps(3.4028234663852886e38f);
    __m256 bounds[15];
    for (int b = 0; b < 15; b++)
        bounds[b] = _mm256_set1_ps(q->bounds[b]);
    int32_t order[16];
    for (int k = 0; k < 16; k++)
        order[k] = q->order ? q->order[k] : k;
    const __m256i order_lo = _mm256_loadu_si256((const __m256i *)order);
    const __m256i order_hi = _mm256_loadu_si256((const __m256i *)(order + 8));
    const __m256i seven = _mm256_set1_epi32(7);
    /* byte 0 of each 64-bit lane (c[2k] << 4 | c[2k+1]) to bytes 0-1 of each 128-bit lane */
    const __m256i gather = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                            0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const int64_t whole = q->n / q->block_size;
    for (int64_t block = b0; block < b1; block++) {
        int64_t begin = block * q->block_size, end = begin + q->block_size;
        if (block >= whole) {  /* the tensor's partial tail */
            scalar_quantize_block(q, block, begin, q->n);
            continue;
        }
        __m256 max = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int64_t i = begin; i < end; i += 8) {
            __m256 a = _mm256_andnot_ps(sign, load8(q, i));
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, largest, _CMP_NLE_UQ));  /* inf or NaN */
            max = _mm256_max_ps(max, a);
        }
        if (_mm256_movemask_ps(bad)) {
            q->absmax[block] = NAN;
            continue;
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps(max, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float absmax = _mm_cvtss_f32(m4);
        q->absmax[block] = absmax;
        if (!q->packed)
            continue;
        const __m256 reciprocal = _mm256_set1_ps(1.0f / (absmax < 1e-38f ? 1e-38f : absmax));
        for (int64_t i = begin; i < end; i += 8) {
            __m256 scaled = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(load8(q, i), reciprocal), minus_one), one);
            __m256i position = _mm256_setzero_si256();
            for (int b = 0; b < 15; b++)  /* a true comparison is -1 */
                position = _mm256_sub_epi32(position, _mm256_castps_si256(_mm256_cmp_ps(scaled, bounds[b], _CMP_GT_OQ)));
            const __m256i code = _mm256_blendv_epi8(_mm256_permutevar8x32_epi32(order_lo, position),
                                                    _mm256_permutevar8x32_epi32(order_hi, position),
                                                    _mm256_cmpgt_epi32(position, seven));
            const __m256i pairs = _mm256_or_si256(_mm256_slli_epi64(code, 4), _mm256_srli_epi64(code, 32));
            const __m256i bytes = _mm256_shuffle_epi8(pairs, gather);
            const uint32_t four = (uint32_t)_mm256_extract_epi16(bytes, 0) | (uint32_t)_mm256_extract_epi16(bytes, 8) << 16;
            memcpy(q->packed + (i >> 1), &four, 4);
        }
    }
}

AVX512_TARGET static inline __m512 load16(const Quantize *q, int64_t i)
{
    if (!q->bf16)
        return _mm512_loadu_ps((const float *)q->x + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)q->x + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Whole blocks (a multiple of 16 elements) 16 lanes at a time: the sorted position by a binary
 * search over the 15 midpoints held in one register (4 permutes and compares: the count of
 * midpoints below, as the 15 comparisons count it, since the midpoints are sorted), the order by
 * one more permute, two codes to a byte in 64-bit lanes and 8 bytes out with vpmovqb. */
AVX512_TARGET static void avx512_quantize(const void *job, int64_t b0, int64_t b1)
{
    const Quantize *q = job;
    const __m512 one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
    const __m512 largest = _mm512_set1_ps(3.4028234663852886e38f);
    float midpoints[16];
    memcpy(midpoints, q->bounds, 15 * sizeof(float));
    midpoints[15] = INFINITY;  /* never looked up: the search reads indices 0-14 */
    const __m512 table = _mm512_loadu_ps(midpoints);
    int32_t order[16];
    for (int k = 0; k < 16; k++)
        order[k] = q->order ? q->order[k] : k;
    const __m512i order_table = _mm512_loadu_si512(order);
    const int64_t whole = q->n / q->block_size;
    for (int64_t block = b0; block < b1; block++) {
        int64_t begin = block * q->block_size, end = begin + q->block_size;
        if (block >= whole) {
            scalar_quantize_block(q, block, begin, q->n);
            continue;
        }
        __m512 max = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (int64_t i = begin; i < end; i += 16) {
            const __m512 a = _mm512_abs_ps(load16(q, i));
            bad |= _mm512_cmp_ps_mask(a, largest, _CMP_NLE_UQ);  /* inf or NaN */
            max = _mm512_max_ps(max, a);
        }
        if (bad) {
            q->absmax[block] = NAN;
            continue;
        }
        const float absmax = _mm512_reduce_max_ps(max);
        q->absmax[block] = absmax;
        if (!q->packed)
            continue;
        const __m512 reciprocal = _mm512_set1_ps(1.0f / (absmax < 1e-38f ? 1e-38f : absmax));
        for (int64_t i = begin; i < end; i += 16) {
            const __m512 scaled = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(load16(q, i), reciprocal), minus_one), one);
            __m512i position = _mm512_setzero_si512();
            for (int step = 8; step; step >>= 1) {
                const __m512i probe = _mm512_add_epi32(position, _mm512_set1_epi32(step - 1));
                const __mmask16 above = _mm512_cmp_ps_mask(scaled, _mm512_permutexvar_ps(probe, table), _CMP_GT_OQ);
                position = _mm512_mask_add_epi32(position, above, position, _mm512_set1_epi32(step));
            }
            const __m512i code = _mm512_permutexvar_epi32(position, order_table);
            const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(code, 4), _mm512_srli_epi64(code, 32));
            _mm_storel_epi64((__m128i *)(q->packed + (i >> 1)), _mm512_cvtepi64_epi8(pairs));
        }
    }
}
#endif

/* ------------------------------------------------------------------------------- threading */

/* run_parallel's RangeFunction for a Task: the task over rows (or row ids) [begin, end). */
static void run_task(const void *job, int64_t begin, int64_t end)
{
    Task part = *(const Task *)job;
    part.begin = begin;
    part.end = end;
    part.run(&part);
}

/* ------------------------------------------------------------------------------ Python glue */

static int ilog2(int64_t v)
{
    int s = 0;
    while (((int64_t)1 << s) < v)
        s++;
    return s;
}

/* The matrix arguments shared by matmul and dequantize, in this order:
 * packed, rows, cols, block_size, code, absmax, absmax_codes, nested_absmax, nested_code,
 * nested_offset, nested_block_size, rounding. Pointers are ints (0 for "none"). */
#define MATRIX_FORMAT "KLLLKKKKKdLi"

#ifdef HAVE_X86_KERNELS
static int use_avx2(int isa, const Matrix *w)
{
    if (isa == ISA_SCALAR)
        return 0;
    return cpu_has_avx2() && w->cols % CHUNK == 0 && ((int64_t)1 << w->block_shift) % CHUNK == 0;
}

/* Where AVX-512 is asked for (or left to choose) but the job is one it does not take, the AVX2
 * code runs: dequantizing. */
static int use_avx512(int isa, const Matrix *w)
{
    return (isa == ISA_AUTO || isa == ISA_AVX512) && cpu_has_avx512() && use_avx2(isa, w);
}
#endif

static Matrix make_matrix(unsigned long long packed, long long rows, long long cols, long long block_size,
                          unsigned long long code, unsigned long long absmax, unsigned long long absmax_codes,
                          unsigned long long nested_absmax, unsigned long long nested_code,
                          double nested_offset, long long nested_block_size, int rounding)
{
    Matrix w = {
        .packed = (const uint8_t *)(uintptr_t)packed,
        .code = (const float *)(uintptr_t)code,
        .absmax = (const float *)(uintptr_t)absmax,
        .absmax_codes = (const uint8_t *)(uintptr_t)absmax_codes,
        .nested_absmax = (const float *)(uintptr_t)nested_absmax,
        .nested_code = (const float *)(uintptr_t)nested_code,
        .nested_offset = (float)nested_offset,
        .nested_shift = ilog2(nested_block_size),
        .block_shift = ilog2(block_size),
        .rows = rows,
        .cols = cols,
        .rounding = rounding,
    };
    return w;
}

/* The arguments matmul and dequantize share: (address, count, out, threads, isa, *matrix), then for
 * dequantize (`to_bf16` not NULL) whether `out` is bf16. 0 when they do not parse (the Python error
 * is set). */
static int parse_call(PyObject *args, unsigned long long *first, long long *count, unsigned long long *out,
                      int *threads, int *isa, Matrix *w, int *to_bf16)
{
    unsigned long long packed, code, absmax, absmax_codes, nested_absmax, nested_code;
    long long rows, cols, block_size, nested_block_size;
    int rounding, bf16 = 0;
    double nested_offset;
    if (!PyArg_ParseTuple(args, "KLKii" MATRIX_FORMAT "|p", first, count, out, threads, isa, &packed, &rows, &cols,
                          &block_size, &code, &absmax, &absmax_codes, &nested_absmax, &nested_code,
                          &nested_offset, &nested_block_size, &rounding, &bf16))
        return 0;
    if (bf16 && !to_bf16) {
        PyErr_SetString(PyExc_TypeError, "the product's output is always fp32");
        return 0;
    }
    if (to_bf16)
        *to_bf16 = bf16;
    *w = make_matrix(packed, rows, cols, block_size, code, absmax, absmax_codes, nested_absmax, nested_code,
                     nested_offset, nested_block_size, rounding);
    return 1;
}

static PyObject *tiles_matmul_call(unsigned long long x, long long batch, unsigned long long out, int threads, Matrix w);
static PyObject *int8_matmul_call(unsigned long long x, long long batch, unsigned long long out, int threads, Matrix w);

enum { PRODUCTS_FP32, PRODUCTS_BF16_TILES, PRODUCTS_INT8 };

/* fourbit_matmul, fourbit_matmul_bf16_tiles and fourbit_matmul_int8_activations (`products`). */
static PyObject *matmul_call(PyObject *args, int products)
{
    unsigned long long x, out;
    long long batch;
    int threads, isa;
    Matrix w;
    if (!parse_call(args, &x, &batch, &out, &threads, &isa, &w, NULL))
        return NULL;
    if (products == PRODUCTS_BF16_TILES)
        return tiles_matmul_call(x, batch, out, threads, w);
    if (products == PRODUCTS_INT8)
        return int8_matmul_call(x, batch, out, threads, w);
    const int64_t rows = w.rows, cols = w.cols;
    Task task = {.w = &w, .x = (const float *)(uintptr_t)x, .batch = batch, .out = (float *)(uintptr_t)out};
    float *laid_out = NULL;
    task.run = scalar_matmul;
#ifdef HAVE_X86_KERNELS
    void (*layout)(const float *, float *, int64_t, int64_t) = NULL;
    int64_t laid_out_rows = batch;
    if (use_avx512(isa, &w)) {
        layout = layout_x_even_odd;
        task.run = avx512_matvec;
    } else if (use_avx2(isa, &w)) {
        layout = layout_x;
        laid_out_rows = (batch + X_GROUP - 1) / X_GROUP * X_GROUP;  /* whole groups: the last may be partial */
        task.run = batch == 1 ? avx2_matvec : avx2_matmul;
    }
    if (layout) {
        laid_out = malloc((size_t)(laid_out_rows * cols) * sizeof(float));
        if (!laid_out)
            return PyErr_NoMemory();
        layout(task.x, laid_out, batch, cols);
        task.x = laid_out;
    }
#endif
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_parallel(run_task, &task, rows, (cols + 1) / 2 * batch, threads, MIN_BYTES_PER_THREAD);  /* work ~ packed bytes x batch */
    Py_END_ALLOW_THREADS
    free(laid_out);
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyObject *fourbit_matmul(PyObject *self, PyObject *args) { return matmul_call(args, PRODUCTS_FP32); }

PyObject *fourbit_matmul_bf16_tiles(PyObject *self, PyObject *args) { return matmul_call(args, PRODUCTS_BF16_TILES); }

PyObject *fourbit_matmul_int8_activations(PyObject *self, PyObject *args) { return matmul_call(args, PRODUCTS_INT8); }

static PyObject *int8_matmul_call(unsigned long long x, long long batch, unsigned long long out, int threads, Matrix w)
{
#ifdef HAVE_X86_KERNELS
    if (!cpu_has_avx512_vnni() || w.block_shift != 5 || w.cols % X8_GROUP != 0 || batch < 1) {
        PyErr_SetString(PyExc_ValueError, "int8 activations take 4-bit weights in blocks of 32, rows of a multiple "
                                          "of 128 elements, on a CPU with AVX512-VNNI");
        return NULL;
    }
    /* one allocation: x's bytes (a multiple of 128 per row), then the lanes' starts, then the scales */
    const int64_t cols = w.cols, bytes = batch * cols, lanes = batch * (cols / X8_GROUP) * 16;
    int8_t *memory = malloc((size_t)bytes + (size_t)lanes * sizeof(int32_t)
                            + (size_t)(batch * (cols / X8_CHUNK)) * sizeof(float));
    if (!memory)
        return PyErr_NoMemory();
    Int8Rows x8 = {.q = memory, .start = (int32_t *)(memory + bytes)};
    x8.scale = (float *)(x8.start + lanes);
    quantize_rows((const float *)(uintptr_t)x, batch, cols, w.code, &x8);
    Task task = {.run = vnni_matvec, .w = &w, .batch = batch, .out = (float *)(uintptr_t)out, .x8 = &x8};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_parallel(run_task, &task, w.rows, (cols + 1) / 2 * batch, threads, MIN_BYTES_PER_THREAD);
    Py_END_ALLOW_THREADS
    free(memory);
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)x; (void)out; (void)batch; (void)threads; (void)w;
    PyErr_SetString(PyExc_ValueError, "this build has no x86 kernels");
    return NULL;
#endif
}

static PyObject *tiles_matmul_call(unsigned long long x, long long batch, unsigned long long out, int threads, Matrix w)
{
#ifdef HAVE_AMX_KERNELS
    if (!cpu_has_amx_bf16() || w.rounding != ROUND_BF16 || w.cols % TILE_COLS != 0 || batch < 1 ||
        batch > TILE_X_ROWS * TILE_MAX_X) {
        PyErr_SetString(PyExc_ValueError, "AMX tiles take 1-64 rows of x and 4-bit weights rounded to bf16 in rows "
                                          "of a multiple of 32, on a CPU with AMX-BF16");
        return NULL;
    }
    float *even_odd = malloc((size_t)(batch * w.cols) * sizeof(float));
    if (!even_odd)
        return PyErr_NoMemory();
    layout_x_even_odd((const float *)(uintptr_t)x, even_odd, batch, w.cols);
    TileJob job = {.decode = decode_tile, .matrix = &w, .batch = batch, .rows = w.rows, .cols = w.cols,
                   .out = (float *)(uintptr_t)out};
    const int status = tiles_matmul(&job, even_odd, threads, (w.cols + 1) / 2, MIN_BYTES_PER_THREAD);
    free(even_odd);
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)x; (void)out; (void)batch; (void)threads; (void)w;
    PyErr_SetString(PyExc_ValueError, "this build has no AMX kernels");
    return NULL;
#endif
}

PyObject *fourbit_dequantize(PyObject *self, PyObject *args)
{
    unsigned long long row_ids, out;
    long long count;
    int threads, isa, to_bf16;
    Matrix w;
    if (!parse_call(args, &row_ids, &count, &out, &threads, &isa, &w, &to_bf16))
        return NULL;
    if (to_bf16 && w.rounding != ROUND_BF16) {
        PyErr_SetString(PyExc_ValueError, "only weights rounded to bf16 dequantize to bf16");
        return NULL;
    }
    const int64_t cols = w.cols;
    Task task = {.run = scalar_dequantize, .w = &w, .row_ids = (const int64_t *)(uintptr_t)row_ids,
                 .out = to_bf16 ? NULL : (float *)(uintptr_t)out,
                 .out_bf16 = to_bf16 ? (uint16_t *)(uintptr_t)out : NULL};
#ifdef HAVE_X86_KERNELS
    if (to_bf16 && use_avx512(isa, &w))
        task.run = avx512_dequantize_bf16;
    else if (use_avx2(isa, &w))
        task.run = avx2_dequantize;
#endif
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_parallel(run_task, &task, count, cols * (to_bf16 ? 2 : 4), threads, MIN_BYTES_PER_THREAD);
    Py_END_ALLOW_THREADS
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyObject *fourbit_quantize(PyObject *self, PyObject *args)
{
    unsigned long long x, bounds, order, absmax, packed;
    long long n, block_size;
    int bf16, threads, isa;
    if (!PyArg_ParseTuple(args, "KiLLKKKKii", &x, &bf16, &n, &block_size, &bounds, &order,
                          &absmax, &packed, &threads, &isa))
        return NULL;
    Quantize q = {.x = (const void *)(uintptr_t)x, .bf16 = bf16, .n = n, .block_size = block_size,
                  .bounds = (const float *)(uintptr_t)bounds,
                  .order = (const uint8_t *)(uintptr_t)order, .absmax = (float *)(uintptr_t)absmax,
                  .packed = (uint8_t *)(uintptr_t)packed};
    RangeFunction run = scalar_quantize;
#ifdef HAVE_X86_KERNELS
    if ((isa == ISA_AUTO || isa == ISA_AVX512) && cpu_has_avx512() && block_size % 16 == 0)
        run = avx512_quantize;
    else if (isa != ISA_SCALAR && cpu_has_avx2() && block_size % 8 == 0)
        run = avx2_quantize;
#endif
    const int64_t blocks = (n + block_size - 1) / block_size;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_parallel(run, &q, blocks, block_size * (bf16 ? 2 : 4), threads, QUANTIZE_MIN_BYTES_PER_THREAD);
    Py_END_ALLOW_THREADS
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}
