/* The bf16 matrix-vector product of dense.c as a building block for a caller's own OpenMP region (step.c runs a
 * whole decode step in one region). dense.c's comment explains the arithmetic; its exported lh_bf16_gemv /
 * lh_bf16_gemv_many are this loop inside one `omp parallel` each. */
#ifndef LLAMAHERD_NATIVE_DENSE_H
#define LLAMAHERD_NATIVE_DENSE_H

#include <stdint.h>

#define LH_BF16_MAX_M 16 /* rows of X per call; dense.py's MAX_ROWS */

/* Inside a parallel region, every thread: Y (M, N) rows ldy apart, float32 (y_bf16 = 0) or bf16, = X (M, K) bf16
 * rows ldx apart times W (N, K) bf16 rows ldw apart, transposed; an `omp for nowait`: the caller puts the barrier
 * after its last weight. */
void lh_bf16_gemv_in_region(const uint16_t *X, int64_t ldx, int64_t M, const uint16_t *W, int64_t ldw, int64_t N,
                            int64_t K, void *Y, int64_t ldy, int y_bf16);

#endif
