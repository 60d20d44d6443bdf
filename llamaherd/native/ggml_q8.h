/* The int8-activation matrix-vector kernels of ggml_q8.c as building blocks for a caller's own OpenMP region
 * (step.c runs a whole decode step in one region): the quantized activation rows and the two worksharing
 * loops. ggml_q8.c's comment explains the arithmetic; its exported lh_q8_gemv / lh_q8_gemv_many are these
 * pieces inside one `omp parallel` each. */
#ifndef LLAMAHERD_NATIVE_GGML_Q8_H
#define LLAMAHERD_NATIVE_GGML_Q8_H

#include <stdint.h>

#define LH_Q8_MAX_ROWS 64 /* rows of X per call, as lh_gemv */

/* One row of X: int8 codes, and per 32-element block the scale d, the code sum s and d*s; per 16 elements the
 * scale and code sum again (Q6_K's sub-blocks are 16 long). Arrays are padded with zeros to a multiple of 16
 * blocks so that the 32-block kernels, which take blocks 16 at a time, may read a whole group. The K-quants'
 * rows (FLAVOUR_K: the same Q8_0 codes and scales, K a multiple of 256) also keep, for their one-row kernels, the codes in Q4_K's nibble order (`qk4`: per 128 elements 0-31, 64-95,
 * 32-63, 96-127) and the code sums as int16 per 16 (`b16`) and per 32 (`b32`). */
typedef struct {
    int8_t *q, *qk4;
    float *d, *s, *ds, *d16, *s16;
    int16_t *b16, *b32;
} qrow;

enum { FLAVOUR_Q8_0 = 0, FLAVOUR_K = 1 };

typedef struct {
    int64_t nbp; /* padded block count */
    void *mem;   /* one allocation for every row: free(a.mem) */
    qrow rows[2][LH_Q8_MAX_ROWS]; /* [FLAVOUR_Q8_0 / FLAVOUR_K][row of X] */
} qact;

/* Which activation rows weights of ggml `type` multiply: FLAVOUR_Q8_0 (Q4_0, Q5_0, Q8_0) or FLAVOUR_K (K-quants). */
int lh_q8_flavour(int type);
int lh_q8_supported(int type);
/* Room for M rows of K values in both flavours; 0, or -1 without memory. */
int lh_q8_alloc(qact *a, int64_t K, int64_t M);
/* Inside a parallel region, every thread: quantize X (M, K) into the flavours with need[flavour] set (an
 * `omp for` with its closing barrier). */
void lh_q8_quantize_in_region(qact *a, const float *X, int64_t K, int64_t M, const int need[2]);
/* Inside a parallel region, every thread: Y (M, N) = X . W^T for one packed weight (N rows `stride` bytes apart)
 * against the quantized X; an `omp for nowait`: the caller puts the barrier after its last weight. */
void lh_q8_weight(int type, const uint8_t *W, int64_t N, int64_t stride, int64_t K, const qact *a, int64_t M,
                  float *Y);

#endif
