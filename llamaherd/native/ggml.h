/* The float-activation matrix-vector kernel of ggml.c as a building block for a caller's own OpenMP region
 * (step.c): inside a parallel region every thread calls it; Y (M, N) = X (M, K) . W^T for one packed weight of
 * ggml `type` (rows `stride` bytes apart), each kernel's rows an orphaned `omp for nowait` (the caller puts the
 * barrier after its last weight). M <= 64. */
#ifndef LLAMAHERD_NATIVE_GGML_H
#define LLAMAHERD_NATIVE_GGML_H

#include <stdint.h>

int lh_supported(int type);
void lh_gemv_in_region(int type, const uint8_t *W, int64_t N, int64_t stride, int64_t K, const float *X, int64_t M,
                       float *Y);

#endif
