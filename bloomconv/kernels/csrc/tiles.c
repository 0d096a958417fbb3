/* bf16 products on AMX tiles, for the batched decoding steps of the 4-bit (fourbit.c) and dense
 * (dense.c) kernels, where the caller chose bf16 products (x rounded to bf16, as in a bf16 prefill).
 *
 * out (M, N) = x (M, K) @ W (N, K)^T [* scale (N,)] for M <= TILE_X_ROWS * TILE_MAX_X: per 16 weight
 * rows, the kernel's decoder writes 16 rows by 32 columns of weights as bf16 (exact: weights stored
 * as bf16, int8 codes, 4-bit weights rounded to bf16) into one tile (A), which multiplies x's tiles
 * (B: per 32 columns, the 16 column pairs of 16 rows of x) into fp32 accumulator tiles (C: 16 weight
 * rows by 16 x rows) that stay in tile registers over the whole row. A tile product costs a
 * fraction of decoding the weights, against one fp32 multiply-add per weight and x row in the
 * vector kernels. Each (weight row, x row) sum depends only on those two rows, however the batch
 * and the weight rows are cut. */
#include "kernels.h"

#ifdef HAVE_AMX_KERNELS
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Tile registers: C, the sums of x rows 16g..16g+15, in g (0-3); A, the weights, 4; B, x, 5. */

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} __attribute__((packed)) TileConfig;

/* Linux hands out the tile registers' state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XTILEDATA), once per process; CPUID leaf 7 EDX bits 22 (AMX-BF16) and 24 (AMX-TILE). */
int cpu_has_amx_bf16(void)
{
    static int ready = -1;
    if (ready < 0) {
        unsigned int eax, ebx, ecx, edx;
        const int cpu = cpu_has_bf16_dot() && __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) &&
                        ((edx >> 22) & 1) && ((edx >> 24) & 1);
        ready = cpu && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    }
    return ready;
}

/* x (batch, K) rounded to bf16, as B tiles: per 32 columns and 16 rows of x, 16 tile rows holding
 * column pair p of those rows side by side (a transpose of the pairs); rows past the batch are 0. */
AMX_TARGET static void layout_x(const float *x, uint32_t *dst, int64_t batch, int64_t cols)
{
    const int64_t groups = (batch + TILE_X_ROWS - 1) / TILE_X_ROWS;
    for (int64_t c = 0; c < cols; c += TILE_COLS)
        for (int64_t g = 0; g < groups; g++) {
            uint32_t *tile = dst + ((c / TILE_COLS) * groups + g) * TILE_X_ROWS * TILE_X_ROWS;
            for (int m = 0; m < TILE_X_ROWS; m++) {
                const int64_t row = g * TILE_X_ROWS + m;
                uint32_t pairs[TILE_X_ROWS] __attribute__((aligned(64))) = {0};  /* bf16 column pairs */
                if (row < batch) {
                    const float *src = x + row * cols + c;
                    _mm512_store_si512(pairs, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16),
                                                                           _mm512_loadu_ps(src)));
                }
                for (int p = 0; p < TILE_X_ROWS; p++)
                    tile[p * TILE_X_ROWS + m] = pairs[p];
            }
        }
}

/* run_parallel's RangeFunction: weight rows [begin, end). */
AMX_TARGET static void multiply_rows(const void *job, int64_t begin, int64_t end)
{
    const TileJob *j = job;
    const int64_t K = j->cols, groups = (j->batch + TILE_X_ROWS - 1) / TILE_X_ROWS;
    TileConfig config = {.palette = 1};
    for (int i = 0; i <= 5; i++) {
        config.bytes_per_row[i] = 64;
        config.rows[i] = 16;
    }
    _tile_loadconfig(&config);
    uint16_t a[16][TILE_COLS] __attribute__((aligned(64)));
    float sums[16][TILE_X_ROWS] __attribute__((aligned(64)));
    for (int64_t r0 = begin; r0 < end; r0 += 16) {
        const int n = end - r0 < 16 ? (int)(end - r0) : 16;
        if (n < 16)
            memset(a, 0, sizeof a);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t c = 0; c < K; c += TILE_COLS) {
            j->decode(j->matrix, r0, n, c, a);
            _tile_loadd(4, a, 64);
            const uint32_t *x = j->x_tiles + (c / TILE_COLS) * groups * TILE_X_ROWS * TILE_X_ROWS;
            const int64_t tile = TILE_X_ROWS * TILE_X_ROWS;
            switch (groups) {  /* each x tile into its sums (the intrinsics take literal tile numbers) */
            case 4: _tile_loadd(5, x + 3 * tile, 64); _tile_dpbf16ps(3, 4, 5); /* fall through */
            case 3: _tile_loadd(5, x + 2 * tile, 64); _tile_dpbf16ps(2, 4, 5); /* fall through */
            case 2: _tile_loadd(5, x + tile, 64); _tile_dpbf16ps(1, 4, 5); /* fall through */
            default: _tile_loadd(5, x, 64); _tile_dpbf16ps(0, 4, 5);
            }
        }
        for (int64_t g = 0; g < groups; g++) {
            switch (g) {
            case 0: _tile_stored(0, sums, 64); break;
            case 1: _tile_stored(1, sums, 64); break;
            case 2: _tile_stored(2, sums, 64); break;
            default: _tile_stored(3, sums, 64); break;
            }
            const int rows = j->batch - g * TILE_X_ROWS < TILE_X_ROWS ? (int)(j->batch - g * TILE_X_ROWS) : TILE_X_ROWS;
            for (int m = 0; m < rows; m++)
                for (int i = 0; i < n; i++)
                    j->out[(g * TILE_X_ROWS + m) * j->rows + r0 + i] = j->scale ? sums[i][m] * j->scale[r0 + i]
                                                                                : sums[i][m];
        }
    }
    _tile_release();
}

int tiles_matmul(TileJob *job, const float *x, int threads, int64_t bytes_per_row, int64_t min_bytes_per_thread)
{
    const int64_t groups = (job->batch + TILE_X_ROWS - 1) / TILE_X_ROWS;
    uint32_t *x_tiles = malloc((size_t)(job->cols / TILE_COLS * groups) * TILE_X_ROWS * TILE_X_ROWS * sizeof(uint32_t));
    if (!x_tiles)
        return 1;
    layout_x(x, x_tiles, job->batch, job->cols);
    job->x_tiles = x_tiles;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_parallel(multiply_rows, job, job->rows, bytes_per_row, threads, min_bytes_per_thread);
    Py_END_ALLOW_THREADS
    free(x_tiles);
    return status;
}
#elif defined(HAVE_X86_KERNELS)
int cpu_has_amx_bf16(void) { return 0; }
#endif
